"""Readers for the MEL dataset layouts users already hold, all returning the same data model.

    split = load_dataset("wikimel", "../shared/data/wikimel", "dev")
    print(split.report.summary())
    for example in split: ...
    entities = read_kb_entities("wikimel", "../shared/data/wikimel")

Every reader gives one Example per mention (sample_id "<record id>#<mention index>"),
locates mentions that come without offsets with mel.types.locate_mention (exact, then
ignoring case), and reports what it could not use instead of dropping it silently: unlocated
mentions, invalid captions, missing images (Mention.image is None then), ids listed in a split
but absent from the data. Malformed files raise DatasetFormatError naming the file and record.
"dev" and "val" are accepted for each other. Each module's docstring gives its layout.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Iterator

from ..errors import InputError
from ..types import Entity
from . import gemel, jsonl, mimic, richpedia, wikidiverse, wikimel
from .common import DatasetSplit, ReadReport
from .jsonl import write_jsonl_examples, write_jsonl_kb

FORMATS = ("wikimel", "richpedia", "wikidiverse", "mimic", "gemel", "jsonl")
_READERS: dict[str, ModuleType] = {
    "wikimel": wikimel, "richpedia": richpedia, "wikidiverse": wikidiverse,
    "mimic": mimic, "gemel": gemel, "jsonl": jsonl,
}

__all__ = ["FORMATS", "DatasetSplit", "ReadReport", "load_dataset", "read_kb_entities", "available_splits",
           "write_jsonl_examples", "write_jsonl_kb"]


def _reader(format: str) -> ModuleType:
    module = _READERS.get(format) if isinstance(format, str) else None
    if module is None:
        raise InputError(f"unknown dataset format {format!r}; known formats: {', '.join(FORMATS)}")
    return module


def load_dataset(format: str, path: str | Path, split: str = "dev", *, dev_fraction: float = 0.1,
                 seed: int = 0) -> DatasetSplit:
    """Read one split. `dev_fraction` and `seed` only matter where dev is carved from train
    (RichpediaMEL without a dev file)."""
    return _reader(format).read(path, split, dev_fraction=dev_fraction, seed=seed)


def read_kb_entities(format: str, source: str | Path, **options) -> Iterator[Entity]:
    """The knowledge base that goes with a dataset layout. `options` go to the format's
    reader (richpedia: long_descriptions=True)."""
    return _reader(format).read_kb(source, **options)


def available_splits(format: str, path: str | Path) -> list[str]:
    """Split names present at `path` (RichpediaMEL lists a carved "dev" when it has no dev file)."""
    return _reader(format).available_splits(path)
