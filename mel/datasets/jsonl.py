"""The library's own format: JSON lines of its dataclasses.

Layout of DIR:
    <split>.jsonl   one Example.to_dict() per line (offsets included, so nothing is located)
    kb.jsonl        one Entity.to_dict() per line

`path` may also be one .jsonl file, read as the split it is asked for. Example.dataset and
Example.split are kept as written (so a converted dataset keeps its origin); empty ones are
filled in with "jsonl" and the split. Mention.image: a URL is kept; a local path is kept when
it exists as written or relative to DIR, else it becomes None and is counted as missing.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import DatasetFormatError, InputError
from ..types import Entity, Example
from .common import DatasetSplit, ExampleBuilder, dataset_dir, expand_user, iter_jsonl, resolve_split

FORMAT = "jsonl"
KB_FILE = "kb.jsonl"
LAYOUT = "DIR/<split>.jsonl (one Example.to_dict() per line) and DIR/kb.jsonl (one Entity.to_dict() per line)"
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)

_EXAMPLE_FIELDS = {"mention": dict, "gold_id": str, "gold_name": str, "sample_id": str, "dataset": str, "split": str,
                   "located": str}  # located: how the source reader found the mention (mel.types.LOCATE_RULES)
_MENTION_FIELDS = {"caption": str, "start": int, "end": int, "image": (str, type(None)), "id": (str, type(None))}
_ENTITY_FIELDS = {"id": str, "name": str, "aliases": list, "description": str, "type": str, "images": list}


def _split_files(root: Path) -> dict[str, Path]:
    files = {p.stem: p for p in sorted(root.glob("*.jsonl")) if p.name != KB_FILE}
    if not files:
        raise DatasetFormatError(root, f"no split file found; the {FORMAT} layout expects {LAYOUT}")
    return files


def available_splits(path) -> list[str]:
    p = Path(path).expanduser()
    if p.is_file():
        return [p.stem]
    return list(_split_files(dataset_dir(p, FORMAT, LAYOUT)))


def read(path, split: str = "dev", *, dev_fraction: float = 0.1, seed: int = 0) -> DatasetSplit:
    p = Path(path).expanduser()
    if p.is_file():
        source, root = p.resolve(), p.resolve().parent
    else:
        root = dataset_dir(p, FORMAT, LAYOUT)
        files = _split_files(root)
        source = files[resolve_split(split, files, FORMAT, root)]
    out = ExampleBuilder(FORMAT, split, root)
    for n, obj in iter_jsonl(source):
        label = f"line {n}"
        _check(obj, _EXAMPLE_FIELDS, ("mention", "gold_id"), source, label)
        _check(obj["mention"], _MENTION_FIELDS, ("caption", "start", "end"), source, label, prefix="mention.")
        data = dict(obj, mention=dict(obj["mention"]))
        data["mention"]["image"] = _image(data["mention"].get("image"), root)
        data.setdefault("sample_id", label)
        data["dataset"] = data.get("dataset") or FORMAT
        data["split"] = data.get("split") or split
        try:
            example = Example.from_dict(data)
        except InputError as e:  # the span or caption fails validate_span
            out.add_invalid_record(data["sample_id"], str(e), data["mention"]["image"])
            continue
        out.add_example(example)
    return out.build()


def _image(image: str | None, root: Path) -> str | None:
    if not image or _URL.match(image):
        return image or None
    p = expand_user(image)
    if p.is_file():
        return image
    if not p.is_absolute() and (root / p).is_file():
        return str(root / p)
    return None


def _check(obj: Any, fields: dict, required: tuple[str, ...], source: Path, label: str, prefix: str = "") -> None:
    """Types of a dataclass dict; unknown and missing required keys are errors too."""
    if not isinstance(obj, dict):
        raise DatasetFormatError(source, f"{prefix or 'the line'} must be an object", label)
    unknown = set(obj) - set(fields)
    if unknown:
        raise DatasetFormatError(source, f"unknown key(s) {sorted(prefix + k for k in unknown)}", label)
    for key, types in fields.items():
        if key not in obj:
            if key in required:
                raise DatasetFormatError(source, f"missing required key {prefix + key!r}", label)
            continue
        value = obj[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise DatasetFormatError(source, f"{prefix + key!r} has the wrong type ({type(value).__name__})", label)


def read_kb(source, check_duplicates: bool = True) -> "KBStream":
    """Entities of DIR/kb.jsonl or of a .jsonl file, streamed in file order. A repeated id is a
    DatasetFormatError naming its line; `check_duplicates=False` leaves that check to the consumer
    (`build_kb` looks ids up in the database it writes, so memory stays constant in the KB size,
    and calls `duplicate_error(id)` for the message)."""
    p = Path(source).expanduser()
    if not p.is_file():
        p = dataset_dir(p, FORMAT, LAYOUT) / KB_FILE
        if not p.is_file():
            raise DatasetFormatError(p, f"file not found; the {FORMAT} layout expects {LAYOUT}")
    return KBStream(p, check_duplicates)


class KBStream:
    """An iterable of the entities of one kb.jsonl, read line by line (constant memory unless
    `check_duplicates` keeps the set of ids seen)."""

    def __init__(self, path: Path, check_duplicates: bool = True):
        self.path, self.check_duplicates = path, check_duplicates
        self.label: str | None = None  # the line being read, for duplicate_error

    def duplicate_error(self, entity_id: str) -> DatasetFormatError:
        return DatasetFormatError(self.path, f"duplicate entity id {entity_id!r}", self.label)

    def __iter__(self) -> Iterator[Entity]:
        seen: set[str] = set()
        for n, obj in iter_jsonl(self.path):
            label = self.label = f"line {n}"
            _check(obj, _ENTITY_FIELDS, ("id", "name"), self.path, label)
            for key in ("aliases", "images"):
                if not all(isinstance(x, str) for x in obj.get(key, [])):
                    raise DatasetFormatError(self.path, f"{key!r} must be a list of strings", label)
            if not obj["id"].strip():
                raise DatasetFormatError(self.path, "empty entity id", label)
            if self.check_duplicates:
                if obj["id"] in seen:
                    raise self.duplicate_error(obj["id"])
                seen.add(obj["id"])
            try:
                entity = Entity.from_dict(obj)
            except InputError as e:  # e.g. a lone surrogate from a "\ud800" escape
                raise DatasetFormatError(self.path, str(e), label) from None
            yield entity


def write_jsonl_examples(examples: Iterable[Example], path: str | Path) -> int:
    """Write one Example per line; returns how many. Written atomically."""
    return _write_lines((e.to_dict() for e in examples), Path(path))


def write_jsonl_kb(entities: Iterable[Entity], path: str | Path) -> int:
    """Write one Entity per line; returns how many. Written atomically."""
    return _write_lines((e.to_dict() for e in entities), Path(path))


def _write_lines(rows: Iterable[dict], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)  # a reader never sees a half-written file
    finally:
        if tmp.exists():
            tmp.unlink()
    return n
