"""`python -m mel ...`: the command line mirrors the Python API (one subcommand per function).

    python -m mel models --preset auto
    python -m mel data info --format wikimel --data DIR --split dev
    python -m mel kb build --format wikimel --source DIR --out wikimel.sqlite --preset offline
    python -m mel kb search wikimel.sqlite "Bianca Ryan"
    python -m mel kb info wikimel.sqlite
    python -m mel link --kb wikimel.sqlite --linker dense --caption "..." --mention "..." [--image IMG] [--nil]
    python -m mel eval --format wikimel --data DIR --split dev --kb wikimel.sqlite --linker dense --json out.json

Other modules add subcommands (train, annotations, bench, batch, dim) through `COMMANDS`; what
every command shares (--preset, --threads, --limit, output checks, provenance) is in mel.cli_kit.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from .cli_kit import (
    add_preset_args,
    add_threads_arg,
    check_device,
    check_output_file,
    command_line,
    count_arg,
    resolve_preset,
    run_command,
)
from .errors import MAX_WHOLE, InputError, MELError, require_whole

# subcommand -> "module:function(subparsers)" that adds it; kept lazy so --help stays fast
COMMANDS: dict[str, str] = {
    "train": "mel.training.cli:add_parser",
    "annotations": "annotations.cli:add_parser",
    "bench": "mel.bench.cli:add_parser",
    "batch": "mel.batch.cli:add_parser",
    "dim": "mel.dim.candidates:add_parser",
    "calibrate": "mel.calibration_cli:add_parser",
}


# -- models / data ------------------------------------------------------------------------------
def cmd_models(args):
    """Each preset's models with their parameters, dtype and estimated memory, and whether it fits here
    (a named preset is shown even when it does not fit; `auto` shows the one it would pick)."""
    from .memory import available_memory, estimate_preset, format_estimate
    from .presets import PRESETS, describe, get_preset
    names = [args.preset] if args.preset != "all" else list(PRESETS)
    for name in names:
        preset = get_preset(name, device=check_device(args.device), check_memory=name == "auto")
        if preset.reason:
            print(f"[mel] {preset.reason}", file=sys.stderr)
        print(describe(preset))
        print(format_estimate(estimate_preset(preset), available_memory(preset.device)))


def cmd_data_info(args):
    from .datasets import load_dataset
    split = load_dataset(args.format, args.data, args.split, unlocated="context")
    print(f"{args.format} {args.split}: {len(split)} mentions")
    print(split.report.summary())
    print(split.report.rules_line())
    for rule, samples in split.report.located_samples.items():  # a few per rule, to check them by eye
        print(f"  {rule}: " + "; ".join(f"{m!r} -> {found!r}" for _, m, found in samples[:3]))
    if args.json:
        print(json.dumps(split.report.to_dict(), indent=2, ensure_ascii=False))


# -- kb -----------------------------------------------------------------------------------------
def cmd_kb_build(args):
    from .kb import build_dataset_kb
    kb = build_dataset_kb(args.format, args.source, args.out, preset=None if args.no_dense else resolve_preset(args),
                          images=not args.no_images, limit=args.limit, batch_size=args.batch_size,
                          progress=not args.quiet)
    info = kb.info()
    print(f"built {args.out}: {info['n_entities']:,} entities, {info['n_aliases']:,} names/aliases, "
          f"{info['n_entity_images']} entity images, text encoder {info['text_encoder']}, "
          f"{info['build_seconds']} s")


def cmd_kb_info(args):
    from .kb import KnowledgeBase
    print(json.dumps(KnowledgeBase(args.kb).info(), indent=2, ensure_ascii=False))


def cmd_kb_prior(args):
    from .kb import build_link_prior
    info = build_link_prior(args.kb, args.format, args.data, args.split, command=getattr(args, "command_line", ""))
    print(f"{args.kb}: link prior from {info['dataset']}/{info['split']} ({info['n_records']:,} records, "
          f"{info['n_mentions']:,} mentions): {info['n_counted']:,} counted, {info['n_pairs']:,} (mention, entity) "
          f"pairs over {info['n_entities']:,} entities; {info['n_not_in_kb']:,} mentions whose gold is not in the KB "
          f"({info['ids_not_in_kb']} ids, e.g. {', '.join(info['examples_not_in_kb'][:5]) or '-'}), "
          f"{info['n_nil']} NIL, {info['n_empty_mention']} empty")
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))


def cmd_kb_search(args):
    from .kb import KnowledgeBase
    from .linkers.base import check_k
    from .types import Mention
    check_k(args.k)
    if not args.query.strip():
        raise InputError("the search query is empty: give the words to look for")
    kb = KnowledgeBase(args.kb)
    if args.mode == "bm25":
        ranked = kb.search_bm25(args.query, k=args.k)
    elif args.mode == "exact":
        ranked = [(idx, 1.0 if kind == "name" else 0.5) for idx, kind in kb.lookup_name(args.query)][: args.k]
    else:
        from .linkers import build_linker
        linker = build_linker("dense", kb, resolve_preset(args))
        result = linker.link(Mention(args.query, 0, len(args.query)), k=args.k)
        ranked = [(kb.idx_of(c.entity.id), c.score) for c in result.candidates]
    print(f"{kb.path.name}: {kb.size:,} entities; {args.mode} results for {args.query!r}")
    entities = kb.entities_at([i for i, _ in ranked])
    for rank, (entity, (_, score)) in enumerate(zip(entities, ranked, strict=True), start=1):
        desc = (entity.description[:70] + "...") if len(entity.description) > 70 else entity.description
        print(f"{rank:3d}. {score:8.3f}  {entity.id:<12} {entity.name}  | {desc}")


# -- link / eval --------------------------------------------------------------------------------
def cmd_link(args):
    from .imageio import load_image
    from .kb import KnowledgeBase
    from .linkers import build_linker
    from .linkers.base import check_k
    from .spans import resolve_mention
    check_k(args.k)
    for flag, offset in (("--start", args.start), ("--end", args.end)):
        if offset is not None:  # a negative one is "outside the caption" (resolve_mention); a huge one, too large
            require_whole(flag, offset, -MAX_WHOLE)
    if (args.start is None) != (args.end is None):
        raise MELError("give both --start and --end (character offsets of the mention), or --mention TEXT")
    if args.start is None and not args.mention:
        raise MELError("give the mention: --mention TEXT, or --start/--end character offsets")
    # the app's resolver; strict: offsets and a mention that disagree are an error here (both were typed)
    mention = resolve_mention(args.caption, args.mention, args.start, args.end, image=args.image, strict=True)
    if args.image:
        load_image(args.image, name=f"the image {args.image}")  # refused here, whichever linker runs
    kb = KnowledgeBase(args.kb)
    linker = build_linker(args.linker, kb, resolve_preset(args), **_options(args))
    calibrate(linker, args)
    result = linker.link(mention, k=args.k)
    if args.json:
        if linker.calibration is None:  # the JSON's "probability" fields are null: say why, beside it
            print(f"[mel] probabilities: none ({_missing(linker)})", file=sys.stderr)
        print(result.to_json())
        return
    pred = result.prediction
    print(f"mention: {mention.text!r}  ->  {pred.name + ' (' + pred.id + ')' if pred else 'NIL'}  "
          f"[{args.linker}, preset {result.preset}, {result.timings.get('total', 0):.0f} ms]")
    if result.details.note:
        print(f"  note: {result.details.note}")
    print(probabilities_line(linker))
    for rank, c in enumerate(result.candidates[:10], start=1):
        p = "" if c.probability is None else f"  p={c.probability:.4f}"
        print(f"{rank:3d}. {c.score:8.3f}{p}  {c.entity.id:<12} {c.entity.name}")


def _missing(linker) -> str:
    from .calibration import missing_calibration
    return missing_calibration(linker)


def probabilities_line(linker) -> str:
    """What the p= values of `mel link` are: calibrated (how, and the NIL rule in use), or none and why."""
    from .calibration import describe_calibration
    cal = linker.calibration
    if cal is None:
        return f"probabilities: none ({_missing(linker)})"
    if linker.nil_threshold is not None:
        nil = f"NIL below p {linker.nil_threshold:.3f}"
    elif cal.nil_threshold is not None:
        nil = f"NIL off (--nil: NIL below the threshold chosen on train, p {cal.nil_threshold:.3f})"
    else:
        nil = "NIL off (--nil-threshold T to answer NIL below p T)"
    return f"probabilities: calibrated, {describe_calibration(cal)}; {nil}"


def calibrate(linker, args) -> None:
    """`--calibration DIR`, `--nil` and `--nil-threshold T` (link and eval) applied to `linker`:
    DIR replaces the calibration it finds by itself; NIL below a threshold needs a calibration."""
    from .calibration import use_calibration
    if args.calibration:
        use_calibration(linker, args.calibration)
    threshold = args.nil_threshold
    if threshold is None and not getattr(args, "nil", False):
        return
    if linker.calibration is None:
        raise InputError(f"NIL below a probability needs calibrated probabilities: {_missing(linker)} "
                         f"(and pass --calibration DIR)")
    use_calibration(linker, linker.calibration, nil=True if threshold is None else threshold)


def add_calibration_args(p, *, nil_flag: bool, threshold_help: str) -> None:
    """The calibration options of link and eval (applied by `calibrate`)."""
    p.add_argument("--calibration", help="calibration directory (default: the linker's own, if any: "
                                         "models/calibration/<linker>@<kb>; fit one with mel calibrate)")
    if nil_flag:
        p.add_argument("--nil", action="store_true",
                       help="answer NIL when the best candidate's probability is below the calibration's "
                            "threshold (chosen on train)")
    p.add_argument("--nil-threshold", type=float, default=None, help=threshold_help)


def _options(args) -> dict:
    """`--opt key=value` pairs for linker-specific options (values parsed as JSON when possible)."""
    from .linkers import parse_options
    return parse_options(args.opt or [])


def cmd_eval(args):
    from .datasets import load_dataset
    from .evaluate import evaluate, format_report
    from .kb import KnowledgeBase
    from .linkers import build_linker
    from .paths import atomic_write
    require_whole("--batch-size", args.batch_size, 1)  # before any output is opened: every linker refuses it
    for path in (args.json, args.predictions):  # fail now, not after the whole evaluation
        if path:
            check_output_file(path)
    data = load_dataset(args.format, args.data, args.split, unlocated="context")  # every mention counts in n
    examples = data.examples[: args.limit] if args.limit else data.examples
    kb = KnowledgeBase(args.kb, engine=args.engine)
    print(f"[mel] {args.format} {args.split}: {len(examples)} mentions; KB {kb.path.name}: {kb.size:,} entities",
          file=sys.stderr)
    print(f"[mel] {data.report.rules_line()}", file=sys.stderr)
    linker = build_linker(args.linker, kb, resolve_preset(args), **_options(args))
    from .calibration import removed_golds
    calibrate(linker, args)
    if args.nil_share and linker.calibration is None:
        raise InputError(f"--nil-share needs a calibrated {linker.name}: none found for this KB; fit one with "
                         f"`python -m mel calibrate ... --out DIR` and pass --calibration DIR")
    removed = removed_golds([e.gold_id for e in examples], args.nil_share, args.nil_seed) if args.nil_share else set()
    report = evaluate(linker, examples, batch_size=args.batch_size, progress=not args.quiet,
                      predictions_path=args.predictions, removed_ids=removed, nil_share=args.nil_share)
    report.update({"dataset": args.format, "split": args.split, "limit": args.limit,
                   "reader": data.report.to_dict() if hasattr(data.report, "to_dict") else {},
                   "located_by_rule": data.report.rule_counts()})
    report["command"] = args.command_line
    print(format_report(report))
    print(f"  {data.report.rules_line()}")
    if args.json:  # published whole (a temporary file renamed over it), or the old file is kept
        with atomic_write(args.json) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)


# -- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .index import ENGINES
    parser = argparse.ArgumentParser(prog="python -m mel", description="Multimodal entity linking: GEMEL and DIM.")
    add_threads_arg(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="show the models of a preset (or 'all')")
    add_preset_args(p)
    p.set_defaults(func=cmd_models)

    data = sub.add_parser("data", help="inspect a dataset").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("info", help="read a split and print what the reader found")
    p.add_argument("--format", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="dev")
    p.add_argument("--json", action="store_true", help="also print the full report as JSON")
    p.set_defaults(func=cmd_data_info)

    kb = sub.add_parser("kb", help="build, search and inspect a knowledge base").add_subparsers(dest="kb_command",
                                                                                                 required=True)
    p = kb.add_parser("build", help="build a KB (SQLite + FTS5 + dense index) from a dataset's KB files")
    p.add_argument("--format", required=True, help="wikimel | richpedia | wikidiverse | mimic | gemel | jsonl")
    p.add_argument("--source", required=True, help="the dataset directory (or a kb.jsonl for --format jsonl)")
    p.add_argument("--out", required=True, help="the KB file to write, e.g. wikimel.sqlite")
    p.add_argument("--no-dense", action="store_true", help="skip embeddings (BM25/exact only)")
    p.add_argument("--no-images", action="store_true", help="skip entity image embeddings")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit", type=count_arg, default=None, help="only the first N entities (for a quick try)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_preset_args(p)
    p.set_defaults(func=cmd_kb_build)

    p = kb.add_parser("info", help="size, encoders and build facts of a KB")
    p.add_argument("kb")
    p.set_defaults(func=cmd_kb_info)

    p = kb.add_parser("search", help="search a KB by name (BM25 by default)")
    p.add_argument("kb")
    p.add_argument("query")
    p.add_argument("--mode", choices=("bm25", "dense", "exact"), default="bm25")
    p.add_argument("-k", type=int, default=10)
    add_preset_args(p)
    p.set_defaults(func=cmd_kb_search)

    p = kb.add_parser("prior", help="count a link prior (mention -> entity) from a dataset's TRAIN annotations "
                                    "into the KB (DIM's prior terms); a rebuild replaces it")
    p.add_argument("--kb", required=True, help="the dataset's KB (written in place, in one transaction)")
    p.add_argument("--format", required=True, help="wikimel | richpedia | wikidiverse | mimic | gemel | jsonl")
    p.add_argument("--data", required=True, help="the dataset directory")
    p.add_argument("--split", default="train", help="train only (RichpediaMEL: train without the carved dev)")
    p.add_argument("--json", action="store_true", help="also print the provenance as JSON")
    p.set_defaults(func=cmd_kb_prior)

    from .dim import enrich as dim_enrich  # import-light: the LLM loads only when the command runs
    p = kb.add_parser("enrich", help="write a copy of a KB whose descriptions an LLM rewrote (DIM; off by default)")
    dim_enrich.add_arguments(p)
    p.set_defaults(func=dim_enrich.run)

    p = sub.add_parser("link", help="link one mention")
    p.add_argument("--kb", required=True)
    p.add_argument("--linker", default="dense")
    p.add_argument("--caption", required=True)
    p.add_argument("--mention", help="the mention text (located in the caption)")
    p.add_argument("--start", type=int, help="character offset where the mention starts")
    p.add_argument("--end", type=int, help="character offset where it ends (exclusive)")
    p.add_argument("--image", help="path of the image that goes with the caption")
    p.add_argument("-k", type=int, default=20)
    p.add_argument("--opt", action="append", help="linker option key=value (repeatable)")
    p.add_argument("--json", action="store_true", help="print the LinkResult as JSON (with each candidate's probability)")
    add_calibration_args(p, nil_flag=True, threshold_help="answer NIL when the best candidate's probability is "
                                                          "below this (implies --nil)")
    add_preset_args(p)
    p.set_defaults(func=cmd_link)

    p = sub.add_parser("eval", help="Hits@k / MRR of a linker on a dataset split, whole-KB protocol")
    p.add_argument("--format", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="dev")
    p.add_argument("--kb", required=True)
    p.add_argument("--linker", required=True)
    p.add_argument("--limit", type=count_arg, default=None, help="only the first N mentions (0: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--engine", default="auto", choices=ENGINES, help="dense search engine (default: auto)")
    p.add_argument("--opt", action="append", help="linker option key=value (repeatable)")
    p.add_argument("--json", help="write the report to this JSON file")
    p.add_argument("--predictions", help="write one JSON line per mention to this file")
    p.add_argument("--quiet", action="store_true")
    add_calibration_args(p, nil_flag=False, threshold_help="answer NIL below this probability (default: the "
                                                           "calibration's, chosen on train)")
    p.add_argument("--nil-share", type=float, default=0.0,
                   help="NIL-aware metrics with this seeded share of the split's golds out of the KB (e.g. 0.1)")
    p.add_argument("--nil-seed", type=int, default=0, help="seed of the golds taken out (--nil-share)")
    add_preset_args(p)
    p.set_defaults(func=cmd_eval)

    for target in COMMANDS.values():
        module, attr = target.split(":")
        try:
            add = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as exc:
            if exc.name and (exc.name == module or module.startswith(exc.name + ".")):
                continue  # that part of the project is not installed/built yet
            raise
        add(sub)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = command_line("python -m mel", argv)  # what result files and checkpoints record
    return run_command(args)
