"""Checkpoints survive a kill at any instant: training killed (SIGKILL, in a forked child) at each step of
a checkpoint save, then resumed, ends with exactly the weights of an uninterrupted run; the user's files
in OUT survive; nothing is left behind (no `.OUT.tmp/new/old-PID` folder, no half-removed state).

The kill points are every file write, directory creation, rename, deletion and directory removal the
run makes under its output folder, counted in the child by wrapping `os.replace` & co. A kill just
before an fsync leaves the disk as a kill just after the step before it, which is covered; that each
save fsyncs its files before the rename that publishes them is checked on its own below.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import signal
import traceback

import pytest
import torch
from conftest import HashingTextEncoder, wait_for_child
from safetensors.torch import load_file

from mel.errors import CheckpointError
from mel.kb import build_kb
from mel.presets import Preset

HIDDEN_LEFTOVER = (".tmp-", ".new-", ".old-")
forks = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill tests fork a child and SIGKILL it")
pytestmark = pytest.mark.forks  # `make test` runs this module in a pytest process of its own


# -- killing a run at its k-th filesystem step --------------------------------------------------------
def _arm(k: int, root: pathlib.Path, log: pathlib.Path) -> None:
    """In the child: SIGKILL the process just before its k-th filesystem step under `root`."""
    import mel.training.checkpoint as checkpoint
    seen = [0]

    def inside(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(str(root))

    def wrap(owner, name, counts):
        original = getattr(owner, name)

        def step(*args, **kwargs):
            if counts(*args):
                seen[0] += 1
                if seen[0] == k:
                    with open(log, "w") as fh:  # builtin open, outside root: not a step itself
                        fh.write(name + repr(tuple(os.path.relpath(a, root) for a in args[:2] if inside(a))))
                    os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        setattr(owner, name, step)

    wrap(os, "replace", lambda src, *_: inside(src))
    wrap(os, "rename", lambda src, *_: inside(src))
    wrap(os, "mkdir", lambda path, *_: inside(path) and not os.path.exists(path))
    wrap(os, "unlink", lambda path, *_: inside(path) and os.path.lexists(path))  # rmtree's own: relative, not counted
    wrap(os, "rmdir", lambda path, *_: inside(path) and os.path.exists(path))
    wrap(shutil, "rmtree", lambda path, *_: inside(path) and os.path.exists(path))
    wrap(pathlib.Path, "write_text", lambda path, *_: inside(path))
    wrap(checkpoint, "save_file", lambda _tensors, path, *_: inside(path))


def _run_killed_at(k: int, root: pathlib.Path, fn) -> str | None:
    """fn() in a forked child killed at its k-th step under `root`: the step it died at, or None when
    fn() finished first."""
    log = root.with_name(root.name + ".killed-at")
    log.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            _arm(k, root, log)
            fn()
            code = 0
        except BaseException:
            log.write_text(traceback.format_exc())
        finally:
            os._exit(code)
    status = wait_for_child(pid)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return log.read_text()
    assert os.WEXITSTATUS(status) == 0, f"the run to be killed at step {k} failed on its own:\n{log.read_text()}"
    return None


def _leftovers(root: pathlib.Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()
                  if p.name.startswith(".") and any(h in p.name for h in HIDDEN_LEFTOVER))


def _visible(folder: pathlib.Path, name: str) -> list[pathlib.Path]:
    """The files called `name` in `folder` or its subfolders, hidden folders left out."""
    return [p for p in folder.rglob(name) if not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def _sweep(tmp_path, start, resume, final_weights, keeps_state=False, max_points: int = 200) -> list[str]:
    """Kill a fresh run at step 1, 2, ... until one finishes; after each kill, resume and compare with
    the uninterrupted run. Returns what went wrong, one line per kill point."""
    reference = tmp_path / "reference"
    reference.mkdir()
    start(reference)
    expected = final_weights(reference)
    problems = []
    for k in range(1, max_points):
        root = tmp_path / f"kill{k}"
        root.mkdir()
        (root / "out").mkdir()
        (root / "out" / "notes.md").write_text("the user's notes")
        point = _run_killed_at(k, root, functools.partial(start, root))
        if point is None:
            break
        try:
            resumed = resume(root)
            got = final_weights(root) if (root / "out" / "model.safetensors").exists() else None
            if not resumed and got is None:  # killed before any state was saved: starting again is right
                start(root)
                got = final_weights(root)
            if got is None or not _same(expected, got):
                problems.append(f"kill {k} before {point}: weights differ from the uninterrupted run")
            if (root / "out" / "notes.md").read_text() != "the user's notes":
                problems.append(f"kill {k} before {point}: the user's file in OUT was lost")
            if _leftovers(root) or (root / "out.trainer_state").exists() != keeps_state:
                problems.append(f"kill {k} before {point}: left behind {_leftovers(root)} "
                                f"{sorted(p.name for p in root.iterdir())}")
        except Exception as exc:  # noqa: BLE001 - every kill point is reported, not just the first
            problems.append(f"kill {k} before {point}: {type(exc).__name__}: {exc}")
    else:
        pytest.fail(f"the run was still being killed after {max_points} steps")
    assert k > 10, f"only {k - 1} kill points: the injection does not reach the saves"
    return problems


@pytest.fixture
def one_thread():
    """One torch thread (forked children then never meet an OpenMP pool); the old setting restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- DIM ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dim_training_killed_at_every_save_step_resumes_to_the_same_head(tmp_path, one_thread, capsys):
    from test_dim import StubImageEncoder, write_tiny_training_set

    from mel.cli import main

    encoder = HashingTextEncoder()
    data = write_tiny_training_set(tmp_path, encoder, dev=False)

    def args(root):  # 3 epochs: the best is epoch 2, so OUT is written, replaced, then left as it is;
        # the state is kept: its weights show an epoch trained twice (OUT, the best epoch, may not)
        return ["train", "dim", "--format", "jsonl", "--data", str(data), "--kb", str(tmp_path / "kb.sqlite"),
                "--dev-split", "", "--preset", "offline", "--out", str(root / "out"), "--epochs", "3",
                "--batch-size", "4", "--d-model", "16", "--n-heads", "2", "--ffn-dim", "16", "--out-dim", "8",
                "--dropout", "0.1", "--cache-dir", str(tmp_path / "cache"), "--quiet", "--train-width", "6",
                "--n-hard", "2", "--keep-state"]

    def start(root):
        assert main(args(root)) == 0

    def resume(root) -> bool:
        code = main(args(root) + ["--resume"])
        err = capsys.readouterr().err
        if code == 2 and "nothing to resume" in err:
            return False
        assert code == 0, err[-2000:]
        return True

    def final_weights(root):  # OUT's and the kept state's (wherever in OUT.trainer_state it keeps them)
        assert json.loads((root / "out" / "config.json").read_text())["epoch"] == 2
        [state] = _visible(root / "out.trainer_state", "state.json")
        assert json.loads(state.read_text())["epoch"] == 3
        [last] = _visible(root / "out.trainer_state", "model.safetensors")
        return {**{f"out.{k}": v for k, v in load_file(str(root / "out" / "model.safetensors")).items()},
                **{f"state.{k}": v for k, v in load_file(str(last)).items()}}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Preset, "backend", lambda self, role: {"text_encoder": encoder,
                                                          "image_encoder": StubImageEncoder()}[role])
        problems = _sweep(tmp_path, start, resume, final_weights, keeps_state=True)
    assert not problems, "\n".join(problems)


