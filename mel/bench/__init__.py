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

    provenance.py  checksums, the run's facts (mel.cli_kit.provenance), the JSON file
    synthetic.py   clustered vectors, queries near them, made-up entities (the scale run)
    measure.py     peak RSS, median call time, dense search engines side by side
    runs.py        quality, reference, ablations, scale: each returns its result dict
    report.py      Markdown + PNG from the JSON alone
    cli.py         `python -m mel bench ...`
"""
from .measure import PeakRSS, p50_ms, search_engines
from .provenance import kb_files, run_meta, save_json, seed_everything, sha256_paths
from .runs import evaluate_spec, is_generative, open_kb, parse_linker
from .synthetic import RandomEncoder, synthetic_entities, synthetic_queries, synthetic_vectors

__all__ = ["PeakRSS", "p50_ms", "search_engines", "kb_files", "run_meta", "save_json", "seed_everything",
           "sha256_paths", "evaluate_spec", "is_generative", "open_kb", "parse_linker", "RandomEncoder",
           "synthetic_entities", "synthetic_queries", "synthetic_vectors"]
