"""Benchmark batch linking on Ray Data.

    RAY_AUTH_MODE=token MEL_THREADS=1 python bench/bench_batch.py --sections scaling,growth

Sections (each result is merged into results/bench_batch.json; the plot is results/bench_batch.png):
  scaling  mentions/s of dense and DIM in 1 process (Linker.pipe, no Ray) and on a local 2-worker Ray
           cluster (a head and a `ray start --address` worker, 1 CPU each, on this machine), the same
           input, side by side in one run: the ratio and the scaling efficiency (ratio / 2)
  growth   wall time of `batch link` on the 2-worker cluster as the input grows (--growth-sizes for
           bm25/dense, --dim-sizes for DIM), with the load average when each job ended (shared machine)
Synthetic data: a KB of --kb-size entities with made-up names, mentions that name them in captions.
The pieces for 10M-entity KBs (the faiss-ivfpq index, the streamed KB build's memory) are measured by
bench/bench_index_scale.py.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
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


GROWTH_NOTE = (
    "wall_s = `batch link` wall seconds (Ray join, actor start, model loading, reading, linking, writing Parquet) on "
    "the local 2-worker cluster, KB of --kb-size synthetic entities, --part-size max(1000, n/50). The machine is "
    "shared: load_average (1, 5, 15 min, at the end of each job) says how busy it was; rows with similar loads "
    "compare best. The plot's dashed line is cost proportional to n through the largest point.")


def section_growth(args, tmp: Path, cluster, out: dict):
    kb = build_kb(tmp, args.kb_size)
    growth = out.setdefault("growth", {"rows": []})
    growth["note"] = GROWTH_NOTE
    rows = growth["rows"]
    plan = [(linker, n) for n in args.growth_sizes for linker in ("bm25", "dense")]
    plan += [("dim", n) for n in args.dim_sizes]
    for linker, n in plan:
        mentions = write_mentions(tmp / f"growth-{n}.jsonl", n, args.kb_size) if not (tmp / f"growth-{n}.jsonl").exists() \
            else tmp / f"growth-{n}.jsonl"
        s = cli("link", "--kb", kb, "--linker", linker, "--input", mentions, "--output", tmp / f"g-{linker}-{n}",
                "--preset", "offline", "--address", cluster.address, "--num-workers", "2",
                "--part-size", str(max(1000, n // 50)))
        row = {"linker": linker, "n": n, "wall_s": s["seconds"], "mentions_per_s": s["mentions_per_s"],
               "steady_mentions_per_s": s.get("steady_mentions_per_s"), "first_result_s": s.get("first_result_s"),
               "load_average": [round(x, 2) for x in os.getloadavg()]}
        print(json.dumps(row), flush=True)
        rows[:] = [r for r in rows if (r["linker"], r["n"]) != (linker, n)] + [row]
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
    n_max, s_max = max((r["n"], r["wall_s"]) for r in rows)
    n_min = min(r["n"] for r in rows if r["n"] * 100 >= n_max)
    ax.loglog([n_min, n_max], [s_max * n_min / n_max, s_max], "--", color="grey", lw=1, label="proportional to n")
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
    p.add_argument("--sections", default="scaling,growth")
    p.add_argument("--kb-size", type=int, default=5000)
    p.add_argument("--scaling-n", type=int, default=4000, help="mentions for the dense scaling ratio")
    p.add_argument("--dim-scaling-n", type=int, default=300, help="mentions for the DIM scaling ratio")
    p.add_argument("--growth-sizes", default="10000,100000,1000000")
    p.add_argument("--dim-sizes", default="300,1000,3000")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--json", default=str(REPO / "results" / "bench_batch.json"))
    p.add_argument("--plot", default=str(REPO / "results" / "bench_batch.png"))
    args = p.parse_args()
    args.growth_sizes = [int(x) for x in args.growth_sizes.split(",") if x]
    args.dim_sizes = [int(x) for x in args.dim_sizes.split(",") if x]
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
    save(args, out)


if __name__ == "__main__":
    main()
