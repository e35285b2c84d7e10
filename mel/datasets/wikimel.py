"""WikiMEL (Wikidata-MEL, MELBench / GHMFC release).

Layout of DIR:
    Wikidata-MEL.json   {"<id>": {"id", "sentence", "mentions": [...], "entities": [...], "answer": [...]}}
    splits.json         {"train": [ids], "dev": [ids], optionally "test": [ids]}
    images/<id>.jpg     mention image of sample <id> (optional; usually absent)
    qid2ne.json         KB names {QID: name}
    qid2abs.json        KB descriptions {QID: text} (optional)
    ne2qid.json         {name: QID} (optional); names other than qid2ne's become aliases

Ids listed in splits.json but absent from Wikidata-MEL.json (the public release withholds
the test samples) are skipped and counted in a report note.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..types import Entity
from .common import (
    DatasetSplit,
    ExampleBuilder,
    dataset_dir,
    image_index,
    load_json,
    load_split_ids,
    load_str_map,
    make_entity,
    mention_record,
    records_of_split,
    require_file,
    resolve_split,
)

FORMAT = "wikimel"
DATA_FILE = "Wikidata-MEL.json"
SPLITS_FILE = "splits.json"
LAYOUT = (f"DIR/{DATA_FILE} (dict id -> sample), DIR/{SPLITS_FILE} ({{split: [ids]}}), "
          "optional DIR/images/<id>.jpg, KB in DIR/qid2ne.json + DIR/qid2abs.json")


def _splits(root: Path) -> dict[str, list[str]]:
    return load_split_ids(require_file(root, SPLITS_FILE, FORMAT, LAYOUT))


def available_splits(path) -> list[str]:
    return list(_splits(dataset_dir(path, FORMAT, LAYOUT)))


def read(path, split: str = "dev", *, dev_fraction: float = 0.1, seed: int = 0) -> DatasetSplit:
    root = dataset_dir(path, FORMAT, LAYOUT)
    splits = _splits(root)
    stored = resolve_split(split, splits, FORMAT, root)
    data_path = require_file(root, DATA_FILE, FORMAT, LAYOUT)
    samples = load_json(data_path, dict)
    images = image_index(root / "images")

    out = ExampleBuilder(FORMAT, split, root)
    for sid, rec in records_of_split(splits[stored], samples, out, split_name=stored, ids_file=SPLITS_FILE,
                                     data_file=DATA_FILE):
        caption, mentions = mention_record(rec, data_path, sid)
        image = str(root / "images" / f"{sid}.jpg") if f"{sid}.jpg" in images else None
        out.add_record(sid, caption, mentions, image)
    return out.build()


def read_kb(source) -> Iterator[Entity]:
    root = dataset_dir(source, FORMAT, LAYOUT)
    names_path = require_file(root, "qid2ne.json", FORMAT, LAYOUT)
    names = load_str_map(names_path, "entity name")
    abs_path = root / "qid2abs.json"
    descriptions = load_str_map(abs_path, "description") if abs_path.is_file() else {}
    aliases: dict[str, list[str]] = {}
    if (root / "ne2qid.json").is_file():
        for name, qid in load_str_map(root / "ne2qid.json", "QID").items():
            if names.get(qid) != name:
                aliases.setdefault(qid, []).append(name)
    entities = []
    for qid, name in names.items():
        entities.append(make_entity(names_path, qid, id=qid, name=name, aliases=aliases.get(qid, []),
                                    description=descriptions.get(qid, "")))
    return iter(entities)

