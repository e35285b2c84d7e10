"""Calibrated probabilities, ECE, the NIL threshold and NIL-aware metrics (mel.calibration)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mel import calibration as calmod
from mel.calibration import (
    Calibration,
    Scored,
    candidate_probabilities,
    choose_nil_threshold,
    expected_calibration_error,
    fit_temperature,
    nil_decisions,
    removed_golds,
    use_calibration,
)
from mel.errors import InputError
from mel.evaluate import nil_metrics
from mel.linkers.base import Linker
from mel.types import NIL, Candidate, Entity, Example, LinkResult, Mention


def test_ece_matches_a_hand_computed_table():
    # 15 bins of width 1/15: 0.95 -> bin 14, 0.55 -> bin 8, 0.15 -> bin 2
    # bin 14: 2 mentions, accuracy 0.5, confidence 0.95 -> 2/5 * 0.45 = 0.18
    # bin 8:  2 mentions, accuracy 1.0, confidence 0.55 -> 2/5 * 0.45 = 0.18
    # bin 2:  1 mention,  accuracy 0.0, confidence 0.15 -> 1/5 * 0.15 = 0.03
    conf = [0.95, 0.95, 0.55, 0.55, 0.15]
    ok = [True, False, True, True, False]
    assert expected_calibration_error(conf, ok) == pytest.approx(0.39)
    assert expected_calibration_error([0.8] * 10, [True] * 8 + [False] * 2) == pytest.approx(0.0)
    assert expected_calibration_error([1 / 15, 0.0], [False, False]) == pytest.approx(1 / 30)  # both in bin 0
    with pytest.raises(InputError):
        expected_calibration_error([], [])


def test_probabilities_with_the_none_option():
    p = candidate_probabilities([2.0, 1.0, float("-inf")], temperature=1.0, none_logit=0.0)
    e = np.exp([2.0, 1.0, 0.0])
    assert p == pytest.approx([e[0] / e.sum(), e[1] / e.sum(), 0.0])
    assert candidate_probabilities([5.0]) == pytest.approx([1.0])  # plain softmax: one candidate is sure
    assert candidate_probabilities([5.0], none_logit=5.0) == pytest.approx([0.5])
    assert candidate_probabilities([]).size == 0


def _synthetic(n, t_true, b_true, seed=0, width=8):
    """Mentions whose gold is drawn from softmax(z / T) with a "none" logit b (gold not returned)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        z = np.sort(rng.normal(0, 3, width))[::-1]
        p = candidate_probabilities(z, t_true, b_true)
        pick = rng.choice(width + 1, p=np.append(p, max(0.0, 1 - p.sum())))
        ids = [f"e{i}_{j}" for j in range(width)]
        gold = ids[pick] if pick < width else f"absent{i}"
        rows.append(Scored(gold, ids, z.tolist(), f"s{i}"))
    return rows


def test_temperature_fit_recovers_a_known_temperature_and_none_logit():
    t, b = fit_temperature(_synthetic(3000, 2.5, 0.5))
    assert t == pytest.approx(2.5, rel=0.1) and b == pytest.approx(0.5, abs=0.3)
    t2, b2 = fit_temperature(_synthetic(3000, 0.5, -1.0, seed=1))
    assert t2 == pytest.approx(0.5, rel=0.1) and b2 == pytest.approx(-1.0, abs=0.4)
    # and the fitted probabilities are calibrated on fresh mentions of the same kind
    cal = Calibration("x", temperature=t, none_logit=b)
    fresh = _synthetic(3000, 2.5, 0.5, seed=7)
    conf, ok = calmod.top_confidences(fresh, cal)
    raw_conf, _ = calmod.top_confidences(fresh, None)
    assert expected_calibration_error(conf, ok) < 0.03 < expected_calibration_error(raw_conf, ok)


def test_candidate_probability_round_trips_and_is_checked():
    e = Entity("Q1", "Eileen Collins")
    m = Mention("Collins in orbit", 0, 7)
    r = LinkResult("bm25", m, e, [Candidate(e, 3.0, "bm25", probability=0.75), Candidate(e, 1.0, "bm25")])
    back = LinkResult.from_json(r.to_json())
    assert back == r and [c.probability for c in back.candidates] == [0.75, None]
    assert json.loads(r.to_json())["candidates"][1]["probability"] is None
    for bad in (1.5, -0.1, "0.5", True):
        with pytest.raises(InputError, match="probability"):
            Candidate(e, 1.0, "x", probability=bad)


class _Fixed(Linker):
    """Returns the same two candidates for any mention (scores 2 and 0)."""

    name = "fixed"

    def __init__(self):
        super().__init__(kb=None, preset=None)

    def _link(self, mention, k):
        a, b = Entity("A", "Alpha"), Entity("B", "Beta")
        return LinkResult(self.name, mention, a, [Candidate(a, 2.0, "x"), Candidate(b, 0.0, "x")], score=2.0)


