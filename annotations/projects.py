"""Annotation projects: a KB, a set of tasks (one mention each) and settings, in the annotation database.

    project = create_project(store, "wikimel-dev", kb="wikimel.sqlite",
                             settings=ProjectSettings(guidelines="# Link the person, not the role"))
    report = import_tasks(store, project, "wikimel", "../data/wikimel", split="dev", limit=500)
    print(report.summary())
    print(progress(store, project, "alice"))            # alice 37 / 500, project 120 / 500

Tables (schema version 2 of annotations/store.py): `projects`, `tasks`, `queue_cursors`, `flags`,
and four columns of `corrections` (task_id, shown_predictions, client_token, supersedes) that bind
every queue decision to its task (annotations/queue.py).

Import formats: every dataset layout the library reads (mel.datasets.FORMATS: wikimel, richpedia,
wikidiverse, mimic, gemel, jsonl), read by mel's own readers, and two task formats for a team's own
data (TASK_FORMATS):

    csv          a header row, then one mention per row
    tasks-jsonl  one JSON object per line

with the columns/keys `caption` (required), `mention` and/or `start`,`end` (character offsets;
the span is resolved as the app resolves a typed or selected mention), `image` (a file name looked
up in the image folder: --images, default DATA/images; URLs are not fetched), `gold_id`,
`gold_name` and `id` (optional). Unknown CSV columns are refused up front (a typo would otherwise
spoil every row); a malformed record is reported by file and record number and the rest is imported.

Re-importing adds nothing twice: a task's content hash (its caption, span and image: the mention
id of the store) is unique within a project. An import is all or nothing: the whole file is read
and checked first (a file that cannot be read to its end, e.g. not UTF-8 or a broken CSV, is refused
with nothing written), then every task, and the project settings given with it, is written in one
transaction: a crash or a refusal leaves the project as it was. Images are stored while reading,
under their content hash (store.save_image), so an image without a task after a refusal or a
crash is harmless and is reused by the next import.
"""
from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mel.errors import DatasetFormatError, InputError, require_whole
from mel.types import NIL, Mention, check_typed_text

from .store import STANDING, AnnotationStore, AnnotationStoreError, mention_key, utc_now

PROJECTS_SCHEMA_VERSION = 2  # the store schema version that added projects and tasks
TASK_FORMATS = ("csv", "tasks-jsonl")
TASK_FIELDS = ("id", "caption", "mention", "start", "end", "image", "gold_id", "gold_name")
DEFAULT_LINKERS = ("gemel", "dim")  # the app's two panels
MAX_NAME_CHARS = 100
MAX_ANNOTATIONS_PER_TASK = 1000    # distinct annotators per task; more is surely a typo
MAX_LEASE_MINUTES = 525_600        # one year
_SETTING_BOUNDS = {"annotations_per_task": (1, MAX_ANNOTATIONS_PER_TASK), "lease_minutes": (1, MAX_LEASE_MINUTES)}
MAX_LISTED_MALFORMED = 5  # in ImportReport.summary(); every one is in ImportReport.malformed
_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|data:)", re.I)


