"""In-context demonstrations: the labelled mentions most similar to the query.

As in the paper, the key is a sentence embedding of the MENTION string (SimCSE in the paper;
the preset's `mention_encoder` here), cosine similarity, k nearest, ordered by ascending
similarity so that the most similar demonstration sits right before the query. While training,
the query itself is excluded (by `sample_id`).

`key="multimodal"` (beyond the paper) embeds "mention. caption" with the text encoder and, when
an image encoder is given, appends the image embedding: the vector is
`[sqrt(1-w) * text, sqrt(w) * image]`, so the cosine of two examples that both have images is
`(1-w) * text_cos + w * image_cos`, and an example without an image only matches on text.

The pool is any list of Examples: a dataset's train split, or annotators' corrections. Live
changes go through `add(examples)` (retrievable at once) and `remove(sample_id)`; an example is
known by its `Example.sample_id` (`keys()`). Both are safe while other threads retrieve: a
retrieval sees the pool as it was before or after a change, never half of one. Examples whose
gold is NIL are left out (they have no entity name to demonstrate).

Retrieval can be limited to some of the pool (`allowed`: a set of sample_ids or a predicate on
one), per call or, for code that calls retrieve for you (the linker), for a block:
`with pool.only(allowed): linker.link(m)`. The app uses it to give each annotator a view of the
shared pool: the dataset's examples, their own decisions and reviewed ones, never another
annotator's unreviewed decisions. Embeddings of a pool are cached on disk (safetensors) under a
checksum of the encoder and the key texts, so a pool is embedded once per machine.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Union

import numpy as np

from ..errors import InputError
from ..paths import cache_dir
from ..types import NIL, Example, Mention

KEYS = ("mention", "multimodal")
SEARCH_CHUNK = 2048  # query rows per matrix product in batch retrieval

Allowed = Union[Collection[str], Callable[[str], bool], None]  # sample_ids retrieval may return
# (pool id, allowed) set by DemonstrationPool.only() for the current thread / context
_ONLY: contextvars.ContextVar[tuple[int, Allowed] | None] = contextvars.ContextVar("mel_pool_only", default=None)


@dataclass
class Demonstration:
    example: Example
    similarity: float


def _key_text(mention: Mention, key: str) -> str:
    return mention.text if key == "mention" else f"{mention.text}. {mention.caption}"


class DemonstrationPool:
    def __init__(self, examples: list[Example], encoder, *, key: str = "mention", image_encoder=None,
                 image_weight: float = 0.5, use_cache: bool = True, progress: bool = False):
        if key not in KEYS:
            raise InputError(f"unknown demonstration key {key!r}; choose one of {KEYS}")
        if not 0.0 <= image_weight < 1.0:
            raise InputError(f"image_weight must be in [0, 1), got {image_weight}")
        self.encoder = encoder
        self.key = key
        self.image_encoder = image_encoder if key == "multimodal" else None
        self.image_weight = image_weight
        self.use_cache = use_cache
        self.progress = progress
        # replaced together under the lock, never changed in place: a reader's snapshot stays whole
        self._lock = threading.Lock()
        self._examples: tuple[Example, ...] = ()
        self._vectors = np.zeros((0, self.dim), np.float32)
        self._image_vectors: dict[str, np.ndarray | None] = {}
        self.n_skipped_nil = 0
        self.add(examples, cache=use_cache)

    @property
    def dim(self) -> int:
        return self.encoder.dim + (self.image_encoder.dim if self.image_encoder is not None else 0)

    def __len__(self) -> int:
        return len(self._examples)

    def __contains__(self, sample_id: str) -> bool:
        return any(ex.sample_id == sample_id for ex in self._examples)

    @property
    def examples(self) -> tuple[Example, ...]:
        return self._examples

    @property
    def vectors(self) -> np.ndarray:
        """(len(self), dim) retrieval keys, one row per example (read-only: change the pool with add/remove)."""
        return self._vectors

    def keys(self) -> list[str]:
        """The sample_id of every demonstration, in pool order."""
        return [ex.sample_id for ex in self._examples]

    def _snapshot(self, allowed: Allowed = None) -> tuple[tuple[Example, ...], np.ndarray]:
        """The examples and their vectors, limited to `allowed` (else to what only() set, if anything)."""
        with self._lock:
            examples, vectors = self._examples, self._vectors
        if allowed is None:
            scoped = _ONLY.get()
            allowed = scoped[1] if scoped is not None and scoped[0] == id(self) else None
        if allowed is None:
            return examples, vectors
        ok = allowed if callable(allowed) else allowed.__contains__
        keep = [i for i, ex in enumerate(examples) if ok(ex.sample_id)]
        if len(keep) == len(examples):
            return examples, vectors
        return tuple(examples[i] for i in keep), vectors[keep]

    @contextlib.contextmanager
    def only(self, allowed: Allowed):
        """Within the block (this thread or context only), retrieve/retrieve_many return only
        examples whose sample_id is `allowed` (a collection, or a predicate); None: all of them."""
        mark = _ONLY.set((id(self), allowed) if allowed is not None else None)
        try:
            yield self
        finally:
            _ONLY.reset(mark)

    def describe(self) -> dict:
        return {"size": len(self), "key": self.key, "encoder": getattr(self.encoder, "name", "?"),
                "image_encoder": getattr(self.image_encoder, "name", None), "n_skipped_nil": self.n_skipped_nil}

    # -- embedding ---------------------------------------------------------------------------
    def _image_vector(self, path: str | None) -> np.ndarray | None:
        if path is None or self.image_encoder is None:
            return None
        if path not in self._image_vectors:
            from ..imageio import load_image
            try:
                self._image_vectors[path] = self.image_encoder.encode([load_image(path)])[0]
            except InputError:
                self._image_vectors[path] = None  # an unreadable image leaves the example text-only
        return self._image_vectors[path]

    def embed(self, mentions: list[Mention]) -> np.ndarray:
        """Retrieval keys (n, dim), L2-normalised."""
        texts = [_key_text(m, self.key) for m in mentions]
        from ..backends.text import as_text_encoder
        encoder = as_text_encoder(self.encoder)  # the library's TextEncoder, or any object with encode(texts)
        text = np.asarray(encoder.encode(texts, batch_size=128, show_progress=self.progress and len(texts) > 512),
                          dtype=np.float32)
        if self.image_encoder is None:
            return text
        image = np.zeros((len(mentions), self.image_encoder.dim), np.float32)
        for row, m in enumerate(mentions):
            vec = self._image_vector(m.image)
            if vec is not None:
                image[row] = vec
        out = np.concatenate([math.sqrt(1 - self.image_weight) * text, math.sqrt(self.image_weight) * image], axis=1)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def _checksum(self, examples: list[Example]) -> str:
        h = hashlib.sha256(f"{getattr(self.encoder, 'name', '?')}|{self.key}|{self.image_weight}|"
                           f"{getattr(self.image_encoder, 'name', None)}".encode())
        for ex in examples:
            h.update(f"{_key_text(ex.mention, self.key)}\x1f{ex.mention.image if self.image_encoder else ''}\x1e"
                     .encode("utf-8"))
        return h.hexdigest()[:24]

    def add(self, examples: list[Example], cache: bool = False) -> int:
        """Append examples (e.g. fresh corrections); they are retrievable immediately. Returns how many."""
        kept = [ex for ex in examples if ex.gold_id != NIL]
        with self._lock:
            self.n_skipped_nil += len(examples) - len(kept)
        if not kept:
            return 0
        vectors = None
        path = None
        if cache:
            path = cache_dir("gemel", "demos") / f"pool-{self._checksum(kept)}.safetensors"
            if path.exists():
                from safetensors.numpy import load_file
                try:
                    loaded = load_file(str(path))["vectors"]
                    if loaded.shape == (len(kept), self.dim):
                        vectors = loaded
                except Exception:  # a damaged cache is recomputed
                    vectors = None
        if vectors is None:
            vectors = self.embed([ex.mention for ex in kept])
            if path is not None:
                from safetensors.numpy import save_file
                tmp = path.with_name(f".{path.name}.{os.getpid()}")
                save_file({"vectors": np.ascontiguousarray(vectors)}, str(tmp))
                os.replace(tmp, path)
        with self._lock:
            self._examples = self._examples + tuple(kept)
            self._vectors = np.concatenate([self._vectors, vectors.astype(np.float32)], axis=0)
        return len(kept)

    def remove(self, sample_id: str) -> int:
        """Take out every example with this `sample_id` (e.g. an undone correction); returns how many."""
        if not isinstance(sample_id, str) or not sample_id:
            raise InputError(f"a demonstration is removed by its sample_id (non-empty text), got {sample_id!r}")
        with self._lock:
            keep = [i for i, ex in enumerate(self._examples) if ex.sample_id != sample_id]
            removed = len(self._examples) - len(keep)
            if removed:
                self._examples = tuple(self._examples[i] for i in keep)
                self._vectors = self._vectors[keep]
        return removed

    # -- retrieval ---------------------------------------------------------------------------
    def retrieve(self, mention: Mention, k: int, exclude_id: str | None = None,
                 query_vector: np.ndarray | None = None, allowed: Allowed = None) -> list[Demonstration]:
        """The k most similar examples, ordered LEAST similar first (the most similar comes last,
        next to the query). `exclude_id`: a sample_id never returned (the query itself in training);
        `allowed`: only these sample_ids (a collection or a predicate; default: what only() set)."""
        examples, vectors = self._snapshot(allowed)
        if k <= 0 or not examples:
            return []
        q = self.embed([mention])[0] if query_vector is None else query_vector
        return _top(examples, vectors @ q, k, {exclude_id} if exclude_id else set())

    def retrieve_many(self, mentions: list[Mention], k: int, exclude_ids: list[str | None] | None = None,
                      allowed: Allowed = None) -> list[list[Demonstration]]:
        """`retrieve` for many queries at once (training): one embedding pass, chunked matrix products."""
        examples, vectors = self._snapshot(allowed)
        if k <= 0 or not examples:
            return [[] for _ in mentions]
        queries = self.embed(mentions)
        exclude_ids = exclude_ids or [None] * len(mentions)
        out = []
        for start in range(0, len(mentions), SEARCH_CHUNK):
            sims = queries[start:start + SEARCH_CHUNK] @ vectors.T
            for row, ex_id in zip(sims, exclude_ids[start:start + SEARCH_CHUNK], strict=True):
                out.append(_top(examples, row, k, {ex_id} if ex_id else set()))
        return out


def _top(examples: tuple[Example, ...], sims: np.ndarray, k: int, exclude: set[str]) -> list[Demonstration]:
    """The k examples with the highest `sims` (one per example) not in `exclude`, least similar first."""
    take = min(len(sims), k + len(exclude))
    top = np.argpartition(-sims, take - 1)[:take] if take < len(sims) else np.arange(len(sims))
    top = top[np.argsort(-sims[top], kind="stable")]
    chosen = [int(i) for i in top if examples[int(i)].sample_id not in exclude][:k]
    # ascending similarity: the most similar demonstration ends up next to the query
    return [Demonstration(examples[i], float(sims[i])) for i in reversed(chosen)]


def load_pool_examples(*, pool: str | Path | None = None, pool_format: str | None = None,
                       pool_data: str | Path | None = None, pool_split: str = "train") -> tuple[list[Example], str]:
    """Examples for a pool from a JSONL file of Examples or a dataset split; (examples, description)."""
    if pool is not None:
        path = Path(pool)
        if not path.exists():
            raise InputError(f"demonstration pool {path} does not exist; give a JSONL file of Examples "
                             f"(`mel.datasets.write_jsonl_examples`), or pool_data=DIR with pool_format=FORMAT")
        from ..datasets import load_dataset
        split = load_dataset("jsonl", path, pool_split)  # a single .jsonl file is read whatever the split
        return split.examples, f"{path.name} ({len(split.examples)} examples)"
    if pool_data is not None:
        if not pool_format:
            raise InputError("pool_data needs pool_format (wikimel, richpedia, wikidiverse, ...), or a KB whose "
                             "build recorded its format")
        from ..datasets import load_dataset
        split = load_dataset(pool_format, pool_data, pool_split)
        return split.examples, f"{pool_format} {pool_split} split ({len(split.examples)} examples)"
    return [], "none (zero-shot)"