def test_every_linker_gets_probabilities_and_nil_through_the_base_class():
    linker, m = _Fixed(), Mention("Alpha or Beta", 0, 5)
    plain = linker.link(m)
    assert linker.calibration is None and [c.probability for c in plain.candidates] == [None, None]
    use_calibration(linker, Calibration("fixed", temperature=1.0, none_logit=0.0))
    r = linker.link(m)
    e = np.exp([2.0, 0.0, 0.0])
    assert [c.probability for c in r.candidates] == pytest.approx([e[0] / e.sum(), e[1] / e.sum()], abs=1e-6)
    assert r.prediction.id == "A"  # no NIL unless asked
    assert [x.candidates[0].probability for x in linker.pipe([m, m])] == [r.candidates[0].probability] * 2
    use_calibration(linker, linker.calibration, nil=0.9)  # above the best probability (~0.79): NIL
    r = linker.link(m)
    assert r.prediction is None and r.candidates[0].entity.id == "A" and "below the threshold" in r.details.note
    assert linker.apply_calibration(r).details.note.count("NIL") == 1  # idempotent
    with pytest.raises(InputError, match="NIL threshold"):
        use_calibration(linker, Calibration("fixed"), nil=True)  # none stored


class _LeaveOneOut(_Fixed):
    """A linker that draws on samples (like GEMEL's demonstrations): records what it was told to leave out."""

    excludes_samples = True

    def __init__(self):
        super().__init__()
        self.left_out = []

    def _link_excluding(self, mention, k, sample_id):
        self.left_out.append(sample_id)
        return self._link(mention, k)


def test_collect_leaves_each_sample_out_only_where_the_linker_says_it_can():
    examples = [Example(Mention("Alpha or Beta", 0, 5), "A", sample_id=f"s{i}") for i in range(3)]
    loo = _LeaveOneOut()
    use_calibration(loo, Calibration("fixed", temperature=1.0, none_logit=0.0))
    scored = calmod.collect(loo, examples)
    assert loo.left_out == ["s0", "s1", "s2"] and [s.sample_id for s in scored] == ["s0", "s1", "s2"]
    assert loo.calibration is not None  # collect scores without the calibration, then puts it back
    assert loo.link(examples[0].mention, exclude_sample_id="s9").candidates[0].probability is not None
    assert [s.ids for s in calmod.collect(_Fixed(), examples)] == [["A", "B"]] * 3  # through pipe
    with pytest.raises(InputError, match="exclude_sample_id"):
        _Fixed().link(examples[0].mention, exclude_sample_id="s0")


def test_saved_calibration_loads_and_a_default_for_other_models_is_not_used(tmp_path, monkeypatch):
    cal = Calibration("fixed", temperature=2.0, none_logit=1.5, nil_threshold=0.4, fitted_on={"split": "train"})
    assert Calibration.load(cal.save(tmp_path / "c")) == cal
    assert Calibration.load(Calibration("x").save(tmp_path / "d")).none_logit == -math.inf
    with pytest.raises(InputError, match="no calibration"):
        Calibration.load(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "DimFusion"}')
    with pytest.raises(InputError, match="not a calibration"):
        Calibration.load(tmp_path / "bad")

    class _KB:
        path = tmp_path / "mykb.sqlite"

    linker = _Fixed()
    linker.kb = _KB()
    monkeypatch.setattr(calmod, "DEFAULT_DIR", tmp_path / "defaults")
    mine = Calibration("fixed", temperature=3.0, fingerprint=calmod.model_fingerprint(linker))
    mine.save(tmp_path / "defaults" / "fixed@mykb")
    assert linker.calibration == mine  # found by itself, under <linker>@<kb stem>
    Calibration("fixed", fingerprint="0" * 16).save(tmp_path / "defaults" / "fixed@mykb")
    other = _Fixed()
    other.kb = _KB()
    with pytest.warns(UserWarning, match="other models"):
        assert other.calibration is None


def test_removed_golds_are_a_seeded_deterministic_share():
    golds = [f"Q{i}" for i in range(200)] * 2 + [NIL]
    a = removed_golds(golds, 0.1, seed=0)
    assert len(a) == 20 and a == removed_golds(list(reversed(golds)), 0.1, seed=0) and NIL not in a
    assert a != removed_golds(golds, 0.1, seed=1)
    assert removed_golds(golds, 0.0) == set()
    with pytest.raises(InputError, match="NIL share"):
        removed_golds(golds, 1.0)


def test_nil_metrics_match_a_hand_computed_table():
    decisions = [("Q1", "Q1"), ("Q2", "Q3"), ("Q4", None), (NIL, None), (NIL, "Q5")]
    m = nil_metrics(decisions)
    # in-KB: 3 mentions, 1 right; NIL golds 2, answered NIL 2 (one of them right)
    assert (m["n"], m["n_in_kb"], m["n_nil_gold"], m["n_predicted_nil"]) == (5, 3, 2, 2)
    assert m["accuracy_in_kb"] == pytest.approx(1 / 3, abs=1e-4)
    assert m["accuracy"] == pytest.approx(2 / 5)
    assert (m["nil_precision"], m["nil_recall"], m["nil_f1"]) == (0.5, 0.5, 0.5)
    assert nil_metrics([("Q1", "Q1")])["nil_f1"] == 0.0