# -- GEMEL ----------------------------------------------------------------------------------------------
@forks
@pytest.mark.slow
def test_gemel_training_killed_at_every_save_step_resumes_to_the_same_mapper(tmp_path, one_thread, monkeypatch):
    from test_gemel import ENTITIES, _examples, _preset, _save_tiny_lm

    from mel.gemel.train import GemelTrainConfig, MapperTrainer

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    preset = _preset(_save_tiny_lm("opt", tmp_path / "tiny-opt"))
    kb = build_kb(ENTITIES, tmp_path / "kb.sqlite", text_encoder=HashingTextEncoder(), progress=False)
    images = {}
    for name, colour in {"red": (220, 30, 30), "blue": (20, 40, 230), "green": (30, 200, 60)}.items():
        from PIL import Image
        images[name] = str(tmp_path / f"{name}.png")
        Image.new("RGB", (16, 16), colour).save(images[name])
    examples = _examples(images)
    # saves after steps 1 and 2 (state, then OUT), the final OUT after step 3, then the state removed
    config = GemelTrainConfig(lr=3e-2, epochs=1, grad_accum=1, max_steps=3, n_demos=1, n_image_tokens=2,
                              examples="with-query-image", save_every=1, seed=3)

    def trainer(root):
        return MapperTrainer(examples, kb, preset, root / "out", config, progress=False)

    def start(root):
        trainer(root).run(command="test")

    def resume(root) -> bool:
        try:
            trainer(root).run(resume=True, command="test")
        except CheckpointError as exc:
            if "nothing to resume" not in str(exc):
                raise
            return False
        return True

    def final_weights(root):
        assert json.loads((root / "out" / "config.json").read_text())["training"]["optimizer_steps"] == 3
        return load_file(str(root / "out" / "model.safetensors"))

    problems = _sweep(tmp_path, start, resume, final_weights)
    assert not problems, "\n".join(problems)


# -- durability order, leftovers ------------------------------------------------------------------------
def _head():
    from mel.dim.model import DimFusion, FusionConfig
    torch.manual_seed(0)
    return DimFusion(FusionConfig(text_dim=8, image_dim=8, cue_dim=8, d_model=8, n_heads=2, ffn_dim=16, out_dim=8))


