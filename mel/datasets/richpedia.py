"""RichpediaMEL (GHMFC release).

Layout of DIR:
    train.json               {"<QID>": {"id", "sentence", "mentions": str, "entities": str, "answer": str}}
    dev.json / val.json      same shape (optional)
    test.json                same shape (optional)
    images/<id>.jpg          mention image of sample <id> (optional)
    qid2ne.json              KB names {QID: name}
    qid2abs.json             KB descriptions (short); qid2abs_long.json the long ones (optional)
    entity_images/<QID>.jpg  entity images (optional)

The fields may also be lists (one sample, several mentions), as in WikiMEL.
When there is no dev file, dev is carved from train.json: the round(n * dev_fraction) ids
with the smallest sha256("<seed>:<id>"), the same on every machine; `train` then excludes
them. A `test.json` is never touched by the carve.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..types import Entity
from .common import (
    DatasetSplit,
    ExampleBuilder,
    carve_dev,
    dataset_dir,
    image_index,
    load_json,
    load_str_map,
    make_entity,
    mention_record,
    require_file,
    resolve_split,
)

FORMAT = "richpedia"
SPLIT_FILES = {"train": "train.json", "dev": "dev.json", "val": "val.json", "test": "test.json"}
LAYOUT = ("DIR/train.json (dict id -> sample), optional DIR/dev.json and DIR/test.json, "
          "KB in DIR/qid2ne.json + DIR/qid2abs.json, optional DIR/entity_images/<QID>.jpg")


def _split_files(root: Path) -> dict[str, Path]:
    files = {name: root / fn for name, fn in SPLIT_FILES.items() if (root / fn).is_file()}
    if not files:
        require_file(root, "train.json", FORMAT, LAYOUT)  # raises with the layout
    return files


def _has_dev_file(files: dict[str, Path]) -> bool:
    return "dev" in files or "val" in files


def available_splits(path) -> list[str]:
    files = _split_files(dataset_dir(path, FORMAT, LAYOUT))
    names = [n for n in SPLIT_FILES if n in files]
    if not _has_dev_file(files) and "train" in files:
        names.insert(names.index("train") + 1, "dev")
    return names


def read(path, split: str = "dev", *, dev_fraction: float = 0.1, seed: int = 0) -> DatasetSplit:
    root = dataset_dir(path, FORMAT, LAYOUT)
    files = _split_files(root)
    stored = resolve_split(split, available_splits(root), FORMAT, root)
    carving = not _has_dev_file(files) and stored in ("train", "dev")
    source = files["train"] if carving else files[stored]
    samples = load_json(source, dict)

    out = ExampleBuilder(FORMAT, split, root)
    keep = list(samples)
    if carving:
        dev_ids = carve_dev(samples, dev_fraction, seed)
        keep = [sid for sid in samples if (sid in dev_ids) == (stored == "dev")]
        out.note(f"no dev file: dev is carved from train.json ({len(dev_ids):,} of {len(samples):,} ids, "
                 f"dev_fraction={dev_fraction}, seed={seed}); train excludes them")
    images = image_index(root / "images")
    for sid in keep:
        rec = samples[sid]
        caption, mentions = mention_record(rec, source, sid)
        image = str(root / "images" / f"{sid}.jpg") if f"{sid}.jpg" in images else None
        out.add_record(sid, caption, mentions, image)
    return out.build()


def read_kb(source, *, long_descriptions: bool = False) -> Iterator[Entity]:
    """KB entities. Descriptions come from qid2abs.json, falling back per entity to
    qid2abs_long.json where the short one is empty or absent; `long_descriptions=True`
    prefers the long ones."""
    root = dataset_dir(source, FORMAT, LAYOUT)
    names_path = require_file(root, "qid2ne.json", FORMAT, LAYOUT)
    names = load_str_map(names_path, "entity name")
    short = _optional_map(root / "qid2abs.json")
    long = _optional_map(root / "qid2abs_long.json")
    first, second = (long, short) if long_descriptions else (short, long)
    images = image_index(root / "entity_images")
    entities = []
    for qid, name in names.items():
        image = [str(root / "entity_images" / f"{qid}.jpg")] if f"{qid}.jpg" in images else []
        entities.append(make_entity(names_path, qid, id=qid, name=name,
                                    description=first.get(qid) or second.get(qid) or "", images=image))
    return iter(entities)


def _optional_map(path: Path) -> dict[str, str]:
    return load_str_map(path, "description") if path.is_file() else {}
