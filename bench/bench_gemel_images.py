"""Does the image decide GEMEL's answer? The bundled demo's captions x photos, and held-out train images.

    python bench/bench_gemel_images.py matrix --label shipped --json results/gemel_image_matrix.json
    python bench/bench_gemel_images.py matrix --label conse --opt mapper=DIR
    python -m bench.bench_gemel_images heldout --feature conse --out runs/gemel-ho-conse --json results/...

`matrix`: the 5 bundled demo captions (demo/assets/examples.json) x the 5 bundled photos, plus no
photo, linked on the demo KB (30 entities) with the demo pool (24 text-only demonstrations), as the
app's service does, with `gemel+bm25` (the app's default generator) and `gemel` (whole-KB trie).
For each linker: the answer in every cell, how many (caption, photo) cells answer differently from
the same caption without a photo, how many captions get more than one answer across the photos,
and which answers are right. Only the matched pairs (a caption with its own photo) have a gold
answer: Eileen Collins, Grace Hopper, Falcon 9, Java coffee, NIL (the cat; GEMEL has no NIL
without a calibration, so it is always counted wrong here). A run is stored under `--label` in
the JSON file (other labels already there are kept), with its command.

`heldout`: the measure for choosing an image feature or prompt on TRAIN data only. The WikiMEL
train mentions with an image are split by image file (every third image, sorted by name, is held
out, with all of its mentions); a mapper is trained with the shipped recipe on the rest (the fit
part, `--examples with-image`), then on the held-out mentions (their demonstrations from the fit
part) it reports the mean answer loss with the trained mapper and with no visual tokens, and the
Hits@1 of gemel+bm25 with and without the image.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root (for demo/) on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mel.cli_kit import add_threads_arg, apply_threads, load_average, script_command
from mel.paths import REPO_ROOT, atomic_write, display_path

PHOTOS = ("astronaut", "grace_hopper", "rocket", "coffee", "chelsea")
GOLD = {"Collins": "demo:eileen-collins", "Hopper": "demo:grace-hopper", "Falcon": "demo:falcon-9",
        "Java": "demo:java-coffee", "Chelsea": None}  # None: NIL (the cat is not in the KB)
DEFAULT_LINKERS = "gemel+bm25 gemel"
RECIPE = {"lr": 1e-4, "epochs": 2, "grad_accum": 4, "examples": "with-image"}  # models/gemel-offline's


def _photo_key(ref: str) -> str:
    return ref.split(":", 1)[-1].rsplit(".", 1)[0]


def _options(pairs: list[str]) -> dict:
    from mel.linkers import parse_options
    return parse_options(pairs)


def link_matrix(linker, examples, keys: list[str]) -> dict:
    """{caption mention: {photo key or 'none': answer}} plus the summary counts; `keys`: each example's photo."""
    from mel.types import Mention
    photos = {"none": None, **{key: ex.image for key, ex in zip(keys, examples, strict=True)}}
    rows, details = {}, {}
    for ex in examples:
        row, det = {}, {}
        for key, image in photos.items():
            r = linker.link(Mention(ex.caption, ex.start, ex.end, image), k=3)
            row[key] = r.prediction.id if r.prediction is not None else None
            det[key] = {"answer": r.prediction.name if r.prediction is not None else None,
                        "top3": [[c.entity.name, round(float(c.score), 3)] for c in r.candidates[:3]],
                        "generated": getattr(r.details, "generated", None),
                        "visual_tokens": getattr(r.details, "visual_tokens", None)}
        rows[ex.mention] = row
        details[ex.mention] = det
    changed = sum(1 for m, row in rows.items() for key in PHOTOS if row[key] != row["none"])
    distinct = sum(1 for row in rows.values() if len(set(row.values())) > 1)
    own = {ex.mention: key for key, ex in zip(keys, examples, strict=True)}
    right_own = {m: rows[m][own[m]] == GOLD.get(m) for m in rows}
    right_none = {m: rows[m]["none"] == GOLD.get(m) for m in rows}
    return {"answers": rows, "details": details,
            "n_cells_changed_by_photo": changed, "n_cells_with_photo": len(rows) * len(PHOTOS),
            "n_captions_with_several_answers": distinct,
            "right_with_own_photo": right_own, "n_right_with_own_photo": sum(right_own.values()),
            "right_without_photo": right_none, "n_right_without_photo": sum(right_none.values()),
            "gold": GOLD}


