"""MIMIC-style data (Luo et al., KDD 2023; also what its cleaned WikiMEL/RichpediaMEL/WikiDiverse
releases look like).

Layout of DIR:
    <split>.json or <PREFIX>_<split>.json   e.g. train.json or WIKIMEL_dev.json: a JSON list of
        {"id" (optional), "sentence", "mentions", "entities" (optional), "answer", "imgPath"}
        where mentions/entities/answer are parallel lists or single strings; answer "nil" = NIL
    kb_entity.json    [{"entity_name", "attr", "image_list", "qid" and/or "id"}]
    qid2id.json       {QID: kb id} (optional; maps integer kb ids back to QIDs)
    mention_image/    mention images (or images/), named by imgPath
    kb_image/         entity images (or entity_images/), named by image_list entries

As MIMIC does, mentions and entity names are URL-unquoted ("Caf%C3%A9" -> "Café"), and an
imgPath that is not found as given is looked up as <stem>.jpg (MIMIC converted every image to
JPEG). Gold names missing from a record are taken from the KB when kb_entity.json is there.
"""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote

from ..errors import DatasetFormatError
from ..types import NIL, Entity
from .common import (
    DatasetSplit,
    ExampleBuilder,
    dataset_dir,
    get_field,
    image_index,
    load_json,
    make_entity,
    mention_record,
    require_file,
    resolve_split,
)

FORMAT = "mimic"
KB_FILE = "kb_entity.json"
SPLIT_ORDER = ("train", "dev", "val", "valid", "test")
LAYOUT = (f"DIR/<split>.json or DIR/<PREFIX>_<split>.json (JSON lists of mentions), DIR/{KB_FILE}, "
          "optional DIR/qid2id.json, DIR/mention_image/, DIR/kb_image/")
MENTION_IMAGE_DIRS = ("mention_image", "mention_images", "images")
KB_IMAGE_DIRS = ("kb_image", "kb_images", "entity_images")
_SPLIT_FILE = re.compile(r"^(?:.+_)?(?P<split>[A-Za-z]+)\.json$")


def _split_files(root: Path) -> dict[str, Path]:
    """split name -> file. A bare <split>.json wins over <PREFIX>_<split>.json; two prefixed
    files for one split are ambiguous."""
    found: dict[str, list[Path]] = {}
    for p in sorted(root.glob("*.json")):
        m = _SPLIT_FILE.match(p.name)
        if m and p.name not in (KB_FILE, "qid2id.json"):
            name = m["split"].lower()
            if name in SPLIT_ORDER:
                found.setdefault(name, []).append(p)
    files = {}
    for name, paths in found.items():
        bare = [p for p in paths if p.name.lower() == f"{name}.json"]
        if bare:
            files[name] = bare[0]
        elif len(paths) == 1:
            files[name] = paths[0]
        else:
            raise DatasetFormatError(root, f"several files could hold the {name!r} split: "
                                           f"{', '.join(p.name for p in paths)}; keep one")
    if not files:
        raise DatasetFormatError(root, f"no split file found; the {FORMAT} layout expects {LAYOUT}")
    return {n: files[n] for n in SPLIT_ORDER if n in files}


def available_splits(path) -> list[str]:
    return list(_split_files(dataset_dir(path, FORMAT, LAYOUT)))


def read(path, split: str = "dev", *, dev_fraction: float = 0.1, seed: int = 0) -> DatasetSplit:
    root = dataset_dir(path, FORMAT, LAYOUT)
    files = _split_files(root)
    source = files[resolve_split(split, files, FORMAT, root)]
    records = load_json(source, list)
    folders = [(d, image_index(root / d)) for d in MENTION_IMAGE_DIRS]
    kb_names: dict[str, str] | None = None

    out = ExampleBuilder(FORMAT, split, root)
    for i, rec in enumerate(records):
        rid = get_field(rec, "id", (str, int), source, i, default=i)
        sid = str(rid)
        caption, mentions = mention_record(rec, source, sid)
        if any(not name for _, gid, name in mentions if gid != NIL) and kb_names is None:
            kb_names = _kb_names(root)
        mentions = [(unquote(m), gid, unquote(name) or (kb_names or {}).get(gid, ""))
                    for m, gid, name in mentions]
        img = get_field(rec, "imgPath", (str, type(None)), source, sid, default=None)
        out.add_record(sid, caption, mentions, _find_image(root, img, folders))
    return out.build()


def _find_image(root: Path, name: str | None, folders) -> str | None:
    if not name:
        return None
    base = Path(name).name
    for candidate in (base, Path(base).stem + ".jpg"):
        for folder, names in folders:
            if candidate in names:
                return str(root / folder / candidate)
    return None


def _kb_names(root: Path) -> dict[str, str]:
    if not (root / KB_FILE).is_file():
        return {}
    return {e.id: e.name for e in read_kb(root)}


def read_kb(source) -> Iterator[Entity]:
    """Entities of kb_entity.json (`source` is DIR or the file itself). Entity.id is the
    record's "qid", else its "id" (mapped back to a QID through qid2id.json when that exists)."""
    src = Path(source).expanduser()
    path = src if src.is_file() else require_file(dataset_dir(src, FORMAT, LAYOUT), KB_FILE, FORMAT, LAYOUT)
    root = path.parent.resolve()
    id2qid = _id2qid(root / "qid2id.json")
    folders = [(d, image_index(root / d)) for d in KB_IMAGE_DIRS]
    entities: dict[str, Entity] = {}
    for i, rec in enumerate(load_json(path, list)):
        qid = get_field(rec, "qid", str, path, i, default=None)
        raw_id = get_field(rec, "id", (str, int), path, i, default=None)
        if qid is None and raw_id is None:
            raise DatasetFormatError(path, "an entity needs an 'id' or a 'qid'", i)
        eid = qid or id2qid.get(str(raw_id), str(raw_id))
        name = unicodedata.normalize("NFC", unquote(get_field(rec, "entity_name", str, path, eid)))
        attr = get_field(rec, "attr", (str, type(None)), path, eid, default="") or ""
        image_list = get_field(rec, "image_list", (list, type(None)), path, eid, default=[]) or []
        images = []
        for img in image_list:
            if not isinstance(img, str):
                raise DatasetFormatError(path, "'image_list' must hold file names", eid)
            found = _find_image(root, img, folders)
            if found:
                images.append(found)
        if eid in entities:
            if entities[eid].name != name:
                raise DatasetFormatError(path, f"entity id {eid!r} appears twice with different names "
                                               f"({entities[eid].name!r}, {name!r})", i)
            continue  # an exact repeat adds nothing
        entities[eid] = make_entity(path, eid, id=eid, name=name, description=attr, images=images)
    return iter(entities.values())


def _id2qid(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    data = load_json(path, dict)
    for qid, kb_id in data.items():
        if not isinstance(kb_id, (str, int)) or isinstance(kb_id, bool):
            raise DatasetFormatError(path, "each value must be the entity's kb id", qid)
    return {str(v): k for k, v in data.items()}
