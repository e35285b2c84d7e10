"""Evaluation harness: Hits@k and MRR against the WHOLE KB, with latency figures.

A gold entity missing from the KB counts as a miss (and is counted). A NIL gold is a hit when
the linker predicts NIL (no entity). Latency is per mention as the linker reports it
(`timings["total"]`; batched linkers report their amortised share of a batch).
"""
from __future__ import annotations

import contextlib
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import InputError, require_whole
from .linkers.base import check_k
from .paths import atomic_write
from .types import NIL, Example, GemelDetails, LinkResult

HITS_AT = (1, 5, 10, 20)
# a linker's `protocol` attribute -> the label every report carries (whole-KB when it has none)
PROTOCOL_LABELS = {"whole-kb": "whole-KB ranking",
                   "candidate-list": "candidate lists given per mention, gold inside (inflated; DIM's code)"}


def rank_of(result: LinkResult, gold_id: str) -> int | None:
    """1-based rank of the gold entity among the candidates, None when absent."""
    for rank, candidate in enumerate(result.candidates, start=1):
        if candidate.entity.id == gold_id:
            return rank
    return None


def rank_metrics(ranks: Sequence[int | None]) -> dict:
    """Hits@k for k in HITS_AT and MRR from 1-based gold ranks (None: the gold was not returned)."""
    n = len(ranks)
    out = {f"hits@{h}": round(sum(1 for r in ranks if r is not None and r <= h) / n, 4) if n else 0.0
           for h in HITS_AT}
    out["mrr"] = round(sum(1.0 / r for r in ranks if r) / n, 4) if n else 0.0
    return out


def nil_metrics(decisions: Sequence[tuple[str, str | None]]) -> dict:
    """NIL-aware metrics from (gold id, predicted id or None for NIL) pairs, gold NIL meaning that
    the right entity is not in the KB:
    accuracy        correct answers over all mentions (an in-KB mention: the gold; a NIL one: NIL)
    accuracy_in_kb  the gold predicted, over the mentions whose gold is in the KB
    nil_precision   NIL answers whose gold is NIL, over the NIL answers (0 when there are none)
    nil_recall      NIL golds answered NIL, over the NIL golds (0 when there are none)
    nil_f1          their harmonic mean"""
    n = len(decisions)
    in_kb = [(g, p) for g, p in decisions if g != NIL]
    nil_gold = sum(g == NIL for g, _ in decisions)
    nil_pred = sum(p is None for _, p in decisions)
    nil_hit = sum(g == NIL and p is None for g, p in decisions)
    hit_in_kb = sum(p == g for g, p in in_kb)
    precision = nil_hit / nil_pred if nil_pred else 0.0
    recall = nil_hit / nil_gold if nil_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": n, "n_in_kb": len(in_kb), "n_nil_gold": nil_gold, "n_predicted_nil": nil_pred,
            "accuracy": round((hit_in_kb + nil_hit) / n, 4) if n else 0.0,
            "accuracy_in_kb": round(hit_in_kb / len(in_kb), 4) if in_kb else 0.0,
            "nil_precision": round(precision, 4), "nil_recall": round(recall, 4), "nil_f1": round(f1, 4)}


