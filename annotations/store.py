"""The correction store: every mention shown, every prediction made, every correction given.

One SQLite file (sqlite-utils on a plain sqlite3 connection) in a data directory:

    DATA_DIR/annotations.sqlite   mentions, predictions, corrections, images, schema_version
    DATA_DIR/images/<sha256>.<ext> uploaded images, named by the SHA-256 of their bytes
    DATA_DIR/annotations.sqlite.open-lock  taken while a connection opens (processes starting at once)
    DATA_DIR/annotations-before-restore-<time>.sqlite  the live database as it was before a restore
    DATA_DIR/annotations-rescued-<time>.sqlite  what a file deleted or replaced while open still held

Guarantees (each one has a test in tests/test_annotations.py or tests/test_store_swap.py):

- An acknowledgement (`Ack`) is returned only after the transaction that wrote the correction
  has committed. The journal is WAL with synchronous=FULL: WAL+NORMAL already survives a killed
  process (SIGKILL), but FULL also fsyncs the WAL on every commit, so an acknowledged correction
  survives a power cut or a VM being stopped too. One fsync per human click costs nothing.
- Every thread gets its own connection (Gradio runs handlers in a thread pool; sqlite3
  connections must not be shared between threads mid-transaction). Writes take the write lock
  up front (BEGIN IMMEDIATE) and wait up to BUSY_TIMEOUT_MS for another writer, so two
  annotators saving at once both succeed, one after the other.
- Uploaded images are stored under their content hash, never under a name the user chose.
  The image file is written and fsynced before the row that points to it commits.
- An annotator can only undo their own corrections; undo marks the row (`undone_at`), nothing
  is deleted, so the history stays auditable.
- A read-only database or a full disk raises AnnotationStoreError with what to do, and no
  acknowledgement is given.
- The schema is versioned (`schema_version` table); MIGRATIONS run in order, each in one
  transaction, and a database written by a newer version is refused rather than misread.
- The file at the path is the file written to. Every connection records the (device, inode) of
  the file it opened; each use, each write after it holds the write lock, and each write before
  and after COMMIT compare it with the file now at the path. If the file was deleted or replaced
  (`rm`, `mv`, a backup copied in with a rename), what the previous file held is first copied to
  annotations-rescued-<time>.sqlite through a connection still open on it, every connection to it
  is closed, and its -wal/-shm are taken away from the path (SQLite leaves them when the file has
  moved, and would read that WAL as the new file's). Then a deleted file is refused (every save
  raises AnnotationStoreError saying how to restore; no empty database is created in its place)
  and a replaced one is used from then on (after the same schema checks as at start). A write
  whose transaction saw the swap before COMMIT is rolled back and run in the new file; one that
  committed while the file was swapped is refused, never acknowledged.
  Not detectable, so not to be done: writing over the live file in place (`cp backup
  annotations.sqlite` onto it, same inode) while anything has it open; replacing it while the app
  is stopped without removing the -wal/-shm beside it. Another process that still has the previous
  file open keeps writing to that file until it notices too.
- `restore` (`python -m mel annotations restore`) checks the backup (an intact annotation database
  of this schema or older) before touching anything, copies the live database to
  annotations-before-restore-<time>.sqlite (never overwriting a file), then copies the backup INTO
  the live file with SQLite's online backup API: same file, one write transaction, and every open
  connection (threads, other processes) sees the restored content. A deleted live file is written
  anew from the backup.
- Images: a deleted images directory is made again before an image is stored.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import logging
import os
import re
import sqlite3
import tempfile
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import filelock
import sqlite_utils
from PIL import Image

from mel.cli_kit import check_output_dir
from mel.errors import InputError, MELError
from mel.imageio import load_image
from mel.paths import fsync_path
from mel.types import NIL, LinkResult, Mention

log = logging.getLogger(__name__)

DB_NAME = "annotations.sqlite"
IMAGES_DIR = "images"
LOCK_NAME = "annotations.sqlite.open-lock"  # held only while a connection is opened (see _connect)
BUSY_TIMEOUT_MS = 15_000  # how long a writer waits for another writer before giving up

# What an annotator can do. `entity_id` is a KB id for the first three, NIL for "nil" and
# None for "skip" (a skip says nothing about the entity and never becomes training data).
LINK_ACTIONS = ("accept_gemel", "accept_dim", "search")
ACTIONS = LINK_ACTIONS + ("nil", "skip")

# PIL format -> file extension; anything else is re-encoded as PNG (lossless) before storing.
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


class AnnotationStoreError(MELError):
    """The store cannot be read or written (read-only file, full disk, newer schema...)."""


class _Replaced(Exception):
    """Internal: the file at the path changed during a transaction, which is rolled back and run again."""


class NotAllowedError(MELError, PermissionError):
    """The user may not do this (undo another annotator's correction, export without the admin role)."""


# -- schema --------------------------------------------------------------------------------------
# (version, statements). Append new versions; never edit one that has shipped.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        """CREATE TABLE images (
            sha256 TEXT PRIMARY KEY,
            ext TEXT NOT NULL,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            created TEXT NOT NULL)""",
        """CREATE TABLE mentions (
            id TEXT PRIMARY KEY,               -- content hash of caption, span and image
            caption TEXT NOT NULL,
            start INTEGER NOT NULL,
            "end" INTEGER NOT NULL,
            mention TEXT NOT NULL,             -- caption[start:end], kept for readable queries
            image_sha256 TEXT REFERENCES images(sha256),
            source TEXT NOT NULL DEFAULT '',   -- 'app', 'api', 'example'...
            created TEXT NOT NULL)""",
        """CREATE TABLE predictions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            mention_id TEXT NOT NULL REFERENCES mentions(id),
            linker TEXT NOT NULL,
            entity_id TEXT,                    -- NULL when the linker predicted NIL or failed
            entity_name TEXT,
            score REAL,
            candidates TEXT NOT NULL,          -- JSON [{id, name, score}], best first
            details TEXT NOT NULL,             -- JSON: generated text, cue, demonstration ids...
            timings TEXT NOT NULL,             -- JSON {stage: ms}
            preset TEXT NOT NULL,
            models TEXT NOT NULL,              -- JSON {role: model spec}
            kb TEXT NOT NULL,                  -- KB file name and build stamp
            error TEXT,                        -- why the linker gave nothing, if it failed
            shown_to TEXT NOT NULL DEFAULT '',
            created TEXT NOT NULL)""",
        "CREATE INDEX predictions_mention ON predictions(mention_id)",
        """CREATE TABLE corrections (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            mention_id TEXT NOT NULL REFERENCES mentions(id),
            annotator TEXT NOT NULL,
            action TEXT NOT NULL CHECK (action IN ('accept_gemel','accept_dim','search','nil','skip')),
            entity_id TEXT,                    -- KB id, 'NIL', or NULL for skip
            entity_name TEXT NOT NULL DEFAULT '',
            prediction_id INTEGER REFERENCES predictions(id),
            kb TEXT NOT NULL DEFAULT '',
            created TEXT NOT NULL,
            undone_at TEXT,
            CHECK ((action = 'skip') = (entity_id IS NULL)),
            CHECK ((action = 'nil') = (entity_id IS NOT NULL AND entity_id = 'NIL')))""",
        "CREATE INDEX corrections_annotator ON corrections(annotator, id)",
        "CREATE INDEX corrections_mention ON corrections(mention_id, id)",
    ]),
    (2, [  # annotation projects: tasks, queue cursors, flags; decisions bound to tasks (annotations/queue.py)
        """CREATE TABLE projects (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL UNIQUE,
            kb TEXT NOT NULL DEFAULT '',            -- path of the KB file the project links against
            kb_stamp TEXT NOT NULL DEFAULT '',      -- KB file name and build time, as predictions.kb stores it
            kb_build_id TEXT NOT NULL DEFAULT '',
            settings TEXT NOT NULL DEFAULT '{}',    -- JSON: guidelines (Markdown), linkers, annotations_per_task...
            created TEXT NOT NULL)""",
        """CREATE TABLE tasks (
            id TEXT PRIMARY KEY,                    -- stable: hash of the project name and the content hash
            project_id INTEGER NOT NULL REFERENCES projects(id),
            mention_id TEXT NOT NULL REFERENCES mentions(id),
            content_hash TEXT NOT NULL,             -- caption, span and image (= the mention id)
            gold_id TEXT,                           -- gold entity id from the imported file, 'NIL', or NULL
            gold_name TEXT NOT NULL DEFAULT '',
            source_file TEXT NOT NULL,
            source_record TEXT NOT NULL,
            position INTEGER NOT NULL,              -- queue order within the project
            created TEXT NOT NULL,
            UNIQUE (project_id, content_hash),
            UNIQUE (project_id, position))""",
        "CREATE INDEX tasks_mention ON tasks(mention_id)",
        "ALTER TABLE corrections ADD COLUMN task_id TEXT REFERENCES tasks(id)",
        "ALTER TABLE corrections ADD COLUMN shown_predictions TEXT",   # JSON list of the prediction ids on screen
        "ALTER TABLE corrections ADD COLUMN client_token TEXT",        # one per key press: a repeat is idempotent
        "ALTER TABLE corrections ADD COLUMN supersedes INTEGER REFERENCES corrections(id)",  # a changed decision
        "CREATE UNIQUE INDEX corrections_client_token ON corrections(client_token) WHERE client_token IS NOT NULL",
        "CREATE INDEX corrections_task ON corrections(task_id, annotator, id)",
        """CREATE TABLE queue_cursors (
            project_id INTEGER NOT NULL REFERENCES projects(id),
            annotator TEXT NOT NULL,
            task_id TEXT REFERENCES tasks(id),      -- the task on the annotator's screen; NULL between tasks
            since TEXT NOT NULL,
            PRIMARY KEY (project_id, annotator))""",
        """CREATE TABLE flags (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            task_id TEXT NOT NULL REFERENCES tasks(id),
            annotator TEXT NOT NULL,
            comment TEXT NOT NULL,
            created TEXT NOT NULL,
            resolved_at TEXT,
            resolved_by TEXT)""",
        "CREATE INDEX flags_task ON flags(task_id)",
    ]),
    (3, [  # annotation teams: reviews (final labels, send-backs) and when each decided task was on screen
        """CREATE TABLE reviews (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            task_id TEXT NOT NULL REFERENCES tasks(id),
            reviewer TEXT NOT NULL,
            action TEXT NOT NULL CHECK (action IN ('final','send_back')),
            entity_id TEXT,                         -- the final label: a KB id or 'NIL'; NULL for send_back
            entity_name TEXT NOT NULL DEFAULT '',
            comment TEXT NOT NULL DEFAULT '',
            seen_decisions TEXT NOT NULL DEFAULT '[]',  -- JSON ids of the annotators' decisions on the reviewer's screen
            supersedes INTEGER REFERENCES reviews(id),  -- the task's previous review
            client_token TEXT,                      -- one per click: a repeat is idempotent
            created TEXT NOT NULL,
            CHECK ((action = 'send_back') = (entity_id IS NULL)))""",
        "CREATE INDEX reviews_task ON reviews(task_id, id)",
        "CREATE UNIQUE INDEX reviews_client_token ON reviews(client_token) WHERE client_token IS NOT NULL",
        # set (never cleared) on the decisions a review sent back: they stay in the audit trail, no longer standing
        "ALTER TABLE corrections ADD COLUMN returned_by INTEGER REFERENCES reviews(id)",
        "ALTER TABLE corrections ADD COLUMN shown_at TEXT",  # when the task went on the annotator's screen
    ]),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

# A queue decision stands while it is neither undone by its annotator nor sent back by a review;
# for each task and annotator the latest standing row is their decision.
STANDING = "undone_at IS NULL AND returned_by IS NULL"


def standing(alias: str = "") -> str:
    """STANDING for a table alias: standing("c") -> "c.undone_at IS NULL AND c.returned_by IS NULL"."""
    return STANDING if not alias else f"{alias}.undone_at IS NULL AND {alias}.returned_by IS NULL"


@dataclass(frozen=True)
class Ack:
    """Returned by record_correction once the correction is committed to disk."""

    correction_id: int
    mention_id: str
    annotator: str
    action: str
    entity_id: str | None
    entity_name: str
    created: str
    annotator_total: int  # the annotator's corrections that stand (not undone), this one included

    def to_dict(self) -> dict:
        return asdict(self)


def utc_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def mention_key(caption: str, start: int, end: int, image_sha256: str | None) -> str:
    """The id of a mention: the same caption, span and image always get the same id."""
    payload = json.dumps([caption, start, end, image_sha256 or ""], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def _check_annotator(annotator: str) -> str:
    if not isinstance(annotator, str) or not annotator.strip():
        raise InputError("no annotator name: log in (or pass annotator=...) before saving a correction")
    if len(annotator) > 200:
        raise InputError("the annotator name is longer than 200 characters")
    return annotator.strip()


class AnnotationStore:
    """The annotation database in `data_dir`. Safe to share between threads.

    `read_only=True` opens the file with SQLite's read-only mode (for stats and export from a
    copy); every write then fails with AnnotationStoreError.
    """

    def __init__(self, data_dir: str | Path, *, read_only: bool = False):
        self.data_dir = Path(data_dir)
        self.read_only = read_only
        self.path = self.data_dir / DB_NAME
        self.images_dir = self.data_dir / IMAGES_DIR
        self._local = threading.local()
        self._connections: dict[sqlite3.Connection, tuple[int, int]] = {}  # -> identity of the file it opened
        self._connections_lock = threading.Lock()
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file this store uses
        self._sidecars: dict[tuple[int, int], set[tuple[int, int]]] = {}  # its -wal/-shm files, by identity
        self._rescued: dict[tuple[int, int], Path | str] = {}  # copies made of files deleted or replaced
        self._checked: set[tuple[int, int]] = set()  # files whose schema was checked
        self._swap_lock = threading.RLock()
        if read_only:
            if not self.path.exists():
                raise AnnotationStoreError(f"no annotation database at {self.path}; check --db / --data-dir")
        else:
            try:
                self.images_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise AnnotationStoreError(
                    f"cannot create the annotation data directory {self.data_dir} ({exc.strerror or exc}); "
                    f"pick a writable --data-dir") from exc
        self._migrate()

    @classmethod
    def from_db(cls, db: str | Path, *, read_only: bool = False) -> "AnnotationStore":
        """Open by the database file (or its directory), as the CLI's --db does."""
        db = Path(db)
        if db.is_dir():
            return cls(db, read_only=read_only)
        if not db.exists():
            raise AnnotationStoreError(f"{db} does not exist; give --db the app's data directory (its --data-dir) "
                                       f"or the {DB_NAME} file in it")
        if db.name != DB_NAME:
            raise AnnotationStoreError(f"{db} is not an annotation database: expected a file named {DB_NAME} "
                                       f"(or the data directory that holds it)")
        return cls(db.parent, read_only=read_only)

    # -- connections -----------------------------------------------------------------------------
    @property
    def db(self) -> sqlite_utils.Database:
        """This thread's connection (sqlite-utils wrapper), opened on first use.

        Every use first checks that the file at self.path is still the file the connection
        opened (device and inode): a file replaced at the path is followed, a deleted one refused
        (see _follow_path)."""
        for _ in range(3):
            db = getattr(self._local, "db", None)
            current = self._path_identity()
            if db is not None and self._local.identity == self._identity == current:
                return db
            if self._identity is not None and current != self._identity:
                self._follow_path(db.conn if db is not None else None)
            if db is not None:  # this thread's connection is to a file the store no longer uses
                self._forget(db.conn)
                self._local.db = None
            opened = self._connect()
            if opened is None:
                continue  # the file changed while the connection opened: look again
            conn, identity = opened
            self._local.db, self._local.identity = sqlite_utils.Database(conn), identity
            if identity not in self._checked:  # a file whose schema this store has not checked yet
                self._checked.add(identity)
                try:
                    self._migrate()
                except BaseException:
                    self._checked.discard(identity)
                    self._forget(conn)
                    self._local.db = None
                    raise
            return self._local.db
        raise self._changing_error("open it")

    def _path_identity(self, suffix: str = "") -> tuple[int, int] | None:
        """(device, inode) of the file now at self.path (+ suffix), None if there is none."""
        try:
            st = os.stat(f"{self.path}{suffix}")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AnnotationStoreError(f"cannot look at the annotation database {self.path} "
                                       f"({exc.strerror or exc}); nothing was saved. Check the data directory") from exc
        return st.st_dev, st.st_ino

    def _connect(self) -> tuple[sqlite3.Connection, tuple[int, int]] | None:
        """A new connection and the identity of the file it opened; None if that file changed meanwhile."""
        if self.read_only:
            return self._open_identified()
        # Two processes opening a new database at once both try to switch it to WAL; SQLite then
        # refuses one of them with SQLITE_BUSY at once (its busy handler would deadlock), so the
        # switch is serialised across processes by a lock file beside the database.
        try:
            with filelock.FileLock(self.data_dir / LOCK_NAME, timeout=BUSY_TIMEOUT_MS / 1000):
                return self._open_identified()
        except filelock.Timeout as exc:
            raise AnnotationStoreError(
                f"the annotation database {self.path} is being opened by another process that held "
                f"{LOCK_NAME} for more than {BUSY_TIMEOUT_MS / 1000:.0f} s; nothing was saved, try again") from exc
        except PermissionError as exc:
            raise self._error(sqlite3.OperationalError("attempt to write a readonly database"), "open") from exc

    def _open_identified(self) -> tuple[sqlite3.Connection, tuple[int, int]] | None:
        before = self._path_identity()
        if self._identity is not None and before != self._identity:
            return None
        # Only the store's first connection may create the file: a later one must not put an empty
        # database where the store's file was deleted.
        conn = self._open_connection(create=self._identity is None)
        after = self._path_identity()
        if after is None or (before is not None and before != after) or after != (self._identity or after):
            conn.close()
            return None
        if self._identity is None:
            self._identity = after
        if not self.read_only:
            self._note_sidecars(after)
        with self._connections_lock:
            self._connections[conn] = after
        return conn, after

    def _open_connection(self, create: bool = False) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit transactions; every write says BEGIN IMMEDIATE itself
            mode = "ro" if self.read_only else "rwc" if create else "rw"
            uri = f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode={mode}"
            conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys = ON")
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            if tables and "schema_version" not in tables:  # e.g. a KB renamed annotations.sqlite
                conn.close()
                raise AnnotationStoreError(
                    f"{self.path} is an SQLite file but not an annotation database (it holds "
                    f"{', '.join(tables[:5])}); it is left untouched: point --data-dir / --db at the right file")
            if not self.read_only:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise AnnotationStoreError(f"{self.path} cannot use write-ahead logging (journal mode {mode}); "
                                               f"put the data directory on a local disk")
                conn.execute("PRAGMA synchronous = FULL")  # see the module docstring
        except sqlite3.Error as exc:
            raise self._error(exc, "open") from exc
        return conn

    def _forget(self, conn: sqlite3.Connection) -> None:
        with self._connections_lock:
            self._connections.pop(conn, None)
        try:
            conn.close()
        except sqlite3.Error:
            pass

    def _follow_path(self, source: sqlite3.Connection | None) -> Path | None:
        """The file at self.path is no longer the file this store opened: deleted, or replaced.

        What the previous file holds is copied first, through a connection still open on it, to
        DATA_DIR/annotations-rescued-<time>.sqlite (it may hold saves made since the last backup).
        Then every connection to it is closed: SQLite checkpoints its WAL into it and removes its
        -wal/-shm, so they cannot be read as if they belonged to the file now at the path.
        Then a deleted file is refused (AnnotationStoreError, saying how to restore); a replaced
        one is used from now on. Returns the rescue copy (None if none was made).
        """
        with self._swap_lock:
            old, current = self._identity, self._path_identity()
            if current == old:
                return None  # another thread followed it already
            with self._connections_lock:
                stale = [c for c, identity in self._connections.items() if identity == old]
            if self.read_only:
                for conn in stale:
                    self._forget(conn)
                raise AnnotationStoreError(f"the annotation database {self.path} was deleted or replaced while it "
                                           f"was being read; run the command again")
            if old not in self._rescued:
                conn = source if source in stale else (stale[0] if stale else None)
                self._rescued[old] = self._rescue(conn)
            rescued = self._rescued[old]
            for conn in stale:
                self._forget(conn)
            if current is None:
                self._drop_sidecars(old, rescued)
                raise AnnotationStoreError(
                    f"the annotation database {self.path} was deleted while it was open; nothing was saved. "
                    f"{self._rescue_note(rescued)} Never delete or copy over the live file: restore backups with "
                    f"`python -m mel annotations restore`")
            self._drop_sidecars(old, rescued)
            self._identity = current
            log.warning("the annotation database %s was replaced by another file while it was open; using the file "
                        "now at the path. %s", self.path, self._rescue_note(rescued))
            return rescued if isinstance(rescued, Path) else None

    def _note_sidecars(self, identity: tuple[int, int]) -> None:
        """Remember which -wal/-shm files belong to the database file `identity` (SQLite makes them
        when the database is first opened in WAL mode, or first written)."""
        for suffix in ("-wal", "-shm"):
            sidecar = self._path_identity(suffix)
            if sidecar is not None:
                self._sidecars.setdefault(identity, set()).add(sidecar)

    def _drop_sidecars(self, old: tuple[int, int], rescued: Path | str) -> None:
        """Take the previous file's -wal/-shm away from the path once its connections are closed.

        SQLite does not checkpoint or remove them when the database file has moved, and a connection
        to a new file at the path would read that old WAL as its own (a copy with stale pages applied).
        Their content is in the rescue copy; without one they are kept, renamed."""
        for suffix in ("-wal", "-shm"):
            sidecar = Path(f"{self.path}{suffix}")
            if self._path_identity(suffix) not in self._sidecars.get(old, ()):
                continue  # none, or not the previous file's (it came with the new file)
            try:
                if isinstance(rescued, Path):
                    sidecar.unlink()
                else:
                    aside = _free_name(self.data_dir, f"{sidecar.name}-orphaned", "")
                    sidecar.rename(aside)
                    log.warning("kept %s of the previous database file as %s", sidecar, aside)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise AnnotationStoreError(
                    f"the annotation database {self.path} was deleted or replaced while it was open, and {sidecar} "
                    f"of the previous file cannot be removed ({exc.strerror or exc}); nothing was saved. Stop the "
                    f"app, move {sidecar} away, and start it again") from exc

    def _rescue(self, conn: sqlite3.Connection | None) -> Path | str:
        """Copy what `conn`'s file holds to a new file in the data directory; the path, or why not."""
        if conn is None:
            return "no connection to it was open"
        try:
            return self._copy(conn, _free_name(self.data_dir, "annotations-rescued", ".sqlite"))
        except AnnotationStoreError as exc:
            return str(exc)

    def _rescue_note(self, rescued: Path | str | None) -> str:
        if isinstance(rescued, Path):
            return (f"What the previous file held (every save acknowledged until now) is copied to {rescued}; put it "
                    f"back with `python -m mel annotations restore --db {self.path} --from {rescued}` (safe while "
                    f"the app runs).")
        return f"No copy of what the previous file held could be made ({rescued or 'no connection to it was open'})."

    def _changing_error(self, doing: str) -> AnnotationStoreError:
        return AnnotationStoreError(
            f"the annotation database {self.path} kept being replaced while trying to {doing}; nothing was saved. "
            f"Stop whatever replaces it (restore backups with `python -m mel annotations restore`) and try again")

    def close(self) -> None:
        """Close every thread's connection (the WAL is checkpointed by the last one)."""
        with self._connections_lock:
            for conn in self._connections:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _error(self, exc: sqlite3.Error, doing: str) -> AnnotationStoreError:
        """A message that says what went wrong with the file and what to do about it."""
        text = str(exc).lower()
        if "readonly" in text or "read-only" in text or "read only" in text:
            why = (f"the annotation database {self.path} is read-only; nothing was saved. Make the file and "
                   f"its directory writable, or start the app with a writable --data-dir")
        elif "full" in text:
            why = (f"the disk holding {self.path} is full; nothing was saved. Free some space (or move "
                   f"--data-dir) and save again")
        elif "locked" in text or "busy" in text:
            why = (f"the annotation database {self.path} stayed locked by another writer for more than "
                   f"{BUSY_TIMEOUT_MS / 1000:.0f} s; nothing was saved, try again")
        elif "unable to open" in text:
            why = f"cannot open the annotation database {self.path}; check that the data directory exists and is writable"
        elif "not a database" in text or "malformed" in text:
            why = f"{self.path} is not a readable annotation database ({exc}); restore it from a backup"
        else:
            why = f"the annotation database {self.path} failed while trying to {doing}: {exc}"
        return AnnotationStoreError(why)

    def _write(self, doing: str, fn):
        """Run fn(conn) in one IMMEDIATE transaction; commit, or roll back and raise a clear error.

        The file at the path is checked after the write lock is taken, before COMMIT and after it.
        Replaced before COMMIT: rolled back and run again in the file now at the path. Replaced
        during COMMIT: the write landed in the previous file, so it is refused (AnnotationStoreError),
        never acknowledged.
        """
        if self.read_only:
            raise AnnotationStoreError(f"the annotation database {self.path} was opened read-only; "
                                       f"nothing was saved (cannot {doing})")
        for _ in range(3):
            conn, identity = self.db.conn, self._local.identity
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                if self._path_identity() != identity:
                    continue  # replaced meanwhile (and this connection closed): use the file now at the path
                raise self._error(exc, doing) from exc
            try:
                if self._path_identity() != identity:  # replaced while this waited for the write lock
                    raise _Replaced
                result = fn(conn)
                if self._path_identity() != identity:
                    raise _Replaced
                conn.execute("COMMIT")
            except BaseException as exc:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # a failed COMMIT may already have rolled back
                if isinstance(exc, _Replaced) or (isinstance(exc, sqlite3.Error) and self._path_identity() != identity):
                    continue
                if isinstance(exc, sqlite3.IntegrityError):
                    raise InputError(f"refused to {doing}: {exc}") from exc
                if isinstance(exc, sqlite3.Error):
                    raise self._error(exc, doing) from exc
                raise
            if self._path_identity() == identity:
                self._note_sidecars(identity)
                return result
            # The commit went into a file that was deleted or replaced during COMMIT.
            try:
                self._follow_path(conn)
            except AnnotationStoreError:
                pass  # said below
            now = "no file is at that path now" if self._path_identity() is None else "another file is there now"
            raise AnnotationStoreError(
                f"the annotation database {self.path} was deleted or replaced while saving ({now}); nothing was saved "
                f"in the file at that path (cannot {doing}). {self._rescue_note(self._rescued.get(identity))} "
                f"Check which database should be live (restore backups with `python -m mel annotations restore`), "
                f"then save again")
        raise self._changing_error(doing)

    # -- schema ----------------------------------------------------------------------------------
    def schema_version(self) -> int:
        try:
            if "schema_version" not in self.db.table_names():
                return 0
            row = self.db.execute("SELECT max(version) FROM schema_version").fetchone()
        except sqlite3.Error as exc:
            raise self._error(exc, "read the schema version") from exc
        return int(row[0] or 0)

    def _migrate(self) -> None:
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise AnnotationStoreError(
                f"{self.path} has annotation schema version {current}, newer than this code's {SCHEMA_VERSION}; "
                f"upgrade the project before opening it (it is left untouched)")
        if current == SCHEMA_VERSION:
            return
        if self.read_only:
            raise AnnotationStoreError(f"{self.path} needs a schema upgrade ({current} -> {SCHEMA_VERSION}) "
                                       f"but was opened read-only; open it once writable")
        for version, statements in MIGRATIONS:
            def apply(conn, version=version, statements=statements):
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied TEXT NOT NULL)")
                done = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
                if done >= version:
                    return  # another process migrated while we waited for the lock
                for sql in statements:
                    conn.execute(sql)
                conn.execute("INSERT INTO schema_version (version, applied) VALUES (?, ?)", (version, utc_now()))
            if version > current:
                self._write(f"apply schema migration {version}", apply)

    # -- images ----------------------------------------------------------------------------------
    def save_image(self, source) -> str:
        """Store an image (path, bytes or PIL image) under its content hash; returns the SHA-256.

        The bytes are checked to be a readable image first (InputError otherwise). Files that PIL
        reads are kept byte for byte; a PIL image without a file is stored as PNG.
        """
        if self.read_only:
            raise AnnotationStoreError(f"the annotation database {self.path} was opened read-only; cannot store images")
        name = "the image"
        if isinstance(source, Image.Image):
            buffer = io.BytesIO()
            load_image(source).save(buffer, format="PNG")
            data = buffer.getvalue()
        elif isinstance(source, (bytes, bytearray)):
            data = bytes(source)
        else:
            path = Path(source)
            name = f"the image {path.name}"
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise InputError(f"cannot read the image {path.name}: {exc.strerror or exc}") from exc
        image = load_image(data, name=name)  # refuses non-images, bombs and corrupt files with InputError
        fmt = Image.open(io.BytesIO(data)).format or ""
        if fmt not in _EXTENSIONS:  # e.g. ICO, PPM: store a lossless PNG instead
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data, fmt = buffer.getvalue(), "PNG"
        sha = hashlib.sha256(data).hexdigest()
        ext = _EXTENSIONS[fmt]
        target = self.images_dir / f"{sha}.{ext}"
        if not target.exists():
            try:
                self.images_dir.mkdir(exist_ok=True)  # deleted while the app ran: put back (never its parent)
            except OSError:
                pass  # _atomic_write says what is wrong
            _atomic_write(target, data)

        def insert(conn):
            conn.execute("INSERT OR IGNORE INTO images (sha256, ext, width, height, bytes, created) VALUES (?,?,?,?,?,?)",
                         (sha, ext, image.width, image.height, len(data), utc_now()))
        self._write("store an image", insert)
        return sha

    def image_path(self, sha256: str) -> Path | None:
        row = self.db.execute("SELECT ext FROM images WHERE sha256 = ?", (sha256,)).fetchone()
        if row is None:
            return None
        path = self.images_dir / f"{sha256}.{row[0]}"
        return path if path.exists() else None

    # -- mentions and predictions ----------------------------------------------------------------
    def record_mention(self, mention: Mention, *, image_sha256: str | None = None, source: str = "app") -> str:
        """Store a mention (idempotent: the same caption, span and image give the same id).

        Give `image_sha256` from save_image; a Mention.image path is stored with save_image here.
        """
        if image_sha256 is None and mention.image:
            image_sha256 = self.save_image(mention.image)
        mention_id = mention_key(mention.caption, mention.start, mention.end, image_sha256)

        def insert(conn):
            conn.execute(
                'INSERT OR IGNORE INTO mentions (id, caption, start, "end", mention, image_sha256, source, created) '
                "VALUES (?,?,?,?,?,?,?,?)",
                (mention_id, mention.caption, mention.start, mention.end, mention.text, image_sha256, source, utc_now()))
        self._write("record the mention", insert)
        return mention_id

    def record_predictions(self, mention_id: str, results: Iterable[LinkResult | dict], *, kb: str = "",
                           shown_to: str = "") -> list[int]:
        """Store what each linker showed for a mention; returns the prediction ids, in order.

        An item may be a LinkResult or a dict {"linker", "error", "preset", "models"} for a linker
        that failed (so the record says what was NOT shown too).
        """
        rows = [_prediction_row(mention_id, r, kb, shown_to) for r in results]

        def insert(conn):
            ids = []
            for row in rows:
                cur = conn.execute(f"INSERT INTO predictions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                                   list(row.values()))
                ids.append(cur.lastrowid)
            return ids
        return self._write("record the predictions", insert)

    def mention(self, mention_id: str) -> dict:
        rows = list(self.db.query('SELECT * FROM mentions WHERE id = ?', [mention_id]))
        if not rows:
            raise InputError(f"unknown mention id {mention_id!r}: link the mention first, then correct it")
        return rows[0]

    def predictions(self, mention_id: str | None = None) -> list[dict]:
        where, params = ("WHERE mention_id = ?", [mention_id]) if mention_id else ("", [])
        rows = list(self.db.query(f"SELECT * FROM predictions {where} ORDER BY id", params))
        for row in rows:
            for key in ("candidates", "details", "timings", "models"):
                row[key] = json.loads(row[key])
        return rows

    # -- corrections -----------------------------------------------------------------------------
    def record_correction(self, annotator: str, mention_id: str, entity_id: str | None, action: str, *,
                          entity_name: str = "", prediction_id: int | None = None, kb: str = "") -> Ack:
        """Save one correction; returns the Ack only after it is committed.

        action: accept_gemel | accept_dim | search (entity_id = a KB id), nil (entity_id = NIL),
        skip (entity_id = None). The caller checks that the id is in the KB.
        """
        annotator = _check_annotator(annotator)
        if action not in ACTIONS:
            raise InputError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
        if action == "skip":
            entity_id, entity_name = None, ""
        elif action == "nil":
            if entity_id not in (None, NIL):
                raise InputError(f"action 'nil' takes no entity (got {entity_id!r})")
            entity_id, entity_name = NIL, ""
        elif not entity_id or entity_id == NIL:
            raise InputError(f"action {action!r} needs the id of the chosen KB entity; use action 'nil' for "
                             f"'not in the KB'")
        created = utc_now()

        def insert(conn):
            if conn.execute("SELECT 1 FROM mentions WHERE id = ?", (mention_id,)).fetchone() is None:
                raise InputError(f"unknown mention id {mention_id!r}: link the mention first, then correct it")
            if prediction_id is not None and conn.execute(
                    "SELECT 1 FROM predictions WHERE id = ? AND mention_id = ?", (prediction_id, mention_id)).fetchone() is None:
                raise InputError(f"prediction {prediction_id} does not belong to mention {mention_id}")
            cur = conn.execute(
                "INSERT INTO corrections (mention_id, annotator, action, entity_id, entity_name, prediction_id, kb, created) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (mention_id, annotator, action, entity_id, entity_name or "", prediction_id, kb, created))
            total = conn.execute("SELECT count(*) FROM corrections WHERE annotator = ? AND undone_at IS NULL",
                                 (annotator,)).fetchone()[0]
            return cur.lastrowid, total

        correction_id, total = self._write("save the correction", insert)
        return Ack(correction_id, mention_id, annotator, action, entity_id, entity_name or "", created, total)

    def undo_last(self, annotator: str, *, include_tasks: bool = True) -> dict | None:
        """Undo `annotator`'s most recent standing correction (never anyone else's).

        include_tasks=False: only a correction of a free-form mention (the Link tab's, the API's),
        never a project task's decision, which its queue undoes (annotations.queue: it also moves
        the annotator's cursor back and refuses a decision a review sent back).
        Returns the undone correction (as a dict) or None when there is nothing to undo.
        """
        annotator = _check_annotator(annotator)
        only_free = "" if include_tasks else "AND task_id IS NULL "

        def undo(conn):
            row = conn.execute("SELECT id FROM corrections WHERE annotator = ? AND undone_at IS NULL "
                               f"{only_free}ORDER BY id DESC LIMIT 1", (annotator,)).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE corrections SET undone_at = ? WHERE id = ? AND annotator = ?",
                         (utc_now(), row[0], annotator))
            return row[0]

        undone_id = self._write("undo the last correction", undo)
        return None if undone_id is None else self.correction(undone_id)

    def undo(self, annotator: str, correction_id: int) -> dict:
        """Undo one correction by id; refused unless `annotator` wrote it."""
        annotator = _check_annotator(annotator)

        def undo(conn):
            row = conn.execute("SELECT annotator, undone_at FROM corrections WHERE id = ?", (correction_id,)).fetchone()
            if row is None:
                raise InputError(f"no correction {correction_id}")
            if row[0] != annotator:
                raise NotAllowedError(f"correction {correction_id} belongs to another annotator; "
                                      f"only its author can undo it")
            if row[1] is None:
                conn.execute("UPDATE corrections SET undone_at = ? WHERE id = ?", (utc_now(), correction_id))

        self._write("undo the correction", undo)
        return self.correction(correction_id)

    def correction(self, correction_id: int) -> dict:
        rows = list(self.db.query("SELECT * FROM corrections WHERE id = ?", [correction_id]))
        if not rows:
            raise InputError(f"no correction {correction_id}")
        return rows[0]

    def corrections(self, *, annotator: str | None = None, include_undone: bool = False) -> list[dict]:
        """Corrections joined with their mention (caption, span, image), oldest first."""
        where, params = [], []
        if annotator is not None:
            where.append("c.annotator = ?")
            params.append(annotator)
        if not include_undone:
            where.append("c.undone_at IS NULL")
        sql = ('SELECT c.*, m.caption, m.start, m."end", m.mention, m.image_sha256 FROM corrections c '
               "JOIN mentions m ON m.id = c.mention_id "
               + (f"WHERE {' AND '.join(where)} " if where else "") + "ORDER BY c.id")
        return list(self.db.query(sql, params))

    def latest_corrections(self) -> list[dict]:
        """For each mention, its most recent correction that was not undone (by anyone)."""
        sql = ('SELECT c.*, m.caption, m.start, m."end", m.mention, m.image_sha256 FROM corrections c '
               "JOIN mentions m ON m.id = c.mention_id "
               "WHERE c.id IN (SELECT max(id) FROM corrections WHERE undone_at IS NULL GROUP BY mention_id) "
               "ORDER BY c.id")
        return list(self.db.query(sql))

    def counts_by_annotator(self) -> dict[str, dict[str, int]]:
        """{annotator: {"total", "linked", "nil", "skip", "undone"}}; total excludes undone ones."""
        counts: dict[str, dict[str, int]] = {}
        for annotator, action, undone, n in self.db.execute(
                "SELECT annotator, action, undone_at IS NOT NULL, count(*) FROM corrections "
                "GROUP BY annotator, action, undone_at IS NOT NULL"):
            c = counts.setdefault(annotator, {"total": 0, "linked": 0, "nil": 0, "skip": 0, "undone": 0})
            if undone:
                c["undone"] += n
                continue
            c["total"] += n
            c["linked" if action in LINK_ACTIONS else action] += n
        return counts

    def stats(self) -> dict[str, Any]:
        q = lambda sql: self.db.execute(sql).fetchone()[0]  # noqa: E731
        return {
            "path": str(self.path),
            "schema_version": self.schema_version(),
            "mentions": q("SELECT count(*) FROM mentions"),
            "images": q("SELECT count(*) FROM images"),
            "predictions": q("SELECT count(*) FROM predictions"),
            "corrections": q("SELECT count(*) FROM corrections WHERE undone_at IS NULL"),
            "undone": q("SELECT count(*) FROM corrections WHERE undone_at IS NOT NULL"),
            "corrected_mentions": q("SELECT count(DISTINCT mention_id) FROM corrections WHERE undone_at IS NULL"),
            "by_annotator": self.counts_by_annotator(),
        }

    def backup(self, target: str | Path) -> Path:
        """A consistent copy of the database (SQLite online backup; safe while the app writes).
        Never overwrites: the copy is written beside `target` and linked in only if nothing is there.
        It copies the file now at the path, never a file deleted or replaced since it was opened."""
        conn, identity = self.db.conn, self._local.identity
        path = self._copy(conn, Path(target))
        if self._path_identity() != identity:
            raise AnnotationStoreError(f"the annotation database {self.path} was deleted or replaced while it was "
                                       f"copied, so {path} holds the previous file; make the backup again")
        return path

    def _copy(self, conn: sqlite3.Connection, target: Path) -> Path:
        if target.exists() or target.is_symlink():
            raise AnnotationStoreError(f"{target} already exists; a backup never overwrites a file: pick a new name")
        check_output_dir(target.parent)  # a parent that is a file, or not writable: said as such
        try:
            _copy_no_clobber(conn, target, "tmp")
        except FileExistsError as exc:
            raise AnnotationStoreError(f"{target} already exists; a backup never overwrites a file: "
                                       f"pick a new name") from exc
        except (OSError, sqlite3.Error) as exc:
            raise AnnotationStoreError(f"could not write the backup {target} ({exc}); pick a writable path") from exc
        return target

    def restore(self, backup: str | Path) -> dict:
        """Put the content of `backup` into the live database; safe while the app runs.

        The backup is checked first (an intact annotation database this code can read); if it is
        not one, nothing is touched. Then the live database is copied to
        DATA_DIR/annotations-before-restore-<time>.sqlite (a new file, nothing overwritten), and the
        backup is copied INTO the live file with SQLite's online backup API: the file keeps its
        identity, and every connection to it (other threads, other processes) sees the restored
        content through SQLite's locking. A live file that was deleted is recreated from the backup
        (linked in only if nothing is at the path).

        Returns {"restored", "into", "safety_copy" (None when no live file was there), "rescued" (the
        copy of a deleted file's content, if one was made), "counts" (rows of the restored database)}.
        """
        if self.read_only:
            raise AnnotationStoreError(f"the annotation database {self.path} was opened read-only; "
                                       f"cannot restore a backup into it")
        backup = Path(backup)
        safety, rescued = None, None
        with _opened_backup(backup, self.path) as (src, counts):
            if self._path_identity() is None:  # deleted while open: copy what the open file holds, then recreate
                if self._identity is not None:
                    try:
                        self._follow_path(None)
                    except AnnotationStoreError:
                        pass  # "deleted": expected here
                    rescued = self._rescued.get(self._identity)
                _restore_new_file(src, self.path)
            else:
                conn, identity = self.db.conn, self._local.identity  # follows a file replaced by hand
                sizes = (src.execute("PRAGMA page_size").fetchone()[0], conn.execute("PRAGMA page_size").fetchone()[0])
                if sizes[0] != sizes[1]:
                    raise AnnotationStoreError(
                        f"{backup} uses {sizes[0]}-byte pages and {self.path} {sizes[1]}-byte pages; a live WAL "
                        f"database cannot take a backup of another page size. Nothing was changed: stop the app, "
                        f"move {self.path} aside and run the restore again (it then writes a new file)")
                safety = self._copy(conn, _free_name(self.data_dir, "annotations-before-restore", ".sqlite"))
                try:
                    src.backup(conn)  # one step, in one write transaction: all of it or nothing
                except sqlite3.Error as exc:
                    raise AnnotationStoreError(
                        f"{self._error(exc, 'restore the backup')}; the live database is unchanged (and also "
                        f"copied to {safety})") from exc
                if self._path_identity() != identity:
                    raise AnnotationStoreError(
                        f"the annotation database {self.path} was deleted or replaced while the backup was restored "
                        f"into it; the file now at the path is not the restored one. Run the restore again")
        self.db  # noqa: B018  (re)open the restored file and check its schema
        return {"restored": str(backup), "into": str(self.path), "safety_copy": str(safety) if safety else None,
                "rescued": str(rescued) if isinstance(rescued, Path) else None, "counts": counts}


def restore_database(db: str | Path, backup: str | Path) -> dict:
    """Restore `backup` into the annotation database `db` (the file or its data directory), as
    `python -m mel annotations restore` does; AnnotationStore.restore says how. Works when the
    file is missing too (deleted): the backup is then written as a new file at the path."""
    db = Path(db)
    path = db / DB_NAME if db.is_dir() else db
    if path.name != DB_NAME:
        raise AnnotationStoreError(f"{db} is not an annotation database: expected a file named {DB_NAME} "
                                   f"(or the data directory that holds it)")
    if path.exists():
        with AnnotationStore(path.parent) as store:
            return store.restore(backup)
    if not path.parent.is_dir():
        raise AnnotationStoreError(f"no data directory {path.parent}; check --db (nothing was changed)")
    with _opened_backup(Path(backup), path) as (src, counts):
        _restore_new_file(src, path)
    return {"restored": str(backup), "into": str(path), "safety_copy": None, "rescued": None, "counts": counts}


BACKUP_TABLES = ("mentions", "images", "predictions", "corrections")


def _tables_up_to(version: int) -> list[str]:
    """The tables an annotation database of schema `version` has (those its migrations create)."""
    return [m[1] for v, statements in MIGRATIONS if v <= version for sql in statements
            if (m := re.match(r"\s*CREATE TABLE (\w+)", sql))]


@contextlib.contextmanager
def _opened_backup(backup: Path, live: Path):
    """Open `backup` read-only, check that it is an intact annotation database this code can read,
    and yield (connection, {table: rows}); AnnotationStoreError (nothing changed) otherwise."""
    if not backup.is_file():
        raise AnnotationStoreError(f"no backup file at {backup}; nothing was changed. Give a file written by "
                                   f"`python -m mel annotations backup`")
    if live.exists() and os.path.samefile(backup, live):
        raise AnnotationStoreError(f"{backup} is the live database itself, not a backup; nothing was changed")
    created = [Path(f"{backup}{suffix}") for suffix in ("-wal", "-shm") if not Path(f"{backup}{suffix}").exists()]
    refuse = (f"{backup} is not an annotation database backup ({{}}); nothing was changed. Give a file written by "
              f"`python -m mel annotations backup` (or a rescue copy the app wrote)")
    conn = None
    try:
        try:
            conn = sqlite3.connect(f"file:{urllib.parse.quote(str(backup.resolve()))}?mode=ro", uri=True,
                                   timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "schema_version" not in tables:
                raise AnnotationStoreError(refuse.format(
                    f"it holds {', '.join(sorted(tables)[:5])}" if tables else "it holds no tables"))
            version = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
            if not isinstance(version, int):
                raise AnnotationStoreError(refuse.format(f"its schema version is {str(version)[:40]!r}"))
            if version > SCHEMA_VERSION:
                raise AnnotationStoreError(
                    f"{backup} has annotation schema version {version}, newer than this code's {SCHEMA_VERSION}; "
                    f"nothing was changed. Upgrade the project before restoring it")
            if version < 1:
                raise AnnotationStoreError(refuse.format("its schema_version table names no version"))
            missing = [t for t in _tables_up_to(version) if t not in tables]
            if missing:
                raise AnnotationStoreError(refuse.format(f"tables {', '.join(missing)} are missing"))
            check = [r[0] for r in conn.execute("PRAGMA quick_check")]
            if check != ["ok"]:
                raise AnnotationStoreError(refuse.format(f"its integrity check failed: {'; '.join(check[:3])}"))
            counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in BACKUP_TABLES if t in tables}
        except sqlite3.DatabaseError as exc:
            raise AnnotationStoreError(refuse.format(f"not a readable SQLite database: {exc}")) from exc
        except sqlite3.Error as exc:
            raise AnnotationStoreError(f"cannot read the backup {backup} ({exc}); nothing was changed") from exc
        yield conn, counts
    finally:
        if conn is not None:
            conn.close()
        for sidecar in created:  # an empty -wal/-shm that SQLite made to read the backup: not left behind
            if sidecar.exists() and (sidecar.name.endswith("-shm") or sidecar.stat().st_size == 0):
                sidecar.unlink(missing_ok=True)


def _restore_new_file(src: sqlite3.Connection, path: Path) -> None:
    """Write the database open as `src` to a new file at `path`; linked in only if nothing is there."""
    for suffix in ("-wal", "-shm"):  # left by a deleted file: never to be read as the new file's
        orphan = Path(f"{path}{suffix}")
        if orphan.exists():
            aside = _free_name(path.parent, f"{path.name}{suffix}-orphaned", "")
            orphan.rename(aside)
            log.warning("moved %s, left by a deleted database, to %s", orphan, aside)
    try:
        _copy_no_clobber(src, path, "restore")
    except FileExistsError as exc:
        raise AnnotationStoreError(f"a file appeared at {path} while the backup was written; it is left as it "
                                   f"is: run the restore again") from exc
    except (OSError, sqlite3.Error) as exc:
        raise AnnotationStoreError(f"could not write {path} ({exc}); nothing was restored") from exc


def _copy_no_clobber(src: sqlite3.Connection, target: Path, tag: str) -> None:
    """Copy the database open as `src` (SQLite online backup) to a new file at `target`: written under a
    temporary name beside it and hard-linked in, which fails (FileExistsError) if the name was taken
    meanwhile, so nothing is ever overwritten, even in a race. OSError / sqlite3.Error pass through."""
    tmp = target.with_name(f".{target.name}.{tag}-{os.getpid()}-{threading.get_ident()}")
    try:
        dest = sqlite3.connect(tmp)
        try:
            src.backup(dest)
        finally:
            dest.close()
        os.link(tmp, target)
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), Path(f"{tmp}-journal")):
            leftover.unlink(missing_ok=True)
    fsync_path(target.parent)


