"""Synthetic data for the scale run: clustered unit vectors, queries near them, made-up entities,
and an encoder stand-in with no model cost."""
from __future__ import annotations

import random

import numpy as np

from ..index import normalize


def synthetic_vectors(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """Clustered unit vectors: real embeddings are clustered; uniform noise is the worst case for IVF."""
    rng = np.random.default_rng(seed)
    centers = normalize(rng.normal(size=(2000, dim)))
    vectors = np.empty((rows, dim), np.float32)
    for start in range(0, rows, 100_000):
        stop = min(rows, start + 100_000)
        assign = rng.integers(0, len(centers), stop - start)
        vectors[start:stop] = normalize(centers[assign] + 0.6 * rng.normal(size=(stop - start, dim)) / np.sqrt(dim))
    return vectors


def synthetic_queries(vectors: np.ndarray, n: int, seed: int = 1, noise: float = 0.05) -> np.ndarray:
    """Queries near random rows: row + Gaussian noise (`noise` per dimension; 0.05 over 384 dims gives a
    cosine of about 0.7 to the row, like a mention embedding to its entity's)."""
    rng = np.random.default_rng(seed)
    return normalize(vectors[rng.integers(0, len(vectors), n)]
                     + noise * rng.standard_normal((n, vectors.shape[1]), dtype=np.float32))



class RandomEncoder:
    """A text encoder stand-in with no model cost (synthetic KBs measure SQLite/FTS5/index cost)."""
    name = "synthetic-random"

    def __init__(self, dim: int):
        self.dim = dim
        self._rng = np.random.default_rng(0)

    def encode(self, texts, batch_size: int = 128, **_):
            return normalize(self._rng.standard_normal((len(texts), self.dim), dtype=np.float32))


WORDS = ("river north king star stone city black red house field john maria lake union royal club saint new "
         "grand valley park west museum film band party national football university church bridge island").split()


def synthetic_entities(n: int, seed: int = 0):
    from ..types import Entity
    rng = random.Random(seed)
    for i in range(n):
        name = " ".join(rng.choice(WORDS).title() for _ in range(rng.randint(1, 3))) + f" {i}"
        desc = " ".join(rng.choice(WORDS) for _ in range(12))
        yield Entity(id=f"S{i}", name=name, description=desc)

