"""Inputs of a batch job, cut into numbered row ranges ("parts") that any worker can read alone.

A source yields records `{"row": int, "record": str}`: `row` is the position of the mention in
the input (0-based, blank JSONL lines not counted), `record` its JSON text, parsed later in the
link workers so that an unreadable row becomes a counted error row instead of failing the job.

    JSONL    one mention per line: {"caption", "start"+"end" or "mention", "image"?, "id"?, "gold_id"?}
             (a line of the library's own jsonl dataset format, {"mention": {...}, "gold_id": ...},
             is read too). Workers read their byte range of the file themselves.
    Parquet  the same fields as columns; workers read their row groups themselves.
    dataset  any layout `mel eval` reads (`--format wikimel --data DIR --split dev`): the driver
             reads the split (as `mel eval` does) and hands the examples to Ray.

File inputs must be readable at the same path on every node of a cluster (a shared filesystem).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

FILE_KINDS = ("jsonl", "parquet")


@dataclass
class Source:
    kind: str                       # "jsonl" | "parquet" | "dataset"
    path: str                       # the input file, or the dataset directory
    n_rows: int
    fingerprint: dict
    offsets: list[int] = field(default_factory=list)   # jsonl: byte offset of every part's first row
    part_size: int = 0
    records: list[str] | None = None  # dataset: the examples as JSON (driver-side)
    base_dir: str = ""              # where relative image paths of a file input are looked up
    report: dict = field(default_factory=dict)

    def parts(self) -> list[tuple[int, int, int]]:
        """(part, start row, stop row) for every part of the input."""
        return [(p, s, min(s + self.part_size, self.n_rows)) for p, s in enumerate(range(0, self.n_rows, self.part_size))]

    def reader(self) -> "RangeReader":
        return RangeReader(self.kind, self.path, self.offsets, self.part_size)


def _file_fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def open_source(input: str | None = None, *, format: str | None = None, data: str | None = None,
                split: str = "dev", limit: int | None = None, part_size: int = 10_000) -> Source:
    """Index the input once (row count, where each part starts) without holding its rows."""
    if part_size < 1:
        raise InputError(f"--part-size must be >= 1, got {part_size}")
    if format:
        return _dataset_source(format, data or input, split, limit, part_size)
    if not input:
        raise InputError("give the mentions to link: --input FILE (.jsonl or .parquet), or a dataset with "
                         "--format F --input DIR --split S")
    path = Path(input).expanduser()
    if path.is_dir():
        raise InputError(f"{path} is a directory; for a dataset layout add --format (wikimel, richpedia, ..., jsonl) "
                         f"and --split, for a file give the .jsonl or .parquet file itself")
    if not path.is_file():
        raise InputError(f"input {path} does not exist")
    kind = "parquet" if path.suffix.lower() in (".parquet", ".pq") else "jsonl"
    if kind == "parquet":
        import pyarrow.parquet as pq
        try:
            n_rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a file that is not Parquet
            raise InputError(f"{path} cannot be read as Parquet ({exc}); give a .parquet file or a .jsonl file") from exc
        offsets = []
    else:
        n_rows, offsets = _index_jsonl(path, part_size)
    if limit:
        n_rows = min(n_rows, limit)
    fp = {"kind": kind, **_file_fingerprint(path), "limit": limit, "part_size": part_size}
    return Source(kind, str(path.resolve()), n_rows, fp, offsets, part_size, base_dir=str(path.resolve().parent))


def _index_jsonl(path: Path, part_size: int) -> tuple[int, list[int]]:
    """Count the non-blank lines and note the byte offset where every part starts (one pass, constant memory)."""
    offsets, n, pos = [], 0, 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                if n % part_size == 0:
                    offsets.append(pos)
                n += 1
            pos += len(line)
    return n, offsets


def _dataset_source(format: str, data: str | None, split: str, limit: int | None, part_size: int) -> Source:
    from ..datasets import load_dataset
    if not data:
        raise InputError(f"--format {format} needs the dataset directory: --input DIR (or --data DIR)")
    ds = load_dataset(format, data, split, unlocated="context")  # every mention, as `mel eval` counts them
    examples = ds.examples[:limit] if limit else ds.examples
    if not examples:
        raise InputError("nothing to link: no usable mention (an empty split, --limit cut everything, or the reader "
                         "skipped every mention; `python -m mel data info ...` shows why)")
    records = [json.dumps(ex.to_dict(), ensure_ascii=False) for ex in examples]
    digest = hashlib.sha256("\n".join(records).encode("utf-8")).hexdigest()[:16]
    fp = {"kind": "dataset", "format": format, "path": str(Path(data).expanduser().resolve()), "split": split,
          "limit": limit, "n": len(records), "sha256_16": digest, "part_size": part_size}
    report = ds.report.to_dict() if hasattr(ds.report, "to_dict") else {}
    return Source("dataset", str(data), len(records), fp, [], part_size, records=records, report=report)


class RangeReader:
    """Reads the records of rows [start, stop) of a file input; picklable, runs inside Ray tasks."""

    def __init__(self, kind: str, path: str, offsets: list[int], part_size: int):
        self.kind, self.path, self.offsets, self.part_size = kind, path, offsets, part_size

    def read(self, start: int, stop: int) -> tuple[list[int], list[str]]:
        if self.kind == "jsonl":
            return self._read_jsonl(start, stop)
        return self._read_parquet(start, stop)

    def _read_jsonl(self, start: int, stop: int) -> tuple[list[int], list[str]]:
        part = start // self.part_size
        row = part * self.part_size
        rows, records = [], []
        with open(self.path, "rb") as f:
            f.seek(self.offsets[part])
            for line in f:
                if not line.strip():
                    continue
                if row >= stop:
                    break
                if row >= start:
                    rows.append(row)
                    # undecodable bytes stay visible (U+FFFD) and make the row an error in the worker
                    text = line.decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r\n")
                    records.append(text if "\ufffd" not in text or _has_real_fffd(line)
                                   else "\x00not UTF-8 text: " + text)
                row += 1
        return rows, records

    def _read_parquet(self, start: int, stop: int) -> tuple[list[int], list[str]]:
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(self.path)
        rows, records, first = [], [], 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if first + n > start and first < stop:
                table = pf.read_row_group(g)
                lo, hi = max(start - first, 0), min(stop - first, n)
                for i, rec in enumerate(table.slice(lo, hi - lo).to_pylist()):
                    rows.append(first + lo + i)
                    records.append(json.dumps({k: v for k, v in rec.items() if v is not None}, ensure_ascii=False,
                                              default=str))
            first += n
            if first >= stop:
                break
        return rows, records


def _has_real_fffd(line: bytes) -> bool:
    """Whether U+FFFD is in the bytes themselves (valid UTF-8), not produced by a decoding error."""
    try:
        line.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def resolve_image(image, base_dir: str) -> str | None:
    """An image path of a file input: a URL as is, a local path as written or relative to the input's folder."""
    if not image:
        return None
    if "://" in image:
        return image
    p = Path(os.path.expanduser(image))
    if p.is_file():
        return str(p)
    if not p.is_absolute() and base_dir and (Path(base_dir) / p).is_file():
        return str(Path(base_dir) / p)
    raise InputError(f"image {image!r} not found (looked as written and relative to {base_dir})")
