"""Measuring tools: peak resident memory, the median time of a call, dense search engines side by side."""
from __future__ import annotations

import gc
import os
import threading
import time

import numpy as np


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms from /proc)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):  # not Linux: the lifetime peak is the best there is
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.current())

    def __enter__(self):
        self.peak = self.current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)



def p50_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))



def search_engines(vectors: np.ndarray, queries: np.ndarray, engines: list[str], k: int = 20) -> list[dict]:
    """Per-query and batched search time of each engine, recall@k against exact search."""
    from ..index import DenseIndex
    out, truth, baseline_ms = [], None, None
    for engine in ["numpy"] + [e for e in engines if e != "numpy"]:
        t0 = time.perf_counter()
        index = DenseIndex(vectors, engine=engine)
        build_s = time.perf_counter() - t0
        index.search(queries[:2], k)  # warm-up
        times, found = [], []
        for q in queries:
            t0 = time.perf_counter()
            _, ids = index.search(q[None], k)
            times.append((time.perf_counter() - t0) * 1000)
            found.append(ids[0])
        t0 = time.perf_counter()
        index.search(queries, k)
        batch_ms = (time.perf_counter() - t0) * 1000 / len(queries)
        p50 = float(np.median(times))
        if engine == "numpy":
            truth, baseline_ms = found, p50
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)]))
        index_bytes = index.memory_bytes()
        if engine in engines:
            out.append({"engine": engine, "rows": len(vectors), "dim": vectors.shape[1], "build_s": round(build_s, 2),
                        "query_ms_p50": round(p50, 3), "query_ms_p95": round(float(np.percentile(times, 95)), 3),
                        "batched_ms_per_query": round(batch_ms, 3), "recall@20_vs_exact": round(recall, 4),
                        "speedup_vs_numpy": round(baseline_ms / p50, 1),
                        "index_bytes_per_entity": round(index_bytes / len(vectors), 1)})
        del index
        gc.collect()
    return out