def _free_name(directory: Path, stem: str, ext: str) -> Path:
    """DIRECTORY/STEM-<UTC time>EXT, with -2, -3... added if that name is taken."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in itertools.count(1):
        path = directory / f"{stem}-{stamp}{'' if n == 1 else f'-{n}'}{ext}"
        if not (path.exists() or path.is_symlink()):
            return path
    raise AssertionError("unreachable")


# -- helpers -------------------------------------------------------------------------------------
MAX_CANDIDATES_STORED = 20


def _prediction_row(mention_id: str, result: LinkResult | dict, kb: str, shown_to: str) -> dict:
    if isinstance(result, LinkResult):
        # the calibrated probability the annotator was shown (None without a calibration) is kept with it
        candidates = [{"id": c.entity.id, "name": c.entity.name, "score": c.score, "probability": c.probability}
                      for c in result.candidates[:MAX_CANDIDATES_STORED]]
        return {
            "mention_id": mention_id, "linker": result.linker,
            "entity_id": result.prediction.id if result.prediction else None,
            "entity_name": result.prediction.name if result.prediction else None,
            "score": result.score, "candidates": json.dumps(candidates, ensure_ascii=False),
            "details": json.dumps(_jsonable(result.details), ensure_ascii=False),
            "timings": json.dumps(result.timings), "preset": result.preset or "",
            "models": json.dumps(result.models, ensure_ascii=False), "kb": kb, "error": None,
            "shown_to": shown_to, "created": utc_now(),
        }
    if not isinstance(result, dict) or "linker" not in result:
        raise InputError("a prediction is a LinkResult or a dict with at least 'linker' (and 'error')")
    return {
        "mention_id": mention_id, "linker": str(result["linker"]), "entity_id": None, "entity_name": None,
        "score": None, "candidates": "[]", "details": json.dumps(_jsonable(result.get("details", {}))),
        "timings": json.dumps(result.get("timings", {})), "preset": str(result.get("preset", "")),
        "models": json.dumps(result.get("models", {})), "kb": kb, "error": str(result.get("error") or "failed"),
        "shown_to": shown_to, "created": utc_now(),
    }


def _jsonable(value, depth: int = 0):
    """Details can hold arrays, tensors or entities: keep what JSON can hold, summarise the rest."""
    if depth > 6:
        return repr(value)[:200]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value[:100]]
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict(), depth + 1)
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist(), depth + 1)
    return repr(value)[:200]


def _atomic_write(path: Path, data: bytes) -> None:
    """Write, fsync, rename, fsync the directory: the file is whole or absent, even after a crash."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise AnnotationStoreError(f"cannot write the image to {path.parent} ({exc.strerror or exc}); "
                                   f"nothing was saved. Check free space and permissions of the data directory") from exc
    fsync_path(path.parent)
