"""Benchmark the offline preset's text encoder and LLM: MiniLM speed and SmolLM2 load times.

    python bench/bench_backends.py --json results/bench_backends.json
    MEL_THREADS=1 python -m bench.bench_backends --texts 512

Prints:
  * MiniLM (all-MiniLM-L6-v2, packaged): its load time (the transformers import apart), then entities per second on --texts synthetic
    ~30-word entity texts ("name. description", as a KB holds them), batch --batch-size, after a
    warm-up; and what that means for WikiMEL's 18,880 entities;
  * SmolLM2-135M (packaged GGUF): ensure_converted_smollm2 (converting the GGUF into a transformers
    checkpoint when no converted copy is cached: tens of seconds, once per machine), the first
    load_causal_lm("smollm2") of this process, and a second one (from the converted copy again).
Figures depend on the machine and its load: the JSON records both (provenance).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from mel.bench import save_json
from mel.cli_kit import check_output_file, provenance, script_command

WIKIMEL_ENTITIES = 18_880
WORDS = "born city football player politician engineer river museum album band singer french".split()


def entity_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"Entity {i}. " + " ".join(rng.choice(WORDS, size=28)) for i in range(n)]


def bench_minilm(n_texts: int, batch_size: int) -> dict:
    import torch

    from mel.backends.text import load_text_encoder

    t0 = time.perf_counter()
    import transformers  # noqa: F401  (its import is timed apart from the model load)
    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    encoder = load_text_encoder("minilm")
    load_s = time.perf_counter() - t0
    texts = entity_texts(n_texts)
    encoder.encode(texts[:batch_size], batch_size=batch_size)  # warm-up
    t0 = time.perf_counter()
    encoder.encode(texts, batch_size=batch_size)
    encode_s = time.perf_counter() - t0
    rate = n_texts / encode_s
    return {"model": "minilm", "transformers_import_s": round(import_s, 2), "load_s": round(load_s, 2), "texts": n_texts, "batch_size": batch_size,
            "threads": torch.get_num_threads(), "encode_s": round(encode_s, 2), "entities_per_s": round(rate, 1),
            "wikimel_estimate_s": round(WIKIMEL_ENTITIES / rate, 1)}


def bench_smollm2() -> dict:
    from mel.backends import llm
    from mel.paths import cache_dir

    converted_before = llm._conversion_complete(cache_dir("models") / llm.SMOLLM2_CACHE_NAME, llm.smollm2_gguf_path())
    t0 = time.perf_counter()
    llm.ensure_converted_smollm2()
    convert_s = time.perf_counter() - t0
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        lm = llm.load_causal_lm("smollm2")
        times.append(time.perf_counter() - t0)
        del lm
    return {"model": "smollm2", "converted_this_run": not converted_before, "ensure_converted_s": round(convert_s, 2),
            "first_load_s": round(times[0], 2), "cached_load_s": round(times[1], 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=256, help="entity texts to encode (default 256)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--skip-llm", action="store_true", help="MiniLM only")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.json:
        check_output_file(args.json)
    results = provenance(script_command(__file__, argv))
    m = results["minilm"] = bench_minilm(args.texts, args.batch_size)
    print(f"MiniLM: loaded in {m['load_s']} s (importing transformers: {m['transformers_import_s']} s); {m['entities_per_s']:.0f} entities/s on {m['threads']} threads "
          f"(batch {m['batch_size']}) -> {WIKIMEL_ENTITIES:,} entities in ~{m['wikimel_estimate_s']:.0f} s")
    if not args.skip_llm:
        s = results["smollm2"] = bench_smollm2()
        print(f"SmolLM2: ensure_converted {s['ensure_converted_s']} s "
              f"({'converted now' if s['converted_this_run'] else 'converted copy already cached'}); "
              f"load_causal_lm first {s['first_load_s']} s, again {s['cached_load_s']} s")
    if args.json:
        save_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
