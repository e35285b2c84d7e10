"""`python -m mel calibrate`: fit a linker's calibration (temperature + "none" logit, NIL threshold)
on a TRAIN slice and store it; optionally measure it on another split (never fitted on).

    python -m mel calibrate --format wikimel --data ../shared/data/wikimel --split train --limit 2000 \\
        --kb data/wikimel.sqlite --linker dim --out models/calibration/dim@wikimel \\
        --measure-split dev --json results/calibration_wikimel_dim.json --plot results/calibration_wikimel_dim.png

The train slice is `--limit` mentions drawn with a seeded hash of their sample id (not the first N:
files are often sorted). For a DIM head trained on this very split, the slice is drawn from the
records the head held out while training (reproduced from its config), since the head has seen
the rest. GEMEL keeps each query out of its own demonstrations. `--measure-split` takes the
first `--measure-limit` mentions of that split (what the benches call the generative subset).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .cli_kit import add_preset_args, check_output_file, count_arg, resolve_preset
from .errors import InputError
from .paths import atomic_write


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="fit a linker's probabilities (and NIL threshold) on a train slice")
    p.add_argument("--format", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="train", help="the split to fit on (never dev: it would be tuned on)")
    p.add_argument("--limit", type=count_arg, default=2000, help="mentions of the split to fit on (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the slice and of the NIL golds")
    p.add_argument("--kb", required=True)
    p.add_argument("--linker", required=True)
    p.add_argument("--opt", action="append", help="linker option key=value (repeatable)")
    p.add_argument("-k", type=int, default=20, help="candidates per mention")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--nil-share", type=float, default=0.1,
                   help="share of the slice's golds taken out of the KB to choose the NIL threshold (0: none)")
    p.add_argument("--method", default="temperature+none", choices=["temperature+none", "temperature+none:top1",
                   "temperature+none+isotonic", "temperature+none:top1+isotonic", "auto"],
                   help="how the probabilities are fitted (mel.calibration); 'auto' chooses among the four by "
                        "out-of-fold ECE on the train slice (default: temperature+none, as before)")
    p.add_argument("--out", required=True, help="calibration directory to write (config.json)")
    p.add_argument("--measure-split", help="also measure ECE / NIL metrics on this split (e.g. dev)")
    p.add_argument("--measure-limit", type=count_arg, default=0, help="first N mentions of it (0: all)")
    p.add_argument("--json", help="write the measurement (train and measure split) to this JSON file")
    p.add_argument("--plot", help="write a reliability diagram PNG of the measure split")
    p.add_argument("--save-scores", help="write every mention's candidates and scores (JSONL) to this prefix")
    p.add_argument("--scores", help="read the candidates and scores of the train slice (and of the measure split) "
                   "from PREFIX.<split>.jsonl written by --save-scores, instead of running the linker on every "
                   "mention; they must be of the same mentions (or the first of them: the linker scores the rest, so "
                   "a larger --limit / --measure-limit extends an earlier run), and the linker is re-run on the "
                   "first --verify-scores of each file, which must give the same candidates and scores")
    p.add_argument("--verify-scores", type=int, default=10,
                   help="with --scores: mentions of each file re-run and compared (default 10)")
    p.add_argument("--quiet", action="store_true")
    add_preset_args(p)
    p.set_defaults(func=run)


def train_slice(examples, limit: int | None, seed: int, linker=None, fmt: str = "", split: str = "") -> tuple[list, str]:
    """(`limit` examples drawn by a seeded hash of their id, a sentence saying how)."""
    from .datasets.common import stable_hash
    how = f"{split}: {{n}} mentions drawn by sha256(seed={seed}, sample id)"
    held = _checkpoint_holdout(linker, examples, fmt, split) if linker is not None else None
    if held is not None:
        examples, how = held, f"{split}: {{n}} mentions of the records the DIM head held out while training, " \
                              f"drawn by sha256(seed={seed}, sample id)"
    ranked = sorted(examples, key=lambda e: (stable_hash(seed, e.sample_id), e.sample_id))
    chosen = ranked[:limit] if limit else ranked
    return chosen, how.format(n=len(chosen))


def _checkpoint_holdout(linker, examples, fmt: str, split: str):
    """The examples of the training records a DIM head did not train on, when it was trained on
    `fmt`/`split` (alone or as one dataset of a joint head); None when the head was trained elsewhere
    (every example is unseen)."""
    ckpt = getattr(linker, "checkpoint", None)
    if ckpt is None or not (Path(ckpt) / "config.json").is_file():
        return None
    from .dim.train import heldout_examples
    cfg = json.loads((Path(ckpt) / "config.json").read_text(encoding="utf-8"))
    return heldout_examples(cfg, examples, fmt, split, linker.kb)


def load_scores(path: str, examples, linker, args, log) -> tuple[list, str]:
    """(scores of `examples`, a sentence saying where they came from): those saved by an earlier run
    (--save-scores), checked: the same mentions in the same order, and the linker re-run now on the
    first --verify-scores gives the same candidates and scores (to 1e-5 of their size: a float32 LLM scores a
    mention a few 1e-6 differently in another batch). A file that holds only the
    first mentions of this run (an earlier, smaller --limit or --measure-limit: the train slice of a
    larger limit starts with the smaller one) is extended: the linker scores the rest now. Anything
    else is an InputError: run without --scores."""
    from .calibration import collect, loads_scored
    try:
        scored = loads_scored(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"cannot read saved scores {path}: {exc}") from None
    for r in scored:  # a hand-edited or damaged file: said, not a TypeError further down
        if not (isinstance(r.ids, list) and isinstance(r.scores, list) and len(r.ids) == len(r.scores)) or any(
                isinstance(s, bool) or not isinstance(s, (int, float)) for s in r.scores):
            raise InputError(f"{path}: a saved score of {r.sample_id!r} is not a number ({r.scores!r:.200}), or "
                             f"its candidates and scores differ in number; run without --scores")
    want = [(ex.sample_id, ex.gold_id) for ex in examples]
    if [(r.sample_id, r.gold_id) for r in scored] != want[:len(scored)]:
        raise InputError(f"{path} holds other mentions than this run's {len(want)}, or more of them "
                         f"(another slice, seed or a larger limit)")
    n = min(max(args.verify_scores, 0), len(scored))
    again = collect(linker, examples[:n], k=args.k, batch_size=args.batch_size, progress=False)
    for old, new in zip(scored[:n], again, strict=True):
        if old.ids != new.ids or len(old.scores) != len(new.scores) or any(
                (a != a) != (b != b) or abs(a - b) > 1e-5 * max(1.0, abs(a))  # NaN only where the linker gives NaN
                for a, b in zip(old.scores, new.scores, strict=True) if not (a == b or (a != a and b != b))):
            raise InputError(f"{path}: the linker now gives other candidates or scores for {old.sample_id!r} than "
                             f"those saved (other models or code?); run without --scores")
    log(f"[mel] {len(scored)} mentions' scores read from {path}; the first {n} re-run: identical")
    how = f"{Path(path).name} (an earlier run's --save-scores; the first {n} re-run and identical)"
    rest = examples[len(scored):]
    if rest:
        log(f"[mel] scoring the other {len(rest)} mentions of this run")
        scored += collect(linker, rest, k=args.k, batch_size=args.batch_size, progress=not args.quiet)
        how = f"{len(scored) - len(rest)} of {len(scored)} from {how}; the other {len(rest)} scored by this run"
    return scored, how


def measure(args, linker, cal, seconds: dict, log) -> tuple[list, list, dict]:
    """(examples, scores, report) of --measure-split: its scores collected, or read and checked (--scores)."""
    from .calibration import calibration_report, collect, nil_decisions, removed_golds
    from .datasets import load_dataset
    from .evaluate import nil_metrics
    dev = load_dataset(args.format, args.data, args.measure_split, unlocated="context")
    dev_ex = dev.examples[: args.measure_limit] if args.measure_limit else dev.examples
    log(f"[mel] measuring on {args.measure_split}: the first {len(dev_ex)} of {len(dev.examples)} mentions "
        f"({dev.report.rules_line()})")
    t0 = time.perf_counter()
    if args.scores:
        dev_scored, report_from = load_scores(f"{args.scores}.{args.measure_split}.jsonl", dev_ex, linker, args, log)
    else:
        dev_scored = collect(linker, dev_ex, k=args.k, batch_size=args.batch_size, progress=not args.quiet)
        report_from = ""
    seconds["collect_measure"] = round(time.perf_counter() - t0, 1)
    report = calibration_report(dev_scored, cal)
    report["split"] = args.measure_split
    if report_from:
        report["scores_from"] = report_from
    if cal.nil_threshold is not None:
        removed = removed_golds([r.gold_id for r in dev_scored], args.nil_share, args.seed)
        report["nil"] = {"share": args.nil_share, "seed": args.seed, "n_removed_golds": len(removed),
                         "threshold": cal.nil_threshold,
                         **nil_metrics(nil_decisions(dev_scored, cal, cal.nil_threshold, removed)),
                         "without_threshold": nil_metrics(nil_decisions(dev_scored, cal, None, removed))}
    return dev_ex, dev_scored, report


def check_outputs(args) -> None:
    """Every file this run will write, checked before any mention is scored: --out (a directory whose
    config.json is replaced), --json, --plot (of the measure split: refused without one) and the
    --save-scores files. --out and the --save-scores folder are not created here: a run refused later
    leaves nothing behind."""
    if args.plot and not args.measure_split:
        raise InputError("--plot draws the reliability diagram of the measure split: add --measure-split SPLIT "
                         "(e.g. dev), or leave --plot out")
    for path in (args.json, args.plot):
        if path:
            check_output_file(path)
    _check_folder("--out", Path(args.out))
    if (Path(args.out) / "config.json").is_dir():
        raise InputError(f"--out: {Path(args.out) / 'config.json'} is a directory; pick another --out")
    if args.save_scores:
        for split in filter(None, (args.split, args.measure_split)):
            path = Path(f"{args.save_scores}.{split}.jsonl")
            if path.is_dir():
                raise InputError(f"--save-scores: {path} is a directory; pick another prefix")
            _check_folder("--save-scores", path.parent)


def _check_folder(flag: str, folder: Path) -> None:
    """`folder` is a writable directory or can be made one: its nearest existing ancestor is a
    writable directory (nothing is created now)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{flag}: {existing} is a file, not a folder; pick another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag}: cannot write into {existing}; pick a writable path")


