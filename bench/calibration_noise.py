"""How much of a measured ECE is the sample size: the ECE a perfectly calibrated model would show on
the same mentions, and a bootstrap interval of the measured one.

    python bench/calibration_noise.py --scores runs/calg/wikidiverse_gemel+bm25.dev.jsonl \
        --calibration models/calibration/gemel+bm25@wikidiverse [--json results/calibration_noise.json]

Reads the dev scores saved by `mel calibrate --save-scores` (no linker is run). For the plain
softmax of the scores ("before") and for the calibration ("after"): the measured ECE (15 bins), a
95% bootstrap interval (mentions resampled), and the ECE of outcomes drawn as if each top
probability were exactly right (mean and 95th percentile): at n = 300-400 a perfectly calibrated
linker still shows an ECE of about 0.03-0.05.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mel.bench.provenance import save_json
from mel.calibration import Calibration, expected_calibration_error, loads_scored, top_confidences
from mel.cli_kit import script_command
from mel.errors import MELError


def noise(conf: np.ndarray, ok: np.ndarray, draws: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    perfect = [expected_calibration_error(conf, rng.random(conf.size) < conf) for _ in range(draws)]
    boot = []
    for _ in range(draws):
        i = rng.integers(0, conf.size, conf.size)
        boot.append(expected_calibration_error(conf[i], ok[i]))
    return {"ece": round(float(expected_calibration_error(conf, ok)), 4),
            "bootstrap_95": [round(float(np.percentile(boot, 2.5)), 4), round(float(np.percentile(boot, 97.5)), 4)],
            "perfectly_calibrated_mean": round(float(np.mean(perfect)), 4),
            "perfectly_calibrated_p95": round(float(np.percentile(perfect, 95)), 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scores", required=True, nargs="+", help="PREFIX.dev.jsonl files from `mel calibrate --save-scores`")
    p.add_argument("--calibration", required=True, nargs="+", help="the calibration directory of each scores file")
    p.add_argument("--draws", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if len(args.scores) != len(args.calibration):
        print("error: give one --calibration per --scores file, in the same order", file=sys.stderr)
        return 2
    report = {"command": script_command(__file__, argv), "runs": []}
    for scores_path, cal_dir in zip(args.scores, args.calibration, strict=True):
        try:
            scored = loads_scored(Path(scores_path).read_text(encoding="utf-8"))
            calibration = Calibration.load(cal_dir)
        except (OSError, MELError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        run = {"scores": Path(scores_path).name, "calibration": Path(cal_dir).name, "n": len(scored)}
        for name, cal in (("before", None), ("after", calibration)):
            conf, ok = top_confidences(scored, cal)
            run[name] = noise(conf, ok, args.draws, args.seed)
        report["runs"].append(run)
        b, a = run["before"], run["after"]
        print(f"{run['calibration']} n={run['n']}: before ECE {b['ece']:.4f}, after {a['ece']:.4f} "
              f"(95% {a['bootstrap_95'][0]:.4f}-{a['bootstrap_95'][1]:.4f}); a perfectly calibrated linker "
              f"here: mean {a['perfectly_calibrated_mean']:.4f}, 95th pct {a['perfectly_calibrated_p95']:.4f}")
    if args.json:
        save_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
