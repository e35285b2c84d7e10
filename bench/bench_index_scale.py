"""Benchmark the pieces for 10M-entity KBs: the faiss-ivfpq index at 1M and 10M rows, and the memory
of the streamed `mel kb build --format jsonl`.

    nice -n 10 python bench/bench_index_scale.py --sections ivfpq,kbbuild --ivfpq 1000000x384,10000000x384 \
        --kb-sizes 100000,1000000 --kb-dense-sizes 10000,100000,300000

Sections (each result is merged into results/bench_index_scale.json):
  ivfpq    synthetic unit vectors written chunk by chunk to a raw float32 file on disk (never all in
           memory), then, in a fresh child process, memory-mapped and handed to
           `DenseIndex(vectors, engine="faiss-ivfpq")`, which trains IVF-PQ on a sample and adds the
           rows in chunks. Measured: build seconds; peak anonymous resident memory (RssAnon) during the
           build; the IVF-PQ structure's bytes on disk (faiss.write_index) and DenseIndex.memory_bytes();
           exact top-20 of --queries queries by one streaming brute-force pass over all rows; then, the
           vectors' file-backed pages dropped from the process (madvise), for each --probes setting:
           query p50/p95 (one query a call) and recall@20 against the exact top-20; RssAnon and
           RssFile (file-backed pages: libraries + the vector rows the re-ranking read) while searching;
           last, the engine's default setting again with the vector file evicted from the page cache
           (posix_fadvise DONTNEED): the re-ranking then reads the disk (`cold_cache`).
  kbbuild  peak RSS (ru_maxrss of the child, from os.wait4) and seconds of `python -m mel kb build
           --format jsonl` at each of --kb-sizes entities without vectors (--no-dense), and with the
           offline preset's text encoder at each of --kb-dense-sizes.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from mel.bench import PeakRSS, save_json
from mel.cli_kit import provenance, script_command

if __package__:  # python -m bench.bench_index_scale
    from .bench_batch import write_kb_jsonl
else:  # python bench/bench_index_scale.py: bench/ itself is sys.path[0]
    from bench_batch import write_kb_jsonl

REPO = Path(__file__).resolve().parents[1]
GEN_CHUNK_ROWS = 200_000    # rows generated (and written) at a time
EXACT_CHUNK_ROWS = 250_000  # rows a step of the exact (brute-force) pass
K = 20


# -- synthetic vectors ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _structure(d: int) -> tuple[np.ndarray, np.ndarray]:
    """A 48-dimensional subspace of R^d and 4,096 cluster centres in it (fixed seeds)."""
    basis = np.random.default_rng(42).standard_normal((48, d)).astype(np.float32)
    centres = np.random.default_rng(43).standard_normal((4096, 48)).astype(np.float32)
    return basis, centres


def synth(rows: int, d: int, seed: int) -> np.ndarray:
    """Unit vectors near a 48-dimensional subspace in 4,096 clusters (real embeddings are clustered and
    of low intrinsic dimension; uniform noise would be the worst case for IVF)."""
    basis, centres = _structure(d)
    rng = np.random.default_rng(seed)
    x = (centres[rng.integers(0, len(centres), rows)]
         + 0.5 * rng.standard_normal((rows, 48)).astype(np.float32)) @ basis
    x += 0.3 * rng.standard_normal((rows, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_vectors(path: Path, n: int, d: int) -> float:
    """n x d float32 rows appended to `path` chunk by chunk; returns the seconds taken."""
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for start in range(0, n, GEN_CHUNK_ROWS):
            f.write(synth(min(GEN_CHUNK_ROWS, n - start), d, 1000 + start).tobytes())
    return time.perf_counter() - t0


# -- memory ---------------------------------------------------------------------------------------
def status_mb() -> dict:
    """This process's resident memory from /proc/self/status, MiB: anon (heap, numpy and faiss arrays),
    file (file-backed pages mapped: the memory-mapped vectors and the shared libraries)."""
    fields = {"RssAnon": "anon", "RssFile": "file"}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in fields:
                out[fields[key]] = round(int(line.split()[1]) / 1024, 1)
    return out


class PeakAnon(PeakRSS):
    """Peak anonymous resident memory (RssAnon) while the block runs: what the process itself holds,
    not the page-cache pages of a memory-mapped file it reads."""

    @staticmethod
    def current() -> int:
        return int(status_mb()["anon"] * 2**20)


def page_cached_mb(path: Path) -> float | None:
    """How much of `path` is in the page cache now (util-linux fincore), MiB; None without fincore."""
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(["fincore", "--bytes", "--raw", "--noheadings", "-o", "RES", str(path)],
                         capture_output=True, text=True)
    return round(int(out.stdout.split()[0]) / 2**20, 1) if out.returncode == 0 and out.stdout.strip() else None


def evict_from_page_cache(path: Path) -> None:
    """Drop `path`'s pages from the kernel's page cache (this file only; pages mapped by a process stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# -- the ivfpq measurement (in a fresh child process) --------------------------------------------
def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    """Exact top-k rows by inner product: one streaming pass over `vectors` (a memory map), a chunk at
    a time, keeping the best k of each query."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    for start in range(0, len(vectors), EXACT_CHUNK_ROWS):
        sims = queries @ np.asarray(vectors[start:start + EXACT_CHUNK_ROWS]).T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], 1)
        cand_i = np.concatenate([best_i, top + start], 1)
        order = np.argsort(-cand_s, 1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    return best_i


def time_queries(index, queries: np.ndarray) -> tuple[list[float], list[np.ndarray]]:
    """Milliseconds of each one-query search (after 5 warm-up queries) and the ids found."""
    for q in synth(5, index.dim, 8):
        index.search(q[None], K)
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        _, ids = index.search(q[None], K)
        times.append((time.perf_counter() - t) * 1000)
        found.append(ids[0])
    return times, found


def recall_at_k(found, truth) -> tuple[float, float]:
    """recall@K (|found & exact| / K) and how often the exact best row is in the K found, averaged."""
    recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth, strict=True)]))
    top1 = float(np.mean([b[0] in a for a, b in zip(found, truth, strict=True)]))
    return round(recall, 4), round(top1, 4)


def measure_ivfpq(raw: str, n: int, d: int, n_queries: int, probes: list[tuple[int, int]], threads: int) -> dict:
    """In a fresh process: build DenseIndex(memmap, engine="faiss-ivfpq") over the raw float32 file,
    then its memory, size, speed and recall (see the module docstring)."""
    import faiss

    from mel.index import DenseIndex

    if threads:
        faiss.omp_set_num_threads(threads)
    raw = Path(raw)
    vectors = np.memmap(raw, dtype=np.float32, mode="r", shape=(n, d))
    drop_file_pages = functools.partial(vectors._mmap.madvise, mmap.MADV_DONTNEED)  # from this process, not the cache
    queries = synth(n_queries, d, 7)
    base = status_mb()
    t0 = time.perf_counter()
    with PeakAnon(interval=0.1) as peak:
        index = DenseIndex(vectors, engine="faiss-ivfpq")  # trains on a sample, adds 100,000 rows at a time
    build_s = time.perf_counter() - t0
    ivf = index._faiss_index  # the IVF-PQ structure: DenseIndex has no public save or nprobe setter for it
    faiss_file = raw.with_suffix(".faiss")
    faiss.write_index(ivf, str(faiss_file))
    faiss_bytes = faiss_file.stat().st_size
    faiss_file.unlink()
    t = time.perf_counter()
    truth = exact_top_k(vectors, queries)
    exact_s = time.perf_counter() - t
    gc.collect()
    drop_file_pages()
    idle, cached = status_mb(), page_cached_mb(raw)
    sweep, searching = [], None
    for nprobe, rerank in probes:
        ivf.nprobe, index.rerank = nprobe, rerank
        times, found = time_queries(index, queries)
        searching = searching or status_mb()  # after the first setting (the engine's defaults)
        t = time.perf_counter()
        index.search(queries, K)
        batched_ms = (time.perf_counter() - t) * 1000 / n_queries
        recall, top1 = recall_at_k(found, truth)
        sweep.append({"nprobe": nprobe, "rerank": rerank, "query_ms_p50": round(float(np.median(times)), 2),
                      "query_ms_p95": round(float(np.percentile(times, 95)), 2),
                      "batched_ms_per_query": round(batched_ms, 2), "recall_at_20": recall, "top1_in_top20": top1})
    ivf.nprobe, index.rerank = probes[0]  # again, the vector file out of the page cache: the re-ranking reads the disk
    drop_file_pages()
    evict_from_page_cache(raw)
    cold_cached = page_cached_mb(raw)
    times, found = time_queries(index, queries)
    cold = {"nprobe": probes[0][0], "rerank": probes[0][1], "vectors_page_cached_before_mb": cold_cached,
            "vectors_page_cached_after_mb": page_cached_mb(raw), "query_ms_p50": round(float(np.median(times)), 2),
            "query_ms_p95": round(float(np.percentile(times, 95)), 2)}
    return {
        "n": n, "dim": d, "nlist": ivf.nlist, "pq_bytes_per_vector": ivf.pq.M,
        "faiss_threads": faiss.omp_get_max_threads(), "build_s": round(build_s, 1),
        "faiss_index_bytes_on_disk": faiss_bytes, "ids_bytes": int(index.ids.nbytes),
        "index_memory_mb": round((faiss_bytes + index.ids.nbytes) / 2**20, 1),
        "memory_bytes_api": index.memory_bytes(),
        "rss_anon_before_build_mb": base["anon"], "rss_anon_peak_build_mb": round(peak.peak / 2**20, 1),
        "rss_anon_before_search_mb": idle["anon"], "rss_anon_searching_mb": searching["anon"],
        "rss_anon_index_mb": round(searching["anon"] - base["anon"], 1),
        "rss_file_before_search_mb": idle["file"], "rss_file_searching_mb": searching["file"],
        "vectors_page_cached_before_search_mb": cached, "float_vectors_mb_on_disk": round(n * d * 4 / 2**20, 1),
        "queries": n_queries, "exact_pass_s": round(exact_s, 1), **sweep[0], "sweep": sweep, "cold_cache": cold,
    }


def section_ivfpq(args, work: Path, out: dict):
    res = out.setdefault("ivfpq", {"rows": []})
    res["note"] = (
        "synthetic unit vectors (48-dim subspace, 4,096 clusters, isotropic noise); queries are fresh draws of "
        "the same distribution. The float vectors stay in a file on disk, memory-mapped; the index is "
        "DenseIndex(memmap, engine='faiss-ivfpq') (IVF ~2*sqrt(n) lists, PQ d/8 bytes a vector, trained on 39 "
        "rows a list, filled 100,000 rows at a time, shortlist of `rerank` rows re-ranked exactly against the "
        "memory map). index_memory_mb = the IVF-PQ structure as faiss.write_index writes it (codes, list ids, "
        "centroids, codebooks) + DenseIndex.ids (int64): what must be held in memory. rss_anon_* = RssAnon of "
        "the measuring process (a fresh child: Python, numpy, faiss and the index; not file-backed pages); "
        "rss_anon_index_mb = RssAnon while searching minus RssAnon before the build. rss_file_* = RssFile, the "
        "file-backed pages mapped (libraries + the vectors' pages the re-ranking read: the build's and the exact "
        "pass's are dropped with madvise(MADV_DONTNEED) before the searches). "
        "vectors_page_cached_before_search_mb: how much of the vector file the kernel's page cache held when "
        "the searches started (fincore), after the exact pass read it all. query_ms: one query a call, 5 "
        "warm-up queries first; the row's query and recall figures are the first --probes setting (the "
        "engine's defaults nprobe 64, rerank 200), `sweep` has all; `cold_cache`: that setting again after "
        "evicting the vector file from the page cache (posix_fadvise DONTNEED; the cache refills as the queries "
        "read, with the kernel's read-around). recall@20 = |top-20 found & exact top-20| "
        "/ 20, exact by one streaming brute-force pass over all rows.")
    for spec in args.ivfpq:
        n, d = (int(x) for x in spec.split("x"))
        raw = work / f"vectors-{n}x{d}.f32"
        try:
            gen_s = write_vectors(raw, n, d)
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:  # a fresh process per size
                row = pool.submit(measure_ivfpq, str(raw), n, d, args.queries, args.probes,
                                  args.faiss_threads).result()
        finally:
            raw.unlink(missing_ok=True)
        row = {"generate_s": round(gen_s, 1), **row}
        print(json.dumps(row), flush=True)
        res["rows"] = [r for r in res["rows"] if (r["n"], r["dim"]) != (n, d)] + [row]
        save(args, out)


# -- streamed KB build memory -----------------------------------------------------------------------
def run_sampled(cmd: list[str], interval: float = 0.5) -> tuple[int, object, float, list[float]]:
    """Run `cmd`; its exit status, rusage (os.wait4), wall seconds, and the highest VmRSS (MiB) sampled in
    each tenth of its wall time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
    samples = []
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            samples.append((time.perf_counter() - t0, rss / 1024))
        except (OSError, StopIteration):  # exiting
            pass
        time.sleep(interval)
    seconds = time.perf_counter() - t0
    tenths = [max((r for t, r in samples if i * seconds / 10 <= t < (i + 1) * seconds / 10), default=None)
              for i in range(10)]
    return status, usage, seconds, [None if r is None else round(r, 1) for r in tenths]


def section_kbbuild(args, work: Path, out: dict):
    res = out.setdefault("kb_build", {"rows": []})
    res["note"] = (
        "peak RSS = ru_maxrss of the `python -m mel kb build --format jsonl` child (os.wait4): the whole process, "
        "Python, SQLite's cache, and with dense=true the offline preset's text encoder (all-MiniLM-L6-v2, "
        "MEL_THREADS=1) and its batches. One JSONL line per synthetic entity (id, name, one alias, description). "
        "rss_mb_by_tenth: the highest VmRSS sampled (every 0.5 s, /proc/PID/status) in each tenth of the run's "
        "wall time, to see whether memory levels off or keeps growing with the entities read.")
    plan = [(n, False) for n in args.kb_sizes] + [(n, True) for n in args.kb_dense_sizes]
    for n, dense in plan:
        src = work / f"kb-{n}.jsonl"
        if not src.exists():
            write_kb_jsonl(src, n)
        kb = work / f"kb-{n}-{'dense' if dense else 'nodense'}.sqlite"
        cmd = [sys.executable, "-m", "mel", "kb", "build", "--format", "jsonl", "--source", str(src), "--out",
               str(kb), "--quiet", *(["--preset", "offline", "--no-images"] if dense else ["--no-dense"])]
        status, usage, seconds, timeline = run_sampled(cmd)
        if status:
            raise RuntimeError(f"kb build failed ({status}): {' '.join(cmd)}")
        sidecar = kb.with_name(f"{kb.stem}.text.safetensors")
        row = {"n_entities": n, "dense": dense, "seconds": round(seconds, 1),
               "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "jsonl_mb": round(src.stat().st_size / 2**20, 1),
               "kb_mb": round(kb.stat().st_size / 2**20, 1),
               "vectors_mb": round(sidecar.stat().st_size / 2**20, 1) if sidecar.exists() else 0,
               "rss_mb_by_tenth": timeline}
        print(json.dumps(row), flush=True)
        res["rows"] = [r for r in res["rows"] if (r["n_entities"], r["dense"]) != (n, dense)] + [row]
        for p in (kb, sidecar):
            p.unlink(missing_ok=True)
        save(args, out)


def save(args, out: dict):
    save_json(args.json, out)


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="ivfpq,kbbuild")
    p.add_argument("--ivfpq", default="1000000x384,10000000x384", help="NxD sizes, comma-separated")
    p.add_argument("--queries", type=int, default=200, help="queries for the p50 and the recall against exact")
    p.add_argument("--probes", default="64:200,128:200,128:400",
                   help="nprobe:rerank settings searched on the same index; the first (the engine's defaults) is "
                        "the row's figures")
    p.add_argument("--faiss-threads", type=int, default=0, help="faiss OpenMP threads (0: faiss's default)")
    p.add_argument("--kb-sizes", default="100000,1000000", help="entities, KB built without vectors")
    p.add_argument("--kb-dense-sizes", default="10000,100000,300000", help="entities, KB built with the offline encoder")
    p.add_argument("--work", default=None, help="scratch folder for the vector file (default: the temp folder)")
    p.add_argument("--json", default=str(REPO / "results" / "bench_index_scale.json"))
    args = p.parse_args(argv)
    args.ivfpq = [x for x in args.ivfpq.split(",") if x]
    args.probes = [tuple(int(v) for v in x.split(":")) for x in args.probes.split(",") if x]
    args.kb_sizes = [int(x) for x in args.kb_sizes.split(",") if x]
    args.kb_dense_sizes = [int(x) for x in args.kb_dense_sizes.split(",") if x]
    os.environ.setdefault("MEL_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    sections = args.sections.split(",")
    run = provenance(script_command(__file__, argv))
    for name in sections:
        out.setdefault("runs", {})[name] = run
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        if "kbbuild" in sections:
            section_kbbuild(args, Path(work), out)
        if "ivfpq" in sections:
            section_ivfpq(args, Path(work), out)
    save(args, out)


if __name__ == "__main__":
    main()
