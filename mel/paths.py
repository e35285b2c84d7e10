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
