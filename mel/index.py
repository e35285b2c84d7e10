"""Dense nearest-neighbour search over L2-normalised embeddings (inner product = cosine).

`DenseIndex` has one interface and two engines:
  numpy  exact search (matrix product + argpartition); the default, fine up to ~200k rows.
  faiss  `faiss-cpu`: exact `IndexFlatIP` (faiss-flat), or approximate IVF (faiss-ivf) / HNSW
         (faiss-hnsw) for 1M-row KBs, where exact search is bound by memory bandwidth.
  faiss-ivfpq  for 10M-row KBs: IVF lists of product-quantised codes (d/8 bytes a vector, ~60 B a
         row in all at d=384) hold the index in memory; the shortlist it returns (`rerank` rows
         a query) is re-ranked exactly against the float vectors, read from the index file through
         a memory map rather than loaded. `DenseIndex.load(path, engine="faiss-ivfpq")` trains and
         fills it from the file in chunks, so the float vectors are never all in memory.
`auto` picks numpy below `FAISS_AUTO_ROWS` rows, else IVF (builds in seconds, unlike HNSW).
Embeddings are saved with safetensors, never pickled.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import InputError, KBError, ModelUnavailableError

FAISS_AUTO_ROWS = 200_000
ENGINES = ("auto", "numpy", "faiss-flat", "faiss-ivf", "faiss-hnsw", "faiss-ivfpq")
IVFPQ_CHUNK_ROWS = 100_000  # rows added to an IVF-PQ index at a time
IVFPQ_MIN_ROWS = 10_000     # smaller faiss-ivfpq indexes search exactly (PQ training needs 256 points a codebook)


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
                 hnsw_m: int = 32, ef_search: int = 128, nprobe: int = 32, rerank: int = 200):
        """`vectors` (n, d) float32, normalised. `ids` maps rows to KB row numbers (default: 0..n-1).
        faiss-ivfpq: `rerank` shortlist rows a query re-ranked exactly; `vectors` may be a read-only
        memory map (what `load` passes), which the index keeps instead of a copy."""
        if engine not in ENGINES:
            raise InputError(f"unknown dense search engine {engine!r}; choose one of {', '.join(ENGINES)}")
        if engine == "faiss-ivfpq" and isinstance(vectors, np.memmap):
            self._vectors = vectors
        else:
            self._vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self._vectors.ndim != 2:
            raise ValueError(f"vectors must be 2-D, got shape {self._vectors.shape}")
        self._n, self._dim = self._vectors.shape
        self.ids = np.arange(self._n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        if engine == "auto":
            engine = "faiss-ivf" if self._n >= FAISS_AUTO_ROWS else "numpy"
        self.engine = engine
        self._faiss_index = None
        self.rerank = rerank
        if engine == "faiss-ivfpq":
            if self._n >= IVFPQ_MIN_ROWS:  # below, the codebooks cannot be trained: exact search, same results
                self._faiss_index = _build_ivfpq(self._vectors, nprobe=max(nprobe, 64))
            return  # keeps the float vectors (a memory map when loaded from a file) for the exact re-ranking
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
            return self._vectors  # faiss-ivfpq loaded from a file: a read-only memory map
        return self._faiss_index.reconstruct_n(0, self._n)

    def memory_bytes(self) -> int:
        """Bytes this index holds: ids plus either the vectors (numpy) or the FAISS structure (its
        serialised size, which holds the vectors once, and for HNSW also the graph)."""
        size = self.ids.nbytes
        if self.engine == "faiss-ivfpq" and self._faiss_index is not None:
            size += int(_import_faiss().serialize_index(self._faiss_index).nbytes)
            if not isinstance(self._vectors, np.memmap):  # memory-mapped vectors stay on disk
                size += self._vectors.nbytes
        elif self._faiss_index is not None:
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
        if self.engine == "faiss-ivfpq" and self._faiss_index is not None:
            return self._search_ivfpq(queries, k)
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

    def _search_ivfpq(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """IVF-PQ shortlist of max(rerank, k) rows, then exact inner products against the float vectors."""
        short = min(max(self.rerank, k), self._n)
        _, rows = self._faiss_index.search(np.ascontiguousarray(queries), short)
        out_scores = np.full((len(queries), k), -np.inf, np.float32)
        out_ids = np.full((len(queries), k), -1, np.int64)
        for qi, (query, cand) in enumerate(zip(queries, rows, strict=True)):
            cand = np.unique(cand[cand >= 0])  # sorted: reads the memory map in file order
            if not len(cand):
                continue
            sims = np.asarray(self._vectors[cand], dtype=np.float32) @ query
            top = np.argsort(-sims, kind="stable")[:k]
            out_scores[qi, :len(top)], out_ids[qi, :len(top)] = sims[top], self.ids[cand[top]]
        return out_scores, out_ids

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
        if engine == "faiss-ivfpq":
            vectors, ids = _map_tensors(path)
            return cls(vectors, np.array(ids), engine=engine), meta
        try:
            tensors = load_file(str(path))
            vectors, ids = tensors["vectors"], tensors["ids"]
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            raise KBError(f"dense index {path} cannot be read ({exc}); rebuild the KB with "
                          f"`python -m mel kb build`") from exc
        return cls(vectors, ids, engine=engine), meta


def _build_ivfpq(vectors: np.ndarray, nprobe: int = 64):
    """IVF (about 2*sqrt(n) lists, at most n/39 so k-means has 39 points a list) over PQ codes of
    d/8 bytes (8 bits a sub-quantiser, residuals to the list centroid); trained on a sample of 39
    points a list (at least 10,000), filled IVFPQ_CHUNK_ROWS rows at a time (a memory map is read
    in chunks). The exact re-ranking makes up for the coarse codes."""
    faiss = _import_faiss()
    n, d = vectors.shape
    m = next(m for m in (d // 8, 64, 48, 32, 24, 16, 12, 8, 4, 2, 1) if 0 < m <= 64 and d % m == 0)
    n_lists = max(1, min(int(2 * np.sqrt(n)), n // 39))
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, n_lists, m, 8, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    sample_rows = np.sort(rng.choice(n, min(n, max(39 * n_lists, 10_000)), replace=False))
    index.train(np.ascontiguousarray(vectors[sample_rows], dtype=np.float32))
    for start in range(0, n, IVFPQ_CHUNK_ROWS):
        index.add(np.ascontiguousarray(vectors[start:start + IVFPQ_CHUNK_ROWS], dtype=np.float32))
    index.nprobe = min(nprobe, n_lists)
    return index


def _map_tensors(path: Path) -> tuple[np.memmap, np.ndarray]:
    """The `vectors` and `ids` tensors of a safetensors file as read-only memory maps (the format:
    an 8-byte little-endian header length, a JSON header with each tensor's dtype, shape and byte
    range, then the data)."""
    dtypes = {"F32": np.float32, "I64": np.int64}
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        start = 8 + header_len
        out = []
        for name in ("vectors", "ids"):
            info = header[name]
            lo, _hi = info["data_offsets"]
            out.append(np.memmap(path, dtype=dtypes[info["dtype"]], mode="r", offset=start + lo,
                                 shape=tuple(info["shape"])))
    except (OSError, ValueError, KeyError) as exc:
        raise KBError(f"dense index {path} cannot be read ({exc}); rebuild the KB with "
                      f"`python -m mel kb build`") from exc
    return out[0], out[1]


def write_vectors_file(path: str | Path, vectors_file: str | Path, n: int, dim: int, metadata: dict | None = None,
                       ids: np.ndarray | None = None, chunk_rows: int = 65_536) -> None:
    """Write a dense index file (what `DenseIndex.write` writes: safetensors with `vectors` (n, dim)
    float32 and `ids` int64) from `vectors_file`, raw float32 rows appended as they were encoded, a
    chunk at a time: memory stays constant in n. `ids` default 0..n-1, also written in chunks."""
    vec_bytes, id_bytes = n * dim * 4, n * 8
    header = {"__metadata__": {"mel_dense_index": json.dumps(metadata or {})},
              "ids": {"dtype": "I64", "shape": [n], "data_offsets": [0, id_bytes]},
              "vectors": {"dtype": "F32", "shape": [n, dim], "data_offsets": [id_bytes, id_bytes + vec_bytes]}}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    if Path(vectors_file).stat().st_size != vec_bytes:
        raise KBError(f"{vectors_file} holds {Path(vectors_file).stat().st_size} bytes, expected {n} x {dim} float32")
    with open(path, "wb") as out:
        out.write(len(raw).to_bytes(8, "little"))
        out.write(raw)
        for start in range(0, n, chunk_rows * 8):
            part = (np.arange(start, min(n, start + chunk_rows * 8), dtype=np.int64) if ids is None
                    else np.asarray(ids[start:start + chunk_rows * 8], dtype="<i8"))
            out.write(part.astype("<i8", copy=False).tobytes())
        with open(vectors_file, "rb") as src:
            while True:
                block = src.read(chunk_rows * dim * 4)
                if not block:
                    break
                out.write(block)
