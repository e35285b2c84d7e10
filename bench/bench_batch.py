"""Benchmark batch linking on Ray Data and the pieces for 10M-entity KBs.

    RAY_AUTH_MODE=token MEL_THREADS=1 python bench/bench_batch.py --sections scaling,growth,kbbuild,ivfpq

Sections (each result is merged into results/bench_batch.json; the plot is results/bench_batch.png):
  scaling  mentions/s of dense and DIM in 1 process (Linker.pipe, no Ray) and on a local 2-worker Ray
           cluster (a head and a `ray start --address` worker, 1 CPU each, on this machine), the same
           input, side by side in one run: the ratio and the scaling efficiency (ratio / 2)
  growth   wall time of `batch link` on the 2-worker cluster as the input grows (--growth-sizes for
           bm25/dense, --dim-sizes for DIM)
  kbbuild  peak RSS of `mel kb build --format jsonl` (streamed) at two KB sizes, in child processes
  ivfpq    the faiss-ivfpq engine on synthetic unit vectors: build time, index memory, recall@20
           against exact search on 100 queries (--ivfpq "1000000x384,10000000x64")
Synthetic data: a KB of --kb-size entities with made-up names, mentions that name them in captions.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORDS = ("amber basil cedar delta ember falcon garnet harbor iris juniper kestrel lumen marble nova onyx pine "
         "quartz raven sierra tundra umber violet willow xenon yarrow zephyr").split()


def name_of(i: int) -> str:
    a, b, c = WORDS[i % 26], WORDS[(i // 26) % 26], WORDS[(i // 676) % 26]
    return f"{a.title()} {b.title()} {c.title()} {i}"


def write_kb_jsonl(path: Path, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"Q{i}", "name": name_of(i), "aliases": [f"{WORDS[i % 26]} {i}"],
                                "description": f"a made-up entity number {i}, of the {WORDS[i % 7]} kind"}) + "\n")
    return path


def write_mentions(path: Path, n: int, kb_size: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for r in range(n):
            name = name_of(rng.randrange(kb_size))
            f.write(json.dumps({"caption": f"Photo {r}: {name} at the {rng.choice(WORDS)} festival.",
                                "mention": name, "id": f"m{r}"}) + "\n")
    return path


def cli(*args, env=None, timeout=None) -> dict:
    proc = subprocess.run([sys.executable, "-m", "mel", "batch", *map(str, args), "--quiet"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout)


def single_process(kb: Path, linker: str, mentions: Path, batch_size: int = 32) -> dict:
    """The plain library: one process, Linker.pipe over the same input (models loaded first)."""
    code = f"""