def cmd_matrix(args) -> int:
    from demo.bundled import POOL_FILE, bundled_examples, ensure_demo_kb
    from mel.kb import KnowledgeBase
    from mel.linkers import build_linker
    from mel.presets import get_preset

    raw = json.loads((REPO_ROOT / "demo" / "assets" / "examples.json").read_text(encoding="utf-8"))
    examples = bundled_examples()
    keys = [_photo_key(item["image"]) for item in raw]
    preset = get_preset(args.preset)
    kb = KnowledgeBase(ensure_demo_kb(preset))
    options = _options(args.opt or [])
    run: dict = {"command": script_command(__file__, args.argv), "preset": preset.name, "kb": "demo KB",
                 "kb_size": kb.size, "pool": "demo/assets/pool.jsonl", "options": {k: str(v) for k, v in options.items()},
                 "load_avg_before": load_average(), "linkers": {}}
    for name in args.linkers.split():
        t0 = time.perf_counter()
        linker = build_linker(name, kb, preset, pool=str(POOL_FILE), **options)
        source = getattr(linker, "mapper_source", "")
        run["mapper"] = display_path(source) if source else "none"
        run["linker_config"] = {"image_feature": getattr(linker, "image_feature", "encoder"),
                                "prompt": getattr(linker, "prompt_style", "paper")}
        m = link_matrix(linker, examples, keys)
        m["seconds"] = round(time.perf_counter() - t0, 1)
        run["linkers"][name] = m
        print(f"{name}: {m['n_cells_changed_by_photo']}/{m['n_cells_with_photo']} cells change with the photo, "
              f"{m['n_captions_with_several_answers']}/5 captions get several answers; right with own photo "
              f"{m['n_right_with_own_photo']}/5, without photo {m['n_right_without_photo']}/5", flush=True)
        for mention, row in m["answers"].items():
            print(f"  {mention:8s} " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if args.json:
        store_run(args.json, __doc__.split("\n\n")[2].replace("\n", " "), args.label, run)
    return 0


def store_run(json_path: str | Path, about: str, label: str, run: dict) -> None:
    """Add `run` under `label` to the JSON file of runs (other labels kept; created when missing)."""
    path = Path(json_path)
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    data.setdefault("about", about)
    data.setdefault("runs", {})[label] = run
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:  # the earlier runs survive a process killed while writing
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# -- held-out train images -------------------------------------------------------------------
def split_by_image(examples, every: int = 3):
    """(fit examples, held-out examples with an image): every `every`-th image file (sorted by name)
    is held out with all of its mentions."""
    images = sorted({os.path.basename(ex.mention.image) for ex in examples if ex.mention.image})
    held = set(images[every - 1::every])
    fit = [ex for ex in examples if not (ex.mention.image and os.path.basename(ex.mention.image) in held)]
    out = [ex for ex in examples if ex.mention.image and os.path.basename(ex.mention.image) in held]
    return fit, out, sorted(held)


def cmd_heldout(args) -> int:
    import numpy as np

    from mel.datasets import load_dataset
    from mel.gemel.train import GemelTrainConfig, MapperTrainer
    from mel.kb import KnowledgeBase
    from mel.linkers import build_linker
    from mel.presets import get_preset

    preset = get_preset(args.preset)
    kb = KnowledgeBase(args.kb)
    train = load_dataset("wikimel", args.data, "train").examples
    fit, held, held_images = split_by_image(train)
    config = GemelTrainConfig(lr=RECIPE["lr"], epochs=RECIPE["epochs"], grad_accum=RECIPE["grad_accum"],
                              examples=RECIPE["examples"], image_feature=args.feature, prompt=args.prompt)
    out: dict = {"command": script_command(__file__, args.argv), "feature": args.feature, "prompt": args.prompt,
                 "n_fit_examples": len(fit), "n_heldout_mentions": len(held), "heldout_images": held_images,
                 "recipe": RECIPE, "load_avg_before": load_average()}
    t0 = time.perf_counter()
    if not (Path(args.out) / "model.safetensors").exists() or args.retrain:
        trainer = MapperTrainer(fit, kb, preset, args.out, config, progress=not args.quiet)
        result = trainer.run(command=out["command"])
        out["train"] = {"steps": result["steps"], "seconds": result["seconds"], "data": result["data"],
                        "epoch_mean_loss": result["epoch_mean_loss"]}
        print(f"trained {args.out}: {result['steps']} steps in {result['seconds']} s", flush=True)
    # the held-out mentions' answer loss: demonstrations from the fit part, mapper trained on it
    eval_config = GemelTrainConfig(examples="with-query-image", image_feature=args.feature, prompt=args.prompt)
    scratch = Path(args.out).with_name(Path(args.out).name + ".eval-scratch")
    ev = MapperTrainer(held, kb, preset, scratch, eval_config, pool_examples=fit, init=args.out, progress=False)
    trained = ev.item_losses()
    none = ev.item_losses(use_images=False)
    out["heldout_loss"] = {"n_items": len(ev.items), "trained_mapper": round(float(np.mean(trained)), 4),
                           "no_visual_tokens": round(float(np.mean(none)), 4),
                           "n_items_better_with_image": int(sum(a < b for a, b in zip(trained, none, strict=True)))}
    print(f"held-out answer loss ({len(ev.items)} mentions): trained mapper {out['heldout_loss']['trained_mapper']}, "
          f"no visual tokens {out['heldout_loss']['no_visual_tokens']}", flush=True)
    # Hits@1 of gemel+bm25 on the held-out mentions, with and without their image
    from mel.types import Mention
    hits = {}
    for use_images in (True, False):
        linker = build_linker("gemel+bm25", kb, preset, pool=fit, mapper=args.out, use_images=use_images,
                              prompt=args.prompt)
        ok = 0
        for ex in held:
            m = ex.mention
            r = linker.link(Mention(m.caption, m.start, m.end, m.image))
            ok += int(r.prediction is not None and r.prediction.id == ex.gold_id)
        hits["with_image" if use_images else "without_image"] = round(ok / max(len(held), 1), 4)
    out["heldout_hits1_gemel_bm25"] = {"n": len(held), **hits}
    print(f"held-out Hits@1 gemel+bm25 (n={len(held)}): with image {hits['with_image']}, without "
          f"{hits['without_image']}", flush=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        store_run(args.json, __doc__.split("\n\n")[3].replace("\n", " "), args.label or f"{args.feature}+{args.prompt}",
                  out)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("matrix", help="demo captions x demo photos")
    m.add_argument("--linkers", default=DEFAULT_LINKERS)
    m.add_argument("--opt", action="append", help="linker option key=value (repeatable), e.g. mapper=DIR")
    m.add_argument("--label", default="run")
    m.add_argument("--json", default=None)
    h = sub.add_parser("heldout", help="train on WikiMEL train minus held-out images, measure on those")
    h.add_argument("--feature", default="encoder", choices=("encoder", "conse"))
    h.add_argument("--prompt", default="paper", choices=("paper", "cue"))
    h.add_argument("--out", required=True, help="directory for the fit-part mapper (reused when present)")
    h.add_argument("--retrain", action="store_true")
    h.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data" / "wikimel"))
    h.add_argument("--kb", default=str(REPO_ROOT / "data" / "wikimel.sqlite"))
    h.add_argument("--label", default=None)
    h.add_argument("--json", default=None)
    h.add_argument("--quiet", action="store_true")
    for q in (m, h):
        q.add_argument("--preset", default="offline")
        add_threads_arg(q)
    args = p.parse_args(argv)
    args.argv = argv
    apply_threads(args.threads)
    return cmd_matrix(args) if args.what == "matrix" else cmd_heldout(args)


if __name__ == "__main__":
    raise SystemExit(main())
