"""The runs of `python -m mel bench`: quality (every linker on every dev split), reference (achieved
fraction of the machine), ablations (the papers' questions) and scale (synthetic KBs); each returns
the result dict that report.py renders."""
from __future__ import annotations

import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..cli_kit import load_average, resolve_preset
from ..evaluate import HITS_AT as HITS
from ..evaluate import rank_metrics
from .measure import PeakRSS, p50_ms, search_engines
from .provenance import kb_files, run_meta, seed_everything, sha256_paths
from .report import markdown_reference
from .synthetic import WORDS, RandomEncoder, synthetic_entities, synthetic_queries, synthetic_vectors

DATASETS = ("wikimel", "richpedia", "wikidiverse")
LINKERS = ("exact", "bm25", "dense", "dim", "gemel+bm25", "gemel", "gemel+dense", "gemel+dim")


def parse_linker(spec: str) -> tuple[str, dict]:
    """`gemel:n_demos=16,constrained=false` -> ("gemel", {"n_demos": 16, "constrained": False})."""
    from ..linkers import parse_options
    name, _, opts = spec.partition(":")
    return name, parse_options(filter(None, opts.split(",")))


def is_generative(spec: str) -> bool:
    return spec.startswith("gemel")



# -- datasets and KBs -------------------------------------------------------------------------------
def open_kb(fmt: str, data_root: Path, kb_dir: Path, preset, progress: bool) -> tuple[object, dict]:
    """The dataset's KB from `kb_dir/{fmt}.sqlite`, built first when missing."""
    from ..kb import KnowledgeBase, build_dataset_kb
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


def evaluate_spec(spec: str, kb, preset, examples, *, fmt: str, data_dir: Path, progress: bool,
                  pool_options: dict | None = None) -> tuple[dict, list]:
    """Evaluate one linker spec; returns (row, per-mention ranks). GEMEL's demonstrations come from the
    dataset's train split, or from `pool_options` (e.g. {"pool": "pool.jsonl"}) when given."""
    from ..evaluate import evaluate
    from ..linkers import build_linker
    name, options = parse_linker(spec)
    if is_generative(name):
        options = {**(pool_options or {"pool_data": str(data_dir), "pool_format": fmt}), **options}
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
def bench_quality(args) -> dict:
    from ..datasets import load_dataset
    preset = resolve_preset(args)
    seed_everything(args.seed)
    data_root, kb_dir = Path(args.data_root), Path(args.kb_dir)
    out = {"kind": "quality", **run_meta(args, preset), "split": "dev",
           "protocol": "whole-KB ranking (a gold missing from the KB is a miss)",
           "generative_limit": args.generative_limit, "datasets": {}, "rows": [], "subset_rows": []}
    linkers = args.linkers.split(",")
    for fmt in args.datasets.split(","):
        data_dir = data_root / fmt
        split = load_dataset(fmt, data_dir, "dev", unlocated="context")  # every mention counts in n
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
    out["load_average_at_end"] = load_average()
    return out



