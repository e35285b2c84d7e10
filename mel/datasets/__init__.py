"""Readers for the MEL dataset layouts users already hold, all returning the same data model.

    split = load_dataset("wikimel", "../shared/data/wikimel", "dev")
    print(split.report.summary())
    for example in split: ...
    entities = read_kb_entities("wikimel", "../shared/data/wikimel")

Every reader gives one Example per mention (sample_id "<record id>#<mention index>"),
locates mentions that come without offsets with mel.types.locate_mention_rule (exact, Unicode
NFC, ignoring case, then the words in order: "Otto Bismarck" in "Otto von Bismarck"; each
Example says which in `located`, the report counts each rule), and reports what it could not use
instead of dropping it silently: unlocated mentions (with `unlocated="context"`, as evaluation
reads them, still examples, linked by the mention string with the caption as context:
`located == "context"`; by default left out, counted and listed), invalid captions, missing images (Mention.image is None then), ids listed in a split
but absent from the data. Malformed files raise DatasetFormatError naming the file and record.
"dev" and "val" are accepted for each other. Each module's docstring gives its layout.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Iterator

from ..errors import InputError
from ..types import NOT_LOCATED, Entity
from . import gemel, jsonl, mimic, richpedia, wikidiverse, wikimel
from .common import UNLOCATED_POLICIES, DatasetSplit, ReadReport, context_mention
from .jsonl import write_jsonl_examples, write_jsonl_kb

FORMATS = ("wikimel", "richpedia", "wikidiverse", "mimic", "gemel", "jsonl")
_READERS: dict[str, ModuleType] = {
    "wikimel": wikimel, "richpedia": richpedia, "wikidiverse": wikidiverse,
    "mimic": mimic, "gemel": gemel, "jsonl": jsonl,
}

__all__ = ["FORMATS", "DatasetSplit", "ReadReport", "context_mention", "load_dataset", "read_kb_entities", "available_splits",
           "write_jsonl_examples", "write_jsonl_kb"]


def _reader(format: str) -> ModuleType:
    module = _READERS.get(format) if isinstance(format, str) else None
    if module is None:
        raise InputError(f"unknown dataset format {format!r}; known formats: {', '.join(FORMATS)}")
    return module


def load_dataset(format: str, path: str | Path, split: str = "dev", *, dev_fraction: float = 0.1,
                 seed: int = 0, unlocated: str = "skip") -> DatasetSplit:
    """Read one split. `dev_fraction` and `seed` only matter where dev is carved from train
    (RichpediaMEL without a dev file). `unlocated`: "context" keeps a mention that no rule finds in
    its caption as an example linked by its mention string with the caption as context
    (Example.located == "context"), so every mention counts in n: what evaluation uses (`mel eval`,
    `mel calibrate`); "skip" (default, for uses that need the mention inside its caption: training,
    annotation import) leaves it out of the examples (it stays counted and listed in report.unlocated)."""
    if unlocated not in UNLOCATED_POLICIES:
        raise InputError(f"unlocated must be one of {', '.join(UNLOCATED_POLICIES)}, got {unlocated!r}")
    data = _reader(format).read(path, split, dev_fraction=dev_fraction, seed=seed)
    if unlocated == "skip":
        data.examples = [e for e in data.examples if e.located != NOT_LOCATED]
        data.report.unlocated_policy = "skip"
    return data


def read_kb_entities(format: str, source: str | Path, **options) -> Iterator[Entity]:
    """The knowledge base that goes with a dataset layout. `options` go to the format's
    reader (richpedia: long_descriptions=True)."""
    return _reader(format).read_kb(source, **options)


def available_splits(format: str, path: str | Path) -> list[str]:
    """Split names present at `path` (RichpediaMEL lists a carved "dev" when it has no dev file)."""
    return _reader(format).available_splits(path)
