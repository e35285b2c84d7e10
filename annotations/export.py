"""Labels -> training files that the project's readers (and so `mel train`) read, and a Parquet table.

    report = export_corrections(store, "exports/run1", format="jsonl", kb=kb)                # app corrections
    report = export_corrections(store, "exports/team", format="parquet", project="wikimel-dev",
                                min_agreement=0.5, reviewed_only=False)                      # a project's tasks

What is exported:

- `project=P`: every task of P that has a final label (annotations.review: the reviewer's label,
  else the label all its k annotators agree on), NIL included. Undecided tasks (open, or in
  disagreement and not reviewed) are counted, not written. `min_agreement` keeps the tasks where
  at least that share of the task's annotators chose the final label (1.0 for an agreed task);
  `reviewed_only` keeps the reviewed ones.
- no project: the free-form corrections of the app (those not bound to a project task): for every
  mention the latest correction that was not undone wins (whoever wrote it), NIL included; skips
  are counted, not written. Project decisions are never mixed in (the report counts the projects
  left out: export them with project=...).

Every written example keeps who labelled it and when: `provenance.json` ({sample id: task id,
project, final label, label source (review / agreement / correction), status, agreement, the
annotators' decisions with their times, reviewer and review time}) beside the training files,
and the same as columns of the Parquet table. NIL examples have gold id "NIL": the trainers
(`mel train dim|gemel`) skip them, and evaluation counts them.

Formats (the first three readable by mel.datasets.load_dataset(format, OUT, split)):

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
    parquet  OUT/train.parquet [+ OUT/dev.parquet] (pyarrow), one row per example with every
             provenance field as a column (annotations: a list of {annotator, entity_id, action,
             decided_at}); OUT/images/<sha256>.<ext>. Hugging Face `datasets` reads it:
             load_dataset("parquet", data_files={"train": "OUT/train.parquet"}).

The export is published as one unit: every file is written into a new hidden folder beside OUT
(`.OUT.building-PID-...`), flushed, and that folder is renamed to OUT; a previous export at OUT is
renamed aside first and deleted after (the files someone added to it are kept: linked into the new
folder before the swap). So OUT holds the previous export or the new one, whole, with its
export_report.json; a failed export leaves OUT as it was. OUT must be new, empty, or a previous
export (it has export_report.json): a folder of other files (someone's dataset) is refused, as is
one where an export file name is taken by a folder. Every path is checked to stay inside OUT.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from mel.cli_kit import check_output_dir
from mel.errors import InputError
from mel.paths import atomic_write, fsync_path, remove_dead_temps, temp_path
from mel.types import NIL, Entity, Example, Mention

from .store import AnnotationStore

FORMATS = ("jsonl", "wikimel", "gemel", "parquet")


@dataclass
class ExportReport:
    format: str
    out_dir: str
    project: str | None = None
    n_mentions_corrected: int = 0   # free-form: mentions with a standing correction
    n_tasks: int = 0                # project: tasks in it
    n_final: int = 0                # project: tasks with a final label
    n_reviewed: int = 0             # ... set by a reviewer (the others: agreed by all their annotators)
    n_undecided: int = 0            # project: no final label (open, or disagreement not reviewed): not written
    n_filtered: int = 0             # final labels left out by min_agreement / reviewed_only
    n_examples: int = 0             # written to training files
    n_train: int = 0
    n_dev: int = 0
    n_nil: int = 0                  # NIL examples written (of n_examples)
    n_skip: int = 0                 # free-form: mentions whose latest correction is a skip: not written
    n_undone: int = 0               # corrections undone by their annotator
    n_superseded: int = 0           # older corrections of a mention, replaced by a later one
    n_images: int = 0
    n_missing_images: int = 0       # image row present but file gone: example kept without image
    n_entities: int = 0
    min_agreement: float | None = None
    reviewed_only: bool = False
    projects_not_exported: list[str] = field(default_factory=list)  # free-form export: projects left out
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        head = (f"{self.format} export to {self.out_dir}: {self.n_examples} examples "
                f"({self.n_train} train, {self.n_dev} dev; {self.n_nil} NIL)")
        if self.project is not None:
            filters = [f"agreement >= {self.min_agreement:g}"] if self.min_agreement is not None else []
            filters += ["reviewed only"] if self.reviewed_only else []
            text = (f"{head} from project {self.project!r}: {self.n_final} of {self.n_tasks} tasks have a final "
                    f"label ({self.n_reviewed} reviewed, {self.n_final - self.n_reviewed} agreed), "
                    f"{self.n_undecided} undecided not written"
                    + (f"; {self.n_filtered} left out by the filter ({', '.join(filters)})" if filters else ""))
        else:
            text = (f"{head} from {self.n_mentions_corrected} corrected mentions; not written: {self.n_skip} "
                    f"skipped; {self.n_undone} undone and {self.n_superseded} superseded corrections ignored")
            if self.projects_not_exported:
                text += (f"; project tasks are exported with --project (projects: "
                         f"{', '.join(self.projects_not_exported)})")
        return (text + f"; {self.n_images} images" + (f" ({self.n_missing_images} missing)" if self.n_missing_images
                                                       else "") + f", {self.n_entities} entities")


@dataclass
class ExportRecord:
    """One labelled mention to write, with where its label comes from."""

    sample_id: str
    mention_id: str
    caption: str
    start: int
    end: int
    mention: str
    image_sha256: str | None
    entity_id: str                 # KB id or NIL
    entity_name: str
    source: str                    # review | agreement | correction
    status: str                    # the task's status (annotations.review.STATUSES); "correction" for free-form
    labelled_at: str               # when the final label was set (the review, or the latest decision)
    annotations: list[dict]        # [{annotator, entity_id, action, decided_at}]
    task_id: str | None = None
    project: str | None = None
    agreement: float | None = None
    reviewer: str | None = None
    reviewed_at: str | None = None

    def provenance(self) -> dict:
        return {"task_id": self.task_id, "project": self.project, "entity_id": self.entity_id,
                "entity_name": self.entity_name, "label_source": self.source, "status": self.status,
                "agreement": self.agreement, "annotations": self.annotations, "reviewer": self.reviewer,
                "reviewed_at": self.reviewed_at, "labelled_at": self.labelled_at}


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
                       dev_fraction: float = 0.0, project=None, min_agreement: float | None = None,
                       reviewed_only: bool = False) -> ExportReport:
    """Write the final labels of `project` (or, without one, the app's free-form corrections) to
    `out_dir` in `format`; returns the report.

    `kb` (a KnowledgeBase) fills in entity descriptions and aliases; without it the entities
    carry only the id and the name the annotator saw.
    """
    if format not in FORMATS:
        raise InputError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if not 0.0 <= dev_fraction < 1.0:
        raise InputError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    if min_agreement is not None and not (isinstance(min_agreement, (int, float)) and 0.0 <= min_agreement <= 1.0):
        raise InputError(f"min_agreement is a share of the task's annotators, in [0, 1]; got {min_agreement!r}")
    if project is None and (min_agreement is not None or reviewed_only):
        raise InputError("--min-agreement and --reviewed-only filter a project's tasks: give --project too")
    if format == "parquet":
        _require_pyarrow()
    out = check_export_dir(out_dir)

    report = ExportReport(format=format, out_dir=str(out),
                          min_agreement=float(min_agreement) if min_agreement is not None else None,
                          reviewed_only=reviewed_only)
    if project is None:
        records = _free_form_records(store, report)
    else:
        records = _project_records(store, project, report, min_agreement, reviewed_only)

    entities: dict[str, Entity] = {}
    for r in records:
        if r.entity_id != NIL:
            entities.setdefault(r.entity_id, _entity(r.entity_id, r.entity_name, kb))
        report.n_nil += r.entity_id == NIL
    report.n_entities = len(entities)

    remove_dead_temps(out.parent, [out.name])  # what a killed export left beside OUT (hidden temp names)
    build = temp_path(out, "building")
    build.mkdir()
    try:
        writer = {"jsonl": _write_jsonl, "wikimel": _write_wikimel, "gemel": _write_gemel,
                  "parquet": _write_parquet}[format]
        writer(store, build, records, entities, dev_fraction, report)
        if format != "parquet":
            _write_json(build, "provenance.json", {r.sample_id: r.provenance() for r in records}, report)
        report.n_examples = report.n_train + report.n_dev
        _write_json(build, "export_report.json", report.to_dict(), report)
        _swap_in(build, out)
    finally:
        shutil.rmtree(build, ignore_errors=True)  # gone after the swap; a failed build is not left behind
    return report


_OUR_FILES = ("train.jsonl", "dev.jsonl", "kb.jsonl", "Wikidata-MEL.json", "splits.json", "qid2ne.json",
              "qid2abs.json", "train.parquet", "dev.parquet", "provenance.json", "export_report.json")
_OUR_DIRS = ("images",)
REPORT_NAME = "export_report.json"  # written by every export: the mark of a folder an export made


def check_export_dir(out_dir: str | Path) -> Path:
    """The export folder OUT (resolved), checked before any work: new, empty, or a previous export;
    and its parent writable (the export is built beside it). InputError saying what to do otherwise."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory; give a new (or empty) directory for the export")
    out = out.resolve()
    if out.parent == out:
        raise InputError(f"cannot export into {out}; give a new (or empty) directory for the export")
    check_output_dir(out.parent)
    if out.is_dir():
        try:
            entries = sorted(os.listdir(out))
        except OSError as exc:
            raise InputError(f"cannot read the export directory {out} ({exc.strerror or exc}); "
                             f"pick a new directory for the export") from exc
        ours = set(_OUR_FILES) | set(_OUR_DIRS)
        taken = [n for n in entries if n in _OUR_FILES and (not (out / n).is_file() or (out / n).is_symlink())]
        taken += [n for n in entries if n in _OUR_DIRS and (not (out / n).is_dir() or (out / n).is_symlink())]
        if taken:
            raise InputError(f"{out / taken[0]} is not a file an export wrote (a folder or a link where the export "
                             f"writes its {taken[0]}); nothing was changed: move it away, or pick a new (or empty) "
                             f"directory for --out")
        if entries and not _is_previous_export(out):
            clash = [n for n in entries if n in ours] or entries
            shown = ", ".join(clash[:4]) + (", ..." if len(clash) > 4 else "")
            raise InputError(f"{out} holds files not written by an export ({shown}); an export replaces the "
                             f"files of its directory, so nothing was changed: pick a new (or empty) directory "
                             f"for --out")
    return out


