"""What a benchmark result records besides its figures: checksums of what it read, the run's facts
(mel.cli_kit.provenance: command, commit, machine, threads, load average, preset and models), and
the JSON file it is written to."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..cli_kit import provenance
from ..paths import atomic_write
from ..training.common import seed_everything  # noqa: F401 (the runs seed like the trainers)


def sha256_paths(paths) -> dict:
    """One sha256 over the files (sorted, names included) and their count/bytes."""
    h, n, size = hashlib.sha256(), 0, 0
    files = sorted(p for path in paths for p in ([path] if Path(path).is_file() else Path(path).rglob("*"))
                   if Path(p).is_file())
    for f in files:
        h.update(str(Path(f).name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        n += 1
        size += Path(f).stat().st_size
    return {"sha256": h.hexdigest(), "files": n, "bytes": size}


def kb_files(kb_path: Path) -> list[Path]:
    stem = kb_path.with_suffix("")
    return [kb_path] + sorted(kb_path.parent.glob(f"{stem.name}.*.safetensors"))


def save_json(path: str | Path, data) -> Path:
    """Write a benchmark result: indented UTF-8 JSON, parent folders created, whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def run_meta(args, preset=None) -> dict:
    """The provenance of a `python -m mel bench` run (`args.command_line` is set by mel.cli.main)."""
    return provenance(getattr(args, "command_line", ""), preset, seed=args.seed)

