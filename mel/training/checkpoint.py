"""Checkpoints are directories: `config.json` + `model.safetensors` (never pickles).

    save_pretrained_dir(module, config, "out/")    # config: a dataclass
    module = load_pretrained_dir(MyModule, MyConfig, "out/")

Resumable training state (optimizer moments, scheduler, step, RNG) goes to `trainer_state/`
as safetensors + JSON too.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"  # training state: optimizer moments
STATE_FILE = "state.json"                 # training state: step, scheduler, run facts


def _atomic_dir(path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


# every file a checkpoint or a training state directory holds; nothing else in such a folder is ours
WRITTEN_FILES = (CONFIG_FILE, WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE)


def check_checkpoint_target(path: str | Path) -> Path:
    """Refuse, before any training time is spent, a checkpoint path that is an existing file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is an existing file; checkpoints are directories (config.json + "
                              f"model.safetensors): pick another --out")
    return path


def _publish(tmp: Path, path: Path) -> None:
    """Swap the freshly written `tmp` in for `path` in one rename. Whatever else an existing folder
    holds (a model card, the user's own files) is carried over: only our files are replaced."""
    try:
        check_checkpoint_target(path)
    except CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.is_dir():
        for entry in path.iterdir():
            if not (tmp / entry.name).exists():
                os.replace(entry, tmp / entry.name)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def remove_written(path: str | Path) -> None:
    """Delete the files this module wrote into `path` (and `path` itself once empty), nothing else."""
    path = Path(path)
    if not path.is_dir():
        return
    for name in WRITTEN_FILES:
        (path / name).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        pass  # it holds something of the user's: leave it


def save_pretrained_dir(module: torch.nn.Module, config, path: str | Path, extra: dict | None = None) -> Path:
    """Write config (a dataclass, plus `extra` facts like the dev score) and weights atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_dir(path)
    payload = {"model_type": type(module).__name__, "config": dataclasses.asdict(config), **(extra or {})}
    (tmp / CONFIG_FILE).write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE))
    _publish(tmp, path)
    return path


def load_config(path: str | Path) -> dict:
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.exists():
        raise CheckpointError(f"{path} is not a checkpoint directory: {CONFIG_FILE} is missing")
    try:
        payload = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc})") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("config", {}), dict):
        raise CheckpointError(f"{file} is not a checkpoint config: expected an object with a 'config' object")
    return payload


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint directory, read with safetensors only (nothing is ever unpickled)."""
    file = Path(path) / WEIGHTS_FILE
    if not file.exists():
        pickles = sorted(p.name for p in Path(path).glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        hint = (f"; {', '.join(pickles)} is a pickle, which is never loaded (it can run code): convert it to "
                f"safetensors where it was made" if pickles else "")
        raise CheckpointError(f"{Path(path)} has no {WEIGHTS_FILE}{hint}")
    try:
        return load_file(str(file))
    except Exception as exc:  # SafetensorError, OSError: a damaged file or a pickle renamed to .safetensors
        raise CheckpointError(f"{file} is not a readable safetensors file ({type(exc).__name__}: {exc}); checkpoints "
                              f"are read as safetensors only, never unpickled") from exc


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
    state = load_state(path)
    expected = module.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        raise CheckpointError(f"{path} does not match {module_cls.__name__}({config}): " + "; ".join(problems[:5]))
    module.load_state_dict(state)
    return module, payload


def save_training_state(path: str | Path, optimizer: torch.optim.Optimizer, scheduler, info: dict) -> None:
    """Optimizer moments as safetensors, the rest (step, epoch, scheduler, RNG seed) as JSON."""
    path = Path(path)
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
    state = {"param_groups": opt["param_groups"], "scalars": scalars,
             "scheduler": scheduler.state_dict() if scheduler is not None else None, **info}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, default=str))
    _publish(tmp, path)


def load_training_state(path: str | Path, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise CheckpointError(f"{path} holds no training state to resume from")
    try:
        state = json.loads((path / STATE_FILE).read_text())
        tensors = load_file(str(path / OPTIMIZER_FILE))
    except Exception as exc:  # damaged JSON or safetensors (never a pickle: nothing else is read)
        raise CheckpointError(f"the training state in {path} cannot be read ({type(exc).__name__}: {exc}); "
                              f"start without resuming or restore it") from exc
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