# -- data model ------------------------------------------------------------------------------------
@dataclass
class ProjectSettings:
    """A project's settings, stored as JSON. Unknown keys survive a round trip in `extra`."""

    guidelines: str = ""                       # Markdown, shown to annotators on `h`
    linkers: list[str] = field(default_factory=lambda: list(DEFAULT_LINKERS))  # pre-annotate with these
    annotations_per_task: int = 1              # distinct annotators who decide each task (k)
    lease_minutes: int = 30                    # a task on someone's screen is not given to another for this long
    # The team, when fixed: each task then goes to k of them in turn (task at position p to
    # annotators[(p*k + j) % N], j < k), so everyone gets the same share (k*tasks/N, give or take
    # one) and nobody else gets tasks. Empty: whoever asks first, at most k per task.
    annotators: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name, (low, high) in _SETTING_BOUNDS.items():  # "... is too large (at most 1,000), got ..."
            require_whole(name, getattr(self, name), low, high)
        if not isinstance(self.annotators, list) or not all(isinstance(x, str) and x.strip() for x in self.annotators):
            raise InputError(f"settings.annotators must be a list of annotator names, got {self.annotators!r}")
        self.annotators = [x.strip() for x in self.annotators]
        if len(set(self.annotators)) != len(self.annotators):
            raise InputError(f"settings.annotators names someone twice: {self.annotators}")
        if self.annotators and len(self.annotators) < self.annotations_per_task:
            raise InputError(f"each task needs {self.annotations_per_task} distinct annotators but the team has only "
                             f"{len(self.annotators)} ({', '.join(self.annotators)}); add annotators or lower "
                             f"annotations_per_task")
        if not isinstance(self.guidelines, str):
            raise InputError("the guidelines must be Markdown text")
        if not isinstance(self.linkers, list) or not all(isinstance(x, str) and x for x in self.linkers):
            raise InputError(f"settings.linkers must be a list of linker names, got {self.linkers!r}")

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        extra = data.pop("extra")
        return json.dumps({**extra, **data}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "ProjectSettings":
        data = json.loads(text or "{}")
        for name, (low, high) in _SETTING_BOUNDS.items():  # stored before the bounds (or by hand): read within them
            value = data.get(name) if isinstance(data, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and not low <= value <= high:
                data[name] = min(max(value, low), high)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})


@dataclass(frozen=True)
class Project:
    id: int
    name: str
    kb: str            # path of the KB file ('' until one is attached)
    kb_stamp: str      # KB file name and build time; predictions made for the project carry it
    kb_build_id: str
    settings: ProjectSettings
    created: str


@dataclass(frozen=True)
class Task:
    """One mention to decide. `mention.image` is the stored image file (or None)."""

    id: str
    project_id: int
    mention_id: str
    mention: Mention
    image_sha256: str | None
    gold_id: str | None
    gold_name: str
    source_file: str
    source_record: str
    position: int


@dataclass(frozen=True)
class Progress:
    """How far an annotator and the project are: str() gives "alice 37 / 500, project 120 / 500"."""

    total: int              # tasks in the project
    project_done: int       # tasks decided by annotations_per_task distinct annotators
    annotator: str | None = None
    annotator_done: int = 0  # tasks this annotator decided (changes of a decision count once)
    annotator_skipped: int = 0  # tasks this annotator skipped and has not decided yet
    annotator_share: int | None = None  # tasks assigned to this annotator (a project with a fixed team)

    def __str__(self) -> str:
        share = self.total if self.annotator_share is None else self.annotator_share
        mine = f"{self.annotator} {self.annotator_done} / {share}, " if self.annotator else ""
        return f"{mine}project {self.project_done} / {self.total}"


@dataclass(frozen=True)
class MalformedRecord:
    file: str
    record: str   # "row 3", "line 7", a dataset sample id...
    reason: str

    def __str__(self) -> str:
        return f"{self.file}, record {self.record}: {self.reason}"


@dataclass
class ImportReport:
    project: str
    format: str
    source: str
    n_read: int = 0              # records (mentions) looked at
    n_imported: int = 0          # new tasks
    n_already_present: int = 0   # same content as a task of the project (re-import, or a repeat in the file)
    n_malformed: int = 0
    malformed: list[MalformedRecord] = field(default_factory=list)
    n_batches: int = 0           # transactions committed (an import is one)
    reader_summary: str = ""     # what mel's dataset reader said (dataset formats)

    def summary(self) -> str:
        text = (f"{self.project}: {self.n_imported:,} tasks imported, {self.n_already_present:,} already present, "
                f"{self.n_malformed:,} malformed records ({self.n_read:,} read from {self.format} {self.source})")
        if self.malformed:
            shown = "; ".join(str(m) for m in self.malformed[:MAX_LISTED_MALFORMED])
            more = len(self.malformed) - MAX_LISTED_MALFORMED
            text += f"\n  malformed: {shown}" + (f"; ... and {more:,} more" if more > 0 else "")
        return text


# -- projects -------------------------------------------------------------------------------------
def require_projects_schema(store: AnnotationStore) -> None:
    """Projects need schema version 2; a store opened read-only on an older file says so."""
    version = store.schema_version()
    if version < PROJECTS_SCHEMA_VERSION:
        raise AnnotationStoreError(f"{store.path} has annotation schema version {version}, without projects; "
                                   f"open it once writable (the app or any `annotations import`) to upgrade it")


