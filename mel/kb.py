"""The knowledge base: one SQLite file (sqlite-utils) plus dense indexes stored beside it.

    KB.sqlite                entities, aliases, meta, and an FTS5 index (BM25) over
                             names, aliases and descriptions
    KB.text.safetensors      text embeddings of every entity ("name. description")
    KB.image.safetensors     image embeddings of the entities that have an image (optional)

Entities are addressed by `idx`, their row number, which is also the row in the dense indexes.

The three files are one unit. Every build gets a build id, written into the KB's meta table and
into each dense index; a build writes all its files under temporary names and renames the KB
last, and `KnowledgeBase` refuses a dense index whose build id is not the KB's. So whatever
instant a build is killed, a reader sees the old unit, the new unit, or a clear error saying
which file is from which build and how to rebuild: never entities paired with another build's
vectors. The temporary files of a killed build are deleted by the next build of the same KB.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import sqlite3
import threading
import time
import unicodedata
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sqlite_utils

from .errors import InputError, KBError, require_whole
from .index import ENGINES, DenseIndex, write_vectors_file
from .paths import fsync_path, remove_dead_temps, temp_path
from .types import Entity

SCHEMA_VERSION = 1
BM25_WEIGHTS = (10.0, 5.0, 1.0)  # name, aliases, description: a name hit matters most
ENTITY_TEXT_MAX_CHARS = 400      # keeps embedding fast; names and the first facts carry the signal
LOCK_WAIT_S = 5.0                # how long a read waits for another process's write lock before KBError
DENSE_KINDS = ("text", "image")
BUILD_CHUNK = 4096               # entities a build holds in memory at a time (rows, texts, vectors)
SQL_PARAMS_PER_QUERY = 500      # SQLite caps the number of bound parameters (999 in old builds)


def normalize_name(text: str) -> str:
    """Case-, accent- and punctuation-insensitive key for exact name matching."""
    text = unicodedata.normalize("NFKD", text.casefold())
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return " ".join(re.findall(r"\w+", text))


def entity_text(entity: Entity) -> str:
    """What gets embedded for an entity (DIM's entity side: name [SEP] description)."""
    text = entity.name if not entity.description else f"{entity.name}. {entity.description}"
    return text[:ENTITY_TEXT_MAX_CHARS]


def fts_query(text: str) -> str:
    """An FTS5 MATCH expression that ORs the words of `text`; safe for any user input. The text is
    NFC-normalised first, as the KB's names are, so a decomposed "Beyonce\u0301" stays one word."""
    words = re.findall(r"\w+", unicodedata.normalize("NFC", text))
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)


def sidecar(path: Path, kind: str) -> Path:
    return path.with_name(f"{path.stem}.{kind}.safetensors")


def _build_label(build_id, created) -> str:
    if not build_id:
        return "a build without a build id (an older mel)" + (f", created {created}" if created else "")
    return f"build {build_id}" + (f" (created {created})" if created else "")


