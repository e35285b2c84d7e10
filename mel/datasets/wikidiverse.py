"""WikiDiverse (KGMEL release).

Layout of DIR:
    WikiDiverse.json   [{"id", "sentence", "mention": [...], "entity": [...], "answer": [...],
                         "imgPath", "img-url"}]
    splits.json        {"train": [ids], "val": [ids], optionally "test": [ids]}
    images/<imgPath>   mention images, optional (the public release has only the URLs)

Image rule: Mention.image is the local file DIR/images/<imgPath> (or DIR/<imgPath>) when it
exists, else None; the `img-url` of every sample is kept in DatasetSplit.image_urls.
"dev" and "val" name the same split. The KB is the set of gold entities named in the file
(QID -> the name used most often for it; other names become aliases); it has no descriptions.
"""
from __future__ import annotations

import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterator

from ..errors import DatasetFormatError
from ..types import NIL, Entity
from .common import (
    DatasetSplit,
    ExampleBuilder,
    dataset_dir,
    get_field,
    image_index,
    load_json,
    load_split_ids,
    make_entity,
    mention_record,
    records_of_split,
    require_file,
    resolve_split,
)

FORMAT = "wikidiverse"
DATA_FILE = "WikiDiverse.json"
SPLITS_FILE = "splits.json"
LAYOUT = (f"DIR/{DATA_FILE} (list of samples), DIR/{SPLITS_FILE} ({{\"train\": [ids], \"val\": [ids]}}), "
          "optional DIR/images/<imgPath>")


def _splits(root: Path) -> dict[str, list[str]]:
    return load_split_ids(require_file(root, SPLITS_FILE, FORMAT, LAYOUT))


def _samples(root: Path) -> tuple[Path, dict[str, dict]]:
    """Samples by id (as text), in file order."""
    path = require_file(root, DATA_FILE, FORMAT, LAYOUT)
    samples: dict[str, dict] = {}
    for i, rec in enumerate(load_json(path, list)):
        rid = get_field(rec, "id", (int, str), path, f"index {i}")
        sid = str(rid)
        if sid in samples:
            raise DatasetFormatError(path, "duplicate sample id", sid)
        samples[sid] = rec
    return path, samples


def available_splits(path) -> list[str]:
    return list(_splits(dataset_dir(path, FORMAT, LAYOUT)))


def read(path, split: str = "dev", *, dev_fraction: float = 0.1, seed: int = 0) -> DatasetSplit:
    root = dataset_dir(path, FORMAT, LAYOUT)
    splits = _splits(root)
    stored = resolve_split(split, splits, FORMAT, root)
    data_path, samples = _samples(root)
    local = {"images": image_index(root / "images"), "": image_index(root)}

    out = ExampleBuilder(FORMAT, split, root)
    for sid, rec in records_of_split(splits[stored], samples, out, split_name=stored, ids_file=SPLITS_FILE,
                                     data_file=DATA_FILE):
        caption, mentions = mention_record(rec, data_path, sid, mentions="mention", names="entity")
        img_name = get_field(rec, "imgPath", str, data_path, sid, default="")
        url = get_field(rec, "img-url", (str, type(None)), data_path, sid, default=None)
        out.add_record(sid, caption, mentions, _local_image(root, img_name, local), image_url=url or None)
    overlap = _overlap(splits, stored)
    if overlap:
        out.note(f"{len(overlap):,} ids of {stored!r} are also listed in another split of {SPLITS_FILE} "
                 f"(e.g. {', '.join(overlap[:5])}); they are kept")
    if out.report.n_missing_image and out.image_urls:
        out.note(f"{out.report.n_missing_image:,} records have no local image; their original URLs are in "
                 f"DatasetSplit.image_urls")
    return out.build()


def _local_image(root: Path, name: str, local: dict[str, set[str]]) -> str | None:
    name = Path(name).name  # imgPath is a bare file name; never follow a path out of DIR
    if not name:
        return None
    for folder, names in local.items():
        if name in names:
            return str(root / folder / name) if folder else str(root / name)
    return None


def _overlap(splits: dict[str, list[str]], stored: str) -> list[str]:
    others = {i for name, ids in splits.items() if name != stored for i in ids}
    return [i for i in splits[stored] if i in others]


def read_kb(source) -> Iterator[Entity]:
    root = dataset_dir(source, FORMAT, LAYOUT)
    data_path, samples = _samples(root)
    names: dict[str, Counter] = {}  # insertion order = first appearance, which breaks ties
    for sid, rec in samples.items():
        _, mentions = mention_record(rec, data_path, sid, mentions="mention", names="entity")
        for _, qid, name in mentions:
            if qid != NIL:
                names.setdefault(qid, Counter())[unicodedata.normalize("NFC", name)] += 1  # NFD = NFC spelling
    entities = []
    for qid, counts in names.items():
        ranked = [n for n, _ in counts.most_common() if n]  # most_common keeps first-seen order on ties
        entities.append(make_entity(data_path, qid, id=qid, name=ranked[0] if ranked else qid, aliases=ranked[1:]))
    return iter(entities)
