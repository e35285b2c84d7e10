"""Where the library keeps caches (converted models, tries, cues). One place, one env var."""
from __future__ import annotations

import os
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
