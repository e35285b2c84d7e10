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
(`.OUT.building-PID-...`; images the previous export holds under the same content-hash name are
linked, not copied again), flushed, and exchanged with OUT in one step (Linux renameat2; elsewhere
OUT is renamed aside and the new folder renamed in, rolled back on any interruption; a previous
export a killed export left aside, `.OUT.tmp-PID-...` with OUT missing, is put back by the next
export). The old folder is then deleted; the files someone added to it are kept (linked into the new
folder first), and OUT keeps its permissions. Where OUT cannot be renamed (a mount point, a read-only
parent, the current folder inside it) the export is built in `OUT/.export.building-...` and published
in place: OUT's report is set aside first, each file replaced, stale export files removed, and the
report written last. So OUT holds the previous export or the new one, whole, with its
export_report.json (in place: or no report, until an export runs again); a failed export leaves OUT
as it was. OUT must be new, empty, or a previous export (it has export_report.json, or only export
files and a mark an export left: provenance.json, a hidden temporary): a folder of other files
(someone's dataset) is refused, as is one where an export file name is taken by a folder. Every path
is checked to stay inside OUT.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import json
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from mel.cli_kit import check_output_dir
from mel.errors import InputError
from mel.paths import atomic_write, fsync_path, pid_alive, remove_dead_temps, temp_path
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
    if _recover_interrupted_swap(out):  # OUT was renamed aside by an export that was killed: put it back
        out = check_export_dir(out)

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

    in_place = _in_place_reason(out) is not None
    if in_place:  # built inside OUT (same disk; OUT itself cannot be renamed), published file by file
        remove_dead_temps(out, [_BUILD_NAME, *_OUR_FILES, *_OUR_DIRS])  # what a killed export left in OUT
        build = temp_path(out / _BUILD_NAME, "building")
    else:
        remove_dead_temps(out.parent, [out.name])  # what a killed export left beside OUT (hidden temp names)
        build = temp_path(out, "building")
    build.mkdir()
    try:
        if format != "wikimel":  # hash-named images the previous export holds: linked, not copied again
            _link_previous_images(store, records, out, build)
        writer = {"jsonl": _write_jsonl, "wikimel": _write_wikimel, "gemel": _write_gemel,
                  "parquet": _write_parquet}[format]
        writer(store, build, records, entities, dev_fraction, report)
        if format != "parquet":
            _write_json(build, "provenance.json", {r.sample_id: r.provenance() for r in records}, report)
        report.n_examples = report.n_train + report.n_dev
        _write_json(build, "export_report.json", report.to_dict(), report)
        if in_place:
            _publish_in_place(build, out)
        else:
            _swap_in(build, out)
    finally:
        shutil.rmtree(build, ignore_errors=True)  # gone after the swap; a failed build is not left behind
    return report


_OUR_FILES = ("train.jsonl", "dev.jsonl", "kb.jsonl", "Wikidata-MEL.json", "splits.json", "qid2ne.json",
              "qid2abs.json", "train.parquet", "dev.parquet", "provenance.json", "export_report.json")
_OUR_DIRS = ("images",)
REPORT_NAME = "export_report.json"  # written by every export: the mark of a folder an export made
# While an export replaces the files of OUT in place, OUT's report is renamed to this hidden name: OUT is
# then not a finished export (no export_report.json), but still marked as one an export is writing.
PARTIAL_NAME = ".export_report.partial.json"
_BUILD_NAME = "export"  # an in-place export builds in OUT/.export.building-PID-..., sets aside in .export.tmp-...


def check_export_dir(out_dir: str | Path) -> Path:
    """The export folder OUT (resolved), checked before any work: new, empty, or a previous export
    (finished, or one an export left unfinished: only export files); and writable: its parent, where the
    export is built beside it, or (OUT a mount point, its parent read-only, or the current folder in it:
    published in place) OUT itself. InputError saying what to do otherwise."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory; give a new (or empty) directory for the export")
    out = out.resolve()
    if out.parent == out:
        raise InputError(f"cannot export into {out}; give a new (or empty) directory for the export")
    if _in_place_reason(out) is not None:
        if not os.access(out, os.W_OK):
            raise InputError(f"cannot write into {out}; pick a writable --out")
    else:
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
        if entries and not _is_previous_export(out) and not _is_unfinished_export(entries):
            clash = [n for n in entries if n in ours] or entries
            shown = ", ".join(clash[:4]) + (", ..." if len(clash) > 4 else "")
            raise InputError(f"{out} holds files not written by an export ({shown}); an export replaces the "
                             f"files of its directory, so nothing was changed: pick a new (or empty) directory "
                             f"for --out (a previous export has its export_report.json; if an unfinished export "
                             f"left these files, one without export_report.json, delete them first)")
    return out


def _is_previous_export(out: Path) -> bool:
    """Whether `out` holds an export's report (so its export files may be replaced)."""
    try:
        report = json.loads((out / REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(report, dict) and {"format", "out_dir", "n_examples", "files"} <= set(report)


def _is_unfinished_export(entries: list[str]) -> bool:
    """Whether a folder without a report was left by an export that did not finish: every entry an
    export file or an export's hidden temporary, and a mark only an export writes among them (its
    provenance.json, a hidden temporary, the report set aside while publishing in place). A folder of
    only train.jsonl / dev.jsonl / kb.jsonl is someone's dataset as likely, and is refused. A folder an
    export was publishing into in place (its report set aside) is one whatever else it holds: the other
    files were there before, and are kept."""
    if PARTIAL_NAME in entries:
        return True
    ours = set(_OUR_FILES) | set(_OUR_DIRS)
    if not all(n in ours or _is_our_temp(n) for n in entries):
        return False
    return any(n == "provenance.json" or _is_our_temp(n) for n in entries)


def _in_place_reason(out: Path) -> str | None:
    """Why the existing folder OUT cannot be replaced by a rename (so the export is published in place):
    a mount point (renaming it fails: EBUSY), a read-only parent (OUT writable), or the current folder
    being OUT or inside it (the shell would be left in a deleted folder). None: OUT is swapped whole."""
    if not out.is_dir():
        return None
    if os.path.ismount(out):
        return "mount point"
    if not os.access(out.parent, os.W_OK):
        return "parent not writable"
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return None
    if cwd == out or out in cwd.parents:
        return "current folder"
    return None


def _recover_interrupted_swap(out: Path) -> bool:
    """Put back the previous export that a killed export had renamed aside (`.OUT.tmp-PID-...`, its
    process gone) when OUT is missing; the newest such folder wins. Whether one was put back."""
    if out.exists() or out.is_symlink():
        return False
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.tmp-(?P<pid>\d+)(?:-[0-9a-f]+)?$")
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return False
    aside = [e for e in entries if (m := pattern.match(e.name)) and e.is_dir() and not e.is_symlink()
             and not pid_alive(int(m["pid"]))]
    if not aside:
        return False
    newest = max(aside, key=lambda e: e.stat().st_mtime)
    os.rename(newest, out)
    fsync_path(out.parent)
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` in one step (Linux renameat2 RENAME_EXCHANGE): no instant where
    either is missing. False where the system cannot (not Linux, old C library, filesystem without it)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _swap_in(build: Path, out: Path) -> None:
    """Publish the finished folder `build` as `out`. A previous export at `out` is exchanged with it in one
    step (renameat2; elsewhere: renamed aside, then `build` renamed in, rolled back on any interruption)
    and deleted; the entries someone added to it (not export files) are first linked (or copied) into
    `build`, so they are kept, and `build` takes its permissions."""
    if not out.exists():
        fsync_path(build)
        os.rename(build, out)
        fsync_path(out.parent)
        return
    for name in os.listdir(out):
        if name in _OUR_FILES or name in _OUR_DIRS or name == PARTIAL_NAME or _is_our_temp(name):
            continue
        source, target = out / name, build / name
        if source.is_dir() and not source.is_symlink():
            shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, target)
    shutil.copymode(out, build)
    fsync_path(build)
    if _exchange(build, out):
        fsync_path(out.parent)
        shutil.rmtree(build, ignore_errors=True)  # now the previous export
        return
    old = temp_path(out, "tmp")
    os.rename(out, old)
    try:
        os.rename(build, out)
    except BaseException:  # a disk error, or Ctrl-C / a signal between the renames: put the previous one back
        if not out.exists():
            os.rename(old, out)
        raise
    fsync_path(out.parent)
    shutil.rmtree(old, ignore_errors=True)


class PartialExportError(OSError):
    """Publishing in place failed after OUT's files began to be replaced: OUT holds no export_report.json
    (not a finished export) until an export into it runs again."""


def _publish_in_place(build: Path, out: Path) -> None:
    """Move the finished export in `build` (a hidden folder inside OUT) into OUT, for an OUT that cannot be
    renamed: OUT's report is set aside first (a half-replaced folder is never declared complete), each
    built file / folder replaces its namesake, export files this export did not write are removed, and
    the report is written last. Files someone added to OUT are left alone."""
    report, partial = out / REPORT_NAME, out / PARTIAL_NAME
    written = sorted(n for n in os.listdir(build) if n != REPORT_NAME)
    try:
        if report.exists():
            os.replace(report, partial)
        else:
            _write_bytes(partial, b"{}")
        fsync_path(out)
        for name in written:
            source, target = build / name, inside(out, name)
            if source.is_dir() and target.is_dir():
                if not _exchange(source, target):
                    aside = temp_path(out / _BUILD_NAME, "tmp")
                    os.rename(target, aside)
                    os.rename(source, target)
                    source = aside
                shutil.rmtree(source, ignore_errors=True)  # the previous folder
            else:
                os.replace(source, target)
        for name in os.listdir(out):
            if (name in _OUR_FILES or name in _OUR_DIRS) and name not in written and name != REPORT_NAME:
                stale = out / name
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale)
                else:
                    stale.unlink()
        fsync_path(out)
        os.replace(build / REPORT_NAME, report)
        fsync_path(out)
        partial.unlink(missing_ok=True)
    except OSError as exc:
        raise PartialExportError(exc.errno, exc.strerror or str(exc), exc.filename) from exc


def _link_previous_images(store: AnnotationStore, records: list[ExportRecord], out: Path, build: Path) -> None:
    """Link (or copy) into build/images the images OUT/images already holds under the same name (their
    content hash, the same size), so a re-export does not copy every image again."""
    previous = out / "images"
    if not previous.is_dir() or previous.is_symlink():
        return
    for sha in {r.image_sha256 for r in records if r.image_sha256}:
        source = store.image_path(sha)
        if source is None:
            continue
        old = previous / source.name
        target = inside(build, "images", source.name)
        try:
            if old.is_symlink() or not old.is_file() or old.stat().st_size != source.stat().st_size:
                continue
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(old, target)
        except OSError:
            continue  # copied from the store by the writer


def _is_our_temp(name: str) -> bool:
    """A hidden temporary an export wrote inside OUT (`.train.jsonl.tmp-PID-...`, `.export.building-PID-...`,
    the report set aside while publishing in place)."""
    return name.startswith(".") and (name == PARTIAL_NAME or any(
        name.startswith(f".{n}.tmp-") for n in (*_OUR_FILES, *_OUR_DIRS, _BUILD_NAME))
        or name.startswith(f".{_BUILD_NAME}.building-"))


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
