"""The knowledge base: one SQLite file (sqlite-utils) plus dense indexes stored beside it.

    KB.sqlite                entities, aliases, meta, and an FTS5 index (BM25) over
                             names, aliases and descriptions
    KB.text.safetensors      text embeddings of every entity ("name. description")
    KB.image.safetensors     image embeddings of the entities that have an image (optional)

Entities are addressed by `idx`, their row number, which is also the row in the dense indexes.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import sqlite3
import threading
import time
import unicodedata
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sqlite_utils

from .errors import InputError, KBError
from .index import DenseIndex
from .types import Entity

SCHEMA_VERSION = 1
BM25_WEIGHTS = (10.0, 5.0, 1.0)  # name, aliases, description: a name hit matters most
ENTITY_TEXT_MAX_CHARS = 400      # keeps embedding fast; names and the first facts carry the signal
LOCK_WAIT_S = 5.0                # how long a read waits for another process's write lock before KBError


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
    """An FTS5 MATCH expression that ORs the words of `text`; safe for any user input."""
    words = re.findall(r"\w+", text)
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)


def sidecar(path: Path, kind: str) -> Path:
    return path.with_name(f"{path.stem}.{kind}.safetensors")


class KnowledgeBase:
    """Read access to a built KB. Thread-safe: one SQLite connection per thread."""

    def __init__(self, path: str | Path, engine: str = "auto"):
        self.path = Path(path)
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

    # -- connection and metadata -------------------------------------------------------------
    @property
    def db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            uri = f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=LOCK_WAIT_S, check_same_thread=False)
            db = self._local.db = sqlite_utils.Database(conn)
        return db

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
        meta = {k: json.loads(v) for k, v in self._query("SELECT key, value FROM meta")}
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise KBError(f"{self.path} has KB schema version {version}, this library reads version "
                          f"{SCHEMA_VERSION}; rebuild it with `python -m mel kb build`")
        return meta

    def info(self) -> dict:
        info = {"path": str(self.path), "n_entities": self.size, **{k: v for k, v in self.meta.items() if k != "n_entities"}}
        info["n_aliases"] = self._query("SELECT count(*) FROM aliases")[0][0]
        info["n_with_description"] = self._query("SELECT count(*) FROM entities WHERE description != ''")[0][0]
        info["dense_indexes"] = {kind: sidecar(self.path, kind).exists() for kind in ("text", "image")}
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
        for start in range(0, len(idxs), 500):  # SQLite caps the number of bound parameters
            chunk = idxs[start:start + 500]
            sql = f"SELECT {self._COLUMNS} FROM entities WHERE idx IN ({','.join('?' * len(chunk))})"
            rows.update({r[0]: r for r in self._query(sql, chunk)})
        return [self._row_to_entity(rows[i]) for i in idxs]

    def entity_at(self, idx: int) -> Entity:
        return self.entities_at([idx])[0]

    def idx_of(self, entity_id: str) -> int | None:
        rows = self._query("SELECT idx FROM entities WHERE id = ?", (entity_id,))
        return rows[0][0] if rows else None

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
        from .linkers.base import check_k
        check_k(k)  # SQLite reads LIMIT -1 as "no limit"
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
                if not path.exists():
                    raise KBError(f"{self.path.name} has no {kind} embeddings ({path.name} is missing); rebuild it "
                                  f"with `python -m mel kb build ... --preset <preset>`")
                self._dense[kind] = DenseIndex.load(path, engine=self.engine)
            return self._dense[kind]

    def has_dense(self, kind: str = "text") -> bool:
        return sidecar(self.path, kind).exists()

    def search_dense(self, query_vectors: np.ndarray, k: int = 20, kind: str = "text"):
        index, _ = self.dense(kind)
        return index.search(query_vectors, k)


# -- building ----------------------------------------------------------------------------------
def build_kb(entities: Iterable[Entity], out: str | Path, *, text_encoder=None, image_encoder=None,
             source_format: str = "", batch_size: int = 128, progress: bool = True,
             overwrite: bool = True) -> KnowledgeBase:
    """Write a KB to `out` (atomically: a half-built KB never replaces a good one).

    `text_encoder` / `image_encoder` are backends with `.encode()`, `.name` and `.dim`; None skips
    that dense index (BM25 and exact matching still work).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    if out.is_dir():
        raise KBError(f"{out} is a directory; the KB is one file: name it, e.g. {out / 'kb.sqlite'}")
    if out.exists() and not overwrite:
        raise KBError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}")
    for p in (tmp, Path(str(tmp) + "-wal"), Path(str(tmp) + "-shm")):
        p.unlink(missing_ok=True)
    started = time.perf_counter()

    seen: set[str] = set()
    entity_rows, alias_rows, texts, images = [], [], [], []
    for entity in tqdm(entities, desc="reading entities", disable=not progress, unit=" ent"):
        if not entity.id or not str(entity.id).strip():
            raise KBError(f"an entity without an id (name {entity.name!r}): every KB entity needs an id")
        if entity.id in seen:
            continue  # the first definition wins; datasets repeat entities across files
        if not (entity.name or "").strip():
            raise KBError(f"entity {entity.id} has no name: every KB entity needs a name to be linked to")
        seen.add(entity.id)
        idx = len(entity_rows)
        entity_rows.append({"idx": idx, "id": entity.id, "name": entity.name, "description": entity.description or "",
                            "type": entity.type or "", "aliases": json.dumps(entity.aliases, ensure_ascii=False),
                            "aliases_text": " ; ".join(entity.aliases), "images": json.dumps(entity.images)})
        keys = {(normalize_name(entity.name), "name")}
        keys |= {(normalize_name(a), "alias") for a in entity.aliases if normalize_name(a) != normalize_name(entity.name)}
        alias_rows += [{"entity_idx": idx, "norm": key, "kind": kind} for key, kind in keys if key]
        texts.append(entity_text(entity))
        if entity.images:
            images.append((idx, entity.images[0]))
    if not entity_rows:
        raise KBError("no entities to build a knowledge base from: check the --source directory and --format")

    db = sqlite_utils.Database(tmp)
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["entities"].insert_all(entity_rows, pk="idx", batch_size=2000,
                              columns={"idx": int, "id": str, "name": str, "description": str, "type": str,
                                       "aliases": str, "aliases_text": str, "images": str})
    db["entities"].create_index(["id"], unique=True)
    db["aliases"].insert_all(alias_rows, batch_size=5000, columns={"entity_idx": int, "norm": str, "kind": str})
    db["aliases"].create_index(["norm"])
    db["entities"].enable_fts(["name", "aliases_text", "description"], tokenize="unicode61 remove_diacritics 2")

    meta = {"schema_version": SCHEMA_VERSION, "n_entities": len(entity_rows), "format": source_format,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "text_encoder": getattr(text_encoder, "name", None), "image_encoder": getattr(image_encoder, "name", None),
            "n_entity_images": 0}

    dense_files = {}
    if text_encoder is not None:
        kwargs = {"show_progress": progress} if "show_progress" in inspect.signature(text_encoder.encode).parameters else {}
        vectors = text_encoder.encode(texts, batch_size=batch_size, **kwargs)
        dense_files["text"] = (DenseIndex(vectors, engine="numpy"), {"encoder": text_encoder.name, "dim": int(vectors.shape[1])})
    if image_encoder is not None and images:
        vectors, ids = _encode_entity_images(image_encoder, images, progress)
        if len(ids):
            meta["n_entity_images"] = len(ids)
            dense_files["image"] = (DenseIndex(vectors, ids, engine="numpy"), {"encoder": image_encoder.name,
                                                                               "dim": int(vectors.shape[1])})
    meta["build_seconds"] = round(time.perf_counter() - started, 2)
    db["meta"].insert_all([{"key": k, "value": json.dumps(v)} for k, v in meta.items()])
    db.conn.commit()
    db.conn.execute("VACUUM")
    db.close()

    for kind in ("text", "image"):
        target = sidecar(out, kind)
        if kind in dense_files:
            index, index_meta = dense_files[kind]
            part = target.with_name(target.name + ".part")
            index.save(part, index_meta)
            os.replace(part, target)
        else:
            target.unlink(missing_ok=True)  # never leave a stale index from an earlier build
    os.replace(tmp, out)
    return KnowledgeBase(out)


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
    entities = read_kb_entities(format, source)
    if limit:
        entities = itertools.islice(entities, limit)
    text_encoder = preset.backend("text_encoder") if preset is not None else None
    image_encoder = preset.backend("image_encoder") if (preset is not None and images) else None
    return build_kb(entities, out, text_encoder=text_encoder, image_encoder=image_encoder, source_format=format,
                    batch_size=batch_size, progress=progress)
