"""Benchmark DIM: latency, throughput, quality against the baselines, candidate recall, both protocols.

    python bench/bench_dim.py --format wikimel --data ../shared/data/wikimel --kb data/wikimel.sqlite \
        --preset offline --json results/bench_dim_wikimel.json

Measures, in ONE run with warm encoders:
  * latency: ranking one mention against the whole KB with `linker.link` (p50 / p95 / mean ms,
    wall clock around the call); target < 100 ms;
  * throughput: `linker.pipe` over text-only mentions (mentions/s); target >= 50;
  * quality, whole-KB protocol: Hits@1/5/10/20 and MRR of dim and of the baselines exact, bm25,
    dense on the same examples, every mention counted (`--unlocated context`, as `mel eval`)
    (target: dim Hits@1 >= 0.80 on WikiMEL dev and above every baseline);
  * DIM's candidate recall@k (is the gold among the generator's first k candidates at all);
  * DIM's candidate-list protocol (gold inside a 100-candidate list), labelled as inflated.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from mel.cli_kit import (
    add_preset_args,
    add_threads_arg,
    apply_threads,
    cap_native_threads_from_argv,
    check_output_file,
    resolve_preset,
    script_command,
)

cap_native_threads_from_argv(sys.argv)  # --threads caps the BLAS pools too: before numpy loads them

import numpy as np  # noqa: E402

from mel.bench import save_json  # noqa: E402
from mel.datasets import load_dataset  # noqa: E402
from mel.dim.candidates import candidate_recall, protocol_lists, save_candidate_lists  # noqa: E402
from mel.evaluate import evaluate  # noqa: E402
from mel.kb import KnowledgeBase  # noqa: E402
from mel.linkers import build_linker  # noqa: E402
from mel.paths import display_path  # noqa: E402
from mel.types import NOT_LOCATED  # noqa: E402

BASELINES = ("exact", "bm25", "dense")


def quality(linker, examples, batch_size: int) -> tuple[dict, list[dict]]:
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as tmp:
        report = evaluate(linker, examples, batch_size=batch_size, progress=False, predictions_path=tmp.name)
        rows = [json.loads(line) for line in open(tmp.name, encoding="utf-8")]
    Path(tmp.name).unlink(missing_ok=True)
    keep = ("n", "kb_size", "protocol", "hits@1", "hits@5", "hits@10", "hits@20", "mrr", "latency_ms_p50",
            "latency_ms_p95", "throughput_per_s", "n_gold_not_in_kb")
    return {k: report[k] for k in keep}, rows


def latency(linker, mentions, n: int) -> dict:
    times = []
    for m in mentions[:n]:
        t0 = time.perf_counter()
        linker.link(m, k=20)
        times.append((time.perf_counter() - t0) * 1000)
    t = np.asarray(times)
    return {"n": len(t), "p50_ms": round(float(np.percentile(t, 50)), 1), "p95_ms": round(float(np.percentile(t, 95)), 1),
            "mean_ms": round(float(t.mean()), 1)}


def throughput(linker, mentions, batch_size: int) -> dict:
    t0 = time.perf_counter()
    n = sum(1 for _ in linker.pipe(mentions, k=20, batch_size=batch_size))
    s = time.perf_counter() - t0
    return {"n": n, "seconds": round(s, 2), "mentions_per_s": round(n / s, 1), "batch_size": batch_size}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", default="wikimel")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--unlocated", choices=("context", "skip"), default="context",
                    help="mentions no rule finds in their caption: linked by their string with the caption as "
                         "context and counted, as `mel eval` does (default), or left out (figures before #15)")
    ap.add_argument("--kb", required=True)
    add_preset_args(ap)
    ap.add_argument("--checkpoint", default=None, help="DIM head (default: the shipped one for the preset)")
    ap.add_argument("--compare", action="append", default=[], metavar="DIR",
                    help="another DIM head to measure on the same examples (whole-KB quality only; repeatable)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N examples for the quality part")
    ap.add_argument("--latency-n", type=int, default=200, help="mentions timed one by one (0 = skip)")
    ap.add_argument("--throughput-n", type=int, default=1000, help="text-only mentions for throughput (0 = skip)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--baselines", default=",".join(BASELINES))
    ap.add_argument("--list-size", type=int, default=100, help="candidate-list protocol: list size (0 = skip)")
    add_threads_arg(ap)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    if args.json:
        check_output_file(args.json)
    apply_threads(args.threads)
    preset = resolve_preset(args)
    kb = KnowledgeBase(args.kb)
    split = load_dataset(args.format, args.data, args.split, unlocated=args.unlocated)
    examples = split.examples[: args.limit] if args.limit else split.examples
    text_only = [ex.mention for ex in split.examples if not ex.mention.image and ex.located != NOT_LOCATED]
    opts = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    dim = build_linker("dim", kb, preset, keep_pool=True, **opts)
    out = {"dataset": args.format, "split": args.split, "unlocated": args.unlocated, "kb": kb.path.name,
           "kb_size": kb.size, "n": len(examples),
           "preset": preset.name, "checkpoint": display_path(dim.checkpoint), "command": script_command(__file__, argv)}

    for m in text_only[:5]:  # warm-up: load the encoders, fill caches
        dim.link(m)
    if args.latency_n > 0:
        out["latency_one_mention"] = latency(dim, text_only, args.latency_n)
        print(f"latency (one mention vs {kb.size:,} entities): {out['latency_one_mention']}", flush=True)
    if args.throughput_n > 0:
        out["throughput_text_only"] = throughput(dim, text_only[: args.throughput_n], args.batch_size)
        print(f"throughput (text-only): {out['throughput_text_only']}", flush=True)

    out["quality"] = {}
    for name in [b for b in args.baselines.split(",") if b]:
        out["quality"][name], _ = quality(build_linker(name, kb, preset), examples, args.batch_size)
        print(f"{name}: {out['quality'][name]}", flush=True)
    for other in args.compare:
        name = f"dim ({display_path(other)})"
        out["quality"][name], _ = quality(build_linker("dim", kb, preset, checkpoint=other), examples, args.batch_size)
        print(f"{name}: {out['quality'][name]}", flush=True)
    out["quality"]["dim"], rows = quality(dim, examples, args.batch_size)
    print(f"dim: {out['quality']['dim']}", flush=True)

    pools = [r["details"]["pool"] or [] for r in rows]  # DimDetails.pool, as the predictions file writes it
    out["dim_candidate_recall"] = candidate_recall(pools, [ex.gold_id if ex.gold_id in kb else None for ex in examples],
                                                   ks=(1, 10, 20, 50, 100))
    print(f"dim candidate recall: {out['dim_candidate_recall']}", flush=True)
    baselines = [(v["hits@1"], k) for k, v in out["quality"].items() if not k.startswith("dim")]
    best_baseline = max(baselines) if baselines else (0, "")
    out["dim_above_every_baseline"] = out["quality"]["dim"]["hits@1"] > best_baseline[0]

    if args.list_size:
        lists, _ = protocol_lists(kb, examples, preset, size=args.list_size)  # as `python -m mel dim candidates`
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "lists.jsonl"
            save_candidate_lists(lists, path)
            listed = build_linker("dim", kb, preset, protocol="candidate-list", candidate_file=str(path), **opts)
            report, _ = quality(listed, examples, args.batch_size)
        report["protocol"] = f"candidate-list (DIM's: gold inside a {args.list_size}-candidate list; inflated)"
        out["quality"]["dim (candidate-list protocol)"] = report
        print(f"dim, candidate-list protocol: {report}", flush=True)

    print()
    print(f"| {args.format} {args.split} (n={len(examples)}, KB {kb.size:,}) | H@1 | H@5 | H@10 | H@20 | MRR |")
    print("|---|---|---|---|---|---|")
    for name, q in out["quality"].items():
        print(f"| {name} | {q['hits@1']:.4f} | {q['hits@5']:.4f} | {q['hits@10']:.4f} | {q['hits@20']:.4f} | {q['mrr']:.4f} |")
    if args.json:
        save_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
