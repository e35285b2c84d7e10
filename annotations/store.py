"""The correction store: every mention shown, every prediction made, every correction given.

One SQLite file (sqlite-utils on a plain sqlite3 connection) in a data directory:

    DATA_DIR/annotations.sqlite   mentions, predictions, corrections, images, schema_version
    DATA_DIR/images/<sha256>.<ext> uploaded images, named by the SHA-256 of their bytes
    DATA_DIR/annotations.sqlite.open-lock  taken while a connection opens (processes starting at once)

Guarantees (each one has a test in tests/test_annotations.py):

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
"""
from __future__ import annotations

import hashlib
import io
import json
import os
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

from mel.errors import InputError, MELError
from mel.imageio import load_image
from mel.types import NIL, LinkResult, Mention

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
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


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
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
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
        if db.name != DB_NAME:
            raise AnnotationStoreError(f"{db} is not an annotation database: expected a file named {DB_NAME} "
                                       f"(or the data directory that holds it)")
        if not db.exists():
            raise AnnotationStoreError(f"no annotation database at {db}; check the path")
        return cls(db.parent, read_only=read_only)

    # -- connections -----------------------------------------------------------------------------
    @property
    def db(self) -> sqlite_utils.Database:
        """This thread's connection (sqlite-utils wrapper), opened on first use."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = sqlite_utils.Database(self._connect())
        return db

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            return self._register(self._open_connection())
        # Two processes opening a new database at once both try to switch it to WAL; SQLite then
        # refuses one of them with SQLITE_BUSY at once (its busy handler would deadlock), so the
        # switch is serialised across processes by a lock file beside the database.
        try:
            with filelock.FileLock(self.data_dir / LOCK_NAME, timeout=BUSY_TIMEOUT_MS / 1000):
                return self._register(self._open_connection())
        except filelock.Timeout as exc:
            raise AnnotationStoreError(
                f"the annotation database {self.path} is being opened by another process that held "
                f"{LOCK_NAME} for more than {BUSY_TIMEOUT_MS / 1000:.0f} s; nothing was saved, try again") from exc
        except PermissionError as exc:
            raise self._error(sqlite3.OperationalError("attempt to write a readonly database"), "open") from exc

    def _open_connection(self) -> sqlite3.Connection:
        try:
            if self.read_only:
                uri = f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro"
                conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                       check_same_thread=False)
            else:
                # isolation_level=None: no implicit transactions; every write says BEGIN IMMEDIATE itself
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
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

    def _register(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        with self._connections_lock:
            self._connections.append(conn)
        return conn

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
        """Run fn(conn) in one IMMEDIATE transaction; commit, or roll back and raise a clear error."""
        if self.read_only:
            raise AnnotationStoreError(f"the annotation database {self.path} was opened read-only; "
                                       f"nothing was saved (cannot {doing})")
        conn = self.db.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._error(exc, doing) from exc
        try:
            result = fn(conn)
            conn.execute("COMMIT")
            return result
        except BaseException as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # a failed COMMIT may already have rolled back
            if isinstance(exc, sqlite3.IntegrityError):
                raise InputError(f"refused to {doing}: {exc}") from exc
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc, doing) from exc
            raise

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

    def undo_last(self, annotator: str) -> dict | None:
        """Undo `annotator`'s most recent standing correction (never anyone else's).

        Returns the undone correction (as a dict) or None when there is nothing to undo.
        """
        annotator = _check_annotator(annotator)

        def undo(conn):
            row = conn.execute("SELECT id FROM corrections WHERE annotator = ? AND undone_at IS NULL "
                               "ORDER BY id DESC LIMIT 1", (annotator,)).fetchone()
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
        Never overwrites: the copy is written beside `target` and linked in only if nothing is there."""
        target = Path(target)
        if target.exists() or target.is_symlink():
            raise AnnotationStoreError(f"{target} already exists; a backup never overwrites a file: pick a new name")
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            dest = sqlite3.connect(tmp)
            try:
                self.db.conn.backup(dest)
            finally:
                dest.close()
            os.link(tmp, target)  # fails if the name was taken meanwhile: no overwrite, even in a race
        except FileExistsError as exc:
            raise AnnotationStoreError(f"{target} already exists; a backup never overwrites a file: "
                                       f"pick a new name") from exc
        except (OSError, sqlite3.Error) as exc:
            raise AnnotationStoreError(f"could not write the backup {target} ({exc}); pick a writable path") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return target


# -- helpers -------------------------------------------------------------------------------------
MAX_CANDIDATES_STORED = 20


def _prediction_row(mention_id: str, result: LinkResult | dict, kb: str, shown_to: str) -> dict:
    if isinstance(result, LinkResult):
        candidates = [{"id": c.entity.id, "name": c.entity.name, "score": c.score}
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
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the file itself is synced