def evaluate(linker, examples: Sequence[Example], *, k: int = max(HITS_AT), batch_size: int = 32,
             progress: bool = True, predictions_path: str | Path | None = None, keep_ranks: bool = False,
             removed_ids: set[str] | frozenset[str] = frozenset(), nil_share: float | None = None) -> dict:
    """The report dict; `keep_ranks` adds `ranks`, the gold's rank per example (None when absent).

    With a calibrated linker (`linker.calibration`, mel.calibration) the report also has
    `calibration` (ECE over 15 bins of the top candidate's probability) and `nil`: the NIL-aware
    metrics (nil_metrics) on the KB view without `removed_ids` (filtered at query time: their
    candidates are dropped from each ranking, and a mention whose gold was removed has gold NIL),
    answering NIL below the linker's `nil_threshold`, else the calibration's. Hits@k and MRR stay
    those of the whole KB.
    """
    from tqdm.auto import tqdm

    if not len(examples):
        raise InputError("nothing to evaluate: no usable mention (an empty split, --limit cut everything, or the "
                         "reader skipped every mention; `python -m mel data info ...` shows why)")
    require_whole("batch_size", batch_size, 1)  # every linker, before the predictions file is touched
    check_k(k)
    kb = linker.kb
    ranks: list[int | None] = []
    latencies, stage_totals = [], {}
    n_gold_missing = n_nil = n_not_kb_name = 0
    calibration = getattr(linker, "calibration", None)
    threshold = getattr(linker, "nil_threshold", None)
    if threshold is None and calibration is not None:
        threshold = calibration.nil_threshold
    confidences, corrects, decisions = [], [], []
    started = time.perf_counter()
    # the predictions go to a temporary file published when every mention is done: an error or Ctrl-C
    # midway leaves the previous predictions file as it was, never an empty or partial one
    with contextlib.ExitStack() as files:
        out = None
        if predictions_path:
            out = files.enter_context(open(files.enter_context(atomic_write(predictions_path)), "w", encoding="utf-8"))
        results = linker.pipe((ex.mention for ex in examples), k=k, batch_size=batch_size)
        for example, result in tqdm(zip(examples, results, strict=True), total=len(examples),
                                    desc=f"eval {linker.name}", disable=not progress, unit=" mention"):
            if example.gold_id == NIL:
                n_nil += 1
                rank = 1 if result.prediction is None else None
            else:
                if example.gold_id not in kb:
                    n_gold_missing += 1
                rank = rank_of(result, example.gold_id)
            ranks.append(rank)
            if calibration is not None:
                nil_row = _nil_view(result, example.gold_id, calibration, threshold, removed_ids)
                confidences.append(nil_row[2])
                corrects.append(bool(result.candidates) and result.candidates[0].entity.id == example.gold_id)
                decisions.append(nil_row[:2])
            # free generation wrote a text that is no KB name
            n_not_kb_name += isinstance(result.details, GemelDetails) and result.details.not_a_kb_name
            latencies.append(result.timings.get("total", float("nan")))
            for stage, ms in result.timings.items():
                stage_totals[stage] = stage_totals.get(stage, 0.0) + ms
            if out:
                out.write(json.dumps({"sample_id": example.sample_id, "mention": example.mention.text,
                                      "gold_id": example.gold_id, "gold_name": example.gold_name, "rank": rank,
                                      "prediction": result.prediction.id if result.prediction else None,
                                      "top": [c.entity.id for c in result.candidates[:5]],
                                      "details": _jsonable(result.details.to_dict())}, ensure_ascii=False) + "\n")
    elapsed = time.perf_counter() - started
    n = len(ranks)
    protocol = getattr(linker, "protocol", "whole-kb")
    report = {"linker": linker.name, "n": n, "kb_size": kb.size, "protocol": PROTOCOL_LABELS.get(protocol, protocol)}
    report.update(rank_metrics(ranks))
    lat = np.asarray(latencies, dtype=float)
    report["latency_ms_p50"] = round(float(np.nanpercentile(lat, 50)), 2) if n else None
    report["latency_ms_p95"] = round(float(np.nanpercentile(lat, 95)), 2) if n else None
    report["stage_ms_mean"] = {s: round(t / n, 2) for s, t in stage_totals.items()} if n else {}
    report["throughput_per_s"] = round(n / elapsed, 2) if elapsed > 0 else None
    report["wall_seconds"] = round(elapsed, 2)
    report["n_gold_not_in_kb"] = n_gold_missing
    report["n_nil_gold"] = n_nil
    if n_not_kb_name:
        report["n_not_a_kb_name"] = n_not_kb_name
    report["n_with_image"] = sum(1 for ex in examples if ex.mention.image)
    preset = linker.preset
    report["preset"] = getattr(preset, "name", "")
    report["preset_reason"] = getattr(preset, "reason", "")
    report["models"] = linker.models()
    report["kb_path"] = str(kb.path.name)
    report["python"] = platform.python_version()
    report["command"] = " ".join(["python -m mel"] + sys.argv[1:]) if sys.argv and sys.argv[0].endswith(("mel", "__main__.py")) else ""
    if calibration is not None and n:
        from .calibration import expected_calibration_error
        report["calibration"] = {"ece": round(expected_calibration_error(confidences, corrects), 4), "bins": 15,
                                 "mean_confidence": round(float(np.mean(confidences)), 4), "n": n,
                                 "temperature": calibration.temperature, "fitted_on": calibration.fitted_on}
        report["nil"] = {"share": nil_share if nil_share is not None else 0.0, "n_removed_golds": len(removed_ids),
                         "threshold": threshold, "kb_view": "removed golds filtered from each ranking at query time",
                         **nil_metrics(decisions)}
    if keep_ranks:
        report["ranks"] = ranks
    return report


def _nil_view(result: LinkResult, gold_id: str, calibration, threshold, removed) -> tuple[str, str | None, float]:
    """(gold, prediction or None, probability of the full ranking's top candidate) for the NIL-aware
    metrics: the ranking without `removed`, NIL below `threshold` (never NIL when it is None)."""
    kept = [c for c in result.candidates if c.entity.id not in removed]
    gold = NIL if gold_id in removed else gold_id
    probs = calibration.probabilities([c.score for c in result.candidates]) if result.candidates else []
    top_full = float(probs[0]) if len(probs) else 0.0
    if not kept:
        return gold, None, top_full
    p0 = float(calibration.probabilities([c.score for c in kept])[0])
    return gold, (None if threshold is not None and p0 < threshold else kept[0].entity.id), top_full


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def format_report(report: dict) -> str:
    hits = "  ".join(f"H@{h} {report[f'hits@{h}']:.4f}" for h in HITS_AT)
    return (f"{report['linker']}: n={report['n']} kb_size={report['kb_size']:,} ({report['protocol']})\n"
            f"  {hits}  MRR {report['mrr']:.4f}\n"
            f"  latency p50 {report['latency_ms_p50']} ms, p95 {report['latency_ms_p95']} ms, "
            f"{report['throughput_per_s']} mentions/s; gold not in KB: {report['n_gold_not_in_kb']}; "
            f"preset {report['preset']}" + _format_calibrated(report))


def _format_calibrated(report: dict) -> str:
    text = ""
    if "calibration" in report:
        c = report["calibration"]
        text += f"\n  calibrated: ECE {c['ece']:.4f} ({c['bins']} bins, n={c['n']}), T={c['temperature']:.4g}"
    if "nil" in report:
        m = report["nil"]
        text += (f"\n  NIL-aware (share {m['share']} of the golds out of the KB, {m['n_removed_golds']} entities; "
                 f"threshold {m['threshold']}): accuracy {m['accuracy']:.4f}, in-KB accuracy {m['accuracy_in_kb']:.4f}, "
                 f"NIL precision {m['nil_precision']:.4f} recall {m['nil_recall']:.4f} F1 {m['nil_f1']:.4f} "
                 f"({m['n_nil_gold']} NIL golds, {m['n_predicted_nil']} NIL answers)")
    return text