def physical_reference(kb, preset, examples, data_dir: Path, fmt: str, n_links: int = 8) -> dict:
    """Achieved fraction of what the machine does on the same work, stage by stage."""
    import torch

    from ..linkers import build_linker
    ref: dict = {}
    # machine: memory bandwidth (a large copy) and matrix-multiply throughput
    big = np.ones(64 * 2**20 // 4, np.float32)
    dst = np.empty_like(big)
    copy_ms = p50_ms(lambda: np.copyto(dst, big), 5)
    bandwidth = 2 * big.nbytes / (copy_ms / 1000)  # read + write
    a = torch.randn(1024, 1024)  # torch, with the run's threads: the library the models use
    mm_ms = p50_ms(lambda: a @ a, 5)
    peak_flops = 2 * 1024**3 / (mm_ms / 1000)
    ref["machine_reference"] = {"copy_gb_per_s": round(bandwidth / 1e9, 2), "sgemm_gflops": round(peak_flops / 1e9, 1)}

    # dense search: the KB's text index against a bare matrix product over the same vectors
    if kb.has_dense("text"):
        index, _ = kb.dense("text")
        vectors = index.vectors
        q = np.random.default_rng(1).standard_normal((1, index.dim), dtype=np.float32)
        q /= np.linalg.norm(q)
        search_ms = p50_ms(lambda: kb.search_dense(q, k=20), 20)
        bare_ms = p50_ms(lambda: q @ vectors.T, 20)  # the same (1, d) x (d, n) product, nothing else
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
    from ..gemel.decode import prefill  # the same call as GEMEL (LM head on the last position only)
    with torch.inference_mode():
        plain_prefill_ms = p50_ms(lambda: prefill(model, model.get_input_embeddings()(ids)), 3)
        past = model(input_ids=ids.repeat(beams, 1), use_cache=True).past_key_values
        step = torch.randint(0, model.config.vocab_size, (beams, 1))

        def one_step():
            cache = past  # one decoding step for every beam on a prompt-sized cache (cache grows by one: fine)
            model(input_ids=step, past_key_values=cache, use_cache=True)
        plain_step_ms = p50_ms(one_step, 5)
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


def bench_reference(args) -> dict:
    from ..datasets import load_dataset
    preset = resolve_preset(args)
    seed_everything(args.seed)
    fmt, data_root = args.dataset, Path(args.data_root)
    examples = load_dataset(fmt, data_root / fmt, "dev", unlocated="context").examples
    kb, kb_meta = open_kb(fmt, data_root, Path(args.kb_dir), preset, args.progress)
    out = {"kind": "reference", **run_meta(args, preset), "dataset": fmt, **kb_meta}
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


def bench_ablations(args) -> dict:
    from ..datasets import load_dataset
    preset = resolve_preset(args)
    seed_everything(args.seed)
    fmt, data_root = args.dataset, Path(args.data_root)
    data_dir = data_root / fmt
    split = load_dataset(fmt, data_dir, "dev", unlocated="context")
    kb, kb_meta = open_kb(fmt, data_root, Path(args.kb_dir), preset, args.progress)
    examples = split.examples
    g = min(args.generative_limit or len(examples), len(examples))
    out = {"kind": "ablations", **run_meta(args, preset), "dataset": fmt, "split": "dev",
           **kb_meta, "data_checksum": sha256_paths([data_dir]), "n_dev_examples": len(examples),
           "generative_subset": g, "n_with_image": sum(1 for ex in examples if ex.mention.image),
           "n_with_image_in_subset": sum(1 for ex in examples[:g] if ex.mention.image), "rows": []}
    done: dict[str, tuple[dict, list]] = {}
    for question, variant, spec in ([] if getattr(args, "photos_only", False) else ABLATIONS):
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
    if args.photos:
        out["photos"] = photo_ablations(args, preset)
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return out


# -- the same questions on every photo the project has ------------------------------------------------
# WikiMEL ships 35 mention photos (train and dev), RichpediaMEL 9 entity photos, WikiDiverse none; the
# demo's examples use the photos scikit-image and matplotlib ship. Too few for a dev-split figure, so
# every one is used, each set reported on its own with its n.
PHOTO_SETS = ("wikimel", "richpedia", "demo")


def photo_variants(preset, generative: bool) -> list[tuple[str, str]]:
    """(variant, linker spec): DIM with everything, without the image, the cue, both, and each visual
    group its shipped head has; GEMEL (+bm25, the app's default) with and without visual tokens."""
    from ..dim.linker import load_head, shipped_checkpoint
    groups = load_head(shipped_checkpoint(preset.name))[0].config.visual_feature_names
    rows = [("DIM, everything", "dim"), ("DIM without the image", "dim:use_image=false"),
            ("DIM without the cue", "dim:use_cue=false"), ("DIM, text only", "dim:use_image=false,use_cue=false")]
    rows += [(f"DIM without {g}", f"dim:disable_visual={g}") for g in groups]
    if generative:
        rows += [("GEMEL+bm25 with visual tokens", "gemel+bm25"),
                 ("GEMEL+bm25 without visual tokens", "gemel+bm25:use_images=false")]
    return rows


def _photo_sets(names: list[str], data_root: Path, kb_dir: Path, preset, progress: bool):
    """(name, note, fmt, kb, kb_meta, examples, pool options) for each requested set that has photos."""
    import dataclasses

    from ..datasets import load_dataset
    for fmt in [n for n in names if n in ("wikimel", "richpedia")]:
        kb, kb_meta = open_kb(fmt, data_root, kb_dir, preset, progress)
        for split in ("train", "dev"):
            examples = load_dataset(fmt, data_root / fmt, split).examples
            if fmt == "wikimel":
                with_photo = [ex for ex in examples if ex.mention.image]
                note = f"WikiMEL {split}: every mention whose sample has a photo"
            else:  # a caption with its gold's KB photo: what a photo of that person adds to the text
                golds = {ex.gold_id for ex in examples if ex.gold_id in kb}  # each KB photo opened once
                photos = {gid: _readable(kb.get(gid).images[:1]) for gid in golds}
                with_photo = [dataclasses.replace(ex, mention=dataclasses.replace(ex.mention, image=photos[ex.gold_id][0]))
                              for ex in examples if photos.get(ex.gold_id)]
                note = (f"RichpediaMEL {split}: mentions of the entities that have a readable KB photo, given that "
                        f"photo (face_sim is off here: it would compare the photo with itself)")
            if with_photo:
                yield f"{fmt}-{split}", note, fmt, kb, kb_meta, with_photo, None
    if "demo" in names:
        try:  # the demo's assets live in the app package, beside the library
            from demo.bundled import POOL_FILE, bundled_gold_examples, ensure_demo_kb
        except ImportError as exc:
            print(f"[bench] the demo set is skipped: {exc}", file=sys.stderr)
            return
        from ..kb import KnowledgeBase
        path = ensure_demo_kb(preset)
        kb = KnowledgeBase(path)
        examples = [ex for ex in bundled_gold_examples() if ex.gold_id != "NIL"]
        yield ("demo", "the app's bundled examples (scikit-image and matplotlib photos) against the demo KB",
               "demo", kb, {"kb": path.name, "kb_size": kb.size}, examples, {"pool": str(POOL_FILE)})


def _also_disable(spec: str, group: str) -> str:
    """`spec` with the visual `group` switched off too: dim -> dim:disable_visual=G, and
    dim:disable_visual=A -> dim:disable_visual=A+G (one option, so neither is lost)."""
    name, _, opts = spec.partition(":")
    parts = [o for o in opts.split(",") if o]
    for i, o in enumerate(parts):
        if o.startswith("disable_visual="):
            parts[i] = f"{o}+{group}"
            break
    else:
        parts.append(f"disable_visual={group}")
    return f"{name}:{','.join(parts)}"


def _readable(paths: list[str]) -> list[str]:
    """The photos that open (RichpediaMEL ships an empty Q23.jpg); the others are left out, and said so."""
    from ..errors import InputError
    from ..imageio import load_image
    out = []
    for path in paths:
        try:
            load_image(path)
            out.append(path)
        except InputError as exc:
            print(f"[bench] photo left out: {exc}", file=sys.stderr)
    return out


def photo_ablations(args, preset) -> dict:
    names = [n for n in args.photos.split(",") if n]
    unknown = [n for n in names if n not in PHOTO_SETS]
    if unknown:
        from ..errors import InputError
        raise InputError(f"unknown photo set(s) {unknown}; choose from {', '.join(PHOTO_SETS)}")
    sets = []
    variants = photo_variants(preset, generative=not args.no_photo_gemel)
    for name, note, fmt, kb, kb_meta, examples, pool in _photo_sets(names, Path(args.data_root), Path(args.kb_dir),
                                                                  preset, args.progress):
        entry = {"set": name, "note": note, **kb_meta, "n": len(examples), "rows": []}
        full: dict[str, list] = {}
        for variant, spec in variants:
            if name.startswith("richpedia") and spec.startswith("dim"):
                spec = _also_disable(spec, "face_sim")
            row, ranks = evaluate_spec(spec, kb, preset, examples, fmt=fmt, data_dir=Path(args.data_root) / fmt,
                                       progress=args.progress, pool_options=pool)
            base = full.setdefault(spec.split(":")[0], ranks)  # the linker's first row is its "everything"
            entry["rows"].append({"variant": variant, "linker": spec, "n": row["n"], "hits@1": row["hits@1"],
                                  "mrr": row["mrr"], "n_with_image": row["n_with_image"],
                                  "gold_rank_changed": sum(a != b for a, b in zip(ranks, base, strict=True))})
            print(f"  photos {name:<15} {variant:<34} n={row['n']:>4} H@1 {row['hits@1']:.4f} "
                  f"(gold rank changed for {entry['rows'][-1]['gold_rank_changed']})", flush=True)
        sets.append(entry)
    return {"sets": sets}


def bench_scale(args) -> dict:
    from ..kb import KnowledgeBase, build_kb
    seed_everything(args.seed)
    engines = args.engines.split(",")
    out = {"kind": "scale", **run_meta(args, None), "dim": args.dim, "rows": [],
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
            bm25_ms = [p50_ms(lambda q=q, kb=kb: kb.search_bm25(q, k=20), 1) for q in queries]
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
        preset = resolve_preset(args)
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

