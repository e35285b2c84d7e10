"""Dense nearest-neighbour search over L2-normalised embeddings (inner product = cosine).

`DenseIndex` has one interface and two engines:
  numpy  exact search (matrix product + argpartition); the default, fine up to ~200k rows.
  faiss  `faiss-cpu`: exact `IndexFlatIP` (faiss-flat), or approximate IVF (faiss-ivf) / HNSW
         (faiss-hnsw) for 1M-row KBs, where exact search is bound by memory bandwidth.
`auto` picks numpy below `FAISS_AUTO_ROWS` rows, else IVF (builds in seconds, unlike HNSW).
Embeddings are saved with safetensors, never pickled.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import KBError, ModelUnavailableError

FAISS_AUTO_ROWS = 200_000
ENGINES = ("auto", "numpy", "faiss-flat", "faiss-ivf", "faiss-hnsw")


def _import_faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ModelUnavailableError("faiss is not installed: `pip install faiss-cpu`, or use engine='numpy'") from exc
    return faiss


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class DenseIndex:
    def __init__(self, vectors: np.ndarray, ids: np.ndarray | None = None, engine: str = "auto",
                 hnsw_m: int = 32, ef_search: int = 128, nprobe: int = 32):
        """`vectors` (n, d) float32, normalised. `ids` maps rows to KB row numbers (default: 0..n-1)."""
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
        self._vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self._vectors.ndim != 2:
            raise ValueError(f"vectors must be 2-D, got shape {self._vectors.shape}")
        self._n, self._dim = self._vectors.shape
        self.ids = np.arange(self._n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        if engine == "auto":
            engine = "faiss-ivf" if self._n >= FAISS_AUTO_ROWS else "numpy"
        self.engine = engine
        self._faiss_index = None
        if engine.startswith("faiss") and self._n:
            faiss = _import_faiss()
            d = self._dim
            if engine == "faiss-flat":
                index = faiss.IndexFlatIP(d)
            elif engine == "faiss-ivf":
                # ~sqrt(n) lists, k-means on 40 points per list: the build stays at seconds for 1M rows
                n_lists = max(1, min(int(np.sqrt(self._n)), self._n // 40))
                index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, n_lists, faiss.METRIC_INNER_PRODUCT)
                rng = np.random.default_rng(0)
                sample = self._vectors[rng.choice(self._n, min(self._n, 40 * n_lists), replace=False)]
                index.train(sample)
                index.nprobe = min(nprobe, n_lists)
                index.make_direct_map()  # so that `vectors` can be reconstructed
            else:
                index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efSearch = ef_search
            index.add(self._vectors)
            self._faiss_index = index
            self._vectors = None  # every FAISS engine here stores the vectors itself: keep one copy

    def __len__(self) -> int:
        return self._n

    @property
    def vectors(self) -> np.ndarray:
        """All vectors (n, d), row order of `ids`; with a FAISS engine, reconstructed from it (a copy)."""
        if self._vectors is not None:
            return self._vectors
        return self._faiss_index.reconstruct_n(0, self._n)

    def memory_bytes(self) -> int:
        """Bytes this index holds: ids plus either the vectors (numpy) or the FAISS structure (its
        serialised size, which holds the vectors once, and for HNSW also the graph)."""
        size = self.ids.nbytes
        if self._faiss_index is not None:
            size += int(_import_faiss().serialize_index(self._faiss_index).nbytes)
        else:
            size += self._vectors.nbytes
        return size

    @property
    def dim(self) -> int:
        return self._dim

    def search(self, queries: np.ndarray, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n_queries, k'), best first; k' = min(k, len(index)). An approximate
        engine that finds fewer than k' rows for a query pads its row with id -1 and score -inf."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise KBError(f"query embeddings have {queries.shape[1]} dimensions but the index has {self.dim}: "
                          f"the KB was embedded with another encoder; rebuild it or use the same preset")
        k = min(k, len(self))
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if self._faiss_index is not None:
            scores, rows = self._faiss_index.search(np.ascontiguousarray(queries), k)
            missing = rows < 0  # HNSW / IVF pad with -1 when they find fewer than k
            ids = np.where(missing, -1, self.ids[np.where(missing, 0, rows)])
            return np.where(missing, -np.inf, scores).astype(np.float32), ids
        sims = queries @ self._vectors.T
        if k < sims.shape[1]:
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        else:
            top = np.tile(np.arange(sims.shape[1]), (len(queries), 1))
        top_scores = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        return np.take_along_axis(top_scores, order, axis=1), self.ids[top]

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        """Write the index to `path` (safetensors), atomically: `path` is the old file or the new one, whole."""
        from .paths import atomic_write
        with atomic_write(path) as tmp:
            self.write(tmp, metadata)

    def write(self, path: str | Path, metadata: dict | None = None) -> None:
        """Write the index to `path` as it is (no temporary name; `save` publishes atomically)."""
        from safetensors.numpy import save_file
        meta = {"mel_dense_index": json.dumps(metadata or {})}
        save_file({"vectors": self.vectors, "ids": self.ids}, str(path), metadata=meta)

    @staticmethod
    def read_metadata(path: str | Path) -> dict:
        """The metadata saved with an index (encoder, dim, the KB build it belongs to), read from the
        file's header only."""
        from safetensors import SafetensorError, safe_open
        path = Path(path)
        try:
            with safe_open(str(path), framework="numpy") as f:
                return json.loads((f.metadata() or {}).get("mel_dense_index", "{}"))
        except FileNotFoundError:
            raise
        except (SafetensorError, OSError, ValueError) as exc:  # a truncated or foreign file
            raise KBError(f"dense index {path} cannot be read ({exc}); rebuild the KB with "
                          f"`python -m mel kb build`") from exc

    @classmethod
    def load(cls, path: str | Path, engine: str = "auto") -> tuple["DenseIndex", dict]:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        path = Path(path)
        if not path.exists():
            raise KBError(f"dense index {path} is missing: rebuild the KB with `python -m mel kb build`")
        meta = cls.read_metadata(path)
        try:
            tensors = load_file(str(path))
            vectors, ids = tensors["vectors"], tensors["ids"]
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            raise KBError(f"dense index {path} cannot be read ({exc}); rebuild the KB with "
                          f"`python -m mel kb build`") from exc
        return cls(vectors, ids, engine=engine), meta
