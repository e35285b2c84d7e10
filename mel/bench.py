"""`python -m mel bench ...`: quality, speed and scale, measured side by side and written to `results/`.

    python -m mel bench quality   --data-root ../shared/data --kb-dir data --out results
    python -m mel bench ablations --data-root ../shared/data --kb-dir data --out results
    python -m mel bench scale     --sizes 10000,100000,1000000 --out results
    python -m mel bench report    --out results          # re-render Markdown + PNG from the JSON files
    python -m mel bench all       --data-root ../shared/data --kb-dir data --out results   # all three runs

quality    every linker (exact, bm25, dense, dim, gemel, gemel+dense, gemel+dim) on the dev split of
           WikiMEL, RichpediaMEL and WikiDiverse, one process, one run: Hits@1/5/10/20, MRR, n, KB size,
           mentions with an image, latency p50/p95 and per stage, throughput, peak RSS. The generative
           linkers cost ~1 s per mention on a CPU, so they run on the first `--generative-limit`
           mentions of each split (0 = all); every linker is ALSO scored on that same subset, so the
           generative rows are compared with the others on identical mentions. Then the physical
           reference: what fraction of the machine each stage achieves (LLM prefill/decoding against
           a plain forward of the same model and shape; dense search against a bare matrix product of
           the same size and against the machine's memory bandwidth).
ablations  the papers' questions on WikiMEL dev: with vs without the image (DIM, GEMEL), with vs
           without the expert cue (DIM), 0 / 4 / 16 demonstrations (GEMEL), trie-constrained vs free
           generation (GEMEL).
scale      KB build (SQLite + FTS5 + dense index) and search cost as the KB grows, on synthetic
           entities (speed only: real quality is the `quality` run), exact numpy vs FAISS engines,
           index memory per entity; the text encoder's own throughput is measured on real names.

Every JSON records its command, preset and models, seed, threads, git commit, load average, and the
sha256 of the KB files and dataset directories it read. A missing KB is built first (same code as
`python -m mel kb build`), and its build time is recorded.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .cli import count_arg
from .errors import InputError
from .evaluate import HITS_AT as HITS, rank_metrics
from .paths import REPO_ROOT

DATASETS = ("wikimel", "richpedia", "wikidiverse")
LINKERS = ("exact", "bm25", "dense", "dim", "gemel", "gemel+dense", "gemel+dim")


# -- provenance ---------------------------------------------------------------------------------
def sha256_paths(paths) -> dict:
    """One sha256 over the files (sorted, names included) and their count/bytes."""
    h, n, size = hashlib.sha256(), 0, 0
    files = sorted(p for path in paths for p in ([path] if Path(path).is_file() else Path(path).rglob("*"))
                   if Path(p).is_file())
    for f in files:
        h.update(str(Path(f).name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        n += 1
        size += Path(f).stat().st_size
    return {"sha256": h.hexdigest(), "files": n, "bytes": size}


def kb_files(kb_path: Path) -> list[Path]:
    stem = kb_path.with_suffix("")
    return [kb_path] + sorted(kb_path.parent.glob(f"{stem.name}.*.safetensors"))


def save_json(path: str | Path, data) -> Path:
    """Write a benchmark result: indented UTF-8 JSON, parent folders created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def run_meta(argv: list[str], preset=None, seed: int = 0, threads: int | None = None) -> dict:
    import torch
    meta = {"command": "python -m mel bench " + " ".join(argv), "git_commit": git_commit(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "seed": seed,
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": threads or torch.get_num_threads(),
                        "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}}
    if preset is not None:
        meta["preset"] = preset.name
        meta["preset_reason"] = preset.reason
        meta["models"] = preset.models()
    return meta


def seed_everything(seed: int) -> None:
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def parse_linker(spec: str) -> tuple[str, dict]:
    """`gemel:n_demos=16,constrained=false` -> ("gemel", {"n_demos": 16, "constrained": False})."""
    from .linkers import parse_options
    name, _, opts = spec.partition(":")
    return name, parse_options(filter(None, opts.split(",")))


def is_generative(spec: str) -> bool:
    return spec.startswith("gemel")


# -- datasets and KBs -------------------------------------------------------------------------------
def open_kb(fmt: str, data_root: Path, kb_dir: Path, preset, progress: bool) -> tuple[object, dict]:
    """The dataset's KB from `kb_dir/{fmt}.sqlite`, built first when missing."""
    from .kb import KnowledgeBase, build_dataset_kb
    path = kb_dir / f"{fmt}.sqlite"
    built = None
    if not path.exists():
        print(f"[bench] {path} is missing: building it from {data_root / fmt} (as `python -m mel kb build`)",
              file=sys.stderr)
        t0 = time.perf_counter()
        build_dataset_kb(fmt, data_root / fmt, path, preset=preset, progress=progress)
        built = round(time.perf_counter() - t0, 1)
    kb = KnowledgeBase(path)
    return kb, {"kb": str(path.name), "kb_size": kb.size, "kb_checksum": sha256_paths(kb_files(path)),
                "kb_built_in_this_run_s": built}


def evaluate_spec(spec: str, kb, preset, examples, *, fmt: str, data_dir: Path, progress: bool) -> tuple[dict, list]:
    """Evaluate one linker spec; returns (row, per-mention ranks)."""
    from .evaluate import evaluate
    from .linkers import build_linker
    name, options = parse_linker(spec)
    if is_generative(name):
        options = {"pool_data": str(data_dir), "pool_format": fmt, **options}
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        linker = build_linker(name, kb, preset, **options)
        load_s = time.perf_counter() - t0
        report = evaluate(linker, examples, progress=progress, keep_ranks=True)
    ranks = report.pop("ranks")
    row = {"linker": spec, "dataset": fmt}
    row.update({k: report[k] for k in ("n", "kb_size", *(f"hits@{h}" for h in HITS), "mrr", "n_with_image",
                                       "latency_ms_p50", "latency_ms_p95", "throughput_per_s", "stage_ms_mean",
                                       "n_gold_not_in_kb", "models")})
    row["n_not_a_kb_name"] = report.get("n_not_a_kb_name", 0)  # free generation only
    row["load_s"] = round(load_s, 2)
    row["peak_rss_mb"] = rss.peak_mb
    del linker
    gc.collect()
    return row, ranks


# -- quality -----------------------------------------------------------------------------------------
def bench_quality(args, argv) -> dict:
    from .datasets import load_dataset
    from .presets import get_preset
    preset = get_preset(args.preset)
    seed_everything(args.seed)
    data_root, kb_dir = Path(args.data_root), Path(args.kb_dir)
    out = {"kind": "quality", **run_meta(argv, preset, args.seed, args.threads), "split": "dev",
           "protocol": "whole-KB ranking (a gold missing from the KB is a miss)",
           "generative_limit": args.generative_limit, "datasets": {}, "rows": [], "subset_rows": []}
    linkers = args.linkers.split(",")
    for fmt in args.datasets.split(","):
        data_dir = data_root / fmt
        split = load_dataset(fmt, data_dir, "dev")
        kb, kb_meta = open_kb(fmt, data_root, kb_dir, preset, args.progress)
        examples = split.examples[: args.limit] if args.limit else split.examples
        g = args.generative_limit or len(examples)
        report = split.report.to_dict() if hasattr(split.report, "to_dict") else {}
        out["datasets"][fmt] = {**kb_meta, "data_checksum": sha256_paths([data_dir]), "n_dev_examples": len(examples),
                                "generative_subset": min(g, len(examples)),
                                "n_with_image": sum(1 for ex in examples if ex.mention.image), "reader": report}
        print(f"[bench] {fmt} dev: {len(examples)} mentions ({out['datasets'][fmt]['n_with_image']} with an image), "
              f"KB {kb.size:,} entities", file=sys.stderr)
        for spec in linkers:
            use = examples[:g] if is_generative(spec) else examples
            row, ranks = evaluate_spec(spec, kb, preset, use, fmt=fmt, data_dir=data_dir, progress=args.progress)
            out["rows"].append(row)
            sub = {"linker": spec, "dataset": fmt, "n": len(ranks[:g]), **rank_metrics(ranks[:g])}
            out["subset_rows"].append(sub)
            print(f"  {fmt:<11} {spec:<12} n={row['n']:>5} H@1 {row['hits@1']:.4f} H@5 {row['hits@5']:.4f} "
                  f"MRR {row['mrr']:.4f} | first {sub['n']}: H@1 {sub['hits@1']:.4f} | p50 {row['latency_ms_p50']} ms "
                  f"{row['throughput_per_s']}/s peak RSS {row['peak_rss_mb']} MB", flush=True)
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def _p50_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def physical_reference(kb, preset, examples, data_dir: Path, fmt: str, n_links: int = 8) -> dict:
    """Achieved fraction of what the machine does on the same work, stage by stage."""
    import torch

    from .linkers import build_linker
    ref: dict = {}
    # machine: memory bandwidth (a large copy) and matrix-multiply throughput
    big = np.ones(64 * 2**20 // 4, np.float32)
    dst = np.empty_like(big)
    copy_ms = _p50_ms(lambda: np.copyto(dst, big), 5)
    bandwidth = 2 * big.nbytes / (copy_ms / 1000)  # read + write
    a = torch.randn(1024, 1024)  # torch, with the run's threads: the library the models use
    mm_ms = _p50_ms(lambda: a @ a, 5)
    peak_flops = 2 * 1024**3 / (mm_ms / 1000)
    ref["machine_reference"] = {"copy_gb_per_s": round(bandwidth / 1e9, 2), "sgemm_gflops": round(peak_flops / 1e9, 1)}

    # dense search: the KB's text index against a bare matrix product over the same vectors
    if kb.has_dense("text"):
        index, _ = kb.dense("text")
        vectors = index.vectors
        q = np.random.default_rng(1).standard_normal((1, index.dim), dtype=np.float32)
        q /= np.linalg.norm(q)
        search_ms = _p50_ms(lambda: kb.search_dense(q, k=20), 20)
        bare_ms = _p50_ms(lambda: q @ vectors.T, 20)  # the same (1, d) x (d, n) product, nothing else
        ref["dense_search"] = {"rows": len(index), "dim": index.dim, "engine": index.engine,
                               "search_ms_p50": round(search_ms, 3), "bare_matmul_ms_p50": round(bare_ms, 3),
                               "fraction_of_bare_matmul": round(bare_ms / search_ms, 3),
                               "achieved_gb_per_s": round(vectors.nbytes / (search_ms / 1000) / 1e9, 2),
                               "fraction_of_copy_bandwidth": round(vectors.nbytes / (search_ms / 1000) / bandwidth, 3)}

    # the LLM: GEMEL's prefill and decoding against plain forwards of the same model and shapes
    linker = build_linker("gemel", kb, preset, pool_data=str(data_dir), pool_format=fmt)
    results = [linker.link(ex.mention) for ex in examples[:n_links]]
    stats = [r.details.decode for r in results]
    llm_share = sum(s["prefill_ms"] + s["decode_ms"] for s in stats) / sum(r.timings["total"] for r in results)
    model = linker.model
    prompt_len = int(np.mean([s["prompt_tokens"] for s in stats]))
    prefill_tps = sum(s["prompt_tokens"] for s in stats) / (sum(s["prefill_ms"] for s in stats) / 1000)
    decode_tps = sum(s["forwarded_tokens"] for s in stats) / max(sum(s["decode_ms"] for s in stats) / 1000, 1e-9)
    beams = linker.decode_config.num_beams
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len))
    from .gemel.decode import prefill  # the same call as GEMEL (LM head on the last position only)
    with torch.inference_mode():
        plain_prefill_ms = _p50_ms(lambda: prefill(model, model.get_input_embeddings()(ids)), 3)
        past = model(input_ids=ids.repeat(beams, 1), use_cache=True).past_key_values
        step = torch.randint(0, model.config.vocab_size, (beams, 1))

        def one_step():
            cache = past  # one decoding step for every beam on a prompt-sized cache (cache grows by one: fine)
            model(input_ids=step, past_key_values=cache, use_cache=True)
        plain_step_ms = _p50_ms(one_step, 5)
    params = sum(p.numel() for p in model.parameters())
    # ~2 FLOPs per weight per token, not counting the embedding table (a lookup; the LM head runs once)
    matmul_params = params - model.get_input_embeddings().weight.numel()
    plain_prefill_tps = prompt_len / (plain_prefill_ms / 1000)
    ref["llm"] = {"model": preset.llm, "parameters": params, "prompt_tokens_mean": prompt_len, "n_links": len(stats),
                  "beams": beams, "plain_forward_gflops": round(2 * matmul_params * plain_prefill_tps / 1e9, 1),
                  "gemel_prefill_tokens_per_s": round(prefill_tps, 1),
                  "plain_forward_tokens_per_s": round(plain_prefill_tps, 1),
                  "prefill_fraction_of_plain_forward": round(prefill_tps / plain_prefill_tps, 3),
                  "gemel_decode_tokens_per_s": round(decode_tps, 1),
                  "plain_decode_step_tokens_per_s": round(beams / (plain_step_ms / 1000), 1),
                  "decode_fraction_of_plain_step": round(decode_tps / (beams / (plain_step_ms / 1000)), 3),
                  "plain_forward_fraction_of_sgemm": round(2 * matmul_params * plain_prefill_tps / peak_flops, 3),
                  "llm_share_of_link_time": round(llm_share, 3)}
    del linker
    gc.collect()
    return ref


def bench_reference(args, argv) -> dict:
    from .datasets import load_dataset
    from .presets import get_preset
    preset = get_preset(args.preset)
    seed_everything(args.seed)
    fmt, data_root = args.dataset, Path(args.data_root)
    examples = load_dataset(fmt, data_root / fmt, "dev").examples
    kb, kb_meta = open_kb(fmt, data_root, Path(args.kb_dir), preset, args.progress)
    out = {"kind": "reference", **run_meta(argv, preset, args.seed, args.threads), "dataset": fmt, **kb_meta}
    out.update(physical_reference(kb, preset, examples, data_root / fmt, fmt))
    print(markdown_reference(out), flush=True)
    return out


# -- ablations ---------------------------------------------------------------------------------------
# (question, variant, linker spec, generative?) on WikiMEL dev; the variant marked * is the default
ABLATIONS = (
    ("image", "DIM with image", "dim"),
    ("image", "DIM without image", "dim:use_image=false"),
    ("image", "GEMEL with visual tokens", "gemel"),
    ("image", "GEMEL without visual tokens", "gemel:use_images=false"),
    ("expert cue", "DIM with cue", "dim"),
    ("expert cue", "DIM without cue", "dim:use_cue=false"),
    ("demonstrations", "GEMEL 0 demos", "gemel:n_demos=0"),
    ("demonstrations", "GEMEL 4 demos", "gemel"),
    ("demonstrations", "GEMEL 16 demos", "gemel:n_demos=16"),
    ("decoding", "GEMEL trie-constrained", "gemel"),
    ("decoding", "GEMEL free generation", "gemel:constrained=false"),
)


def bench_ablations(args, argv) -> dict:
    from .datasets import load_dataset
    from .presets import get_preset
    preset = get_preset(args.preset)
    seed_everything(args.seed)
    fmt, data_root = args.dataset, Path(args.data_root)
    data_dir = data_root / fmt
    split = load_dataset(fmt, data_dir, "dev")
    kb, kb_meta = open_kb(fmt, data_root, Path(args.kb_dir), preset, args.progress)
    examples = split.examples
    g = min(args.generative_limit or len(examples), len(examples))
    out = {"kind": "ablations", **run_meta(argv, preset, args.seed, args.threads), "dataset": fmt, "split": "dev",
           **kb_meta, "data_checksum": sha256_paths([data_dir]), "n_dev_examples": len(examples),
           "generative_subset": g, "n_with_image": sum(1 for ex in examples if ex.mention.image),
           "n_with_image_in_subset": sum(1 for ex in examples[:g] if ex.mention.image), "rows": []}
    done: dict[str, tuple[dict, list]] = {}
    for question, variant, spec in ABLATIONS:
        if spec not in done:
            use = examples[:g] if is_generative(spec) else examples
            done[spec] = evaluate_spec(spec, kb, preset, use, fmt=fmt, data_dir=data_dir, progress=args.progress)
        row, ranks = done[spec]
        entry = {"question": question, "variant": variant, "linker": spec,
                 **{k: row[k] for k in ("n", "hits@1", "hits@5", "mrr", "latency_ms_p50", "n_with_image")}}
        if spec == "gemel:constrained=false":
            entry["note"] = "an output that is no KB name counts as a miss"
            entry["n_not_a_kb_name"] = row["n_not_a_kb_name"]
        out["rows"].append(entry)
        print(f"  {question:<15} {variant:<30} n={row['n']:>5} H@1 {row['hits@1']:.4f} MRR {row['mrr']:.4f} "
              f"p50 {row['latency_ms_p50']} ms", flush=True)
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return out


# -- scale -------------------------------------------------------------------------------------------
def synthetic_vectors(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """Clustered unit vectors: real embeddings are clustered; uniform noise is the worst case for IVF."""
    from .index import normalize
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
    from .index import normalize
    rng = np.random.default_rng(seed)
    return normalize(vectors[rng.integers(0, len(vectors), n)]
                     + noise * rng.standard_normal((n, vectors.shape[1]), dtype=np.float32))


def search_engines(vectors: np.ndarray, queries: np.ndarray, engines: list[str], k: int = 20) -> list[dict]:
    """Per-query and batched search time of each engine, recall@k against exact search."""
    from .index import DenseIndex
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
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)]))
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


