"""Where the library keeps caches (converted models, tries, cues), and how it publishes files
(whole or not at all: `atomic_write`, `publish`, `remove_dead_temps`)."""
from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$MEL_CACHE` (default `~/.cache/mel`) joined with `parts`, created on demand."""
    root = Path(os.environ.get("MEL_CACHE") or Path.home() / ".cache" / "mel")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


REPO_ROOT = Path(__file__).resolve().parents[1]


def display_path(path: str | Path) -> str:
    """A path as results and reports show it: relative to the repository when inside it (a shipped
    checkpoint reads `models/dim-offline` on every machine), otherwise as given."""
    try:
        return Path(path).resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


# -- publishing files: whole or not at all -----------------------------------------------------
# A file the library publishes is written under a temporary name beside its target, flushed to
# disk, and renamed over the target; the folder is flushed after the rename. Temporary names carry
# the writer's process id, `.NAME.TAG-PID[-RANDOM]`, so that a later writer can delete the
# leftovers of a killed one (a dead PID) without touching those of a writer that is still running.
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:building|tmp)-(?P<pid>\d+)(?:-[0-9a-f]+)?(?:-wal|-shm|-journal)?$")


def fsync_path(path: str | Path) -> None:
    """Flush a file (or a folder's entries) to disk."""
    is_dir = Path(path).is_dir()
    if os.name == "nt" and is_dir:
        return  # Windows cannot open a folder to flush it; its renames are journaled by NTFS
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
        # some filesystems cannot flush a folder; the files in it were flushed before the rename
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """Flush every file under the folder `path`, then the folders themselves."""
    path = Path(path)
    for root, _dirs, files in os.walk(path):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(root)


def temp_path(path: str | Path, tag: str = "tmp") -> Path:
    """A unique temporary name beside `path` that names this process: `.NAME.TAG-PID-RANDOM`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def publish(tmp: str | Path, target: str | Path) -> None:
    """Rename the finished file `tmp` over `target` (flushing the file first and the folder after),
    so that `target` is the old file or the new one, whole, whatever instant the process dies."""
    fsync_path(tmp)
    os.replace(tmp, target)
    fsync_path(Path(target).parent)


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """`with atomic_write(p) as tmp: write tmp` publishes tmp as p when the block succeeds; on an
    error the temporary file is removed and `p` is left as it was."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs now (a process of another user counts as running)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists (another user's), or we cannot tell: keep its files
    return True


def remove_dead_temps(directory: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files (or folders) of `names` in `directory` that were left by processes
    that no longer run (`.NAME.building-PID...` / `.NAME.tmp-PID...`); returns what was deleted."""
    directory, names = Path(directory), set(names)
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if not m or m["name"] not in names or pid_alive(int(m["pid"])):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except FileNotFoundError:
            pass
    return removed
