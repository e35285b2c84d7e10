"""Benchmark GEMEL on the offline preset: link latency and quality against the baselines.

    python bench/bench_gemel.py --kb data/wikimel.sqlite --limit 300 --latency-n 30 --json results/bench_gemel.json

Prints
  * latency: one GEMEL link (whole-KB trie, k=4 demonstrations, 5 beams) on this CPU: p50/p95 over
    `--latency-n` dev mentions after one warm-up, the share of time per stage (retrieve, image,
    prompt, prefill, decode, map) and tokens/s (prompt prefill, decoding, overall); target p50 < 2 s;
  * quality: Hits@1/5 and MRR of gemel (whole-KB trie, the paper), gemel+dense (dense top-20 scored
    by the LLM and fused with the dense scores), gemel with BM25 candidates (`gemel:candidates=bm25`)
    and the bm25 and dense baselines on the same first `--limit` mentions of the dev split,
    whole-KB protocol, with n and the KB size. A linker is `name[:key=value,...]` (linker options).
  * `--tune N`: how the fusion defaults were chosen: N random TRAIN mentions (each one's own
    example excluded from its demonstrations), every hybrid (bm25 + dense) top-20 candidate scored
    by the LLM once, then a grid over llm_weight and the retrievers' temperatures for each
    candidate source; prints the accuracy of every setting and of the defaults.
`--format/--data/--kb` select another dataset (RichpediaMEL, WikiDiverse); the demonstration pool
is that dataset's train split. The machine's load average is printed with the figures: on a shared
CPU, latency depends on it. `--threads` sets torch's intra-op threads (default: the library's choice, see mel.cli_kit; on a CPU
shared with other jobs pass 1: 2 threads wait on each other at every op and decoding gets many
times slower).
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from mel.bench import parse_linker, save_json
from mel.cli_kit import (
    add_preset_args,
    add_threads_arg,
    apply_threads,
    check_output_file,
    load_average,
    resolve_preset,
    script_command,
)
from mel.paths import REPO_ROOT

STAGES = ("retrieve", "candidates", "image", "prompt", "prefill", "decode", "map")
DEFAULT_LINKERS = "gemel gemel+dense gemel:candidates=bm25 bm25 dense"
GRID = {"llm_weight": (0.25, 0.5, 1.0, 2.0), "temperature_bm25": (1.0, 2.0, 5.0), "temperature_dense": (0.02, 0.05, 0.1)}
DIM_GRID = {"llm_weight": (0.0, 0.1, 0.25, 0.5, 1.0), "temperature_dim": (0.5, 1.0, 2.0, 4.0)}


def bench_latency(kb, preset, examples, pool_data, pool_format, n: int, n_demos: int, linker_name: str = "gemel") -> dict:
    from mel.linkers import build_linker
    linker = build_linker(linker_name, kb, preset, pool_data=pool_data, pool_format=pool_format, n_demos=n_demos)
    linker.link(examples[0].mention)  # warm-up: first-call allocations, trie and caches
    totals, stages, decode = [], {s: 0.0 for s in STAGES}, []
    for ex in examples[1:n + 1]:
        r = linker.link(ex.mention)
        totals.append(r.timings["total"])
        for s in STAGES:
            stages[s] += r.timings.get(s, 0.0)
        decode.append(r.details.decode)
    total_ms = sum(totals)
    prompt_tok = sum(d["prompt_tokens"] for d in decode)
    fwd_tok = sum(d["forwarded_tokens"] for d in decode)
    prefill_s = sum(d["prefill_ms"] for d in decode) / 1000
    decode_s = sum(d["decode_ms"] for d in decode) / 1000
    return {"linker": linker_name, "n": len(totals), "n_demos": n_demos, "num_beams": linker.decode_config.num_beams,
            "p50_ms": round(float(np.percentile(totals, 50)), 1), "p95_ms": round(float(np.percentile(totals, 95)), 1),
            "mean_ms": round(total_ms / len(totals), 1), "target_p50_ms": 2000,
            "meets_target": float(np.percentile(totals, 50)) < 2000,
            "stage_share": {s: round(stages[s] / total_ms, 3) for s in STAGES if stages[s] > 0},
            "stage_mean_ms": {s: round(stages[s] / len(totals), 1) for s in STAGES if stages[s] > 0},
            "mean_prompt_tokens": round(prompt_tok / len(totals), 1),
            "mean_decode_steps": round(sum(d["steps"] for d in decode) / len(totals), 1),
            "prefill_tokens_per_s": round(prompt_tok / prefill_s, 1),
            "decode_tokens_per_s": round(fwd_tok / decode_s, 1),
            "tokens_per_s": round((prompt_tok + fwd_tok) / (prefill_s + decode_s), 1)}


def bench_quality(kb, preset, examples, linkers: list[str], pool_data, pool_format, n_demos: int) -> list[dict]:
    from mel.evaluate import evaluate
    from mel.linkers import build_linker
    rows = []
    for spec in linkers:
        name, options = parse_linker(spec)
        if name.startswith("gemel"):
            options = {"pool_data": pool_data, "pool_format": pool_format, "n_demos": n_demos, **options}
        linker = build_linker(name, kb, preset, **options)
        report = evaluate(linker, examples, progress=False)
        row = {k: report[k] for k in ("n", "kb_size", "hits@1", "hits@5", "hits@10", "hits@20", "mrr", "latency_ms_p50")}
        rows.append({"linker": spec, **row})
        print(f"  {spec:<24} n={report['n']} H@1 {report['hits@1']:.4f}  H@5 {report['hits@5']:.4f}  "
              f"MRR {report['mrr']:.4f}  p50 {report['latency_ms_p50']} ms", flush=True)
    return rows


def train_sample_scores(kb, preset, data: str, fmt: str, n: int, n_demos: int, seed: int, linker_name: str,
                        sources: tuple[str, ...], **options) -> list[tuple[str, list[tuple]]]:
    """N random TRAIN mentions (each one's own example kept out of its demonstrations), each with its
    candidates as (id, LLM sequence log-prob, score of each source or None): what the grids fuse."""
    import random

    from mel.datasets import load_dataset
    from mel.linkers import build_linker
    train = load_dataset(fmt, data, "train").examples
    sample = random.Random(seed).sample(train, min(n, len(train)))
    linker = build_linker(linker_name, kb, preset, pool=train, n_demos=n_demos, fuse=False, **options)
    rows = []
    for ex in sample:
        r = linker.link(ex.mention, exclude_sample_id=ex.sample_id)
        llm = {c.entity.id: c.score for c in r.candidates}  # sequence log-prob (length_penalty 0)
        rows.append((ex.gold_id, [(x.id, llm[x.id], *(x.retrievers.get(src) for src in sources))
                                  for x in r.details.retriever or [] if x.id in llm]))
    return rows


def tune_fusion(kb, preset, data: str, fmt: str, n: int, n_demos: int, seed: int = 0) -> dict:
    """Grid-search the fusion weights on N random train mentions (never dev)."""
    import itertools

    from mel.gemel.linker import FUSION_DEFAULTS, _log_softmax
    rows = train_sample_scores(kb, preset, data, fmt, n, n_demos, seed, "gemel", ("bm25", "dense"), candidates="hybrid")

    def accuracy(source: str, w: float, tb: float, td: float) -> float:
        hits = 0
        for gold, cands in rows:
            cands = [c for c in cands if (source == "hybrid" or c[2 if source == "bm25" else 3] is not None)]
            if not cands:
                continue
            fused = w * _log_softmax(np.array([c[1] for c in cands]))
            for col, t in ((2, tb), (3, td)):
                present = [c[col] for c in cands if c[col] is not None]
                if present and source in ("hybrid", "bm25" if col == 2 else "dense"):
                    # as in GemelLinker._fuse: absent from a retriever's top_k -> its lowest score
                    fused = fused + _log_softmax(np.array([c[col] if c[col] is not None else min(present)
                                                           for c in cands]) / t)
            hits += cands[int(np.argmax(fused))][0] == gold
        return hits / len(rows)

    out = {"n": len(rows), "split": "train", "seed": seed, "sources": {}}
    for source in ("bm25", "dense", "hybrid"):
        grid = []
        for w, tb, td in itertools.product(*GRID.values()):
            unused = (source == "bm25" and td != GRID["temperature_dense"][0]) or \
                     (source == "dense" and tb != GRID["temperature_bm25"][0])
            if unused:
                continue  # that temperature plays no part for this source
            grid.append({"llm_weight": w, "temperature_bm25": tb, "temperature_dense": td,
                         "accuracy": accuracy(source, w, tb, td)})
        best = max(grid, key=lambda g: g["accuracy"])
        t_bm25, t_dense = FUSION_DEFAULTS["temperature_bm25"], FUSION_DEFAULTS["temperature_dense"]
        out["sources"][source] = {"retriever_only": accuracy(source, 0.0, t_bm25, t_dense),
                                  "llm_only": accuracy(source, 1.0, 1e9, 1e9),
                                  "defaults": accuracy(source, FUSION_DEFAULTS["llm_weight"], t_bm25, t_dense),
                                  "best": best, "grid": grid}
        s = out["sources"][source]
        print(f"  {source:<7} retriever alone {s['retriever_only']:.4f}, LLM alone {s['llm_only']:.4f}, fused with the "
              f"defaults {s['defaults']:.4f}; best {best['accuracy']:.4f} at llm_weight={best['llm_weight']}, "
              f"T_bm25={best['temperature_bm25']}, T_dense={best['temperature_dense']}", flush=True)
    return out


def tune_dim_fusion(kb, preset, data: str, fmt: str, n: int, n_demos: int, seed: int = 0) -> dict:
    """Grid-search gemel+dim's llm_weight and temperature_dim on N random train mentions (never dev)."""
    import itertools

    from mel.gemel.linker import FUSION_DEFAULTS, _log_softmax
    rows = train_sample_scores(kb, preset, data, fmt, n, n_demos, seed, "gemel+dim", ("dim",))

    def accuracy(w: float, t: float) -> float:
        hits = 0
        for gold, cands in rows:
            if cands:
                fused = w * _log_softmax(np.array([c[1] for c in cands])) + _log_softmax(np.array([c[2] for c in cands]) / t)
                hits += cands[int(np.argmax(fused))][0] == gold
        return hits / len(rows)

    grid = [{"llm_weight": w, "temperature_dim": t, "accuracy": accuracy(w, t)}
            for w, t in itertools.product(*DIM_GRID.values())]
    # ties go to the smaller LLM weight (the simpler model), then to the temperature nearer 1
    best = max(grid, key=lambda g: (g["accuracy"], -g["llm_weight"], -abs(np.log(g["temperature_dim"]))))
    out = {"n": len(rows), "split": "train", "dataset": fmt, "seed": seed,
           "dim_only": accuracy(0.0, 1.0), "llm_only": accuracy(1.0, 1e9),
           "defaults": accuracy(FUSION_DEFAULTS["llm_weight"], FUSION_DEFAULTS["temperature_dim"]),
           "best": best, "grid": grid}
    print(f"  dim     DIM alone {out['dim_only']:.4f}, LLM alone {out['llm_only']:.4f}, fused with the defaults "
          f"{out['defaults']:.4f}; best {best['accuracy']:.4f} at llm_weight={best['llm_weight']}, "
          f"T_dim={best['temperature_dim']}", flush=True)
    for g in grid:
        print(f"    llm_weight {g['llm_weight']:<5} T_dim {g['temperature_dim']:<4} {g['accuracy']:.4f}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--format", default="wikimel")
    p.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data" / "wikimel"))
    p.add_argument("--kb", default=str(REPO_ROOT / "data" / "wikimel.sqlite"))
    p.add_argument("--split", default="dev")
    add_preset_args(p)
    p.add_argument("--limit", type=int, default=300, help="dev mentions for the quality comparison (0: all)")
    p.add_argument("--latency-n", type=int, default=30, help="links timed for the latency figures (0: skip)")
    p.add_argument("--n-demos", type=int, default=4)
    p.add_argument("--linkers", default=DEFAULT_LINKERS, help="space-separated linkers to compare, each "
                   "name[:key=value,...] ('' to skip)")
    add_threads_arg(p)
    p.add_argument("--tune", type=int, default=0, help="tune the fusion weights on N random train mentions (0: skip)")
    p.add_argument("--tune-dim", type=int, default=0, help="tune gemel+dim's fusion on N random train mentions (0: skip)")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)

    if args.json:
        check_output_file(args.json)
    apply_threads(args.threads)
    import torch

    from mel.datasets import load_dataset
    from mel.kb import KnowledgeBase

    kb = KnowledgeBase(args.kb)
    preset = resolve_preset(args)
    examples = load_dataset(args.format, args.data, args.split, unlocated="context").examples  # as `mel eval`
    examples = examples[: args.limit] if args.limit else examples
    out = {"dataset": args.format, "split": args.split, "kb": Path(args.kb).name, "kb_size": kb.size,
           "preset": preset.name, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "python": platform.python_version(), "load_avg_before": load_average(), "command": script_command(__file__, argv),
           "unlocated": "context"}   # mentions no rule finds in their caption: linked by their string, counted
    print(f"{args.format} {args.split}: KB {kb.size:,} entities, preset {preset.name}, {out['threads']} thread(s), "
          f"load average {out['load_avg_before']}", flush=True)
    if args.latency_n:
        t0 = time.perf_counter()
        lat = bench_latency(kb, preset, examples, args.data, args.format, args.latency_n, args.n_demos)
        out["latency"] = lat
        print(f"latency ({lat['linker']}, k={lat['n_demos']} demos, {lat['num_beams']} beams, n={lat['n']}): "
              f"p50 {lat['p50_ms']} ms, p95 {lat['p95_ms']} ms (target p50 < 2000 ms: "
              f"{'met' if lat['meets_target'] else 'NOT met'})")
        print(f"  tokens/s: prefill {lat['prefill_tokens_per_s']}, decode {lat['decode_tokens_per_s']}, overall "
              f"{lat['tokens_per_s']}; {lat['mean_prompt_tokens']} prompt tokens, {lat['mean_decode_steps']} decode steps")
        print("  share per stage: " + ", ".join(f"{s} {100 * v:.1f}%" for s, v in lat["stage_share"].items()))
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.tune:
        print(f"fusion tuning on {args.tune} random {args.format} train mentions (query excluded from its demos):",
              flush=True)
        out["tune"] = tune_fusion(kb, preset, args.data, args.format, args.tune, args.n_demos)
    if args.tune_dim:
        print(f"gemel+dim fusion tuning on {args.tune_dim} random {args.format} train mentions:", flush=True)
        out["tune_dim"] = tune_dim_fusion(kb, preset, args.data, args.format, args.tune_dim, args.n_demos)
    linkers = [x for x in args.linkers.split(";" if ";" in args.linkers else " ") if x] if args.linkers else []
    if linkers:
        print(f"quality on the first {len(examples)} {args.split} mentions (whole-KB protocol, KB {kb.size:,}):", flush=True)
        out["quality"] = bench_quality(kb, preset, examples, linkers, args.data, args.format, args.n_demos)
    out["load_avg_after"] = load_average()
    if args.json:
        save_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