def kb_stamp(kb) -> str:
    """How predictions name the KB they were made against: file name and build time (as the app does)."""
    return f"{kb.path.name} ({kb.meta.get('created', '')})"


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InputError("a project needs a name (e.g. --project wikimel-dev)")
    name = name.strip()
    if len(name) > MAX_NAME_CHARS:
        raise InputError(f"the project name is longer than {MAX_NAME_CHARS} characters")
    check_typed_text(name, "project name")
    return name


def _project_from_row(row: dict) -> Project:
    return Project(row["id"], row["name"], row["kb"], row["kb_stamp"], row["kb_build_id"],
                   ProjectSettings.from_json(row["settings"]), row["created"])


def list_projects(store: AnnotationStore) -> list[Project]:
    require_projects_schema(store)
    return [_project_from_row(r) for r in store.db.query("SELECT * FROM projects ORDER BY id")]


def get_project(store: AnnotationStore, project: "Project | str | int") -> Project:
    """A project by name, id, or a Project (read again, so its KB and settings are current)."""
    require_projects_schema(store)
    if isinstance(project, Project):
        project = project.id
    column = "id" if isinstance(project, int) and not isinstance(project, bool) else "name"
    rows = list(store.db.query(f"SELECT * FROM projects WHERE {column} = ?", [project]))
    if not rows:
        known = ", ".join(p.name for p in list_projects(store)) or "none yet"
        raise InputError(f"no project {project!r} in {store.path} (projects: {known}); "
                         f"create it with `python -m mel annotations import --project NAME ...`")
    return _project_from_row(rows[0])


def create_project(store: AnnotationStore, name: str, *, kb: str | Path | None = None,
                   settings: ProjectSettings | None = None) -> Project:
    """A new project; refused when the name is taken. `kb` (a built KB file) may be attached later."""
    name = _check_name(name)
    settings = settings or ProjectSettings()
    kb_fields = _kb_fields(kb) if kb else ("", "", "")

    def insert(conn):
        if conn.execute("SELECT 1 FROM projects WHERE name = ?", (name,)).fetchone():
            raise InputError(f"a project named {name!r} already exists in {store.path}; pick another name")
        conn.execute("INSERT INTO projects (name, kb, kb_stamp, kb_build_id, settings, created) VALUES (?,?,?,?,?,?)",
                     (name, *kb_fields, settings.to_json(), utc_now()))
    store._write("create the project", insert)
    return get_project(store, name)


def open_or_create_project(store: AnnotationStore, name: str, *, kb: str | Path | None = None) -> tuple[Project, bool]:
    """(project, created): the project called `name`, created when missing; `kb` is attached when
    the project has none yet and refused when it has another one."""
    require_projects_schema(store)
    if not store.db.execute("SELECT 1 FROM projects WHERE name = ?", (_check_name(name),)).fetchone():
        return create_project(store, name, kb=kb), True
    project = get_project(store, _check_name(name))
    return (attach_kb(store, project, kb) if kb else project), False


def discard_empty_project(store: AnnotationStore, project: Project | str) -> bool:
    """Delete `project` if it has no task (a project created for an import that then failed, so that
    no empty project is left in everyone's project pickers); True when it was deleted."""
    project = get_project(store, project)

    def discard(conn) -> bool:
        if conn.execute("SELECT 1 FROM tasks WHERE project_id = ? LIMIT 1", (project.id,)).fetchone():
            return False
        conn.execute("DELETE FROM queue_cursors WHERE project_id = ?", (project.id,))
        conn.execute("DELETE FROM projects WHERE id = ?", (project.id,))
        return True
    return bool(store._write("discard the empty project", discard))


def attach_kb(store: AnnotationStore, project: Project | str, kb: str | Path) -> Project:
    """Set the project's KB (first time), or refresh its build stamp when the same file was rebuilt.
    A different KB file is refused: the project's predictions and decisions refer to the first one."""
    project = get_project(store, project)
    path, stamp, build_id = _kb_fields(kb)
    if project.kb and Path(project.kb) != Path(path):
        raise InputError(f"project {project.name!r} links against {project.kb}, not {path}; "
                         f"create a new project for another KB")
    if (project.kb, project.kb_stamp, project.kb_build_id) != (path, stamp, build_id):
        store._write("attach the KB", lambda conn: conn.execute(
            "UPDATE projects SET kb = ?, kb_stamp = ?, kb_build_id = ? WHERE id = ?",
            (path, stamp, build_id, project.id)))
    return get_project(store, project.id)