class RandomEncoder:
    """A text encoder stand-in with no model cost (synthetic KBs measure SQLite/FTS5/index cost)."""
    name = "synthetic-random"

    def __init__(self, dim: int):
        self.dim = dim
        self._rng = np.random.default_rng(0)

    def encode(self, texts, batch_size: int = 128, **_):
        from .index import normalize
        return normalize(self._rng.standard_normal((len(texts), self.dim), dtype=np.float32))


WORDS = ("river north king star stone city black red house field john maria lake union royal club saint new "
         "grand valley park west museum film band party national football university church bridge island").split()


def synthetic_entities(n: int, seed: int = 0):
    from .types import Entity
    rng = random.Random(seed)
    for i in range(n):
        name = " ".join(rng.choice(WORDS).title() for _ in range(rng.randint(1, 3))) + f" {i}"
        desc = " ".join(rng.choice(WORDS) for _ in range(12))
        yield Entity(id=f"S{i}", name=name, description=desc)


def bench_scale(args, argv) -> dict:
    from .kb import KnowledgeBase, build_kb
    from .presets import get_preset
    seed_everything(args.seed)
    engines = args.engines.split(",")
    out = {"kind": "scale", **run_meta(argv, None, args.seed, args.threads), "dim": args.dim, "rows": [],
           "note": "synthetic entities and clustered unit vectors (speed only); build = SQLite + aliases + FTS5 + "
                   "dense index without the encoder, whose own throughput (the preset's text encoder on synthetic names) is `encoder`"}
    rng = np.random.default_rng(args.seed)
    for size in [int(s) for s in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"synthetic-{size}.sqlite"
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                kb = build_kb(synthetic_entities(size, args.seed), path, text_encoder=RandomEncoder(args.dim),
                              progress=False)
                build_s = time.perf_counter() - t0
            kb_bytes = sum(f.stat().st_size for f in kb_files(path))
            kb = KnowledgeBase(path)
            queries = [" ".join(rng.choice(WORDS, 2)) for _ in range(args.queries)]
            bm25_ms = [_p50_ms(lambda q=q: kb.search_bm25(q, k=20), 1) for q in queries]
        vectors = synthetic_vectors(size, args.dim, args.seed)
        search = search_engines(vectors, synthetic_queries(vectors, args.queries, args.seed + 1), engines)
        row = {"entities": size, "kb_build_s": round(build_s, 2), "kb_build_entities_per_s": round(size / build_s, 1),
               "kb_bytes_per_entity": round(kb_bytes / size, 1), "kb_build_peak_rss_mb": rss.peak_mb,
               "bm25_ms_p50": round(float(np.median(bm25_ms)), 3), "search": search}
        out["rows"].append(row)
        print(f"  {size:>9,} entities: build {row['kb_build_s']} s ({row['kb_build_entities_per_s']} ent/s, "
              f"{row['kb_bytes_per_entity']} B/entity on disk), bm25 p50 {row['bm25_ms_p50']} ms; " +
              "; ".join(f"{s['engine']} {s['query_ms_p50']} ms (recall {s['recall@20_vs_exact']}, "
                        f"{s['index_bytes_per_entity']} B/ent)" for s in search), flush=True)
        del vectors
        gc.collect()
    if args.encoder_names:
        preset = get_preset(args.preset)
        encoder = preset.backend("text_encoder")
        names = [e.name for e in synthetic_entities(args.encoder_names, args.seed)]
        encoder.encode(names[:64])
        t0 = time.perf_counter()
        encoder.encode(names, batch_size=128)
        secs = time.perf_counter() - t0
        out["encoder"] = {"model": preset.text_encoder, "preset": preset.name, "names": len(names),
                          "entities_per_s": round(len(names) / secs, 1)}
        print(f"  text encoder {preset.text_encoder}: {out['encoder']['entities_per_s']} names/s", flush=True)
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return out


# -- reports (Markdown + PNG) ------------------------------------------------------------------------
def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 10 else f"{x:,.1f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def markdown_quality(res: dict) -> str:
    lines = [f"# Quality and speed on the dev splits ({res.get('preset')} preset)", "",
             f"Command: `{res['command']}` (commit {res.get('git_commit')}, seed {res['seed']}, "
             f"{res['machine']['cpus']} CPUs, torch threads {res['machine']['torch_threads']}, load average at "
             f"start {res['machine']['load_average_at_start']}). Protocol: {res['protocol']}.", ""]
    for fmt, d in res["datasets"].items():
        lines.append(f"- **{fmt}**: KB {d['kb']} {d['kb_size']:,} entities (sha256 {d['kb_checksum']['sha256'][:12]}), "
                     f"data sha256 {d['data_checksum']['sha256'][:12]}, {d['n_dev_examples']:,} dev mentions, "
                     f"{d['n_with_image']} with an image; generative linkers on the first {d['generative_subset']:,}.")
    lines += ["", "| dataset | linker | n | H@1 | H@5 | H@10 | H@20 | MRR | with image | p50 ms | p95 ms | mentions/s | peak RSS MB |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['dataset']} | {r['linker']} | {r['n']:,} | " + " | ".join(_fmt(r[f'hits@{h}']) for h in HITS) +
                     f" | {_fmt(r['mrr'])} | {r['n_with_image']} | {_fmt(r['latency_ms_p50'], 1)} | "
                     f"{_fmt(r['latency_ms_p95'], 1)} | {_fmt(r['throughput_per_s'], 1)} | {_fmt(r['peak_rss_mb'], 1)} |")
    lines += ["", "Same mentions for every linker (the generative subset of each split):", "",
              "| dataset | linker | n | H@1 | H@5 | MRR |", "|---|---|---:|---:|---:|---:|"]
    for r in res["subset_rows"]:
        lines.append(f"| {r['dataset']} | {r['linker']} | {r['n']:,} | {_fmt(r['hits@1'])} | {_fmt(r['hits@5'])} | "
                     f"{_fmt(r['mrr'])} |")
    return "\n".join(lines) + "\n"


def markdown_reference(res: dict) -> str:
    lines = ["# Physical reference: achieved fraction of what this machine does on the same work", "",
             f"Command: `{res['command']}` (commit {res.get('git_commit')}, {res['machine']['cpus']} CPUs, torch threads "
             f"{res['machine']['torch_threads']}, load average at start {res['machine']['load_average_at_start']}); "
             f"KB {res['kb']} {res['kb_size']:,} entities.", ""]
    m, llm = res["machine_reference"], res["llm"]
    lines += ["| stage | achieved | the machine on the same work | fraction |", "|---|---:|---:|---:|"]
    if "dense_search" in res:
        d = res["dense_search"]
        lines.append(f"| dense top-20 search, {d['rows']:,} x {d['dim']} ({d['engine']}) | {d['search_ms_p50']} ms | bare "
                     f"(1, d) x (d, n) product {d['bare_matmul_ms_p50']} ms | {d['fraction_of_bare_matmul']} |")
        lines.append(f"| ... bytes read per second | {d['achieved_gb_per_s']} GB/s | memory copy {m['copy_gb_per_s']} GB/s | "
                     f"{d['fraction_of_copy_bandwidth']} |")
    lines.append(f"| GEMEL prompt prefill, {llm['prompt_tokens_mean']} tokens | {llm['gemel_prefill_tokens_per_s']} tokens/s | "
                 f"plain forward, same model and shape {llm['plain_forward_tokens_per_s']} tokens/s | "
                 f"{llm['prefill_fraction_of_plain_forward']} |")
    lines.append(f"| GEMEL constrained decoding | {llm['gemel_decode_tokens_per_s']} tokens/s | plain cached step of "
                 f"{llm['beams']} beams {llm['plain_decode_step_tokens_per_s']} tokens/s | {llm['decode_fraction_of_plain_step']} |")
    lines.append(f"| plain forward, FLOP rate | {llm['plain_forward_gflops']} GFLOP/s | float32 matrix multiply "
                 f"{m['sgemm_gflops']} GFLOP/s | {llm['plain_forward_fraction_of_sgemm']} |")
    lines += ["", f"LLM {llm['model']} ({llm['parameters']:,} parameters); over {llm['n_links']} GEMEL links the LLM "
              f"took {llm['llm_share_of_link_time']} of the link time. A fraction above 1 means the work ran faster "
              f"than the reference (e.g. a KB index small enough to stay in cache reads faster than a 64 MB copy)."]
    return "\n".join(lines) + "\n"


def markdown_ablations(res: dict) -> str:
    lines = [f"# Ablations on {res['dataset']} dev ({res.get('preset')} preset)", "",
             f"Command: `{res['command']}` (commit {res.get('git_commit')}, seed {res['seed']}). KB {res['kb']} "
             f"{res['kb_size']:,} entities. DIM rows: all {res['n_dev_examples']:,} dev mentions ({res['n_with_image']} "
             f"with an image); GEMEL rows: the first {res['generative_subset']:,} ({res['n_with_image_in_subset']} with an "
             f"image).", "", "| question | variant | linker | n | H@1 | H@5 | MRR | p50 ms |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['question']} | {r['variant']} | `{r['linker']}` | {r['n']:,} | {_fmt(r['hits@1'])} | "
                     f"{_fmt(r['hits@5'])} | {_fmt(r['mrr'])} | {_fmt(r['latency_ms_p50'], 1)} |")
    return "\n".join(lines) + "\n"


def markdown_scale(res: dict) -> str:
    lines = ["# Scale: KB build and search cost as the KB grows", "", f"Command: `{res['command']}` "
             f"(commit {res.get('git_commit')}). {res['note']}.", "",
             "| entities | KB build s | build ent/s | KB bytes/entity | BM25 p50 ms | engine | index build s | search p50 ms | "
             "batched ms/query | recall@20 | index bytes/entity | x vs numpy |",
             "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        for s in r["search"]:
            lines.append(f"| {r['entities']:,} | {r['kb_build_s']} | {r['kb_build_entities_per_s']:,} | "
                         f"{r['kb_bytes_per_entity']:,} | {r['bm25_ms_p50']} | {s['engine']} | {s['build_s']} | {s['query_ms_p50']} | "
                         f"{s['batched_ms_per_query']} | {s['recall@20_vs_exact']} | {s['index_bytes_per_entity']:,} | "
                         f"{s['speedup_vs_numpy']} |")
    if "encoder" in res:
        e = res["encoder"]
        lines += ["", f"Text encoder {e['model']} ({e['preset']} preset): {e['entities_per_s']} names/s on "
                      f"{e['names']:,} names."]
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_quality(res: dict, out: Path) -> list[Path]:
    plt = _plt()
    paths = []
    datasets = list(res["datasets"])
    linkers = list(dict.fromkeys(r["linker"] for r in res["subset_rows"]))
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / max(len(linkers), 1)
    for j, spec in enumerate(linkers):
        vals = [next((r["hits@1"] for r in res["subset_rows"] if r["dataset"] == d and r["linker"] == spec), 0)
                for d in datasets]
        ax.bar(np.arange(len(datasets)) + j * width, vals, width, label=spec)
    ax.set_xticks(np.arange(len(datasets)) + width * (len(linkers) - 1) / 2)
    ax.set_xticklabels([f"{d}\n(first {res['datasets'][d]['generative_subset']:,} dev)" for d in datasets])
    ax.set_ylabel("Hits@1")
    ax.set_ylim(0, 1)
    ax.set_title(f"Hits@1 per linker, same mentions for every linker ({res.get('preset')} preset)")
    ax.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    paths.append(out / "quality.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    rows = [r for r in res["rows"] if r["dataset"] == datasets[0]]
    stages = [s for s in dict.fromkeys(s for r in rows for s in r["stage_ms_mean"]) if s != "total"]
    colors = plt.get_cmap("tab20").colors
    names = [r["linker"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    a1.barh(names, [r["stage_ms_mean"].get("total", 0.0) for r in rows], color="tab:gray")
    a1.set_xscale("log")
    a1.set_xlabel("mean ms per mention (log)")
    a1.set_title(f"Latency on {datasets[0]} dev")
    left = np.zeros(len(rows))
    for i, s in enumerate(stages):  # each linker's time split by stage, as shares (linear)
        totals = np.array([max(r["stage_ms_mean"].get("total", 0.0), 1e-9) for r in rows])
        share = np.array([r["stage_ms_mean"].get(s, 0.0) for r in rows]) / totals
        a2.barh(names, share, left=left, label=s, color=colors[i % len(colors)])
        left += share
    a2.set_xlim(0, 1)
    a2.set_yticklabels([])
    a2.set_xlabel("share of the time per stage")
    a2.set_title("Where the time goes")
    a2.legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    paths.append(out / "latency_stages.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def plot_ablations(res: dict, out: Path) -> list[Path]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [f"{r['variant']} (n={r['n']:,})" for r in res["rows"]]
    ax.barh(labels[::-1], [r["hits@1"] for r in res["rows"]][::-1], color="tab:blue")
    ax.set_xlim(0, 1)
    ax.set_xlabel("Hits@1")
    ax.set_title(f"Ablations on {res['dataset']} dev")
    fig.tight_layout()
    path = out / "ablations.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_scale(res: dict, out: Path) -> list[Path]:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = [r["entities"] for r in res["rows"]]
    a1.plot(sizes, [r["kb_build_s"] for r in res["rows"]], "o-", label="KB build (s)")
    a1.plot(sizes, [r["bm25_ms_p50"] / 1000 for r in res["rows"]], "s-", label="BM25 query (s, p50)")
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_xlabel("entities")
    a1.set_title("KB build and BM25 search")
    a1.legend(fontsize=8)
    for engine in dict.fromkeys(s["engine"] for r in res["rows"] for s in r["search"]):
        pts = [(r["entities"], s["query_ms_p50"]) for r in res["rows"] for s in r["search"] if s["engine"] == engine]
        a2.plot(*zip(*pts), "o-", label=engine)
    a2.set_xscale("log")
    a2.set_yscale("log")
    a2.set_xlabel("entities")
    a2.set_ylabel("ms per query (p50)")
    a2.set_title(f"Dense top-20 search ({res['dim']} dims)")
    a2.legend(fontsize=8)
    fig.tight_layout()
    path = out / "scale.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


RENDER = {"quality": (markdown_quality, plot_quality), "ablations": (markdown_ablations, plot_ablations),
          "scale": (markdown_scale, plot_scale), "reference": (markdown_reference, lambda res, out: [])}


def write_results(res: dict, out: Path) -> list[Path]:
    """bench_{kind}.json + .md + PNG plots under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    kind = res["kind"]
    paths = [out / f"bench_{kind}.json", out / f"bench_{kind}.md"]
    save_json(paths[0], res)
    markdown, plot = RENDER[kind]
    paths[1].write_text(markdown(res), encoding="utf-8")
    paths += plot(res, out)
    return paths


def cmd_report(args, argv) -> None:
    out = Path(args.out)
    found = False
    for kind in RENDER:
        path = out / f"bench_{kind}.json"
        if path.exists():
            found = True
            for p in write_results(json.loads(path.read_text(encoding="utf-8")), out):
                print(f"wrote {p}")
    if not found:
        raise InputError(f"no bench_*.json under {out}: run `python -m mel bench quality|ablations|scale` first")


# -- CLI ---------------------------------------------------------------------------------------------
def _run(args) -> None:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    argv = sys.argv[sys.argv.index("bench") + 1:] if "bench" in sys.argv else []
    if args.bench_command == "report":
        cmd_report(args, argv)
        return
    runs = {"quality": bench_quality, "ablations": bench_ablations, "scale": bench_scale, "reference": bench_reference}
    for kind in (list(runs) if args.bench_command == "all" else [args.bench_command]):
        res = runs[kind](args, argv)
        for p in write_results(res, Path(args.out)):
            print(f"wrote {p}")


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: quality, ablations, scale; JSON + Markdown + PNG under results/")
    kinds = bench.add_subparsers(dest="bench_command", required=True)

    def common(p, data: bool = True):
        p.add_argument("--out", default="results", help="where the JSON, Markdown and PNG files go")
        p.add_argument("--preset", default="offline")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=1,
                       help="torch threads (default 1: on a shared CPU more threads wait on each other)")
        p.add_argument("--progress", action="store_true", help="progress bars")
        if data:
            p.add_argument("--data-root", default="../shared/data", help="folder holding wikimel/, richpedia/, wikidiverse/")
            p.add_argument("--kb-dir", default="data", help="folder of the KBs {format}.sqlite (built when missing)")
            p.add_argument("--generative-limit", type=int, default=200,
                           help="GEMEL linkers on the first N dev mentions (0 = all; ~1 s per mention on a CPU)")
        p.set_defaults(func=_run)

    def quality_args(p):
        p.add_argument("--datasets", default=",".join(DATASETS))
        p.add_argument("--linkers", default=",".join(LINKERS), help="comma-separated; options as name:key=value")
        p.add_argument("--limit", type=count_arg, default=None, help="only the first N dev mentions for every linker")

    def ablation_args(p):
        p.add_argument("--dataset", default="wikimel")

    def scale_args(p):
        p.add_argument("--sizes", default="10000,100000,1000000")
        p.add_argument("--engines", default="numpy,faiss-flat,faiss-ivf,faiss-hnsw")
        p.add_argument("--dim", type=int, default=384)
        p.add_argument("--queries", type=int, default=30)
        p.add_argument("--encoder-names", type=int, default=2000, help="text-encoder throughput on N names (0: skip)")

    p = kinds.add_parser("quality", help="every linker on every dev split")
    quality_args(p)
    common(p)
    p = kinds.add_parser("ablations", help="image, expert cue, number of demonstrations, trie vs free generation")
    ablation_args(p)
    common(p)
    p = kinds.add_parser("scale", help="KB build and search cost at growing KB sizes (synthetic entities)")
    scale_args(p)
    common(p, data=False)
    p = kinds.add_parser("reference", help="achieved fraction of the machine: LLM vs plain forward, search vs matmul")
    ablation_args(p)
    common(p)
    p = kinds.add_parser("all", help="quality, ablations, scale and reference in turn: all of results/ in one command")
    for add in (quality_args, ablation_args, scale_args):
        add(p)
    common(p)
    p = kinds.add_parser("report", help="re-render Markdown and PNG from the bench_*.json under --out")
    p.add_argument("--out", default="results")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=_run)


