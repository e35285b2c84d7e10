"""Issue #13, steps 1-2: the face pipeline's apparent gender / age against WikiMEL TRAIN image mentions.

    MEL_THREADS=1 OMP_NUM_THREADS=1 .venv/bin/python bench/face_error_model.py [--data ../shared/data/wikimel]

Which faces are scored (the photos hold several people and no face is labelled):
- gender: every detected face of a photo whose located train mentions all have one gold `Sex:` (male /
  female); the face is scored against that sex;
- age: photos with exactly one located mention whose gold has `Birth:` and whose caption has a year; the
  largest face, against (the caption's earliest year - the birth year).
Crop variants (step 1) are measured on the same faces; the error model (step 2) is measured with the crop
`mel.backends.faces` uses. Writes results/face_error_model.json (figures + the error model). Dev is not read.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mel.backends.faces import face_crop_box, load_face_analyzer  # noqa: E402
from mel.datasets import load_dataset  # noqa: E402
from mel.dim.pairs import _YEAR  # noqa: E402
from mel.imageio import load_image  # noqa: E402

SEX = re.compile(r"Sex:\s*(male|female)\b", re.I)
BIRTH = re.compile(r"Birth:\s*(-?\d{1,4})")


def crop_variant(full: np.ndarray, points: np.ndarray, pad: float, square: bool) -> np.ndarray:
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0)
    w, h = x1 - x0, y1 - y0
    if square:
        side = max(w, h)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        x0, y0, w, h = cx - side / 2, cy - side / 2, side, side
    x, y, w, h = x0 - pad / 2 * w, y0 - pad / 2 * h, (1 + pad) * w, (1 + pad) * h
    H, W = full.shape[:2]
    a, b = int(max(np.floor(x), 0)), int(max(np.floor(y), 0))
    c, d = int(min(np.floor(x + w), W)), int(min(np.floor(y + h), H))
    return full[b:d, a:c]


def variants(analyzer, full: np.ndarray, pixels, shape, points, scale):
    import dlib
    H, W = full.shape[:2]
    out = {}
    x, y, w, h = face_crop_box(points, W, H)
    out["current (landmarks bbox + 20%)"] = full[y:y + h, x:x + w]
    for pad in (0.0, 0.2, 0.4, 0.6):
        out[f"pad {int(pad * 100)}%"] = crop_variant(full, points, pad, square=False)
        out[f"pad {int(pad * 100)}% square"] = crop_variant(full, points, pad, square=True)
    for pad in (0.1, 0.25, 0.4):  # dlib's aligned chip (eyes level), on the detection-scale pixels
        out[f"aligned chip pad {int(pad * 100)}%"] = np.asarray(dlib.get_face_chip(pixels, shape, size=150, padding=pad))
    return out


def analyze(analyzer, path):
    from PIL import Image
    image = load_image(path)
    width, height = image.size
    scale = min(1.0, 1024 / max(width, height))
    small = image if scale == 1.0 else image.resize((round(width * scale), round(height * scale)),
                                                     Image.Resampling.BILINEAR)
    pixels = np.asarray(small, dtype=np.uint8)
    rects, scores, _ = analyzer.detector.run(pixels, 1 if max(small.size) <= 640 else 0, 0.0)
    full = np.asarray(image, dtype=np.uint8)
    faces = []
    for rect, score in zip(rects, scores, strict=True):
        if score < 0.3:
            continue
        shape = analyzer.shape_predictor(pixels, rect)
        points = np.array([[p.x, p.y] for p in shape.parts()], np.float64) / scale
        crops = variants(analyzer, full, pixels, shape, points, scale)
        preds = analyzer.age_gender.predict(list(crops.values()))
        area = (rect.right() - rect.left()) * (rect.bottom() - rect.top())
        faces.append((area, dict(zip(crops, preds, strict=True))))
    faces.sort(key=lambda f: -f[0])
    return [f[1] for f in faces]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "wikimel"))
    ap.add_argument("--out", default=str(ROOT / "results" / "face_error_model.json"))
    ap.add_argument("--extra-image", action="append", default=[], help="report only (never chosen on)")
    args = ap.parse_args(argv)
    abstracts = json.loads((Path(args.data) / "qid2abs.json").read_text())
    examples = [e for e in load_dataset("wikimel", args.data, "train").examples if e.mention.image]
    by_image: dict[str, list] = {}
    for e in examples:
        by_image.setdefault(e.mention.image, []).append(e)
    analyzer = load_face_analyzer("cpu")
    gender_rows, age_rows = [], []
    for image, exs in sorted(by_image.items()):
        faces = analyze(analyzer, image)
        sexes = {m.group(1).lower() for e in exs if (m := SEX.search(abstracts.get(e.gold_id, "")))}
        n_sex = sum(bool(SEX.search(abstracts.get(e.gold_id, ""))) for e in exs)
        if len(sexes) == 1 and n_sex == len(exs):
            sex = sexes.pop()
            for f in faces:
                gender_rows.append({"image": Path(image).name, "sex": sex,
                                    **{k: (p.gender, round(p.gender_probability, 4)) for k, p in f.items()}})
        if len(exs) == 1 and faces:
            e = exs[0]
            birth = BIRTH.search(abstracts.get(e.gold_id, ""))
            years = [int(y) for y in _YEAR.findall(e.mention.caption)]
            if birth and years:
                true_age = min(years) - int(birth.group(1))
                age_rows.append({"image": Path(image).name, "true_age": true_age,
                                 **{k: round(p.age - true_age, 2) for k, p in faces[0].items()}})
    names = list(gender_rows[0].keys())[2:] if gender_rows else []
    table = {}
    for k in names:
        right = [r[k][1] for r in gender_rows if r[k][0] == r["sex"]]
        wrong = [r[k][1] for r in gender_rows if r[k][0] != r["sex"]]
        errs = [r[k] for r in age_rows]
        table[k] = {"gender_accuracy": round(len(right) / len(gender_rows), 4), "n_faces": len(gender_rows),
                    "female_recall": _recall(gender_rows, k, "female"), "male_recall": _recall(gender_rows, k, "male"),
                    "age_mae": round(float(np.mean(np.abs(errs))), 2) if errs else None,
                    "age_mean_error": round(float(np.mean(errs)), 2) if errs else None, "n_age": len(errs),
                    "_right": right, "_wrong": wrong, "_age_errors": errs}
    extra = {}
    for img in args.extra_image:
        from demo.bundled import package_image
        faces = analyze(analyzer, package_image(img) if ":" in img else img)
        extra[img] = [{k: [p.gender, round(p.gender_probability, 3), round(p.age, 1)] for k, p in f.items()}
                      for f in faces]
    cur = "current (landmarks bbox + 20%)"
    # the rule: mel.backends.faces changes only for a crop with a HIGHER train gender accuracy (ties keep it)
    better = sorted((k for k in table if table[k]["gender_accuracy"] > table[cur]["gender_accuracy"]),
                    key=lambda k: -table[k]["gender_accuracy"])
    model = error_model(table[cur], len(examples), len(by_image))
    report = {"command": "MEL_THREADS=1 OMP_NUM_THREADS=1 .venv/bin/python bench/face_error_model.py "
                         + " ".join(f"--extra-image {x}" for x in args.extra_image),
              "data": "WikiMEL train image mentions (%d mentions, %d photos)" % (len(examples), len(by_image)),
              "face_rule": __doc__.split("Which faces are scored")[1].split("Crop variants")[0].strip(),
              "crop_variants": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in table.items()},
              "rule": "change the crop only for a higher TRAIN gender accuracy than the current one",
              "variants_better_on_train": better, "crop_changed": bool(better), "error_model": model, "extra_images_report_only": extra,
              "gender_rows": gender_rows, "age_rows": age_rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    for k, v in table.items():
        print(f"{k:34s} acc {v['gender_accuracy']:.3f} (n={v['n_faces']}) F {v['female_recall']} M {v['male_recall']} "
              f"age MAE {v['age_mae']} bias {v['age_mean_error']} (n={v['n_age']})")
    print("extra:", json.dumps(extra)[:3000])


def _recall(rows, k, sex):
    sub = [r for r in rows if r["sex"] == sex]
    return round(sum(r[k][0] == sex for r in sub) / len(sub), 3) if sub else None


def error_model(v: dict, n_mentions: int, n_photos: int) -> dict:
    return {"source": f"WikiMEL train image mentions ({n_mentions} mentions, {n_photos} photos; dev not read), "
                      f"the face pipeline of mel.backends.faces (crop: landmarks' box + 20%)",
            "face_rule": "gender: every face of a photo whose mentions all have one Sex:; age: the largest face of a "
                         "photo with one mention",
            "female_accuracy": v["female_recall"], "male_accuracy": v["male_recall"],
            "gender_accuracy": v["gender_accuracy"], "n_gender_faces": v["n_faces"],
            "gender_probability_right": sorted(v["_right"]), "gender_probability_wrong": sorted(v["_wrong"]),
            "age_error": sorted(v["_age_errors"]), "n_age": v["n_age"],
            "age_reference": "the caption's earliest year minus the gold's Birth: year"}


if __name__ == "__main__":
    main()
