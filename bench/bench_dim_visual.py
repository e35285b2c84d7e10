"""Issue #13, step 5: the shipped DIM head's visual terms on every real photo the project has.

    MEL_THREADS=1 OMP_NUM_THREADS=1 .venv/bin/python bench/bench_dim_visual.py [--head models/dim-offline]

Sets: WikiMEL's image mentions (train and dev, reported apart; the head's visual terms were fitted with the
train ones) against data/wikimel.sqlite, and the bundled demo examples against the demo KB. For each of the
linker's image settings (use_image / use_cue), the linker's own candidates, base scores and visual features
are computed once per mention; the visual groups are then switched on and off as
`FeatureExtractor.disabled_visual` does (a disabled group's mask is off, so it adds exactly 0).
Writes results/dim_visual_terms.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mel.datasets import load_dataset  # noqa: E402
from mel.dim.linker import DimLinker  # noqa: E402
from mel.dim.pairs import VISUAL_GROUPS  # noqa: E402
from mel.dim.visual_train import linker_rows  # noqa: E402
from mel.kb import KnowledgeBase  # noqa: E402
from mel.presets import get_preset  # noqa: E402
from mel.types import Example, Mention  # noqa: E402

GROUPS = list(VISUAL_GROUPS)
DEMO_GOLD = {"Collins": "demo:eileen-collins", "Hopper": "demo:grace-hopper", "Falcon": "demo:falcon-9",
             "Java": "demo:java-coffee", "Chelsea": "NIL"}  # Chelsea the cat has no entry: a NIL example


def collect(lk: DimLinker, examples) -> list[dict]:
    rows = []
    for row in linker_rows(lk, examples, lk.model.config.visual_feature_names):
        ex, feats = row.example, row.feats
        n = int(row.valid.sum())
        ents = lk.kb.entities_at([int(i) for i in row.idxs[:n]])
        faces = [(f.get("gender"), f.get("gender_probability"), f.get("age")) for f in (feats.faces[0] or [])]
        rows.append({"base": row.base[:n], "vis": torch.from_numpy(row.vis[:n]), "mask": torch.from_numpy(row.mask[:n]),
                     "ids": [x.id for x in ents], "names": [x.name for x in ents], "gold": ex.gold_id,
                     "sample": ex.sample_id, "split": ex.split, "faces": faces, "cue": (feats.cues[0] or {}).get("text")})
    return rows


def scores_with(head, row, groups) -> torch.Tensor:
    mask = row["mask"].clone()
    for g in GROUPS:
        if g not in groups:
            mask[:, GROUPS.index(g)] = False
    with torch.no_grad():
        return row["base"] + head.visual_scores(row["vis"][None], mask[None])[0]


def top1(head, row, groups) -> str | None:
    return row["ids"][int(torch.argmax(scores_with(head, row, groups)))] if row["ids"] else None


def variants(head_groups):
    out = {"no visual terms": []}
    out["all visual terms"] = list(head_groups)
    for g in head_groups:
        out[f"only {g}"] = [g]
        out[f"all but {g}"] = [x for x in head_groups if x != g]
    return out


def figures(head, settings: dict, splits: list[str]) -> dict:
    out = {}
    for setting, rows in settings.items():
        for name, groups in variants(head.config.visual_feature_names).items():
            entry = {}
            for split in splits:
                sub = [r for r in rows if r["split"] == split or split == "all"]
                ok = sum(top1(head, r, groups) == r["gold"] for r in sub)
                entry[split] = f"{ok}/{len(sub)}"
            out[f"{setting} | {name}"] = entry
    return out


def per_example(head, rows) -> list[dict]:
    out = []
    for r in rows:
        s0, s1 = r["base"], scores_with(head, r, list(head.config.visual_feature_names))
        order = torch.argsort(-s1)[:4]
        out.append({"example": r["sample"], "gold": r["gold"], "faces (apparent)": r["faces"],
                    "top1 without visual terms": r["ids"][int(torch.argmax(s0))] if r["ids"] else None,
                    "top1 with visual terms": r["ids"][int(torch.argmax(s1))] if r["ids"] else None,
                    "top1 by setting": r["top1 by setting"],
                    "top4 with visual terms": [(r["ids"][j], round(float(s1[j]), 3), round(float(s0[j]), 3))
                                               for j in order.tolist()]})
    return out


def demo_examples():
    from demo.bundled import bundled_examples, ensure_demo_kb
    out = []
    for b in bundled_examples():
        gold = getattr(b, "gold", "") or DEMO_GOLD.get(b.mention)
        out.append(Example(Mention(b.caption, b.start, b.end, image=str(b.image) if b.image else None, id=b.mention),
                           gold or "NIL", b.mention, sample_id=b.mention, dataset="demo",
                           split="demo"))
    return out, ensure_demo_kb(get_preset("offline"))


def run_set(head_dir, kb, examples, splits) -> tuple[dict, list, dict]:
    preset = get_preset("offline")
    settings = {}
    for use_image, use_cue in ((True, True), (False, True), (True, False), (False, False)):
        lk = DimLinker(kb, preset, checkpoint=head_dir, use_image=use_image, use_cue=use_cue)
        settings[f"use_image={use_image}, use_cue={use_cue}"] = collect(lk, examples)
        head = lk.model
    full = settings["use_image=True, use_cue=True"]
    head_groups = list(head.config.visual_feature_names)
    for i, row in enumerate(full):
        row["top1 by setting"] = {f"{name} | {label}": top1(head, rows[i], groups) for name, rows in settings.items()
                                  for label, groups in (("no visual terms", []), ("all visual terms", head_groups))}
    masks = {g: round(float(np.mean([r["mask"][:, i].float().mean().item() for r in full if len(r["ids"])])), 3)
             for i, g in enumerate(GROUPS)}
    return figures(head, settings, splits), per_example(head, full), masks


def demo_latency(head_dir, kb, examples, repeats: int = 3) -> dict:
    """Median / max ms of `linker.link` on the demo's image mentions (warm), with every visual group on, without
    image_text (no ConSE vector) and without any (the faces still come from the person cue)."""
    preset, out = get_preset("offline"), {}
    groups = list(DimLinker(kb, preset, checkpoint=head_dir).model.config.visual_feature_names)
    for label, off in (("all groups", ()), ("without image_text", ("image_text",)), ("no visual group", groups)):
        lk = DimLinker(kb, preset, checkpoint=head_dir, disable_visual=list(off))
        mentions = [ex.mention for ex in examples if ex.mention.image]
        for m in mentions:
            lk.link(m)
        times = []
        for _ in range(repeats):
            for m in mentions:
                t0 = time.perf_counter()
                lk.link(m)
                times.append(1000 * (time.perf_counter() - t0))
        out[label] = {"median_ms": round(float(np.median(times)), 1), "max_ms": round(max(times), 1), "n": len(times)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--head", default=str(ROOT / "models" / "dim-offline"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "wikimel"))
    ap.add_argument("--kb", default=str(ROOT / "data" / "wikimel.sqlite"))
    ap.add_argument("--out", default=str(ROOT / "results" / "dim_visual_terms.json"))
    ap.add_argument("--only-demo", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    out_path = Path(args.out)
    previous = json.loads(out_path.read_text()) if out_path.is_file() else {}
    # --only-demo keeps the WikiMEL figures; a text-only dev check added by hand (mel eval) is always kept
    report = previous if args.only_demo else {k: v for k, v in previous.items() if k == "text_only_dev_check"}
    from mel.training import load_config
    report["head"] = {"path": "models/dim-offline", "weights": load_config(args.head)["visual_terms"]["weights"]}
    report["command"] = "MEL_THREADS=1 OMP_NUM_THREADS=1 .venv/bin/python bench/bench_dim_visual.py" + (
        " --only-demo" if args.only_demo else "")
    if not args.only_demo:
        wik = [ex for split in ("train", "dev") for ex in load_dataset("wikimel", args.data, split).examples
               if ex.mention.image]
        fig, ex, masks = run_set(args.head, KnowledgeBase(args.kb), wik, ["train", "dev", "all"])
        report["wikimel_image_mentions"] = {"n": {s: sum(e.split == s for e in wik) for s in ("train", "dev")},
                                            "hits@1": fig, "visual masks present (share of candidate rows)": masks,
                                            "examples": ex}
        print("wikimel", round(time.time() - t0), "s", flush=True)
    dem, kb_path = demo_examples()
    fig, ex, masks = run_set(args.head, KnowledgeBase(kb_path), dem, ["demo"])
    latency = demo_latency(args.head, KnowledgeBase(kb_path), dem)
    report["demo_examples"] = {"latency (MEL_THREADS=1, shared 2-core CPU)": latency,"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "gold": {e.sample_id: e.gold_id for e in dem}, "hits@1": fig,
                               "visual masks present (share of candidate rows)": masks, "examples": ex}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report["demo_examples"]["examples"], indent=1, default=str)[:4000])
    print("done", round(time.time() - t0), "s")


if __name__ == "__main__":
    main()