def test_nil_threshold_is_chosen_to_maximise_nil_aware_accuracy():
    cal = Calibration("x", temperature=1.0, none_logit=0.0)
    rows = [Scored("A", ["A", "B"], [4.0, 0.0]),   # sure and right
            Scored("C", ["C", "D"], [3.0, 0.0]),   # sure and right
            Scored("E", ["E", "F"], [0.2, 0.0]),   # unsure; its gold will be removed -> should be NIL
            Scored("G", ["H", "G"], [0.3, 0.0])]   # unsure and wrong
    removed = {"E"}
    t, acc = choose_nil_threshold(rows, cal, removed)
    decided = nil_decisions(rows, cal, t, removed)
    assert decided[:2] == [("A", "A"), ("C", "C")] and decided[2] == (NIL, None)
    assert acc == pytest.approx(nil_metrics(decided)["accuracy"]) == pytest.approx(0.75)
    assert nil_metrics(nil_decisions(rows, cal, None, removed))["accuracy"] == pytest.approx(0.5)


def person_dataset(tmp_path, hashing_encoder, sizes: dict[str, int]):
    """A jsonl dataset of ten people (each split `sizes[split]` mentions, by first or last name:
    sometimes ambiguous, sometimes not) in tmp_path/ds, and its KB: (data folder, KB)."""
    from mel.datasets import write_jsonl_examples, write_jsonl_kb
    from mel.kb import build_kb
    from mel.types import Example
    names = ["Ada Lovelace", "Grace Hopper", "Alan Turing", "Eileen Collins", "Sally Ride", "Katherine Johnson",
             "Margaret Hamilton", "John Glenn", "Yuri Gagarin", "Valentina Tereshkova"]
    entities = [Entity(f"Q{i}", n, description=f"person number {i}") for i, n in enumerate(names)]
    data = tmp_path / "ds"
    data.mkdir()
    write_jsonl_kb(entities, data / "kb.jsonl")
    for split, n in sizes.items():
        rows = []
        for i in range(n):
            e = entities[i % len(entities)]
            word = e.name.split()[i % 2]
            caption = f"Photo {i}: {word} at the event."
            start = caption.index(word)
            rows.append(Example(Mention(caption, start, start + len(word)), e.id, e.name, f"{split}{i}", "jsonl", split))
        write_jsonl_examples(rows, data / f"{split}.jsonl")
    return data, build_kb(entities, tmp_path / "kb.sqlite", text_encoder=hashing_encoder, progress=False)


def test_calibrate_and_eval_from_the_command_line(tmp_path, hashing_encoder, capsys):
    """`mel calibrate` on train writes config.json; `mel eval --nil-share` reports both metric families."""
    from mel.cli import main
    data, kb = person_dataset(tmp_path, hashing_encoder, {"train": 40, "dev": 20})
    out = tmp_path / "cal"
    assert main(["calibrate", "--format", "jsonl", "--data", str(data), "--split", "train", "--limit", "0",
                 "--kb", str(kb.path), "--linker", "bm25", "--out", str(out), "--quiet"]) in (0, None)
    cal = Calibration.load(out)
    assert cal.linker == "bm25" and cal.fitted_on["split"] == "train" and cal.fitted_on["n"] == 40
    assert cal.nil_threshold is not None and cal.fitted_on["nil_share"] == 0.1
    assert main(["calibrate", "--format", "jsonl", "--data", str(data), "--split", "dev", "--kb", str(kb.path),
                 "--linker", "bm25", "--out", str(tmp_path / "no")]) == 2  # never fit on dev
    assert "not on 'dev'" in capsys.readouterr().err
    report = tmp_path / "r.json"
    assert main(["eval", "--format", "jsonl", "--data", str(data), "--split", "dev", "--kb", str(kb.path),
                 "--linker", "bm25", "--calibration", str(out), "--nil-share", "0.1", "--json", str(report),
                 "--quiet"]) in (0, None)
    printed = capsys.readouterr().out
    assert "H@1" in printed and "NIL-aware" in printed and "located by rule" in printed
    r = json.loads(report.read_text())
    assert r["nil"]["share"] == 0.1 and r["nil"]["n_removed_golds"] == 1 and r["nil"]["n"] == 20
    assert 0 <= r["calibration"]["ece"] <= 1 and r["located_by_rule"]["offsets"] == 20
    assert main(["eval", "--format", "jsonl", "--data", str(data), "--split", "dev", "--kb", str(kb.path),
                 "--linker", "exact", "--nil-share", "0.1", "--quiet"]) == 2  # no calibration for exact here
    assert "needs a calibrated exact" in capsys.readouterr().err
