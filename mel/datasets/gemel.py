"""GEMEL-style data (Shi et al., LREC-COLING 2024, reference code HITsz-TMG/GEMEL).

Layout of DIR:
    <split>.json or <split>.jsonl   one record per line (as GEMEL writes them) or one JSON list:
        {"id" (optional), "mention", "text", "img_name" | "img_url", "golden", "target"}
    images/<img_name>               mention images (optional)
    kb.jsonl                        optional KB, one Entity.to_dict() per line

Gold rule. GEMEL's code generates and scores `target` (the entity name it is trained to
write) and drops records whose `golden` is "NIL". Here the gold id is whichever of `target` /
`golden` is a Wikidata QID, else the name itself; the gold name is whichever is not a QID
(`target` first). Either field may be missing, not both. A "NIL" in either makes the example
NIL; such examples are kept and counted rather than dropped.
Images: Mention.image is DIR/images/<img_name> (or an `img_url` that is a local file) when the
file exists; an http(s) `img_url` is kept in DatasetSplit.image_urls.
Without kb.jsonl the KB is the gold entities of all split files (id -> name).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from ..errors import DatasetFormatError
from ..types import NIL, Entity
from . import jsonl
from .common import (
    DatasetSplit,
    ExampleBuilder,
    dataset_dir,
    get_field,
    image_index,
    load_records,
    make_entity,
    resolve_split,
)

FORMAT = "gemel"
LAYOUT = "DIR/<split>.json or DIR/<split>.jsonl (GEMEL records), optional DIR/images/, optional DIR/kb.jsonl"
SPLIT_ORDER = ("train", "dev", "val", "valid", "test")
_QID = re.compile(r"^Q[1-9][0-9]*$")


def _split_files(root: Path) -> dict[str, Path]:
    files = {}
    for name in SPLIT_ORDER:
        for ext in (".jsonl", ".json"):
            if (root / f"{name}{ext}").is_file():
                files[name] = root / f"{name}{ext}"
                break
    if not files:
        raise DatasetFormatError(root, f"no split file found; the {FORMAT} layout expects {LAYOUT}")
    return files


def available_splits(path) -> list[str]:
    return list(_split_files(dataset_dir(path, FORMAT, LAYOUT)))


def read(path, split: str = "dev", *, dev_fraction: float = 0.1, seed: int = 0) -> DatasetSplit:
    root = dataset_dir(path, FORMAT, LAYOUT)
    files = _split_files(root)
    source = files[resolve_split(split, files, FORMAT, root)]
    images = image_index(root / "images")
    out = ExampleBuilder(FORMAT, split, root)
    for sid, rec, label in _records(source):
        caption = get_field(rec, "text", str, source, label)
        mention = get_field(rec, "mention", str, source, label)
        gid, name = _gold(rec, source, label)
        image, url = _image(root, images, rec, source, label)
        out.add_record(sid, caption, [(mention, gid, name)], image, image_url=url)
    return out.build()


def _records(source: Path):
    """(sample id, record, label for errors): the record's "id" if any, else its position."""
    for i, (label, rec) in enumerate(load_records(source)):
        rid = get_field(rec, "id", (str, int), source, label, default=i)
        yield str(rid), rec, label


def _gold(rec: dict, source: Path, label) -> tuple[str, str]:
    values = [v.strip() for v in (get_field(rec, "target", str, source, label, default=None),
                                  get_field(rec, "golden", str, source, label, default=None)) if v is not None]
    values = [v for v in values if v]
    if not values:
        raise DatasetFormatError(source, "the record needs a non-empty 'golden' or 'target'", label)
    if any(v.lower() == "nil" for v in values):
        return NIL, ""
    qids = [v for v in values if _QID.match(v)]
    names = [v for v in values if not _QID.match(v)]
    name = names[0] if names else ""
    return (qids[0] if qids else name), name


def _image(root: Path, images: set[str], rec: dict, source: Path, label) -> tuple[str | None, str | None]:
    """(local image or None, URL or None)."""
    name = get_field(rec, "img_name", (str, type(None)), source, label, default=None)
    url = get_field(rec, "img_url", (str, type(None)), source, label, default=None)
    if url and not re.match(r"^[a-z][a-z0-9+.-]*://", url, re.I):
        name, url = name or url, None  # a relative "url" is a file name
    base = Path(name).name if name else ""
    local = str(root / "images" / base) if base in images else None
    return local, url or None


def read_kb(source) -> Iterator[Entity]:
    root = dataset_dir(source, FORMAT, LAYOUT)
    if (root / "kb.jsonl").is_file():
        return jsonl.read_kb(root / "kb.jsonl")
    entities: dict[str, Entity] = {}
    for path in _split_files(root).values():
        for _, rec, label in _records(path):
            gid, name = _gold(rec, path, label)
            if gid != NIL and gid not in entities:
                entities[gid] = make_entity(path, label, id=gid, name=name or gid)
    return iter(entities.values())
