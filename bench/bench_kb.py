"""Benchmark the knowledge base: build time of a real KB and dense search at scale.

    python bench/bench_kb.py --wikimel ../shared/data/wikimel --rows 1000000 --json results/bench_kb.json

Prints, against the foundation targets:
  * building the WikiMEL KB (entities + FTS5 + text embeddings, offline preset): target < 120 s;
  * dense top-20 search over N synthetic unit vectors (the offline text encoder's 384 dims), per
    query, for each engine; target < 50 ms at 1,000,000 rows. The baseline in the same run is the
    brute-force matrix product (`numpy`), whose results also give each engine's recall@20.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from mel.bench import save_json, search_engines, synthetic_queries, synthetic_vectors
from mel.cli_kit import add_preset_args, check_output_file, resolve_preset, script_command


def bench_build(source: str, preset) -> dict:
    from mel.datasets import read_kb_entities
    from mel.kb import build_kb

    t0 = time.perf_counter()
    encoder = preset.backend("text_encoder")
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        kb = build_kb(read_kb_entities("wikimel", source), Path(tmp) / "wikimel.sqlite", text_encoder=encoder,
                      source_format="wikimel", progress=False)
        build_s = time.perf_counter() - t0
        size = kb.size
    return {"kb": "wikimel", "n_entities": size, "preset": preset.name, "encoder_load_s": round(load_s, 2),
            "build_s": round(build_s, 2), "entities_per_s": round(size / build_s, 1), "target_s": 120,
            "meets_target": build_s < 120}


def bench_search(rows: int, dim: int, engines: list[str], n_queries: int, k: int = 20) -> list[dict]:
    """The search part of `python -m mel bench scale` at one size, with the < 50 ms target."""
    vectors = synthetic_vectors(rows, dim)
    out = search_engines(vectors, synthetic_queries(vectors, n_queries), engines, k)
    for r in out:
        r.update({"target_ms": 50, "meets_target": r["query_ms_p50"] < 50})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wikimel", help="WikiMEL directory (skip the build benchmark when absent)")
    add_preset_args(p)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--engines", default="numpy,faiss-flat,faiss-ivf")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.json:
        check_output_file(args.json)
    results = {"command": script_command(__file__, argv)}
    if args.wikimel:
        results["build"] = bench_build(args.wikimel, resolve_preset(args))
        b = results["build"]
        print(f"KB build: {b['n_entities']:,} WikiMEL entities in {b['build_s']} s ({b['entities_per_s']} ent/s, "
              f"encoder load {b['encoder_load_s']} s); target < 120 s: {'met' if b['meets_target'] else 'MISSED'}")
    results["search"] = bench_search(args.rows, args.dim, args.engines.split(","), args.queries)
    for r in results["search"]:
        print(f"search {r['engine']:<11} {r['rows']:,} x {r['dim']}: p50 {r['query_ms_p50']} ms/query "
              f"(p95 {r['query_ms_p95']}; batched {r['batched_ms_per_query']} ms/query), build {r['build_s']} s, "
              f"recall@20 vs exact {r['recall@20_vs_exact']}, x{r['speedup_vs_numpy']} vs numpy; "
              f"target < 50 ms: {'met' if r['meets_target'] else 'MISSED'}")
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(f"peak RSS {results['peak_rss_mb']} MB")
    if args.json:
        save_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