def _is_previous_export(out: Path) -> bool:
    """Whether `out` holds an export's report (so its export files may be replaced)."""
    try:
        report = json.loads((out / REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(report, dict) and {"format", "out_dir", "n_examples", "files"} <= set(report)


def _swap_in(build: Path, out: Path) -> None:
    """Publish the finished folder `build` as `out` in one rename. A previous export at `out` is renamed
    aside and deleted; the entries someone added to it (not export files) are first linked (or copied)
    into `build`, so they are kept."""
    fsync_path(build)
    if not out.exists():
        os.rename(build, out)
    elif not os.listdir(out):
        os.rmdir(out)  # an empty folder made by hand (os.rename cannot replace a folder on every system)
        os.rename(build, out)
    else:
        old = temp_path(out, "tmp")
        for name in os.listdir(out):
            if name in _OUR_FILES or name in _OUR_DIRS or _is_our_temp(name):
                continue
            source, target = out / name, build / name
            if source.is_dir() and not source.is_symlink():
                shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(source, target)
        os.rename(out, old)
        try:
            os.rename(build, out)
        except OSError:
            os.rename(old, out)  # put the previous export back
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(out.parent)


def _is_our_temp(name: str) -> bool:
    """A hidden temporary file an older export wrote inside OUT (`.train.jsonl.tmp-PID-...`)."""
    return name.startswith(".") and any(name.startswith(f".{n}.tmp-") for n in _OUR_FILES)


def _link_or_copy(source, target) -> None:
    """Hard-link `source` at `target` (same folder tree, so the same disk), or copy it."""
    if Path(source).is_symlink():
        os.symlink(os.readlink(source), target)
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# -- what to export ------------------------------------------------------------------------------
def _free_form_records(store: AnnotationStore, report: ExportReport) -> list[ExportRecord]:
    """The latest standing correction of each mention, among the corrections not bound to a task."""
    rows = list(store.db.query(
        'SELECT c.*, m.caption, m.start, m."end", m.mention, m.image_sha256 FROM corrections c '
        "JOIN mentions m ON m.id = c.mention_id WHERE c.task_id IS NULL ORDER BY c.id"))
    latest: dict[str, dict] = {}
    for c in rows:
        if c["undone_at"] is not None:
            report.n_undone += 1
        else:
            latest[c["mention_id"]] = c  # rows are in id order: the last one wins
    report.n_superseded = len(rows) - report.n_undone - len(latest)
    report.n_mentions_corrected = len(latest)
    if "projects" in store.db.table_names():
        report.projects_not_exported = [r[0] for r in store.db.execute(
            "SELECT p.name FROM projects p WHERE EXISTS (SELECT 1 FROM tasks t WHERE t.project_id = p.id) "
            "ORDER BY p.id")]
    records = []
    for c in sorted(latest.values(), key=lambda c: c["id"]):
        if c["action"] == "skip":
            report.n_skip += 1
            continue
        decision = {"annotator": c["annotator"], "entity_id": c["entity_id"], "action": c["action"],
                    "decided_at": c["created"]}
        records.append(ExportRecord(f"c{c['id']}", c["mention_id"], c["caption"], c["start"], c["end"],
                                    c["mention"], c["image_sha256"], c["entity_id"], c["entity_name"] or "",
                                    "correction", "correction", c["created"], [decision]))
    return records


def _project_records(store: AnnotationStore, project, report: ExportReport, min_agreement: float | None,
                     reviewed_only: bool) -> list[ExportRecord]:
    from .projects import get_project
    from .review import task_labels
    project = get_project(store, project)
    report.project = project.name
    labels = task_labels(store, project)
    report.n_tasks = len(labels)
    mentions = {r["task_id"]: r for r in store.db.query(
        'SELECT t.id AS task_id, m.id, m.caption, m.start, m."end", m.mention, m.image_sha256 FROM tasks t '
        "JOIN mentions m ON m.id = t.mention_id WHERE t.project_id = ?", [project.id])}
    records = []
    for task_id, label in labels.items():
        if label.final_label is None:
            report.n_undecided += 1
            continue
        report.n_final += 1
        report.n_reviewed += label.reviewed
        if (reviewed_only and not label.reviewed) or (
                min_agreement is not None and (label.agreement is None or label.agreement < min_agreement - 1e-12)):
            report.n_filtered += 1
            continue
        m = mentions[task_id]
        review = label.review if label.reviewed else None
        decided = [{"annotator": d.annotator, "entity_id": d.label, "action": d.action, "decided_at": d.created}
                   for d in label.decisions]
        labelled_at = review.created if review else max(d.created for d in label.decisions)
        records.append(ExportRecord(task_id, m["id"], m["caption"], m["start"], m["end"], m["mention"],
                                    m["image_sha256"], label.final_label, label.final_name, label.source,
                                    label.status, labelled_at, decided, task_id, project.name, label.agreement,
                                    review.reviewer if review else None, review.created if review else None))
    return records


# -- formats -------------------------------------------------------------------------------------
def _write_jsonl(store, out, records, entities, dev_fraction, report):
    splits: dict[str, list[dict]] = {"train": [], "dev": []}
    for r in records:
        image = _copy_image(store, out, r.image_sha256, None, report)
        mention = Mention(r.caption, r.start, r.end, image=image, id=r.mention_id)
        example = Example(mention, gold_id=r.entity_id, gold_name=_name(r, entities), sample_id=r.sample_id,
                          dataset="annotations", split=split_of(r.mention_id, dev_fraction))
        splits[example.split].append(example.to_dict())
    _write_splits(out, splits, ".jsonl", report)
    _write_lines(out, "kb.jsonl", [e.to_dict() for e in entities.values()], report)


def _write_wikimel(store, out, records, entities, dev_fraction, report):
    samples, splits = {}, {"train": [], "dev": []}
    for r in records:
        sid = r.sample_id
        if r.image_sha256:
            _copy_image(store, out, r.image_sha256, f"{sid}.jpg", report)  # WikiMEL names images by sample
        samples[sid] = {"id": sid, "sentence": r.caption, "mentions": [r.mention],
                        "entities": [_name(r, entities)], "answer": [r.entity_id]}
        splits[split_of(r.mention_id, dev_fraction)].append(sid)
    report.n_train, report.n_dev = len(splits["train"]), len(splits["dev"])
    _write_json(out, "Wikidata-MEL.json", samples, report)
    _write_json(out, "splits.json", splits, report)
    _write_json(out, "qid2ne.json", {e.id: e.name for e in entities.values()}, report)
    _write_json(out, "qid2abs.json", {e.id: e.description for e in entities.values()}, report)


def _write_gemel(store, out, records, entities, dev_fraction, report):
    splits: dict[str, list[dict]] = {"train": [], "dev": []}
    for r in records:
        image = _copy_image(store, out, r.image_sha256, None, report)
        record = {"id": r.sample_id, "mention": r.mention, "text": r.caption,
                  "img_name": Path(image).name if image else None,
                  "golden": r.entity_id, "target": NIL if r.entity_id == NIL else _name(r, entities)}
        splits[split_of(r.mention_id, dev_fraction)].append(record)
    _write_splits(out, splits, ".jsonl", report)
    _write_lines(out, "kb.jsonl", [e.to_dict() for e in entities.values()], report)


def _write_parquet(store, out, records, entities, dev_fraction, report):
    import pyarrow as pa
    import pyarrow.parquet as pq
    decision = pa.struct([("annotator", pa.string()), ("entity_id", pa.string()), ("action", pa.string()),
                          ("decided_at", pa.timestamp("ms", tz="UTC"))])
    schema = pa.schema([
        ("sample_id", pa.string()), ("task_id", pa.string()), ("project", pa.string()),
        ("caption", pa.string()), ("start", pa.int32()), ("end", pa.int32()), ("mention", pa.string()),
        ("image", pa.string()), ("entity_id", pa.string()), ("entity_name", pa.string()),
        ("entity_description", pa.string()), ("is_nil", pa.bool_()), ("label_source", pa.string()),
        ("status", pa.string()), ("reviewed", pa.bool_()), ("reviewer", pa.string()),
        ("reviewed_at", pa.timestamp("ms", tz="UTC")), ("labelled_at", pa.timestamp("ms", tz="UTC")),
        ("agreement", pa.float64()), ("n_annotators", pa.int32()), ("annotations", pa.list_(decision)),
        ("split", pa.string()),
    ])
    splits: dict[str, list[dict]] = {"train": [], "dev": []}
    for r in records:
        entity = entities.get(r.entity_id)
        split = split_of(r.mention_id, dev_fraction)
        splits[split].append({
            "sample_id": r.sample_id, "task_id": r.task_id, "project": r.project, "caption": r.caption,
            "start": r.start, "end": r.end, "mention": r.mention,
            "image": _copy_image(store, out, r.image_sha256, None, report), "entity_id": r.entity_id,
            "entity_name": _name(r, entities), "entity_description": entity.description if entity else "",
            "is_nil": r.entity_id == NIL, "label_source": r.source, "status": r.status,
            "reviewed": r.source == "review", "reviewer": r.reviewer, "reviewed_at": _time(r.reviewed_at),
            "labelled_at": _time(r.labelled_at), "agreement": r.agreement, "n_annotators": len(r.annotations),
            "annotations": [dict(a, decided_at=_time(a["decided_at"])) for a in r.annotations], "split": split})
    report.n_train, report.n_dev = len(splits["train"]), len(splits["dev"])
    for split, rows in splits.items():
        name = f"{split}.parquet"
        if not rows and split != "train":
            continue
        table = pa.Table.from_pylist(rows, schema=schema)
        with atomic_write(inside(out, name)) as tmp:
            pq.write_table(table, tmp)
        report.files.append(name)


# -- pieces --------------------------------------------------------------------------------------
def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise InputError("the parquet export needs pyarrow: pip install pyarrow (or export jsonl)") from exc


def _time(text: str | None) -> datetime | None:
    """The store's UTC timestamps ("2025-01-01T10:00:00.123Z") as aware datetimes."""
    if not text:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def _name(r: ExportRecord, entities: dict[str, Entity]) -> str:
    if r.entity_id == NIL:
        return ""
    return entities[r.entity_id].name


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
        _write_bytes(target, buffer.getvalue())
    elif not target.exists():
        with atomic_write(target) as tmp:
            shutil.copyfile(source, tmp)
    report.n_images += 1
    return f"images/{name}"


def _write_splits(out: Path, splits: dict[str, list[dict]], ext: str, report: ExportReport) -> None:
    report.n_train, report.n_dev = len(splits["train"]), len(splits["dev"])
    for split, lines in splits.items():
        if lines or split == "train":  # always a train file, so readers find the layout
            _write_lines(out, f"{split}{ext}", lines, report)


def _write_lines(out: Path, name: str, rows: list[dict], report: ExportReport) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    _write_bytes(inside(out, name), text.encode("utf-8"))
    report.files.append(name)


def _write_json(out: Path, name: str, data, report: ExportReport) -> None:
    _write_bytes(inside(out, name), json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8"))
    if name not in report.files:
        report.files.append(name)


def _write_bytes(path: Path, data: bytes) -> None:
    """Publish `data` at `path` whole or not at all (mel.paths.atomic_write: flushed, renamed)."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
