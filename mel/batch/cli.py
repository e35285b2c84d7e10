"""`python -m mel batch link|eval`: the batch engine's command line (registered in mel.cli.COMMANDS).

    python -m mel batch link --kb kb.sqlite --linker dense --input mentions.jsonl --output out/
    python -m mel batch link --kb kb.sqlite --linker bm25 --format wikimel --input DIR --split dev --output out/
    python -m mel batch link ... --address auto          # join the cluster `ray start` made
    python -m mel batch eval --kb kb.sqlite --linker dense --format wikimel --data DIR --split dev --output out/

Rerun the same command after a crash or a kill: the parts already written are kept.
"""
from __future__ import annotations

import json
import sys


def _common(p, *, eval_mode: bool):
    from ..cli_kit import add_preset_args, count_arg
    from ..index import ENGINES
    p.add_argument("--kb", required=True, help="the KB file (from `mel kb build`); every node must see it")
    p.add_argument("--linker", required=True, help="bm25 | dense | dim | exact | gemel... (as `mel link`)")
    if eval_mode:
        p.add_argument("--format", required=True, help="dataset layout, as `mel eval` takes it")
        p.add_argument("--data", required=True, help="the dataset directory")
    else:
        p.add_argument("--input", required=True,
                       help="mentions: a .jsonl or .parquet file (caption, start+end or mention, image, id), or a "
                            "dataset directory with --format")
        p.add_argument("--format", default=None, help="read --input as this dataset layout (wikimel, jsonl...)")
    p.add_argument("--split", default="dev", help="with --format: the split to read (default dev)")
    p.add_argument("--limit", type=count_arg, default=None, help="only the first N mentions (0: all)")
    p.add_argument("--output", required=True, help="output folder (Parquet parts, manifest.json, errors.jsonl)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join: auto | HOST:PORT | ray://HOST:PORT (default: a local Ray on this machine)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="link actors (each loads the KB and models once); default: the cluster's CPUs / --worker-cpus")
    p.add_argument("--worker-cpus", type=float, default=0.75,
                   help="CPUs reserved per link actor (default 0.75: leaves room for the read tasks)")
    p.add_argument("--batch-size", type=int, default=32, help="mentions per linker batch (Linker.pipe)")
    p.add_argument("--part-size", type=int, default=10_000, help="input rows per output part (the unit of resume)")
    p.add_argument("-k", type=int, default=20, help="candidates kept per mention")
    p.add_argument("--engine", default="auto", choices=ENGINES, help="dense search engine (default: auto)")
    p.add_argument("--opt", action="append", help="linker option key=value (repeatable)")
    p.add_argument("--json", help="also write the summary (link) or report (eval) to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_preset_args(p)


def _kwargs(args) -> dict:
    from ..linkers import parse_options
    return dict(kb=args.kb, linker=args.linker, output=args.output, split=args.split, limit=args.limit or None,
                preset=args.preset, device=args.device, options=parse_options(args.opt or []), engine=args.engine,
                k=args.k, address=args.address, num_workers=args.num_workers, worker_cpus=args.worker_cpus,
                batch_size=args.batch_size, part_size=args.part_size, progress=not args.quiet)


def _write_json(path, data):
    if path:
        from ..paths import atomic_write
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def _check_outputs(args) -> None:
    """--output (a folder, created now) and --json (a file), checked before Ray starts and the job runs."""
    from ..cli_kit import check_output_dir, check_output_file
    check_output_dir(args.output)
    if args.json:
        check_output_file(args.json)


def cmd_link(args):
    from .engine import batch_link
    _check_outputs(args)
    summary = batch_link(input=args.input, format=args.format, **_kwargs(args))
    print(json.dumps(summary, indent=2))
    _write_json(args.json, summary)


def cmd_eval(args):
    from ..evaluate import HITS_AT
    from .engine import batch_eval
    _check_outputs(args)
    report = batch_eval(format=args.format, data=args.data, **_kwargs(args))
    hits = "  ".join(f"H@{h} {report[f'hits@{h}']:.4f}" for h in HITS_AT)
    print(f"{report['linker']}: n={report['n']} ({report['protocol']}, Ray Data)\n  {hits}  MRR {report['mrr']:.4f}\n"
          f"  {report['mentions_per_s']} mentions/s; gold not in KB: {report['n_gold_not_in_kb']}; "
          f"error rows: {report['n_error_rows']}; preset {report.get('preset', '')}")
    _write_json(args.json, report)
    if report["n_error_rows"]:
        print(f"[mel batch] {report['n_error_rows']} rows could not be linked and count as misses; see "
              f"{args.output}/errors.jsonl", file=sys.stderr)


def add_parser(subparsers) -> None:
    batch = subparsers.add_parser("batch", help="link or evaluate many mentions on Ray Data (one machine or a cluster)")
    sub = batch.add_subparsers(dest="batch_command", required=True)
    p = sub.add_parser("link", help="link every mention of a file or dataset split; Parquet out, resumable")
    _common(p, eval_mode=False)
    p.set_defaults(func=cmd_link)
    p = sub.add_parser("eval", help="Hits@k / MRR of a linker on a split, on Ray Data (same numbers as `mel eval`)")
    _common(p, eval_mode=True)
    p.set_defaults(func=cmd_eval)
