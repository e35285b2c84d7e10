"""What every command line of the project shares: arguments, provenance, output checks.

    from mel.cli_kit import add_preset_args, resolve_preset, count_arg, check_output_file, provenance

One definition each, one default:
  --preset  default `offline`: the preset the shipped trained heads (models/dim-offline,
            models/gemel-offline) and every figure in README were made with; it needs no GPU and no
            network, so a default run is the same on every machine. `auto` (probe the hub, pick
            small/paper) is one flag away.
  --threads default: the library's choice (MEL_THREADS when set, else the CPUs this process may
            use; mel.backends.text.configure_cpu_threads). The figures record the count they ran
            with, so a benchmark stays labelled; on a CPU shared with other jobs pass 1.

Provenance: `command_line` (shell-quoted), `git_commit`, and `provenance` (command, commit, start
time, machine, torch threads, load average, preset and models) for every JSON a run writes.

Import-light: nothing heavy loads until a function runs (bench/bench_dim.py reads --threads before
numpy loads). Library modules may import this one; none imports `mel.cli`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from .errors import InputError, MELError, require_whole
from .paths import REPO_ROOT, display_path

DEFAULT_PRESET = "offline"
MAX_THREADS = 1024  # more than any machine this runs on has cores; far more only hangs starting threads
BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# -- running a command --------------------------------------------------------------------------
def run_command(args: argparse.Namespace) -> int:
    """Run `args.func(args)` after `--threads`; a library error is one line on stderr and status 2."""
    try:
        apply_threads(getattr(args, "threads", None))
        if hasattr(args, "device"):  # every command with --device: an unknown one is refused before any work
            args.device = check_device(args.device)
        args.func(args)
    except MELError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


# -- shared arguments ---------------------------------------------------------------------------
def add_preset_args(parser: argparse.ArgumentParser, device: bool = True) -> None:
    parser.add_argument("--preset", default=DEFAULT_PRESET,
                        help=f"paper | small | offline | auto (default: {DEFAULT_PRESET})")
    if device:
        parser.add_argument("--device", default=None,
                            help="override the preset's device: cpu, cuda, cuda:N, mps, or auto (the preset's own)")


DEVICE_RE = re.compile(r"cpu|mps|cuda(:\d+)?")


def check_device(device: str | None) -> str | None:
    """`--device` as the presets take it: cpu, cuda, cuda:N or mps; None (and `auto`): the preset's own.
    Anything else is an InputError now, not a crash when the first model loads (or a silent no-op)."""
    if device is None or device.strip().lower() == "auto":
        return None
    name = device.strip().lower()
    if not DEVICE_RE.fullmatch(name):
        raise InputError(f"unknown device {device!r}: use cpu, cuda, cuda:N (a GPU's number, e.g. cuda:1), mps, "
                         f"or auto (the preset's own)")
    return name


def resolve_preset(args):
    """The Preset named by `--preset` (and `--device`); says on stderr why `auto` chose it."""
    from .presets import get_preset
    preset = get_preset(args.preset, device=check_device(getattr(args, "device", None)))
    if preset.reason:
        print(f"[mel] {preset.reason}", file=sys.stderr)
    return preset


def add_threads_arg(parser: argparse.ArgumentParser, subcommand: bool = False) -> None:
    """`--threads N`. On a subcommand it only overrides what was given before the subcommand
    (`python -m mel --threads 1 train dim` and `python -m mel train dim --threads 1` are the same)."""
    parser.add_argument("--threads", type=int, metavar="N", default=argparse.SUPPRESS if subcommand else None,
                        help="torch CPU threads for every model (sets MEL_THREADS; default: the CPUs this process "
                             "may use). On a CPU shared with other jobs 1 is often much faster")


def apply_threads(threads: int | None) -> None:
    """Use `threads` torch threads from now on (None: leave the library's choice)."""
    if threads is None:
        return
    if threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    require_whole("--threads", threads, 1, MAX_THREADS)  # torch would try to start them all
    os.environ["MEL_THREADS"] = str(threads)  # read by configure_cpu_threads
    import torch
    torch.set_num_threads(threads)  # also when a backend configured threads earlier


def cap_native_threads_from_argv(argv: list[str]) -> None:
    """`--threads N` given to a script caps the BLAS/OpenMP pools too; only works before numpy loads
    (idle-spinning BLAS threads cost more than they bring on a shared CPU)."""
    if "--threads" in argv[:-1]:
        for var in BLAS_THREAD_VARIABLES:
            os.environ.setdefault(var, argv[argv.index("--threads") + 1])


def count_arg(text: str) -> int:
    """argparse type of a `--limit N`: a whole number >= 0 (-1 once meant "all but the last")."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    try:
        return require_whole("the number", value, 0)  # not too large either
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- config dataclasses as flags -----------------------------------------------------------------
def config_arguments(config_class) -> argparse.ArgumentParser:
    """A parent parser with one flag per field of a config dataclass (`--n-hard`, also `--n_hard`; a
    boolean field that defaults to true also gets `--no-NAME`), made by transformers' HfArgumentParser.
    Use it as `subparsers.add_parser(name, parents=[config_arguments(Config)])`."""
    from transformers import HfArgumentParser
    return HfArgumentParser(config_class, add_help=False)


def config_from_args(config_class, args: argparse.Namespace):
    """The config dataclass filled from the flags `config_arguments` made (its own checks run)."""
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if f.init})


# -- output checks -------------------------------------------------------------------------------
def check_output_file(path: str | Path, *, what: str = "name the file to write", example: str = "report.json",
                      error: type[Exception] = InputError) -> Path:
    """A file this command will write: not a directory, and its folder exists (created) and is writable.
    Call it before the work, so a bad path fails now and not after an hour's evaluation."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path} is a directory; {what}, e.g. {path / example}")
    check_output_dir(path.parent)
    return path


def check_output_dir(folder: str | Path) -> Path:
    """A folder this command will write into: created when missing, and writable."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file; name a folder to write into")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the folder {folder} ({exc.strerror or exc}); pick a writable path") from exc
    if not os.access(folder, os.W_OK):
        raise InputError(f"cannot write into {folder}; pick a writable path")
    return folder


# -- provenance ----------------------------------------------------------------------------------
def command_line(program: str, argv: list[str]) -> str:
    """The command as a shell would take it back: `python -m mel eval --caption 'a b'`."""
    return " ".join([program, *map(shlex.quote, argv)])


def script_command(script: str | Path, argv: list[str] | None = None) -> str:
    """The command line of a script (`python bench/bench_kb.py --rows 10`; its path relative to the
    repository when inside it): pass the script's `__file__` and the argv its main() parsed."""
    return command_line(f"python {display_path(script)}", list(sys.argv[1:] if argv is None else argv))


def git_commit() -> str:
    """The repository's short commit, `+uncommitted` when tracked files changed; "" without git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def provenance(command: str, preset=None, seed: int | None = None) -> dict:
    """What a result file records about the run that made it (figures depend on the machine's load)."""
    import torch
    meta = {"command": command, "git_commit": git_commit(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if seed is not None:
        meta["seed"] = seed
    meta["machine"] = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                       "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                       "load_average_at_start": load_average()}
    if preset is not None:
        meta["preset"] = preset.name
        meta["preset_reason"] = preset.reason
        meta["models"] = preset.models()
    return meta