class KnowledgeBase:
    """Read access to a built KB. Thread-safe: one SQLite connection per thread."""

    def __init__(self, path: str | Path, engine: str = "auto"):
        self.path = Path(path)
        if engine not in ENGINES:
            raise InputError(f"unknown dense search engine {engine!r}; choose one of {', '.join(ENGINES)}")
        self.engine = engine
        if not self.path.exists():
            raise KBError(f"knowledge base {self.path} does not exist; build one with "
                          f"`python -m mel kb build --format ... --source DIR --out {self.path}`")
        if self.path.is_dir():
            raise KBError(f"{self.path} is a directory; a knowledge base is one .sqlite file (from `mel kb build`)")
        self._local = threading.local()
        self._dense: dict[str, tuple[DenseIndex, dict]] = {}
        self._dense_lock = threading.Lock()
        self.meta = self._read_meta()
        self.size = int(self.meta.get("n_entities", 0))
        self.source_format = self.meta.get("format", "")
        self.build_id = self.meta.get("build_id")  # None: a KB built before build ids existed
        for kind in DENSE_KINDS:  # a side file of another build is refused now, not at the first search
            if self.has_dense(kind):
                try:
                    self._check_dense_build(kind, DenseIndex.read_metadata(sidecar(self.path, kind)))
                except FileNotFoundError:
                    pass  # removed since has_dense looked: dense() says so when it is needed

    # -- connection and metadata -------------------------------------------------------------
    @property
    def db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            uri = f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=LOCK_WAIT_S, check_same_thread=False)
            if hasattr(self, "meta"):  # another thread's connection: the file must still be the KB first opened
                self._check_same_build(conn)
            db = self._local.db = sqlite_utils.Database(conn)
        return db

    def _check_same_build(self, conn: sqlite3.Connection) -> None:
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'build_id'").fetchone()
        except sqlite3.Error:
            return  # the query that needs the connection reports what is wrong
        try:
            theirs = json.loads(row[0]) if row else None
        except (TypeError, ValueError):
            theirs = row[0]  # not a build id this library wrote: refused below as another build
        if theirs != self.build_id:
            conn.close()
            raise KBError(f"{self.path} was rebuilt ({_build_label(theirs, None)}) after it was opened "
                          f"({_build_label(self.build_id, self.meta.get('created'))}); open it again")

    def _query(self, sql: str, params=()) -> list[tuple]:
        try:
            return self.db.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):
                raise KBError(f"knowledge base {self.path} is locked by another process; try again when "
                              f"it has finished writing") from exc
            raise KBError(f"knowledge base {self.path} cannot be read ({exc}); is it a KB built by "
                          f"`python -m mel kb build`?") from exc
        except sqlite3.DatabaseError as exc:
            raise KBError(f"{self.path} is not a readable SQLite file ({exc}); rebuild it with "
                          f"`python -m mel kb build`") from exc

    def _read_meta(self) -> dict:
        rows = self._query("SELECT name FROM sqlite_master WHERE type='table' AND name='meta'")
        if not rows:
            raise KBError(f"{self.path} is not a mel knowledge base (no meta table); build one with "
                          f"`python -m mel kb build`")
        meta = {}
        for key, value in self._query("SELECT key, value FROM meta"):
            try:
                meta[key] = json.loads(value)
            except (TypeError, ValueError) as exc:  # a NULL, or text that is not JSON: not what a build writes
                raise KBError(f"{self.path} is not a KB built by this version of mel (its meta value {key!r} is "
                              f"not JSON: {str(value)[:40]!r}); rebuild it with `python -m mel kb build`") from exc
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise KBError(f"{self.path} has KB schema version {version}, this library reads version "
                          f"{SCHEMA_VERSION}; rebuild it with `python -m mel kb build`")
        return meta

    def info(self) -> dict:
        info = {"path": str(self.path), "n_entities": self.size, **{k: v for k, v in self.meta.items() if k != "n_entities"}}
        info["n_aliases"] = self._query("SELECT count(*) FROM aliases")[0][0]
        info["n_with_description"] = self._query("SELECT count(*) FROM entities WHERE description != ''")[0][0]
        info["dense_indexes"] = {kind: self.has_dense(kind) for kind in DENSE_KINDS}
        info["file_mb"] = round(self.path.stat().st_size / 2**20, 2)
        return info

    # -- entities ----------------------------------------------------------------------------
    @staticmethod
    def _row_to_entity(row) -> Entity:
        _idx, eid, name, description, etype, aliases, images = row
        return Entity(id=eid, name=name, aliases=json.loads(aliases), description=description,
                      type=etype, images=json.loads(images))

    _COLUMNS = "idx, id, name, description, type, aliases, images"

    def entities_at(self, idxs: Iterable[int]) -> list[Entity]:
        idxs = [int(i) for i in idxs]
        if not idxs:
            return []
        rows = {}
        for start in range(0, len(idxs), SQL_PARAMS_PER_QUERY):
            chunk = idxs[start:start + SQL_PARAMS_PER_QUERY]
            sql = f"SELECT {self._COLUMNS} FROM entities WHERE idx IN ({','.join('?' * len(chunk))})"
            rows.update({r[0]: r for r in self._query(sql, chunk)})
        return [self._row_to_entity(rows[i]) for i in idxs]

    def entity_at(self, idx: int) -> Entity:
        return self.entities_at([idx])[0]

    def idx_of(self, entity_id: str) -> int | None:
        return self.idxs_of([entity_id]).get(entity_id)

    def idxs_of(self, entity_ids: Iterable[str]) -> dict[str, int]:
        """{entity id: KB idx} for those of `entity_ids` the KB holds: one query (per 500 ids), not one per id."""
        ids = list(dict.fromkeys(entity_ids))
        found: dict[str, int] = {}
        for start in range(0, len(ids), SQL_PARAMS_PER_QUERY):
            chunk = ids[start:start + SQL_PARAMS_PER_QUERY]
            sql = f"SELECT id, idx FROM entities WHERE id IN ({','.join('?' * len(chunk))})"
            found.update(self._query(sql, chunk))
        return found

    def get(self, entity_id: str) -> Entity:
        idx = self.idx_of(entity_id)
        if idx is None:
            raise InputError(f"entity {entity_id!r} is not in the knowledge base {self.path.name}; "
                             f"search the KB for the right id, or mark the mention NIL")
        return self.entity_at(idx)

    def __contains__(self, entity_id: str) -> bool:
        return self.idx_of(entity_id) is not None

    def __len__(self) -> int:
        return self.size

    def iter_entities(self, batch: int = 5000) -> Iterator[tuple[int, Entity]]:
        for start in range(0, self.size, batch):
            for row in self._query(f"SELECT {self._COLUMNS} FROM entities WHERE idx >= ? AND idx < ? ORDER BY idx",
                                   (start, start + batch)):
                yield row[0], self._row_to_entity(row)

    def names(self) -> list[tuple[int, str]]:
        """(idx, name) for every entity, in idx order; names are what a generator may output."""
        return self._query("SELECT idx, name FROM entities ORDER BY idx")

    def lookup_name(self, text: str) -> list[tuple[int, str]]:
        """Entities whose name or alias equals `text` after normalize_name: (idx, 'name'|'alias')."""
        key = normalize_name(text)
        if not key:
            return []
        return self._query("SELECT DISTINCT entity_idx, kind FROM aliases WHERE norm = ? ORDER BY kind DESC, entity_idx",
                           (key,))

    # -- search ------------------------------------------------------------------------------
    def search_bm25(self, query: str, k: int = 20) -> list[tuple[int, float]]:
        """BM25 (FTS5) over names, aliases and descriptions: [(idx, score)], higher is better."""
        require_whole("k (how many candidates to return)", k, 1)  # SQLite reads LIMIT -1 as "no limit"
        match = fts_query(query)
        if not match:
            return []
        w = ", ".join(str(x) for x in BM25_WEIGHTS)
        rows = self._query(f"SELECT rowid, bm25(entities_fts, {w}) FROM entities_fts WHERE entities_fts MATCH ? "
                           f"ORDER BY bm25(entities_fts, {w}) LIMIT ?", (match, int(k)))
        return [(idx, -score) for idx, score in rows]  # FTS5's bm25 is lower-is-better

    def dense(self, kind: str = "text") -> tuple[DenseIndex, dict]:
        """The dense index of `kind` ('text' or 'image') and its metadata (encoder spec...)."""
        with self._dense_lock:
            if kind not in self._dense:
                path = sidecar(self.path, kind)
                if not self.has_dense(kind):
                    raise KBError(f"{self.path.name} has no {kind} embeddings ({path.name} is missing); rebuild it "
                                  f"with `python -m mel kb build ... --preset <preset>`")
                index, meta = DenseIndex.load(path, engine=self.engine)
                self._check_dense_build(kind, meta)  # again: the file may have been replaced since opening
                if len(index) and (int(index.ids.max()) >= self.size or int(index.ids.min()) < 0):
                    raise KBError(f"{path.name} points at KB row {int(index.ids.max())} but {self.path.name} has "
                                  f"{self.size} entities: the two files are not from the same build. Rebuild the "
                                  f"KB with: {self.rebuild_command()}")
                self._dense[kind] = index, meta
            return self._dense[kind]

    def has_dense(self, kind: str = "text") -> bool:
        """Whether this KB has a dense index of `kind`: its build made one, and the file is there (a file
        left from an earlier build that made one, when this build did not, is ignored)."""
        declared = self.meta.get("dense_indexes")  # None: a KB from before build ids, which did not say
        return (declared is None or kind in declared) and sidecar(self.path, kind).exists()

    def rebuild_command(self, index_meta: dict | None = None) -> str:
        """The command that rebuilds this KB: the one recorded by the build (the dense index's first, as
        that is the newer build when a build was interrupted), else its general form."""
        command = (index_meta or {}).get("kb_build_command") or self.meta.get("build_command")
        if command:
            return command
        dense = "--preset <preset>" if self.meta.get("text_encoder") else "--no-dense"
        return (f"python -m mel kb build --format {self.source_format or '<format>'} --source <dataset dir> "
                f"--out {shlex.quote(str(self.path))} {dense}")

    def _check_dense_build(self, kind: str, index_meta: dict) -> None:
        """Refuse a dense index that another build wrote: its rows would name the wrong entities."""
        theirs = index_meta.get("kb_build_id")
        if theirs == self.build_id:
            return
        path = sidecar(self.path, kind)
        raise KBError(
            f"{path.name} does not belong to {self.path.name}: {self.path.name} is from "
            f"{_build_label(self.build_id, self.meta.get('created'))}, {path.name} is from "
            f"{_build_label(theirs, index_meta.get('kb_created'))}. A `kb build` was stopped while it replaced the "
            f"files, or files of two builds were put together; searching them would return wrong entities. "
            f"Rebuild the KB with: {self.rebuild_command(index_meta)}")

    def search_dense(self, query_vectors: np.ndarray, k: int = 20, kind: str = "text"):
        index, _ = self.dense(kind)
        return index.search(query_vectors, k)

    # -- link prior (see build_link_prior) -------------------------------------------------------
    def link_prior_info(self) -> dict | None:
        """The provenance of the KB's link prior (dataset, split, counts, date), None when it has none."""
        info = self.meta.get("link_prior")
        if not info:
            return None
        if not self._query("SELECT name FROM sqlite_master WHERE type='table' AND name='link_prior'"):
            raise KBError(f"{self.path} says it has a link prior but has no link_prior table; rebuild it with "
                          f"`python -m mel kb prior --kb {self.path} ...`")
        return info

    def has_link_prior(self) -> bool:
        if not hasattr(self, "_has_prior"):
            self._has_prior = self.link_prior_info() is not None
        return self._has_prior

    def link_prior_counts(self, keys: Iterable[str]) -> dict[str, dict[int, int]]:
        """{normalised mention: {KB idx: count}} for `keys` (link_prior_key of the mention text); {} per unseen key."""
        keys = list(dict.fromkeys(keys))
        out: dict[str, dict[int, int]] = {k: {} for k in keys}
        if not keys or not self.has_link_prior():
            return out
        for start in range(0, len(keys), SQL_PARAMS_PER_QUERY):
            chunk = keys[start:start + SQL_PARAMS_PER_QUERY]
            rows = self._query(f"SELECT norm, entity_idx, count FROM link_prior WHERE norm IN "
                               f"({','.join('?' * len(chunk))})", chunk)
            for norm, idx, count in rows:
                out[norm][int(idx)] = int(count)
        return out

    def link_prior_entity_counts(self) -> dict[int, int]:
        """{KB idx: how many counted annotations link to it} (loaded once)."""
        if not hasattr(self, "_prior_entity"):
            rows = self._query("SELECT entity_idx, SUM(count) FROM link_prior GROUP BY entity_idx") \
                if self.has_link_prior() else []
            self._prior_entity = {int(i): int(c) for i, c in rows}
        return self._prior_entity