def run(args) -> None:
    from .calibration import collect, dumps_scored, fit, reliability_diagram, top_confidences
    from .datasets import load_dataset
    from .kb import KnowledgeBase
    from .linkers import build_linker, parse_options

    if args.split in ("dev", "val", "valid", "validation", "test"):
        raise InputError(f"calibrate fits on a train slice, not on {args.split!r}: measure there with "
                         f"--measure-split {args.split}")
    check_outputs(args)
    kb = KnowledgeBase(args.kb)
    linker = build_linker(args.linker, kb, resolve_preset(args), **parse_options(args.opt or []))
    data = load_dataset(args.format, args.data, args.split, unlocated="context")
    examples, how = train_slice(data.examples, args.limit, args.seed, linker, args.format, args.split)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    log(f"[mel] calibrating {linker.name} on {how}; KB {kb.path.name}: {kb.size:,} entities")
    t0 = time.perf_counter()
    if args.scores:
        scored, scores_from = load_scores(f"{args.scores}.{args.split}.jsonl", examples, linker, args, log)
    else:
        scored = collect(linker, examples, k=args.k, batch_size=args.batch_size, progress=not args.quiet)
    collect_s = time.perf_counter() - t0
    fitted_on = {"dataset": args.format, "split": args.split, "n": len(scored), "slice": how, "seed": args.seed,
                 "kb": kb.path.name, "kb_size": kb.size, "k": args.k, "options": parse_options(args.opt or []),
                 "command": getattr(args, "command_line", "")}
    if args.scores:
        fitted_on["scores_from"] = scores_from
    t0 = time.perf_counter()
    cal = fit(scored, linker, nil_share=args.nil_share, seed=args.seed, fitted_on=fitted_on, method=args.method)
    fit_s = time.perf_counter() - t0
    seconds = {"collect_train": round(collect_s, 1), "fit": round(fit_s, 1)}
    out = {"linker": linker.name, "kb": kb.path.name, "kb_size": kb.size, "calibration": cal.to_dict(),
           "command": getattr(args, "command_line", ""),
           "seconds": seconds}
    dev_scored, dev_ex = None, []
    if args.measure_split:  # read and checked (--scores) before any output is written
        dev_ex, dev_scored, out["measure"] = measure(args, linker, cal, seconds, log)
    # Everything is computed and checked: the outputs now, each published whole (mel.paths.atomic_write).
    if args.save_scores:
        Path(f"{args.save_scores}.{args.split}.jsonl").parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(f"{args.save_scores}.{args.split}.jsonl") as tmp:
            tmp.write_text(dumps_scored(scored), encoding="utf-8")
        if dev_scored is not None:
            with atomic_write(f"{args.save_scores}.{args.measure_split}.jsonl") as tmp:
                tmp.write_text(dumps_scored(dev_scored), encoding="utf-8")
    path = cal.save(args.out)
    train = cal.metrics["train"]
    selection = cal.fitted_on.get("selection")
    if selection:
        print("  method chosen on train (" + selection["criterion"] + "): " + ", ".join(
            f"{m} {e:.4f}" for m, e in selection["ece"].items()) + f" -> {selection['chosen']}")
    print(f"{linker.name} [{cal.method}]: T={cal.temperature:.4g}, none logit b={cal.none_logit:.4g}, NIL threshold "
          f"{cal.nil_threshold} (train n={train['n']}: ECE {train['ece_before']:.4f} -> {train['ece_after']:.4f}) "
          f"-> {path}")
    if dev_scored is not None:
        report = out["measure"]
        print(f"  {args.measure_split} n={report['n']}: ECE {report['ece_before']:.4f} (softmax of the scores) -> "
              f"{report['ece_after']:.4f} (calibrated); H@1 {report['hits@1']:.4f}"
              + (f"; NIL share {args.nil_share}: accuracy {report['nil']['accuracy']:.4f} "
                 f"(in-KB {report['nil']['accuracy_in_kb']:.4f}, NIL P/R/F1 {report['nil']['nil_precision']:.3f}/"
                 f"{report['nil']['nil_recall']:.3f}/{report['nil']['nil_f1']:.3f})" if "nil" in report else ""))
        if args.plot:
            before = top_confidences(dev_scored, None)
            after = top_confidences(dev_scored, cal)
            reliability_diagram({"softmax of the scores": before, "calibrated": after}, args.plot,
                                title=f"{linker.name} on {args.format} {args.measure_split} (first {len(dev_ex)}), "
                                      f"KB {kb.size:,} entities; fitted on {args.split} n={len(scored)}")
    if args.json:
        with atomic_write(args.json) as tmp:
            tmp.write_text(json.dumps(out, indent=2, ensure_ascii=False), encoding="utf-8")
