"""Evaluation harness: Hits@k and MRR against the WHOLE KB, with latency figures.

A gold entity missing from the KB counts as a miss (and is counted). A NIL gold is a hit when
the linker predicts NIL (no entity). Latency is per mention as the linker reports it
(`timings["total"]`; batched linkers report their amortised share of a batch).
"""
from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import InputError
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


def evaluate(linker, examples: Sequence[Example], *, k: int = max(HITS_AT), batch_size: int = 32,
             progress: bool = True, predictions_path: str | Path | None = None, keep_ranks: bool = False) -> dict:
    """The report dict; `keep_ranks` adds `ranks`, the gold's rank per example (None when absent)."""
    from tqdm.auto import tqdm

    if not len(examples):
        raise InputError("nothing to evaluate: no usable mention (an empty split, --limit cut everything, or the "
                         "reader skipped every mention; `python -m mel data info ...` shows why)")
    kb = linker.kb
    ranks: list[int | None] = []
    latencies, stage_totals = [], {}
    n_gold_missing = n_nil = n_not_kb_name = 0
    out = open(predictions_path, "w", encoding="utf-8") if predictions_path else None
    started = time.perf_counter()
    try:
        results = linker.pipe((ex.mention for ex in examples), k=k, batch_size=batch_size)
        for example, result in tqdm(zip(examples, results), total=len(examples), desc=f"eval {linker.name}",
                                    disable=not progress, unit=" mention"):
            if example.gold_id == NIL:
                n_nil += 1
                rank = 1 if result.prediction is None else None
            else:
                if example.gold_id not in kb:
                    n_gold_missing += 1
                rank = rank_of(result, example.gold_id)
            ranks.append(rank)
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
    finally:
        if out:
            out.close()
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
    if keep_ranks:
        report["ranks"] = ranks
    return report


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
            f"preset {report['preset']}")