# -- building ----------------------------------------------------------------------------------
def build_kb(entities: Iterable[Entity], out: str | Path, *, text_encoder=None, image_encoder=None,
             source_format: str = "", batch_size: int = 128, progress: bool = True,
             overwrite: bool = True, build_command: str | None = None,
             image_index: tuple[DenseIndex, dict] | None = None, extra_meta: dict | None = None,
             finish=None) -> KnowledgeBase:
    """Write a KB to `out` (atomically: a half-built KB never replaces a good one, and the KB and its
    dense indexes are published as one unit; see the module docstring).

    `text_encoder` / `image_encoder` are backends with `.encode()`, `.name` and `.dim`; None skips
    that dense index (BM25 and exact matching still work). `image_index` (index, metadata) is an
    image index already computed for these entities, in this order (`kb enrich` keeps the source's).
    `extra_meta` adds keys to the KB's meta table; `finish(db)` may change the new database (a
    sqlite_utils.Database) before it is published. `build_command` is recorded so that an error
    can say how to rebuild.
    """
    out = check_kb_out(out)
    if out.exists() and not overwrite:
        raise KBError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    _remove_build_leftovers(out)
    started = time.perf_counter()

    tmp = temp_path(out, "building")
    vectors_tmp = temp_path(sidecar(out, "text"), "building")  # raw float32 rows, appended chunk by chunk
    parts: dict[str, Path] = {}
    db = None
    try:
        db = sqlite_utils.Database(tmp)
        _create_tables(db)
        written = _EntityWriter(db, text_encoder, vectors_tmp, batch_size)
        written.write_all(entities, progress)
        db.table("aliases").create_index(["norm"])
        db.table("entities").enable_fts(["name", "aliases_text", "description"],
                                        tokenize="unicode61 remove_diacritics 2")

        meta = {"schema_version": SCHEMA_VERSION, "n_entities": written.n_entities, "format": source_format,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build_id": uuid.uuid4().hex,
                "text_encoder": getattr(text_encoder, "name", None),
                "image_encoder": getattr(image_encoder, "name", None), "n_entity_images": 0}
        if build_command:
            meta["build_command"] = build_command
        dense_files = _dense_files(meta, written, text_encoder, image_encoder, image_index, progress)
        meta["dense_indexes"] = sorted(dense_files)
        meta["build_seconds"] = round(time.perf_counter() - started, 2)
        meta.update(extra_meta or {})
        if finish is not None:
            finish(db)
        db.table("meta").insert_all([{"key": k, "value": json.dumps(v)} for k, v in meta.items()])
        db.conn.commit()
        db.conn.execute("VACUUM")
        db.close()

        _write_dense_parts(out, dense_files, meta, build_command, written, vectors_tmp, parts)
        fsync_path(tmp)
        _publish_unit(out, tmp, parts)
    finally:  # on success only the lock file is left; on an error, nothing of this build
        if db is not None:
            db.close()
        for p in (tmp, vectors_tmp, *(Path(f"{tmp}{s}") for s in ("-wal", "-shm", "-journal")),
                  *parts.values()):
            p.unlink(missing_ok=True)
    return KnowledgeBase(out)