import json, time, sys
from mel.kb import KnowledgeBase
from mel.linkers import build_linker
from mel.presets import get_preset
from mel.types import Mention
t0 = time.perf_counter()
linker = build_linker({linker!r}, KnowledgeBase({str(kb)!r}), get_preset("offline"))
load = time.perf_counter() - t0
ms = [json.loads(l) for l in open({str(mentions)!r})]
ms = [Mention.from_text(m["caption"], m["mention"], id=m["id"]) for m in ms]
t0 = time.perf_counter()
n = sum(1 for _ in linker.pipe(ms, k=20, batch_size={batch_size}))
dt = time.perf_counter() - t0
print(json.dumps({{"n": n, "seconds": round(dt, 2), "load_s": round(load, 2), "mentions_per_s": round(n / dt, 2)}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_kb(tmp: Path, kb_size: int) -> Path:
    kb = tmp / "kb.sqlite"
    if not kb.exists():
        write_kb_jsonl(tmp / "kb.jsonl", kb_size)
        subprocess.run([sys.executable, "-m", "mel", "kb", "build", "--format", "jsonl", "--source", tmp / "kb.jsonl",
                        "--out", kb, "--preset", "offline", "--no-images", "--quiet"], cwd=REPO, check=True)
    return kb


def section_scaling(args, tmp: Path, cluster, out: dict):
    kb = build_kb(tmp, args.kb_size)
    rows = []
    for linker, n in (("dense", args.scaling_n), ("dim", args.dim_scaling_n)):
        mentions = write_mentions(tmp / f"scaling-{linker}.jsonl", n, args.kb_size)
        single = single_process(kb, linker, mentions)
        tiny = write_mentions(tmp / f"tiny-{linker}.jsonl", 8, args.kb_size, seed=1)
        common = ["--preset", "offline", "--address", cluster.address, "--num-workers", "2"]
        # the fixed cost of a job (joining Ray, starting 2 actors, loading the KB and models), measured alone
        overhead = cli("link", "--kb", kb, "--linker", linker, "--input", tiny, "--output", tmp / f"tiny-{linker}",
                       *common, "--part-size", "4")["seconds"]
        two = cli("link", "--kb", kb, "--linker", linker, "--input", mentions, "--output", tmp / f"scale-{linker}",
                  *common, "--part-size", str(max(50, n // 20)))
        net = n / max(two["seconds"] - overhead, 1e-9)
        ratio = two["steady_mentions_per_s"] / single["mentions_per_s"]
        row = {"linker": linker, "n": n, "single_process_per_s": single["mentions_per_s"],
               "single_process_load_s": single["load_s"], "ray_2_workers_steady_per_s": two["steady_mentions_per_s"],
               "ray_2_workers_net_per_s": round(net, 2),
               "ray_2_workers_wall_per_s": two["mentions_per_s"], "ray_job_overhead_s": overhead,
               "ratio": round(ratio, 3), "scaling_efficiency": round(ratio / 2, 3)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    out["scaling"] = {"rows": rows, "cpus": os.cpu_count(), "note": (
        "ratio = Ray 2-worker steady mentions/s (rows of parts 2..N / time from the first part written to the "
        "last: without Ray join, actor start and model loading; net_per_s subtracts an 8-mention job's wall "
        "instead) / single-process Linker.pipe mentions/s (models loaded before timing); efficiency = "
        "ratio / 2. Same input, same run, same machine; both Ray nodes are on this machine")}


def section_growth(args, tmp: Path, cluster, out: dict):
    kb = build_kb(tmp, args.kb_size)
    rows = out.setdefault("growth", {"rows": []})["rows"]
    plan = [(linker, n) for n in args.growth_sizes for linker in ("bm25", "dense")]
    plan += [("dim", n) for n in args.dim_sizes]
    for linker, n in plan:
        mentions = write_mentions(tmp / f"growth-{n}.jsonl", n, args.kb_size) if not (tmp / f"growth-{n}.jsonl").exists() \
            else tmp / f"growth-{n}.jsonl"
        s = cli("link", "--kb", kb, "--linker", linker, "--input", mentions, "--output", tmp / f"g-{linker}-{n}",
                "--preset", "offline", "--address", cluster.address, "--num-workers", "2",
                "--part-size", str(max(1000, n // 50)))
        row = {"linker": linker, "n": n, "wall_s": s["seconds"], "mentions_per_s": s["mentions_per_s"],
               "steady_mentions_per_s": s.get("steady_mentions_per_s"), "first_result_s": s.get("first_result_s")}
        print(json.dumps(row), flush=True)
        rows[:] = [r for r in rows if (r["linker"], r["n"]) != (linker, n)] + [row]
        save(args, out)


def section_kbbuild(args, tmp: Path, out: dict):
    rows = []
    for n in args.kb_build_sizes:
        src = write_kb_jsonl(tmp / f"kb-{n}.jsonl", n)
        for dense in (False, True):
            cmd = [sys.executable, "-m", "mel", "kb", "build", "--format", "jsonl", "--source", src, "--out",
                   tmp / f"kb-{n}-{dense}.sqlite", "--quiet"] + (["--preset", "offline", "--no-images"] if dense
                                                                 else ["--no-dense"])
            if dense and n > args.kb_build_dense_max:
                continue
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
            _, status, usage = os.wait4(proc.pid, 0)
            if status:
                raise RuntimeError(f"kb build failed: {cmd}")
            row = {"n_entities": n, "dense": dense, "seconds": round(time.perf_counter() - t0, 1),
                   "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    out["kb_build"] = {"rows": rows, "note": "peak RSS of the whole `mel kb build` process (Python, SQLite, and "
                                              "the encoder when dense)"}


def section_ivfpq(args, tmp: Path, out: dict):
    rows = out.setdefault("ivfpq", {"rows": []})["rows"]
    for spec in args.ivfpq:
        n, d = (int(x) for x in spec.split("x"))
        code = f"""
import json, os, time, resource, numpy as np, sys
from mel.index import DenseIndex, write_vectors_file
n, d, tmp = {n}, {d}, {str(tmp)!r}
basis = np.random.default_rng(42).standard_normal((48, d)).astype(np.float32)
centres = np.random.default_rng(43).standard_normal((4096, 48)).astype(np.float32)
def synth(rows, seed):
    rng = np.random.default_rng(seed)
    x = (centres[rng.integers(0, 4096, rows)] + 0.5 * rng.standard_normal((rows, 48)).astype(np.float32)) @ basis
    x += 0.3 * rng.standard_normal((rows, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
raw, path = f"{{tmp}}/vec-{n}x{d}.f32", f"{{tmp}}/vec-{n}x{d}.safetensors"
t0 = time.perf_counter()
with open(raw, "wb") as f:
    for s in range(0, n, 200_000):
        f.write(synth(min(200_000, n - s), 1000 + s).tobytes())
write_vectors_file(path, raw, n, d, {{"encoder": "synthetic"}}); os.unlink(raw)
gen_s = time.perf_counter() - t0
def rss_mb():  # anonymous resident memory: the memory-mapped float vectors (page cache) are not counted
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon:")) / 1024
before = rss_mb()
t0 = time.perf_counter()
index, _ = DenseIndex.load(path, engine="faiss-ivfpq")
build_s = time.perf_counter() - t0
after = rss_mb()
q = synth(100, 7)
t0 = time.perf_counter(); _, got = index.search(q, 20); search_ms = (time.perf_counter() - t0) * 1000 / len(q)
vec = index.vectors
best_s = np.full((100, 20), -np.inf, np.float32); best_i = np.zeros((100, 20), np.int64)
for s in range(0, n, 500_000):
    sims = q @ np.asarray(vec[s:s + 500_000]).T
    top = np.argpartition(-sims, 19, axis=1)[:, :20]
    cs = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], 1); ci = np.concatenate([best_i, top + s], 1)
    o = np.argsort(-cs, 1)[:, :20]; best_s = np.take_along_axis(cs, o, 1); best_i = np.take_along_axis(ci, o, 1)
recall = float(np.mean([len(set(a) & set(b)) / 20 for a, b in zip(got, best_i)]))
top1 = float(np.mean([b[0] in a for a, b in zip(got, best_i)]))
mem = index.memory_bytes()
print(json.dumps({{"n": n, "dim": d, "generate_s": round(gen_s, 1), "build_s": round(build_s, 1),
    "index_memory_mb": round(mem / 2**20, 1), "rss_anon_growth_mb": round(after - before, 1),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    "float_vectors_mb_on_disk": round(n * d * 4 / 2**20, 1), "recall_at_20": round(recall, 4),
    "top1_in_top20": round(top1, 4), "search_ms_per_query": round(search_ms, 2), "rerank": index.rerank,
    "nprobe": index._faiss_index.nprobe, "nlist": index._faiss_index.nlist}}))
os.unlink(path)
"""
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows[:] = [r for r in rows if (r["n"], r["dim"]) != (n, d)] + [row]
        out["ivfpq"]["note"] = ("synthetic unit vectors near a 48-dimensional subspace in 4096 clusters; index memory = "
                                "faiss IVF-PQ structure (d/8-byte codes + list ids) + our ids; the float vectors stay "
                                "in the file (memory-mapped) and only the re-ranked shortlist is read")
        save(args, out)


def save(args, out: dict):
    from mel.paths import atomic_write
    with atomic_write(args.json) as tmp:
        tmp.write_text(json.dumps(out, indent=2), encoding="utf-8")
    plot(args, out)


def plot(args, out: dict):
    rows = out.get("growth", {}).get("rows", [])
    if not rows:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mel.paths import atomic_write
    fig, ax = plt.subplots(figsize=(6, 4))
    for linker in sorted({r["linker"] for r in rows}):
        pts = sorted((r["n"], r["wall_s"]) for r in rows if r["linker"] == linker)
        ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o-", label=linker)
    ax.set_xlabel("mentions")
    ax.set_ylabel("wall seconds (2-worker local Ray)")
    ax.set_title("batch link: cost growth with input size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    with atomic_write(args.plot) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="scaling,growth,kbbuild,ivfpq")
    p.add_argument("--kb-size", type=int, default=5000)
    p.add_argument("--scaling-n", type=int, default=4000, help="mentions for the dense scaling ratio")
    p.add_argument("--dim-scaling-n", type=int, default=300, help="mentions for the DIM scaling ratio")
    p.add_argument("--growth-sizes", default="10000,100000,1000000")
    p.add_argument("--dim-sizes", default="300,1000,3000")
    p.add_argument("--kb-build-sizes", default="50000,500000")
    p.add_argument("--kb-build-dense-max", type=int, default=50000, help="largest KB also built with embeddings")
    p.add_argument("--ivfpq", default="1000000x384,10000000x64")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--json", default=str(REPO / "results" / "bench_batch.json"))
    p.add_argument("--plot", default=str(REPO / "results" / "bench_batch.png"))
    args = p.parse_args()
    args.growth_sizes = [int(x) for x in args.growth_sizes.split(",") if x]
    args.dim_sizes = [int(x) for x in args.dim_sizes.split(",") if x]
    args.kb_build_sizes = [int(x) for x in args.kb_build_sizes.split(",") if x]
    args.ivfpq = [x for x in args.ivfpq.split(",") if x]
    os.environ.setdefault("MEL_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mel.batch.cluster import LocalCluster, token_env
    os.environ.update(token_env())
    out = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    out["machine"] = {"cpus": os.cpu_count(), "note": "shared machine; both Ray nodes on it, 1 CPU each"}
    sections = args.sections.split(",")
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        tmp = Path(tmp)
        if {"scaling", "growth"} & set(sections):
            with LocalCluster(nodes=2, cpus_per_node=1, object_store_mb=1000) as cluster:
                for name in ("scaling", "growth"):
                    if name in sections:
                        (section_scaling if name == "scaling" else section_growth)(args, tmp, cluster, out)
                        save(args, out)
        if "kbbuild" in sections:
            section_kbbuild(args, tmp, out)
            save(args, out)
        if "ivfpq" in sections:
            section_ivfpq(args, tmp, out)
    save(args, out)


if __name__ == "__main__":
    main()