def update_settings(store: AnnotationStore, project: Project | str, settings: ProjectSettings) -> Project:
    project = get_project(store, project)
    store._write("update the project settings", lambda conn: conn.execute(
        "UPDATE projects SET settings = ? WHERE id = ?", (settings.to_json(), project.id)))
    return get_project(store, project.id)


def _kb_fields(kb) -> tuple[str, str, str]:
    from mel.kb import KnowledgeBase
    kb = kb if isinstance(kb, KnowledgeBase) else KnowledgeBase(kb)  # KBError if it is not a built KB
    return str(kb.path.resolve()), kb_stamp(kb), str(kb.build_id or "")


# -- tasks ----------------------------------------------------------------------------------------
_TASK_SQL = ('SELECT t.*, m.caption, m.start, m."end", m.image_sha256 FROM tasks t '
             "JOIN mentions m ON m.id = t.mention_id ")


def _task_from_row(store: AnnotationStore, row: dict) -> Task:
    image = store.image_path(row["image_sha256"]) if row["image_sha256"] else None
    mention = Mention(row["caption"], row["start"], row["end"], image=str(image) if image else None,
                      id=row["mention_id"])
    return Task(row["id"], row["project_id"], row["mention_id"], mention, row["image_sha256"], row["gold_id"],
                row["gold_name"], row["source_file"], row["source_record"], row["position"])


def get_task(store: AnnotationStore, task_id: str) -> Task:
    rows = list(store.db.query(_TASK_SQL + "WHERE t.id = ?", [task_id]))
    if not rows:
        raise InputError(f"no task {task_id!r} in {store.path}")
    return _task_from_row(store, rows[0])


def list_tasks(store: AnnotationStore, project: Project | str, *, limit: int | None = None,
               offset: int = 0) -> list[Task]:
    """The project's tasks in queue order."""
    project = get_project(store, project)
    sql = _TASK_SQL + "WHERE t.project_id = ? ORDER BY t.position LIMIT ? OFFSET ?"
    return [_task_from_row(store, r) for r in store.db.query(sql, [project.id, -1 if limit is None else limit, offset])]


def task_id_for(project_name: str, content_hash: str) -> str:
    """A task's stable id: the same project and content give the same id on any machine."""
    return hashlib.sha256(f"{project_name}\n{content_hash}".encode("utf-8")).hexdigest()[:24]


def progress(store: AnnotationStore, project: Project | str, annotator: str | None = None) -> Progress:
    project = get_project(store, project)
    total = store.db.execute("SELECT count(*) FROM tasks WHERE project_id = ?", (project.id,)).fetchone()[0]
    # each annotator's standing (latest, not undone) row per task; a skip is not a decision
    standing = ("SELECT c.task_id, c.annotator, c.action FROM corrections c JOIN tasks t ON t.id = c.task_id "
                "WHERE t.project_id = :p AND c.id IN (SELECT max(id) FROM corrections "
                f"WHERE task_id IS NOT NULL AND {STANDING} GROUP BY task_id, annotator)")
    done = store.db.execute(
        f"SELECT count(*) FROM (SELECT task_id FROM ({standing}) WHERE action != 'skip' GROUP BY task_id "
        f"HAVING count(DISTINCT annotator) >= :n)", {"p": project.id, "n": project.settings.annotations_per_task}
    ).fetchone()[0]
    mine = skipped = 0
    if annotator is not None:
        mine, skipped = store.db.execute(
            f"SELECT coalesce(sum(action != 'skip'), 0), coalesce(sum(action = 'skip'), 0) FROM ({standing}) "
            f"WHERE annotator = :a", {"p": project.id, "a": annotator}).fetchone()
    return Progress(total, done, annotator, mine, skipped, assigned_share(project, total, annotator))