def check_kb_out(out: str | Path) -> Path:
    """The KB file a build will write: not a directory, in a folder that exists (created) and is writable
    (InputError otherwise). Call it before the work, so a bad --out fails now and not after the encoding."""
    from .cli_kit import check_output_file
    return check_output_file(out, what="the KB is one file: name it", example="kb.sqlite", error=KBError)


def _create_tables(db: sqlite_utils.Database) -> None:
    db.table("meta").create({"key": str, "value": str}, pk="key")
    entities = db.table("entities")
    entities.create({"idx": int, "id": str, "name": str, "description": str, "type": str, "aliases": str,
                     "aliases_text": str, "images": str}, pk="idx")
    entities.create_index(["id"], unique=True)
    db.table("aliases").create({"entity_idx": int, "norm": str, "kind": str})


class _EntityWriter:
    """A build's entities, streamed in chunks of BUILD_CHUNK: rows go to SQLite and text vectors to
    `vectors_tmp` as each chunk fills, so memory stays constant in the number of entities (only the
    entities that have an image are listed, for the image index)."""

    def __init__(self, db: sqlite_utils.Database, text_encoder, vectors_tmp: Path, batch_size: int):
        self.db, self.text_encoder, self.vectors_tmp, self.batch_size = db, text_encoder, vectors_tmp, batch_size
        self.n_entities = 0
        self.n_dim: int | None = None
        self.images: list[tuple[int, str]] = []
        self.chunk: list[tuple[int, Entity]] = []
        self.chunk_ids: set[str] = set()

    def write_all(self, entities: Iterable[Entity], progress: bool) -> None:
        from tqdm.auto import tqdm

        duplicate_error = getattr(entities, "duplicate_error", None)
        for entity in tqdm(entities, desc="reading entities", disable=not progress, unit=" ent"):
            self.add(entity, duplicate_error)
        self.flush()
        if not self.n_entities:
            raise KBError("no entities to build a knowledge base from: check the --source directory and --format")

    def add(self, entity: Entity, duplicate_error=None) -> None:
        """Queue `entity` (the first definition of an id wins: datasets repeat entities across files,
        unless the source gives a `duplicate_error` that refuses them and says where)."""
        if not entity.id or not str(entity.id).strip():
            raise KBError(f"an entity without an id (name {entity.name!r}): every KB entity needs an id")
        if entity.id in self.chunk_ids or self.db.conn.execute("SELECT 1 FROM entities WHERE id = ?",
                                                               (entity.id,)).fetchone():
            if duplicate_error is not None:  # a source that refuses duplicates (jsonl) says where
                raise duplicate_error(entity.id)
            return
        if not (entity.name or "").strip():
            raise KBError(f"entity {entity.id} has no name: every KB entity needs a name to be linked to")
        self.chunk.append((self.n_entities, entity))
        self.chunk_ids.add(entity.id)
        if entity.images:
            self.images.append((self.n_entities, entity.images[0]))
        self.n_entities += 1
        if len(self.chunk) >= BUILD_CHUNK:
            self.flush()

    def flush(self) -> None:
        chunk, conn = self.chunk, self.db.conn
        if not chunk:
            return
        conn.executemany("INSERT INTO entities (idx, id, name, description, type, aliases, aliases_text, "
                         "images) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [_entity_row(i, e) for i, e in chunk])
        conn.executemany("INSERT INTO aliases (entity_idx, norm, kind) VALUES (?, ?, ?)",
                         [row for i, e in chunk for row in _alias_rows(i, e)])
        if self.text_encoder is not None:
            vectors = np.ascontiguousarray(self.text_encoder.encode([entity_text(e) for _, e in chunk],
                                                                    batch_size=self.batch_size),
                                           dtype=np.float32)
            self.n_dim = int(vectors.shape[1])
            with open(self.vectors_tmp, "ab") as f:
                f.write(vectors.tobytes())
        chunk.clear()
        self.chunk_ids.clear()


def _dense_files(meta: dict, written: _EntityWriter, text_encoder, image_encoder,
                 image_index: tuple[DenseIndex, dict] | None,
                 progress: bool) -> dict[str, tuple[DenseIndex | None, dict]]:
    """{kind: (index, its metadata)} of the dense indexes this build publishes (the text index as None:
    it is written from the streamed vectors); records the entity images in `meta`."""
    dense_files: dict[str, tuple[DenseIndex | None, dict]] = {}
    if text_encoder is not None:
        dense_files["text"] = (None, {"encoder": text_encoder.name, "dim": written.n_dim})
    if image_encoder is not None and written.images:
        vectors, ids = _encode_entity_images(image_encoder, written.images, progress)
        if len(ids):
            meta["n_entity_images"] = len(ids)
            dense_files["image"] = (DenseIndex(vectors, ids, engine="numpy"), {"encoder": image_encoder.name,
                                                                               "dim": int(vectors.shape[1])})
    elif image_index is not None and len(image_index[0]):
        meta["n_entity_images"], meta["image_encoder"] = len(image_index[0]), image_index[1].get("encoder")
        dense_files["image"] = image_index
    return dense_files


def _write_dense_parts(out: Path, dense_files: dict[str, tuple[DenseIndex | None, dict]], meta: dict,
                       build_command: str | None, written: _EntityWriter, vectors_tmp: Path,
                       parts: dict[str, Path]) -> None:
    """Every side file under a new name too (listed in `parts` as it is started, for the clean-up),
    stamped with the KB's build id."""
    stamp = {"kb_build_id": meta["build_id"], "kb_created": meta["created"]}
    if build_command:
        stamp["kb_build_command"] = build_command
    for kind, (index, index_meta) in dense_files.items():
        parts[kind] = temp_path(sidecar(out, kind), "building")
        file_meta = {**{k: v for k, v in index_meta.items() if not k.startswith("kb_")}, **stamp}
        if index is None:  # the text vectors, streamed to vectors_tmp while reading
            assert written.n_dim is not None  # a text encoder and at least one entity (write_all checks)
            write_vectors_file(parts[kind], vectors_tmp, written.n_entities, written.n_dim, file_meta)
        else:
            index.write(parts[kind], file_meta)
        fsync_path(parts[kind])


def _entity_row(idx: int, entity: Entity) -> tuple:
    return (idx, entity.id, entity.name, entity.description or "", entity.type or "",
            json.dumps(entity.aliases, ensure_ascii=False), " ; ".join(entity.aliases), json.dumps(entity.images))


def _alias_rows(idx: int, entity: Entity) -> list[tuple]:
    name = normalize_name(entity.name)
    keys = {(name, "name")} | {(normalize_name(a), "alias") for a in entity.aliases if normalize_name(a) != name}
    return [(idx, key, kind) for key, kind in sorted(keys) if key]


def _publish_unit(out: Path, tmp: Path, parts: dict[str, Path]) -> None:
    """Rename the side files, then the KB, into place. Readers open the KB first and check every side
    file's build id against it, so each instant in between reads as the old unit (side files it does
    not list are ignored), the new unit, or a mismatch they refuse. A lock keeps two builds of the
    same KB from interleaving their renames."""
    import filelock

    with filelock.FileLock(out.with_name(f".{out.name}.lock")):
        for kind, part in parts.items():
            os.replace(part, sidecar(out, kind))
        fsync_path(out.parent)  # the side files are in place on disk before the KB that names them
        os.replace(tmp, out)
        fsync_path(out.parent)
        for kind in DENSE_KINDS:
            if kind not in parts:
                sidecar(out, kind).unlink(missing_ok=True)  # an earlier build's: the new KB already ignores it


def _remove_build_leftovers(out: Path) -> None:
    """Delete the temporary files that killed builds of `out` left (their process is gone); those of a
    build that is running now, in this process or another, are left alone."""
    names = [out.name] + [sidecar(out, kind).name for kind in DENSE_KINDS]
    remove_dead_temps(out.parent, names)
    for kind in DENSE_KINDS:  # what builds before build ids wrote (`kb.text.safetensors.part`), without a PID
        sidecar(out, kind).with_name(sidecar(out, kind).name + ".part").unlink(missing_ok=True)


def _encode_entity_images(image_encoder, images: list[tuple[int, str]], progress: bool):
    from tqdm.auto import tqdm

    from .imageio import load_image

    loaded, ids = [], []
    for idx, source in tqdm(images, desc="entity images", disable=not progress):
        try:
            loaded.append(load_image(source))
            ids.append(idx)
        except InputError:
            continue  # an unreadable entity image just leaves that entity text-only
    if not loaded:
        return np.zeros((0, image_encoder.dim), np.float32), np.zeros(0, np.int64)
    return image_encoder.encode(loaded), np.asarray(ids, np.int64)


def build_dataset_kb(format: str, source: str | Path, out: str | Path, *, preset=None, images: bool = True,
                     limit: int | None = None, batch_size: int = 128, progress: bool = True) -> KnowledgeBase:
    """The KB that goes with a dataset layout (what `python -m mel kb build` runs). `preset` None: no
    dense index (BM25 and exact only); `images`: also embed entity images when the layout has them."""
    import itertools

    from .datasets import read_kb_entities
    check_kb_out(out)  # before the encoders load
    # jsonl: duplicates are found in the database being written, not in a set of every id (constant memory)
    # (with --limit the reader checks, as islice hides its duplicate_error)
    entities = read_kb_entities(format, source,
                                **({"check_duplicates": False} if format == "jsonl" and not limit else {}))
    if limit:
        entities = itertools.islice(entities, limit)
    text_encoder = preset.backend("text_encoder") if preset is not None else None
    image_encoder = preset.backend("image_encoder") if (preset is not None and images) else None
    command = ["python -m mel kb build", "--format", shlex.quote(format), "--source", shlex.quote(str(source)),
               "--out", shlex.quote(str(out))]
    command += ["--no-dense"] if preset is None else ["--preset", shlex.quote(preset.name)]
    command += ["--no-images"] if preset is not None and not images else []
    command += ["--limit", str(limit)] if limit else []
    return build_kb(entities, out, text_encoder=text_encoder, image_encoder=image_encoder, source_format=format,
                    batch_size=batch_size, progress=progress, build_command=" ".join(command))


# -- link prior (issue #15): how often a dataset's TRAIN annotations link a mention string to an entity ----------
# Stored inside the KB file: `link_prior(norm, entity_idx, count)` and the provenance under the meta key
# `link_prior` (dataset, split, counts, date, command). Written in one transaction: a failed or interrupted
# build leaves the KB as it was, a rebuild replaces the table whole. A KB without it works as before.
LINK_PRIOR_TABLE = "link_prior"
LINK_PRIOR_META = "link_prior"


def link_prior_key(mention_text: str) -> str:
    """The mention string a link prior is keyed by: normalize_name (case, accents, punctuation)."""
    return normalize_name(mention_text)


def count_link_prior(examples, kb: "KnowledgeBase") -> tuple[dict[tuple[str, int], int], dict]:
    """{(normalised mention, KB idx): count} over `examples` (NIL golds and empty mentions skipped) and a
    report: how many were counted, and the golds not in the KB (counted, with examples, never dropped silently)."""
    from .types import NIL
    examples = list(examples)
    idx_of = kb.idxs_of(ex.gold_id for ex in examples if ex.gold_id != NIL)
    pairs: dict[tuple[str, int], int] = {}
    missing: dict[str, int] = {}
    n_nil = n_empty = 0
    for ex in examples:
        key = link_prior_key(ex.mention.text)
        if ex.gold_id == NIL:
            n_nil += 1
        elif not key:
            n_empty += 1
        elif ex.gold_id not in idx_of:
            missing[ex.gold_id] = missing.get(ex.gold_id, 0) + 1
        else:
            pairs[(key, idx_of[ex.gold_id])] = pairs.get((key, idx_of[ex.gold_id]), 0) + 1
    report = {"n_mentions": len(examples), "n_records": len({str(ex.sample_id).split("#")[0] for ex in examples}),
              "n_counted": sum(pairs.values()), "n_nil": n_nil, "n_empty_mention": n_empty,
              "n_not_in_kb": sum(missing.values()), "ids_not_in_kb": len(missing),
              "examples_not_in_kb": sorted(missing)[:10], "n_pairs": len(pairs),
              "n_entities": len({idx for _, idx in pairs}), "n_mention_strings": len({k for k, _ in pairs})}
    return pairs, report


def write_link_prior(kb_path: str | Path, pairs: dict[tuple[str, int], int], provenance: dict) -> dict:
    """Replace the KB's link prior by `pairs` ({(key, idx): count}) and `provenance`, in ONE transaction
    (an exception or a killed process leaves the previous table, or none, untouched). Returns the provenance."""
    path = Path(kb_path)
    kb = KnowledgeBase(path)  # refuses what is not a KB of this schema
    bad = [(k, i, c) for (k, i), c in pairs.items() if not 0 <= int(i) < kb.size or int(c) < 1 or not k]
    if bad:
        raise InputError(f"{len(bad)} link-prior rows name no entity of {path.name} or have no count, e.g. {bad[:3]}")
    provenance = {**provenance, "table": LINK_PRIOR_TABLE, "kb_build_id": kb.build_id,
                  "created": provenance.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _check_kb_writable(path)
    conn = sqlite3.connect(str(path), timeout=LOCK_WAIT_S, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(f"DROP TABLE IF EXISTS {LINK_PRIOR_TABLE}")
            conn.execute(f"CREATE TABLE {LINK_PRIOR_TABLE} (norm TEXT NOT NULL, entity_idx INTEGER NOT NULL, "
                         f"count INTEGER NOT NULL, PRIMARY KEY (norm, entity_idx))")
            conn.executemany(f"INSERT INTO {LINK_PRIOR_TABLE} VALUES (?, ?, ?)",
                             sorted((k, int(i), int(c)) for (k, i), c in pairs.items()))
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                         (LINK_PRIOR_META, json.dumps(provenance)))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc):
            _check_kb_writable(path)  # permissions changed since the check above
        raise KBError(f"cannot write the link prior into {path} ({exc}); is another process writing it?") from exc
    finally:
        conn.close()
    return provenance


def _check_kb_writable(path: Path) -> None:
    """A KBError that says so when this user cannot write the KB file, or its folder (SQLite writes its
    journal beside the file), instead of SQLite's "attempt to write a readonly database"."""
    for what, target in (("the file", path), (f"its folder {path.parent}", path.parent)):
        if not os.access(target, os.W_OK):
            raise KBError(f"cannot write into the KB {path}: {what} is read-only for this user (permissions); "
                          f"make it writable (chmod u+w {shlex.quote(str(target))}), or copy the KB into a writable "
                          f"folder and pass the copy")


def build_link_prior(kb_path: str | Path, format: str, data: str | Path, split: str = "train", *,
                     command: str = "") -> dict:
    """Count the link prior of `format`/`data`/`split` (every mention, unlocated ones by their string; RichpediaMEL's
    train excludes the dev the reader carves) and store it in the KB. Only a TRAIN split is accepted: a prior
    counted on dev would hand the linker the dev answers."""
    from .datasets import available_splits, load_dataset
    from .paths import display_path
    if split != "train":
        raise InputError(f"the link prior is counted on the train split only (got {split!r}): counting the split "
                         f"you evaluate on gives the linker its answers")
    if split not in available_splits(format, data):
        raise InputError(f"{data} has no {split!r} split for format {format!r} (it has {available_splits(format, data)})")
    kb = KnowledgeBase(kb_path)
    _check_kb_writable(kb.path)  # before the dataset is read and counted
    examples = load_dataset(format, data, split, unlocated="context").examples
    pairs, report = count_link_prior(examples, kb)
    if not pairs:
        raise InputError(f"none of the {len(examples)} {format}/{split} mentions links to an entity of "
                         f"{Path(kb_path).name} ({report['n_not_in_kb']} golds are not in it): is it this dataset's KB?")
    provenance = {"dataset": format, "data": display_path(Path(data)), "split": split, **report, "command": command}
    return write_link_prior(kb_path, pairs, provenance)
