"""Checkpoints are directories: `config.json` + `model.safetensors` (never pickles).

    save_pretrained_dir(module, config, "out/")    # config: a dataclass
    module = load_pretrained_dir(MyModule, MyConfig, "out/")

Resumable training state goes to one directory (`OUT.trainer_state/`), as safetensors + JSON too:
the resumable weights (`model.safetensors` + `config.json`), the optimizer moments and `state.json`
(step, scheduler, run facts, and which save the published checkpoint OUT holds).

Crash safety. Every directory is published the same way: its files are written into
`.NAME.tmp-PID`, fsynced, and the folder renamed to `.NAME.new-PID` (now a complete copy); the
user's own entries in NAME are moved into it, NAME is renamed to `.NAME.old-PID`, `.new` to NAME,
the parent fsynced, `.old` deleted. A trainer publishes the state directory FIRST (weights,
optimizer and step together: one rename, so they can never disagree), then OUT. On the next start
`recover_leftovers` finishes or undoes a cut-short publication (a `.new` copy is put in place, an
`.old` one comes back when NAME is missing, a `.tmp` is deleted after handing back the user's
entries; the only copy of a model is never deleted) and the trainer, on `--resume`, re-publishes
OUT from the state when OUT is not the save the state says it holds. A run killed at any instant
therefore resumes from the last complete state and ends with the weights of an uninterrupted run.
Removing the state after a finished run deletes `state.json` first: a half-removed state is no
state.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..cli_kit import check_output_dir
from ..errors import CheckpointError, InputError
from ..paths import fsync_path

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"  # training state: optimizer moments
STATE_FILE = "state.json"                 # training state: step, scheduler, run facts

# every file a checkpoint or a training state directory holds; nothing else in such a folder is ours
WRITTEN_FILES = (CONFIG_FILE, WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE)
LEFTOVER_KINDS = ("tmp", "new", "old")  # .NAME.KIND-PID: being written / complete, not yet in place / replaced


def _leftover(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def find_leftovers(path: str | Path) -> dict[str, list[Path]]:
    """The `.NAME.tmp-PID`, `.NAME.new-PID` and `.NAME.old-PID` folders that cut-short saves of `path`
    left, newest first."""
    path = Path(path)
    found: dict[str, list[Path]] = {kind: [] for kind in LEFTOVER_KINDS}
    if not path.parent.is_dir():
        return found
    pattern = re.compile(rf"\.{re.escape(path.name)}\.({'|'.join(LEFTOVER_KINDS)})-\d+")
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            found[match[1]].append(entry)
    for entries in found.values():
        entries.sort(key=lambda e: e.stat().st_mtime, reverse=True)
    return found


def recover_leftovers(path: str | Path) -> list[str]:
    """Finish or undo a save of `path` that a kill cut short; what was done, one line each.

    A complete `.new` copy is put in place (as the save would have); an `.old` copy comes back when
    `path` is missing (the only copy is never deleted) and is deleted once `path` exists; a
    half-written `.tmp` folder is deleted after the user's entries in it (moved there by older
    versions) are handed back to `path`. An existing FILE at `path` is left alone with its leftovers."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return []
    done = []
    found = find_leftovers(path)
    for new in reversed(found["new"]):  # oldest first: the newest complete copy ends up in place
        _swap_in(new, path)
        done.append(f"put the complete copy {new.name} in place of {path.name}")
    for old in found["old"]:
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"deleted {old.name}, a replaced copy of {path.name}")
        else:
            os.replace(old, path)
            fsync_path(path.parent)
            done.append(f"brought {path.name} back from {old.name}")
    for tmp in found["tmp"]:
        theirs = [e for e in tmp.iterdir() if e.name not in WRITTEN_FILES]
        if theirs:
            path.mkdir(parents=True, exist_ok=True)
            for entry in theirs:
                if not (path / entry.name).exists():
                    os.replace(entry, path / entry.name)
            fsync_path(path)
            done.append(f"moved {', '.join(sorted(e.name for e in theirs))} back from {tmp.name} into {path.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        done.append(f"deleted {tmp.name}, an unfinished save of {path.name}")
    return done


def recover_training_dirs(out: str | Path, state_dir: str | Path) -> list[str]:
    """At a trainer's start: `recover_leftovers` for the checkpoint and its state directory, and the
    files of a state whose removal was cut short (optimizer moments but no state.json, or an empty
    folder) deleted."""
    done = recover_leftovers(out) + recover_leftovers(state_dir)
    state_dir = Path(state_dir)
    if state_dir.is_dir() and not (state_dir / STATE_FILE).exists() and (
            (state_dir / OPTIMIZER_FILE).exists() or not any(state_dir.iterdir())):
        remove_written(state_dir)
        done.append(f"deleted what was left of {state_dir.name}, a training state already being removed")
    return done


def _atomic_dir(path: Path) -> Path:
    """A fresh `.NAME.tmp-PID` folder to write a save of `path` into (after tidying what earlier saves left)."""
    recover_leftovers(path)
    tmp = _leftover(path, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def check_checkpoint_target(path: str | Path) -> Path:
    """Refuse, before any training time is spent, a checkpoint path that is an existing file or that
    cannot be written: its folder must be (or become, created now) a writable directory, since a save
    renames folders in it, and an existing checkpoint directory must be writable too."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is an existing file; checkpoints are directories (config.json + "
                              f"model.safetensors): pick another --out")
    try:
        check_output_dir(path.parent)
    except InputError as exc:
        raise CheckpointError(f"cannot save a checkpoint at {path}: {exc}") from exc
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot save a checkpoint at {path}: the folder is not writable; pick a writable path")
    return path


def _publish(tmp: Path, path: Path) -> None:
    """Put the freshly written `tmp` in place of `path`: fsync it, rename it to `.NAME.new-PID` (a
    complete copy from then on), then swap it in. Whatever else an existing folder holds (a model
    card, the user's own files) is carried over: only our files are replaced."""
    try:
        check_checkpoint_target(path)
    except CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for entry in tmp.iterdir():
        fsync_path(entry)
    fsync_path(tmp)
    new = _leftover(path, "new")
    os.replace(tmp, new)
    fsync_path(path.parent)
    _swap_in(new, path)


def _swap_in(new: Path, path: Path) -> None:
    """Replace `path` by the complete copy `new` (carrying the user's entries over) with renames only."""
    if path.is_dir():
        for entry in path.iterdir():
            if not (new / entry.name).exists():
                os.replace(entry, new / entry.name)
    old = _leftover(path, "old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)  # `path` exists: an .old of ours is no one's only copy
        os.replace(path, old)
    os.replace(new, path)
    fsync_path(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def remove_written(path: str | Path) -> None:
    """Delete the files this module wrote into `path` (and `path` itself once empty), nothing else.
    `state.json` goes first: a removal cut short leaves no training state, only files the next save replaces."""
    path = Path(path)
    if not path.is_dir():
        return
    for name in sorted(WRITTEN_FILES, key=lambda n: n != STATE_FILE):
        (path / name).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        pass  # it holds something of the user's: leave it


def _write_module(folder: Path, module: torch.nn.Module, config, extra: dict | None) -> None:
    payload = {"model_type": type(module).__name__, "config": dataclasses.asdict(config), **(extra or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))


def save_pretrained_dir(module: torch.nn.Module, config, path: str | Path, extra: dict | None = None) -> Path:
    """Write config (a dataclass, plus `extra` facts like the dev score) and weights atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_dir(path)
    _write_module(tmp, module, config, extra)
    _publish(tmp, path)
    return path


def load_config(path: str | Path) -> dict:
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.exists():
        raise CheckpointError(f"{path} is not a checkpoint directory: {CONFIG_FILE} is missing; point at a checkpoint "
                              f"directory ({CONFIG_FILE} + {WEIGHTS_FILE}), or write one by training (`python -m mel "
                              f"train dim ... --out DIR` for a DIM head)")
    try:
        payload = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc})") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("config", {}), dict):
        raise CheckpointError(f"{file} is not a checkpoint config: expected an object with a 'config' object")
    return payload


def update_config(path: str | Path, key: str, value) -> None:
    """Add a fact (a dev score, a fit report) to a checkpoint's config.json: a new file renamed over the
    old one, so a kill leaves the old or the new config, never a truncated one."""
    file = Path(path) / CONFIG_FILE
    payload = load_config(path)
    payload[key] = value
    part = _leftover(file, "tmp")
    part.write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    fsync_path(part)
    os.replace(part, file)
    fsync_path(file.parent)


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint directory, read with safetensors only (nothing is ever unpickled)."""
    file = Path(path) / WEIGHTS_FILE
    if not file.exists():
        pickles = sorted(p.name for p in Path(path).glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        hint = (f"; {', '.join(pickles)} is a pickle, which is never loaded (it can run code): convert it to "
                f"safetensors where it was made" if pickles else "")
        raise CheckpointError(f"{Path(path)} has no {WEIGHTS_FILE}{hint}; point at a checkpoint directory "
                              f"({CONFIG_FILE} + {WEIGHTS_FILE}), or write one by training (`python -m mel train dim "
                              f"... --out DIR` for a DIM head)")
    try:
        return load_file(str(file))
    except Exception as exc:  # SafetensorError, OSError: a damaged file or a pickle renamed to .safetensors
        raise CheckpointError(f"{file} is not a readable safetensors file ({type(exc).__name__}: {exc}); checkpoints "
                              f"are read as safetensors only, never unpickled") from exc


def _load_weights(module: torch.nn.Module, path: str | Path, described: str) -> None:
    """Load `path`'s weights into `module`; a missing, unexpected or reshaped tensor is a CheckpointError."""
    state = load_state(path)
    expected = module.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        raise CheckpointError(f"{path} does not match {described}: " + "; ".join(problems[:5]))
    module.load_state_dict(state)


def load_pretrained_dir(module_cls, config_cls, path: str | Path, **overrides):
    """Rebuild `module_cls(config)` from a directory; a config/weights mismatch is a CheckpointError."""
    payload = load_config(path)
    if payload.get("model_type") not in (None, module_cls.__name__):
        raise CheckpointError(f"{path} holds a {payload.get('model_type')}, not a {module_cls.__name__}")
    fields = {f.name for f in dataclasses.fields(config_cls)}
    raw = {**payload.get("config", {}), **overrides}
    unknown = set(raw) - fields
    if unknown:
        raise CheckpointError(f"{path}/config.json has fields {sorted(unknown)} that {config_cls.__name__} does not know")
    try:
        config = config_cls(**raw)
        module = module_cls(config)
    except (TypeError, ValueError) as exc:  # a required field missing, a value of the wrong kind (InputError too)
        raise CheckpointError(f"{path}/config.json does not fit {config_cls.__name__}: {exc}") from exc
    _load_weights(module, path, f"{module_cls.__name__}({config})")
    return module, payload


def save_training_state(path: str | Path, optimizer: torch.optim.Optimizer, scheduler, info: dict,
                        module: torch.nn.Module | None = None, config=None, extra: dict | None = None) -> None:
    """Optimizer moments as safetensors, the rest (step, epoch, scheduler, RNG seed) as JSON, and the
    resumable weights of `module` (config.json with `config` and `extra`, model.safetensors): one
    directory published by one rename, so a resume never pairs weights and optimizer of different steps."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_dir(path)
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in opt["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{key}"] = value
    save_file(tensors, str(tmp / OPTIMIZER_FILE))
    if module is not None:
        _write_module(tmp, module, config, extra)
    state = {"param_groups": opt["param_groups"], "scalars": scalars,
             "scheduler": scheduler.state_dict() if scheduler is not None else None, **info}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, default=str))
    _publish(tmp, path)


def read_training_state(path: str | Path) -> dict:
    """`state.json` of a training state directory (step, run facts); a CheckpointError when there is none."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise CheckpointError(f"{path} holds no training state to resume from")
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"the training state in {path} cannot be read ({type(exc).__name__}: {exc}); "
                              f"start without resuming or restore it") from exc


def load_training_state(path: str | Path, optimizer: torch.optim.Optimizer, scheduler,
                        module: torch.nn.Module | None = None) -> dict:
    """Restore the optimizer, the scheduler and (given `module`) the resumable weights; returns state.json."""
    path = Path(path)
    state = read_training_state(path)
    try:
        tensors = load_file(str(path / OPTIMIZER_FILE))
    except Exception as exc:  # damaged safetensors (never a pickle: nothing else is read)
        raise CheckpointError(f"the training state in {path} cannot be read ({type(exc).__name__}: {exc}); "
                              f"start without resuming or restore it") from exc
    if module is not None:
        if not (path / WEIGHTS_FILE).exists():
            raise CheckpointError(f"the training state in {path} holds no {WEIGHTS_FILE} (it was saved by an older "
                                  f"version, which kept the weights apart); start without resuming")
        _load_weights(module, path, f"the model being trained ({type(module).__name__})")
    per_param: dict[int, dict] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        per_param.setdefault(int(pid), {})[key] = value
    for name, value in state["scalars"].items():
        pid, key = name.split(".", 1)
        per_param.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state
