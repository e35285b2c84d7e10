"""Where a linker's top-1 errors are: one-word mentions (a surname alone) and captions with no context.

    python -m mel eval --format wikimel --data ../shared/data/wikimel --split dev --kb data/wikimel.sqlite \
        --linker dim --predictions runs/wikimel_dev_dim.jsonl
    python bench/error_breakdown.py --format wikimel --data ../shared/data/wikimel --split dev \
        --predictions runs/wikimel_dev_dim.jsonl --json results/wikimel_dev_dim_errors.json

A caption is "bare" when, once the mention is taken out, it has no word left but years, numbers and
the function words of photo captions ("in", "c.", "photo", "portrait"...): "Jones in 1972". There only
the image can tell the people of that name apart. The report gives Hits@1 per group, how many of the
errors each group holds, and how far Hits@1 would rise if every error of a group were fixed (what a
signal that only helps that group can buy at most).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mel.bench.provenance import save_json
from mel.cli_kit import script_command
from mel.datasets import load_dataset
from mel.errors import InputError

# function words of photo captions; anything else left in a caption counts as context
CAPTION_FILLER = frozenset("""a an the in at on of and with his her their its during from for to is was by as
    circa c ca photo photograph photographed portrait picture image taken official""".split())


def context_words(caption: str, mention: str) -> list[str]:
    rest = caption.replace(mention, " ")
    return [w for w in re.findall(r"[^\W\d_]+", rest) if w.lower() not in CAPTION_FILLER]


def read_predictions(path: Path) -> dict[str, dict]:
    out = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"cannot read predictions {path}: {exc}; write them with `mel eval --predictions`") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[row["sample_id"]] = row
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{path}:{n} is not a `mel eval --predictions` line") from None
    return out


def breakdown(split, predictions: dict[str, dict]) -> dict:
    groups: dict[str, list[bool]] = {}
    missing = 0
    for ex in split.examples:
        row = predictions.get(ex.sample_id)
        if row is None:
            missing += 1
            continue
        right = row.get("rank") == 1
        one_word = len(ex.mention.text.split()) == 1
        bare = not context_words(ex.mention.caption, ex.mention.text)
        key = f"{'one-word' if one_word else 'multi-word'} mention, {'bare' if bare else 'with context'} caption"
        groups.setdefault(key, []).append(right)
    n = sum(len(v) for v in groups.values())
    if n == 0:
        raise InputError("no prediction matches a mention of this split: were they written for another split?")
    correct = sum(sum(v) for v in groups.values())
    errors = n - correct
    rows = {}
    for key, values in sorted(groups.items()):
        wrong = len(values) - sum(values)
        rows[key] = {"n": len(values), "hits@1": round(sum(values) / len(values), 4), "errors": wrong,
                     "share_of_errors": round(wrong / errors, 4) if errors else 0.0,
                     "hits@1_if_all_fixed": round((correct + wrong) / n, 4)}
    return {"n": n, "hits@1": round(correct / n, 4), "errors": errors, "not_in_predictions": missing, "groups": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--format", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="dev")
    p.add_argument("--predictions", required=True, help="JSONL from `mel eval --predictions`")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    try:
        split = load_dataset(args.format, args.data, args.split, unlocated="context")  # as `mel eval`
        report = {"command": script_command(__file__, argv), "dataset": args.format, "split": args.split,
                  "predictions": Path(args.predictions).name, **breakdown(split, read_predictions(Path(args.predictions)))}
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.format} {args.split}: n={report['n']} H@1 {report['hits@1']:.4f}, {report['errors']} errors")
    for key, row in report["groups"].items():
        print(f"  {key:42s} n={row['n']:5d} H@1 {row['hits@1']:.4f} errors {row['errors']:4d} "
              f"({row['share_of_errors']:.0%} of all); all fixed -> H@1 {row['hits@1_if_all_fixed']:.4f}")
    if args.json:
        save_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
