"""`python -m mel bench quality|ablations|scale|reference|all|report` (registered in mel.cli.COMMANDS)."""
from __future__ import annotations

import json
from pathlib import Path

from ..cli_kit import add_preset_args, add_threads_arg, check_output_dir, count_arg
from ..errors import InputError, require_whole
from .report import RENDER, write_results
from .runs import DATASETS, LINKERS, bench_ablations, bench_quality, bench_reference, bench_scale

RUNS = {"quality": bench_quality, "ablations": bench_ablations, "scale": bench_scale, "reference": bench_reference}


def cmd_report(args) -> None:
    out = Path(args.out)
    found = False
    for kind in RENDER:
        path = out / f"bench_{kind}.json"
        if path.exists():
            found = True
            for p in write_results(json.loads(path.read_text(encoding="utf-8")), out):
                print(f"wrote {p}")
    if not found:
        raise InputError(f"no bench_*.json under {out}: run `python -m mel bench quality|ablations|scale` first")


def parse_sizes(text: str) -> list[int]:
    """`--sizes 10000,100000`: KB sizes, each a whole number of entities >= 1 (InputError otherwise)."""
    sizes = []
    for item in text.split(","):
        try:
            size = int(item.strip())
        except ValueError:
            raise InputError(f"--sizes takes KB sizes as whole numbers separated by commas (e.g. 10000,100000), "
                             f"got {item.strip()!r} in {text!r}") from None
        sizes.append(require_whole("--sizes: each KB size (entities)", size, 1))
    return sizes


def check_scale_args(args) -> None:
    """The scale run's numbers and engines, refused before anything is built (normalises --sizes)."""
    from ..index import ENGINES
    args.sizes = ",".join(map(str, parse_sizes(args.sizes)))
    engines = [e.strip() for e in args.engines.split(",")]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise InputError(f"--engines: unknown engine(s) {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(ENGINES)}, separated by commas")
    args.engines = ",".join(engines)
    require_whole("--dim", args.dim, 1)
    require_whole("--queries", args.queries, 1)
    require_whole("--encoder-names", args.encoder_names, 0)


def _run(args) -> None:
    if args.bench_command == "report":
        cmd_report(args)
        return
    if args.bench_command in ("scale", "all"):
        check_scale_args(args)
    out = check_output_dir(args.out)  # fail now, not after an hour of measuring
    for kind in (list(RUNS) if args.bench_command == "all" else [args.bench_command]):
        for path in write_results(RUNS[kind](args), out):
            print(f"wrote {path}")


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: quality, ablations, scale; JSON + Markdown + PNG under results/")
    kinds = bench.add_subparsers(dest="bench_command", required=True)

    def common(p, data: bool = True):
        p.add_argument("--out", default="results", help="where the JSON, Markdown and PNG files go")
        add_preset_args(p)
        p.add_argument("--seed", type=int, default=0)
        add_threads_arg(p, subcommand=True)
        p.add_argument("--progress", action="store_true", help="progress bars")
        if data:
            p.add_argument("--data-root", default="../shared/data", help="folder holding wikimel/, richpedia/, wikidiverse/")
            p.add_argument("--kb-dir", default="data", help="folder of the KBs {format}.sqlite (built when missing)")
            p.add_argument("--generative-limit", type=int, default=200,
                           help="GEMEL linkers on the first N dev mentions (0 = all; ~1 s per mention on a CPU)")
        p.set_defaults(func=_run)

    def quality_args(p):
        p.add_argument("--datasets", default=",".join(DATASETS))
        p.add_argument("--linkers", default=",".join(LINKERS), help="comma-separated; options as name:key=value")
        p.add_argument("--limit", type=count_arg, default=None, help="only the first N dev mentions for every linker")

    def ablation_args(p):
        p.add_argument("--dataset", default="wikimel")

    def photo_args(p):
        p.add_argument("--photos", default="wikimel,richpedia,demo",
                       help="also ask the image and cue questions on every photo of these sets "
                            "(wikimel, richpedia, demo; '' = none)")
        p.add_argument("--no-photo-gemel", action="store_true", help="DIM rows only on the photo sets")
        p.add_argument("--photos-only", action="store_true", help="skip the dev-split questions (write to another --out)")

    def scale_args(p):
        p.add_argument("--sizes", default="10000,100000,1000000")
        p.add_argument("--engines", default="numpy,faiss-flat,faiss-ivf,faiss-hnsw")
        p.add_argument("--dim", type=int, default=384)
        p.add_argument("--queries", type=int, default=30)
        p.add_argument("--encoder-names", type=int, default=2000, help="text-encoder throughput on N names (0: skip)")

    p = kinds.add_parser("quality", help="every linker on every dev split")
    quality_args(p)
    common(p)
    p = kinds.add_parser("ablations", help="image, expert cue, number of demonstrations, trie vs free generation")
    ablation_args(p)
    photo_args(p)
    common(p)
    p = kinds.add_parser("scale", help="KB build and search cost at growing KB sizes (synthetic entities)")
    scale_args(p)
    common(p, data=False)
    p = kinds.add_parser("reference", help="achieved fraction of the machine: LLM vs plain forward, search vs matmul")
    ablation_args(p)
    common(p)
    p = kinds.add_parser("all", help="quality, ablations, scale and reference in turn: all of results/ in one command")
    for add in (quality_args, ablation_args, photo_args, scale_args):
        add(p)
    common(p)
    p = kinds.add_parser("report", help="re-render Markdown and PNG from the bench_*.json under --out")
    p.add_argument("--out", default="results")
    add_threads_arg(p, subcommand=True)
    p.set_defaults(func=_run)