def assigned_share(project: Project, total: int, annotator: str | None) -> int | None:
    """How many of the project's `total` tasks go to `annotator` when the project has a fixed team
    (ProjectSettings.annotators), else None. Positions run 0..total-1 within a project."""
    team, k = project.settings.annotators, project.settings.annotations_per_task
    if annotator is None or not team:
        return None
    if annotator not in team:
        return 0
    i, n = team.index(annotator), len(team)
    period = n // math.gcd(n, k)  # the assignment repeats every `period` positions, k/gcd of them this annotator's
    whole, rest = divmod(total, period)
    return whole * (k // math.gcd(n, k)) + sum(1 for p in range(rest) if (i - p * k) % n < k)


# -- import ---------------------------------------------------------------------------------------
@dataclass
class _Record:
    """One record to import, already checked: a mention (image stored) and its gold."""

    file: str
    record: str
    mention: Mention
    image_sha256: str | None
    gold_id: str | None
    gold_name: str


def import_tasks(store: AnnotationStore, project: Project | str, format: str, data: str | Path,
                 split: str | None = None, limit: int | None = None, *, images: str | Path | None = None,
                 settings: ProjectSettings | None = None) -> ImportReport:
    """Add the mentions of `data` to the project as tasks, in file order, after its existing tasks.

    `format`: a dataset layout (mel.datasets.FORMATS; `split` defaults to dev) or a task file
    (TASK_FORMATS; `data` is the .csv/.jsonl file or a folder of them, `images` the image folder).
    `limit` caps the records read. `settings`, when given, become the project's settings in the
    same transaction as its new tasks. All or nothing: every record is read and checked before
    anything is written (a file error refuses the import and leaves the project as it was).
    """
    from mel.datasets import FORMATS
    project = get_project(store, project)
    if limit is not None:
        require_whole("limit", limit, 1)
    if format not in FORMATS + TASK_FORMATS:
        raise InputError(f"unknown import format {format!r}; known: {', '.join(FORMATS + TASK_FORMATS)}")
    report = ImportReport(project.name, format, str(data))
    if format in TASK_FORMATS:
        reader = _read_task_files(store, format, Path(data), images, report, limit)
    else:
        reader = _read_dataset(store, format, Path(data), split or "dev", report, limit)
    # The whole file first (a task file is size-capped by the app's upload limit; the records are
    # small: the text of a mention and the hash of its image), so that an error anywhere in it
    # writes nothing.
    records = list(reader)

    def write(conn):
        if settings is not None:
            conn.execute("UPDATE projects SET settings = ? WHERE id = ?", (settings.to_json(), project.id))
        return _write_records(conn, project, records)

    added, present, conflicts = store._write("import the tasks", write)
    report.n_imported += added
    report.n_already_present += present
    report.n_malformed += len(conflicts)
    report.malformed.extend(conflicts)
    report.n_batches += 1
    return report


def _write_records(conn, project: Project, records: list[_Record]) -> tuple[int, int, list[MalformedRecord]]:
    """Insert `records` as the project's next tasks, inside the caller's transaction; (added, already
    present, conflicts)."""
    position = conn.execute("SELECT coalesce(max(position), -1) FROM tasks WHERE project_id = ?",
                            (project.id,)).fetchone()[0]
    added, present, conflicts = 0, 0, []
    for rec in records:
        m = rec.mention
        content = mention_key(m.caption, m.start, m.end, rec.image_sha256)
        existing = conn.execute("SELECT id, gold_id, source_file, source_record FROM tasks "
                                "WHERE project_id = ? AND content_hash = ?", (project.id, content)).fetchone()
        if existing is not None:
            if rec.gold_id is not None and existing[1] is not None and existing[1] != rec.gold_id:
                conflicts.append(MalformedRecord(rec.file, rec.record, (
                    f"the same mention is already task {existing[0]} (from {existing[2]}, record {existing[3]}) "
                    f"with gold {existing[1]!r}, not {rec.gold_id!r}; not imported twice")))
            else:
                present += 1
            continue
        position += 1
        _insert_task(conn, project, rec, content, position)
        added += 1
    return added, present, conflicts


def _insert_task(conn, project: Project, rec: _Record, content: str, position: int) -> None:
    m, now = rec.mention, utc_now()
    # the same row AnnotationStore.record_mention writes, inside the import's transaction
    conn.execute('INSERT OR IGNORE INTO mentions (id, caption, start, "end", mention, image_sha256, source, created) '
                 "VALUES (?,?,?,?,?,?,?,?)",
                 (content, m.caption, m.start, m.end, m.text, rec.image_sha256, f"project:{project.name}", now))
    conn.execute("INSERT INTO tasks (id, project_id, mention_id, content_hash, gold_id, gold_name, source_file, "
                 "source_record, position, created) VALUES (?,?,?,?,?,?,?,?,?,?)",
                 (task_id_for(project.name, content), project.id, content, content, rec.gold_id, rec.gold_name,
                  rec.file, rec.record, position, now))


def _store_image(store: AnnotationStore, path: str | None, cache: dict[str, str]) -> str | None:
    """The image's content hash (stored once per import); InputError for a file that is no image."""
    if not path:
        return None
    if path not in cache:
        cache[path] = store.save_image(path)
    return cache[path]


def _read_dataset(store: AnnotationStore, format: str, data: Path, split: str, report: ImportReport,
                  limit: int | None) -> Iterator[_Record]:
    """The examples mel's reader gives; what it could not use is reported as malformed records."""
    from mel.datasets import load_dataset
    dataset = load_dataset(format, data, split)  # DatasetFormatError (file and record) for a broken file
    report.reader_summary = dataset.report.summary()
    examples = dataset.examples[:limit] if limit else dataset.examples
    taken = {e.sample_id.rsplit("#", 1)[0] for e in examples}
    source = f"{data} ({dataset.split})"
    unusable = [(sid, f"the mention {m!r} is not in its caption") for sid, m, _ in dataset.report.unlocated]
    unusable += list(dataset.report.invalid)
    for sid, reason in unusable:  # with a limit: those of the records taken
        if limit is None or sid.rsplit("#", 1)[0] in taken:
            report.n_read += 1
            report.n_malformed += 1
            report.malformed.append(MalformedRecord(source, sid, reason))
    cache: dict[str, str] = {}
    for example in examples:
        report.n_read += 1
        try:
            sha = _store_image(store, example.mention.image, cache)
        except InputError as exc:
            report.n_malformed += 1
            report.malformed.append(MalformedRecord(source, example.sample_id, str(exc)))
            continue
        yield _Record(source, example.sample_id, example.mention, sha, example.gold_id, example.gold_name)


def _task_files(format: str, data: Path) -> list[Path]:
    suffix = ".csv" if format == "csv" else ".jsonl"
    if data.is_file():
        return [data]
    if data.is_dir():
        files = sorted(p for p in data.iterdir() if p.suffix.lower() == suffix and p.is_file())
        if files:
            return files
        raise InputError(f"no {suffix} file in {data}; give the {format} file itself or a folder holding it")
    raise InputError(f"{data} does not exist; give the {format} file (or its folder) with --data")


def _read_task_files(store: AnnotationStore, format: str, data: Path, images: str | Path | None,
                     report: ImportReport, limit: int | None) -> Iterator[_Record]:
    files = _task_files(format, data)
    folder = Path(images) if images else files[0].parent / "images"
    if images and not folder.is_dir():
        raise InputError(f"the image folder {folder} does not exist; check --images")
    cache: dict[str, str] = {}
    for path in files:
        rows = _csv_rows(path) if format == "csv" else _jsonl_rows(path)
        for record, row in rows:
            if limit is not None and report.n_read >= limit:
                return
            report.n_read += 1
            if isinstance(row, dict) and isinstance(row.get("id"), str):
                record = f"{record} (id {row['id']})"
            try:
                if isinstance(row, str):  # the reader's reason why this record cannot be read
                    raise InputError(row)
                yield _task_record(store, path, record, row, folder, cache)
            except (InputError, DatasetFormatError) as exc:
                report.n_malformed += 1
                report.malformed.append(MalformedRecord(str(path), record, str(exc)))


def _csv_rows(path: Path) -> Iterator[tuple[str, dict | str]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            unknown = [h for h in header if h not in TASK_FIELDS]
            if unknown or "caption" not in header:
                raise InputError(f"{path}: the header must name columns among {', '.join(TASK_FIELDS)} "
                                 f"(caption required); got {', '.join(header) or 'no header'}"
                                 + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
            for n, row in enumerate(reader, 1):
                if None in row:  # more cells than header columns
                    yield f"row {n}", f"{len(row[None])} more cells than the header has columns"
                    continue
                yield f"row {n}", {k: v for k, v in row.items() if v not in (None, "")}
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None
    except csv.Error as exc:
        raise InputError(f"{path} is not a readable CSV file: {exc}") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> InputError:
    """The error for a file that is not UTF-8, naming the first bad byte by its offset in the file and
    its line (the decoder's own offset is within the chunk it was decoding)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return InputError(f"{path} is not UTF-8 text ({exc.reason}); save it as UTF-8")
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        raw[skip:].decode("utf-8")
    except UnicodeDecodeError as whole:
        at = skip + whole.start
        line = raw.count(b"\n", 0, at) + 1
        return InputError(f"{path} is not UTF-8 text ({whole.reason} at byte {at} (line {line})); save it as UTF-8")
    return InputError(f"{path} is not UTF-8 text ({exc.reason}); save it as UTF-8")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict | str]]:
    """Tolerant JSON lines: a line that is not a JSON object is reported and the rest is read."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as exc:
                    yield f"line {n}", f"not valid JSON ({getattr(exc, 'msg', 'nested too deeply')})"
                    continue
                if not isinstance(row, dict):
                    yield f"line {n}", f"a record must be a JSON object, got {type(row).__name__}"
                    continue
                unknown = sorted(set(row) - set(TASK_FIELDS))
                if unknown:
                    yield f"line {n}", f"unknown key(s) {unknown}; keys are {', '.join(TASK_FIELDS)}"
                    continue
                yield f"line {n}", {k: v for k, v in row.items() if v not in (None, "")}
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None


def _task_record(store: AnnotationStore, path: Path, record: str, row: dict, folder: Path,
                 cache: dict[str, str]) -> _Record:
    from mel.datasets.common import parse_gold_id
    from mel.spans import resolve_span  # offsets checked against the mention, else located (as in the app)
    for key in ("caption", "mention", "image", "gold_id", "gold_name", "id"):
        if key in row and not isinstance(row[key], str):
            raise InputError(f"{key!r} must be text, got {type(row[key]).__name__}")
    if "caption" not in row:
        raise InputError("no caption")
    caption = row["caption"]
    start, end = row.get("start"), row.get("end")
    if isinstance(start, bool) or isinstance(end, bool):
        raise InputError("start and end must be whole numbers, got true/false")
    s, e = resolve_span(caption, row.get("mention"), start, end)
    if caption[s:e] != caption[s:e].strip():   # a mention never starts or ends with a space: offsets off by one
        raise InputError(f"the span [{s}, {e}) is {caption[s:e]!r}, which starts or ends with a space; check start "
                         f"and end (off by one?) or give the mention")
    image = _image_file(row.get("image"), folder)
    sha = _store_image(store, image, cache)
    mention = Mention(caption, s, e, image=image)
    gold = parse_gold_id(row["gold_id"], path, record) if row.get("gold_id", "").strip() else None
    return _Record(str(path), record, mention, sha, gold, row.get("gold_name", "") if gold != NIL else "")


def _image_file(name: str | None, folder: Path) -> str | None:
    """The image file `name` inside `folder`; URLs and names that leave the folder are refused."""
    if not name:
        return None
    if _URL.match(name):
        raise InputError(f"the image {name!r} is a URL; images are not downloaded: put the file in the image "
                         f"folder ({folder}) and give its name")
    root = folder.resolve()
    path = (root / name).resolve()
    if root not in path.parents:
        raise InputError(f"the image {name!r} is outside the image folder {folder}; give a file name inside it")
    if not path.is_file():
        raise InputError(f"the image {name!r} is not in the image folder {folder}")
    return str(path)


__all__ = ["PROJECTS_SCHEMA_VERSION", "TASK_FORMATS", "TASK_FIELDS", "ProjectSettings", "Project", "Task",
           "Progress", "MalformedRecord", "ImportReport", "list_projects", "get_project", "create_project",
           "open_or_create_project", "discard_empty_project", "attach_kb", "update_settings", "kb_stamp", "get_task", "list_tasks",
           "task_id_for", "progress", "assigned_share", "import_tasks", "require_projects_schema"]