def test_a_save_syncs_its_files_before_the_rename_that_publishes_them(tmp_path, monkeypatch):
    import mel.training.checkpoint as checkpoint
    events = []
    monkeypatch.setattr(checkpoint, "fsync_path", lambda path: events.append(("fsync", pathlib.Path(path))))
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", pathlib.Path(a), pathlib.Path(b))),
                                                     real_replace(a, b))[1])
    head = _head()
    out = tmp_path / "out"
    for _ in range(2):  # a first save, then one replacing it
        events.clear()
        checkpoint.save_pretrained_dir(head, head.config, out)
        renames = [e for e in events if e[0] == "rename"]
        synced = [e[1] for e in events if e[0] == "fsync"]
        first_rename = events.index(renames[0])
        written = {e[1] for e in events[:first_rename] if e[0] == "fsync"}
        tmp = renames[0][1]
        assert {tmp / "config.json", tmp / "model.safetensors", tmp} <= written  # files and folder, before
        assert renames[-1][2] == out and synced[-1] == tmp_path  # in place, then the parent synced
        assert events.index(renames[-1]) < len(events) - 1
    assert _leftovers(tmp_path) == [] and checkpoint.load_pretrained_dir(type(head), type(head.config), out)


def _write_copy(path: pathlib.Path, head, extra=None) -> None:
    from mel.training.checkpoint import _write_module
    path.mkdir(parents=True)
    _write_module(path, head, head.config, extra)


@pytest.mark.parametrize("case", ["only-old", "old-and-out", "new-and-out", "new-only", "tmp-with-user-files",
                                  "tmp-only"])
def test_leftovers_of_a_cut_short_save_are_recovered(tmp_path, case):
    from mel.dim.model import DimFusion, FusionConfig
    from mel.training import load_pretrained_dir, recover_leftovers
    head, other = _head(), _head()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    out = tmp_path / "out"
    expected = head
    if case == "only-old":  # killed between setting OUT aside and putting the new copy in place (old versions)
        _write_copy(tmp_path / ".out.old-999", head)
        (tmp_path / ".out.old-999" / "notes.md").write_text("mine")
    elif case == "old-and-out":  # killed before the replaced copy was deleted
        _write_copy(out, head)
        (out / "notes.md").write_text("mine")
        _write_copy(tmp_path / ".out.old-999", other)
    elif case == "new-and-out":  # a complete new copy not yet in place: it is put there, the user's files kept
        _write_copy(out, other)
        (out / "notes.md").write_text("mine")
        _write_copy(tmp_path / ".out.new-999", head)
    elif case == "new-only":
        _write_copy(tmp_path / ".out.new-999", head)
        (tmp_path / ".out.new-999" / "notes.md").write_text("mine")
        _write_copy(tmp_path / ".out.old-999", other)
    elif case == "tmp-with-user-files":  # old versions moved the user's files into the unfinished copy
        _write_copy(out, head)
        (tmp_path / ".out.tmp-999").mkdir()
        (tmp_path / ".out.tmp-999" / "config.json").write_text("{half")
        (tmp_path / ".out.tmp-999" / "notes.md").write_text("mine")
    else:  # a first save killed while it wrote: nothing to keep
        (tmp_path / ".out.tmp-999").mkdir()
        (tmp_path / ".out.tmp-999" / "config.json").write_text("{half")
        expected = None
    done = recover_leftovers(out)
    assert done and _leftovers(tmp_path) == []
    if expected is None:
        assert not out.exists()
        return
    loaded, _ = load_pretrained_dir(DimFusion, FusionConfig, out)
    assert _same(loaded.state_dict(), expected.state_dict())
    assert (out / "notes.md").read_text() == "mine"
    assert recover_leftovers(out) == []  # nothing left to do


def test_leftovers_beside_a_file_are_left_alone(tmp_path):
    from mel.training import recover_leftovers
    (tmp_path / "out").write_text("the user's file")
    _write_copy(tmp_path / ".out.old-999", _head())
    assert recover_leftovers(tmp_path / "out") == []
    assert (tmp_path / "out").read_text() == "the user's file" and (tmp_path / ".out.old-999").is_dir()


def test_a_half_removed_state_is_cleaned_and_a_user_model_never(tmp_path):
    from mel.training import recover_training_dirs
    from mel.training.checkpoint import OPTIMIZER_FILE
    head = _head()
    state = tmp_path / "out.trainer_state"
    _write_copy(state, head)  # state.json was deleted first, then the kill
    (state / OPTIMIZER_FILE).write_bytes(b"x")
    (state / "mine.txt").write_text("keep")
    assert recover_training_dirs(tmp_path / "out", state)
    assert sorted(p.name for p in state.iterdir()) == ["mine.txt"]
    model = tmp_path / "my-model"  # a model of the user's given as --state-dir: no optimizer file, never touched
    _write_copy(model, head)
    assert recover_training_dirs(tmp_path / "out", model) == []
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]


def test_resume_refuses_a_state_without_its_weights(tmp_path):
    # a state whose weights are missing (an older version kept them in OUT) is never paired with OUT's
    from mel.training import load_training_state, save_training_state
    head = _head()
    opt = torch.optim.AdamW(head.parameters())
    save_training_state(tmp_path / "state", opt, None, {"step": 1})
    with pytest.raises(CheckpointError, match="holds no model.safetensors.*start without resuming"):
        load_training_state(tmp_path / "state", opt, None, module=head)
