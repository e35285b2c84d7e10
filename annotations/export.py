"""Corrections -> training files that the project's readers (and so `mel train`) read.

    report = export_corrections(store, "exports/run1", format="jsonl", kb=kb)

For every mention the latest correction that was not undone wins (whoever wrote it). Mentions
whose winning correction is NIL or skip are counted in the report but left out of the
training files: a NIL has no entity to learn and a skip says nothing.

Formats (all readable by mel.datasets.load_dataset(format, OUT, split)):

    jsonl    OUT/train.jsonl [+ OUT/dev.jsonl]   one Example per line, offsets included
             OUT/kb.jsonl                        the entities the examples link to
             OUT/images/<sha256>.<ext>           the mention images
    wikimel  OUT/Wikidata-MEL.json, OUT/splits.json, OUT/images/<sample id>.jpg,
             OUT/qid2ne.json, OUT/qid2abs.json   (entities involved only)
             WikiMEL stores no offsets: the reader finds the first occurrence of the mention
             text, which may be an earlier occurrence than the one annotated.
    gemel    OUT/train.jsonl [+ OUT/dev.jsonl]   {"id","mention","text","img_name","golden","target"}
             OUT/images/<sha256>.<ext>, OUT/kb.jsonl
             GEMEL's format keys gold entities by Wikidata QID; for a KB whose ids are not QIDs
             its reader falls back to the entity name (which is what GEMEL generates anyway).

Every file is written atomically, and every path is checked to stay inside OUT.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from mel.errors import InputError
from mel.types import NIL, Entity, Example, Mention

from .store import AnnotationStore

FORMATS = ("jsonl", "wikimel", "gemel")


@dataclass
class ExportReport:
    format: str
    out_dir: str
    n_mentions_corrected: int = 0   # mentions with a standing correction
    n_examples: int = 0             # written to training files
    n_train: int = 0
    n_dev: int = 0
    n_nil: int = 0                  # counted, not written
    n_skip: int = 0                 # counted, not written
    n_undone: int = 0               # corrections undone by their annotator
    n_superseded: int = 0           # older corrections of a mention, replaced by a later one
    n_images: int = 0
    n_missing_images: int = 0       # image row present but file gone: example kept without image
    n_entities: int = 0
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.format} export to {self.out_dir}: {self.n_examples} examples "
                f"({self.n_train} train, {self.n_dev} dev) from {self.n_mentions_corrected} corrected mentions; "
                f"not written: {self.n_nil} NIL, {self.n_skip} skipped; {self.n_undone} undone and "
                f"{self.n_superseded} superseded corrections ignored; {self.n_images} images"
                + (f" ({self.n_missing_images} missing)" if self.n_missing_images else "")
                + f", {self.n_entities} entities")


def inside(root: Path, *parts: str) -> Path:
    """root/parts, refused (InputError) if it resolves outside root (.., absolute parts, links)."""
    root = root.resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise InputError(f"refusing to write {'/'.join(parts)!r}: it would land outside the export directory {root}")
    return path


def split_of(mention_id: str, dev_fraction: float) -> str:
    """A deterministic train/dev assignment by hash, stable as more corrections arrive."""
    if dev_fraction <= 0:
        return "train"
    bucket = int(hashlib.sha256(mention_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "dev" if bucket < dev_fraction else "train"


def export_corrections(store: AnnotationStore, out_dir: str | Path, format: str = "jsonl", *, kb=None,
                       dev_fraction: float = 0.0) -> ExportReport:
    """Write the standing corrections of `store` to `out_dir` in `format`; returns the report.

    `kb` (a KnowledgeBase) fills in entity descriptions and aliases; without it the entities
    carry only the id and the name the annotator saw.
    """
    if format not in FORMATS:
        raise InputError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if not 0.0 <= dev_fraction < 1.0:
        raise InputError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory; give a directory for the export")
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()

    report = ExportReport(format=format, out_dir=str(out))
    everything = store.corrections(include_undone=True)
    latest = store.latest_corrections()
    report.n_undone = sum(1 for c in everything if c["undone_at"] is not None)
    report.n_superseded = len(everything) - report.n_undone - len(latest)
    report.n_mentions_corrected = len(latest)

    rows, entities = [], {}
    for c in latest:
        if c["action"] == "skip":
            report.n_skip += 1
        elif c["entity_id"] == NIL:
            report.n_nil += 1
        else:
            rows.append(c)
            entities.setdefault(c["entity_id"], _entity(c["entity_id"], c["entity_name"], kb))
    report.n_entities = len(entities)

    writer = {"jsonl": _write_jsonl, "wikimel": _write_wikimel, "gemel": _write_gemel}[format]
    writer(store, out, rows, entities, dev_fraction, report)
    report.n_examples = report.n_train + report.n_dev
    _write_json(out, "export_report.json", report.to_dict(), report)
    return report


# -- formats -------------------------------------------------------------------------------------
def _write_jsonl(store, out, rows, entities, dev_fraction, report):
    splits: dict[str, list[dict]] = {"train": [], "dev": []}
    for c in rows:
        image = _copy_image(store, out, c["image_sha256"], None, report)
        mention = Mention(c["caption"], c["start"], c["end"], image=image, id=c["mention_id"])
        example = Example(mention, gold_id=c["entity_id"], gold_name=entities[c["entity_id"]].name,
                          sample_id=f"c{c['id']}", dataset="annotations", split=split_of(c["mention_id"], dev_fraction))
        splits[example.split].append(example.to_dict())
    _write_splits(out, splits, ".jsonl", report)
    _write_lines(out, "kb.jsonl", [e.to_dict() for e in entities.values()], report)


def _write_wikimel(store, out, rows, entities, dev_fraction, report):
    samples, splits = {}, {"train": [], "dev": []}
    for c in rows:
        sid = f"c{c['id']}"
        if c["image_sha256"]:
            _copy_image(store, out, c["image_sha256"], f"{sid}.jpg", report)  # WikiMEL names images by sample
        samples[sid] = {"id": sid, "sentence": c["caption"], "mentions": [c["mention"]],
                        "entities": [entities[c["entity_id"]].name], "answer": [c["entity_id"]]}
        splits[split_of(c["mention_id"], dev_fraction)].append(sid)
    report.n_train, report.n_dev = len(splits["train"]), len(splits["dev"])
    _write_json(out, "Wikidata-MEL.json", samples, report)
    _write_json(out, "splits.json", splits, report)
    _write_json(out, "qid2ne.json", {e.id: e.name for e in entities.values()}, report)
    _write_json(out, "qid2abs.json", {e.id: e.description for e in entities.values()}, report)


def _write_gemel(store, out, rows, entities, dev_fraction, report):
    splits: dict[str, list[dict]] = {"train": [], "dev": []}
    for c in rows:
        image = _copy_image(store, out, c["image_sha256"], None, report)
        record = {"id": f"c{c['id']}", "mention": c["mention"], "text": c["caption"],
                  "img_name": Path(image).name if image else None,
                  "golden": c["entity_id"], "target": entities[c["entity_id"]].name}
        splits[split_of(c["mention_id"], dev_fraction)].append(record)
    _write_splits(out, splits, ".jsonl", report)
    _write_lines(out, "kb.jsonl", [e.to_dict() for e in entities.values()], report)


# -- pieces --------------------------------------------------------------------------------------
def _entity(entity_id: str, name: str, kb) -> Entity:
    if kb is not None and entity_id in kb:
        return kb.get(entity_id)
    return Entity(id=entity_id, name=name or entity_id)


def _copy_image(store: AnnotationStore, out: Path, sha: str | None, name: str | None, report) -> str | None:
    """Copy a stored image into OUT/images/; returns its path relative to OUT, or None."""
    if not sha:
        return None
    source = store.image_path(sha)
    if source is None:
        report.n_missing_images += 1
        return None
    name = name or source.name
    target = inside(out, "images", name)
    target.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".jpg") and source.suffix != ".jpg":  # WikiMEL layout wants JPEG files
        buffer = io.BytesIO()
        with Image.open(source) as im:
            im.convert("RGB").save(buffer, format="JPEG", quality=95)
        _atomic_bytes(target, buffer.getvalue())
    elif not target.exists():
        tmp = target.with_name(f".{target.name}.part")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    report.n_images += 1
    return f"images/{name}"


def _write_splits(out: Path, splits: dict[str, list[dict]], ext: str, report: ExportReport) -> None:
    report.n_train, report.n_dev = len(splits["train"]), len(splits["dev"])
    for split, lines in splits.items():
        if lines or split == "train":  # always a train file, so readers find the layout
            _write_lines(out, f"{split}{ext}", lines, report)
        else:
            inside(out, f"{split}{ext}").unlink(missing_ok=True)  # no stale dev file from an earlier export


def _write_lines(out: Path, name: str, rows: list[dict], report: ExportReport) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    _atomic_bytes(inside(out, name), text.encode("utf-8"))
    report.files.append(name)


def _write_json(out: Path, name: str, data, report: ExportReport) -> None:
    _atomic_bytes(inside(out, name), json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8"))
    if name not in report.files:
        report.files.append(name)


def _atomic_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
