"""Issue #15's leftovers: `mel link` prints calibrated probabilities (and NIL below a threshold);
the app shows calibrated probabilities as such (and an uncalibrated softmax labelled as one); the
app's default generator is gemel+bm25, with the paper's whole-KB GEMEL one switch away."""
from __future__ import annotations

import json
import re

import pytest

from annotations.projects import Progress, Task
from annotations.queue import PredictionView, TaskView
from demo.render import (
    CALIBRATED,
    UNCALIBRATED,
    candidate_headers,
    candidate_rows,
    probabilities,
    render_generator,
    render_ranker_note,
    render_task,
    status_html,
)
from demo.service import LinkView, PanelResult, ServiceConfig
from mel.calibration import Calibration
from mel.types import Candidate, Entity, LinkResult, Mention

EVIL = '<img src=x onerror="alert(1)">'


# -- mel link --calibration / --nil ------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_kb(tmp_path_factory):
    from conftest import HashingTextEncoder

    from mel.kb import build_kb
    names = ["Eileen Collins", "Phil Collins", "Michael Collins", "Grace Hopper", "Edward Hopper"]
    entities = [Entity(f"Q{i}", n, description=f"person number {i}") for i, n in enumerate(names)]
    return build_kb(entities, tmp_path_factory.mktemp("kb") / "mykb.sqlite", text_encoder=HashingTextEncoder(),
                    progress=False)


def _link(capsys, kb, *extra):
    from mel.cli import main
    rc = main(["link", "--kb", str(kb.path), "--linker", "bm25", "--caption", "Collins waves from the hatch.",
               "--mention", "Collins", *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_mel_link_prints_calibrated_probabilities_and_nil_below_a_threshold(tmp_path, small_kb, capsys):
    cal = Calibration("bm25", temperature=2.0, none_logit=0.5, nil_threshold=0.2,
                      fitted_on={"dataset": "jsonl", "split": "train", "n": 40},
                      metrics={"train": {"ece_before": 0.2, "ece_after": 0.05}})
    cal.save(tmp_path / "cal")
    rc, out, _ = _link(capsys, small_kb, "--calibration", str(tmp_path / "cal"))
    assert rc in (0, None)
    rows = re.findall(r"^\s*\d+\.\s+(-?[\d.]+)\s+p=([\d.]+)\s+(Q\d)", out, flags=re.M)
    assert len(rows) == 3                                        # the three Collins
    scores, probs = [float(r[0]) for r in rows], [float(r[1]) for r in rows]
    assert sum(probs) <= 1.0 + 1e-9 and probs == sorted(probs, reverse=True)
    assert probs == pytest.approx(list(cal.probabilities(scores)), abs=2e-4)  # T and the none option, as fitted
    assert "probabilities: calibrated" in out and "ECE 0.0500" in out and "NIL off" in out
    assert re.search(r"->  \S.* \(Q\d\)", out)                   # an entity: no NIL unless asked

    rc, out, _ = _link(capsys, small_kb, "--calibration", str(tmp_path / "cal"), "--nil-threshold", "0.99")
    assert rc in (0, None) and "->  NIL" in out and "below the threshold 0.990" in out and "p=" in out
    rc, out, _ = _link(capsys, small_kb, "--calibration", str(tmp_path / "cal"), "--nil")
    assert "NIL below p 0.200" in out                            # the calibration's own threshold

    rc, out, err = _link(capsys, small_kb, "--calibration", str(tmp_path / "cal"), "--json")
    result = json.loads(out)
    assert [c["probability"] for c in result["candidates"]] == pytest.approx(probs, abs=2e-4)


def test_mel_link_says_when_no_calibration_applies(small_kb, capsys):
    rc, out, _ = _link(capsys, small_kb)
    assert rc in (0, None) and "p=" not in out
    assert "probabilities: none (no calibration for bm25@mykb; fit one with python -m mel calibrate" in out
    assert "--out models/calibration/bm25@mykb" in out
    rc, out, err = _link(capsys, small_kb, "--json")
    assert all(c["probability"] is None for c in json.loads(out)["candidates"]) and "no calibration" in err
    rc, _, err = _link(capsys, small_kb, "--nil")
    assert rc == 2 and "needs calibrated probabilities" in err and "mel calibrate" in err


# -- the Link tab --------------------------------------------------------------------------------------
def _view(probability: bool, nil: bool = False, note: str = ""):
    m = Mention.from_text("Collins waves", "Collins")
    a, b = Entity("Q1", "Eileen Collins"), Entity("Q2", EVIL)
    pa, pb = (0.61, 0.27) if probability else (None, None)
    cands = [Candidate(a, 3.0, "dim", probability=pa), Candidate(b, 2.0, "dim", probability=pb)]
    gen = LinkResult("gemel+bm25", m, None if nil else a, [Candidate(a, -0.2, "gemel", probability=pa),
                                                           Candidate(b, -1.9, "gemel", probability=pb)],
                     -0.2, details={"kind": "gemel", "generated": "Eileen Collins", "note": note})
    rank = LinkResult("dim", m, None if nil else a, cands, 3.0, details={"kind": "dim", "note": note})
    summary = ({"calibrated": True, "about": "temperature scaling (T 1.5) with a none option, fitted on wikimel "
                "train, 2,000 mentions; ECE 0.0307 on that slice", "nil_threshold": 0.4} if probability else
               {"calibrated": False, "about": "no calibration for dim@mykb; fit one with python -m mel calibrate"})
    return LinkView(m, "mid", None, PanelResult("generator", "gemel+bm25", gen, calibration=summary),
                    PanelResult("ranker", "dim", rank, calibration=summary), None, [], {}, {})


def test_the_link_tab_shows_calibrated_probabilities_as_such():
    view = _view(probability=True)
    html = render_generator(view)
    assert CALIBRATED in html and UNCALIBRATED not in html and 'data-p="0.61"' in html and "61%" in html
    assert "ECE 0.0307" in html and "train" in html                    # the tooltip: how it was fitted
    assert "GEMEL (gemel+bm25: the LLM scores BM25" in html            # which generator ran
    assert [r[-1] for r in candidate_rows(view)] == [0.61, 0.27]        # Candidate.probability, as set
    assert candidate_headers(view)[-1] == "calibrated p"
    assert CALIBRATED in render_ranker_note(view)
    assert view.to_dict()["candidates"][0]["probability"] == 0.61 and view.generated["probability"] == 0.61


def test_without_a_calibration_the_softmax_is_labelled_uncalibrated():
    view = _view(probability=False)
    html = render_generator(view)
    assert UNCALIBRATED in html and CALIBRATED + "<" not in html and "no calibration for dim@mykb" in html
    soft = probabilities([3.0, 2.0], 1.0)
    assert [r[-1] for r in candidate_rows(view)] == [round(p, 4) for p in soft]
    assert candidate_headers(view)[-1] == "p (uncalibrated)" and UNCALIBRATED in render_ranker_note(view)


def test_nil_by_threshold_is_shown_as_nil_with_the_reason():
    note = f"NIL: the best candidate's probability 0.300 is below the threshold 0.400 {EVIL}"
    view = _view(probability=True, nil=True, note=note)
    gen, ranker = render_generator(view), render_ranker_note(view)
    for html in (gen, ranker):
        assert "<b>NIL</b>" in html and "is below the threshold 0.400" in html
        assert "<img" not in html and "&lt;img" in html
    assert 'id="mel-gemel-result"' in gen and 'id="mel-gemel-nil"' in gen and 'id="mel-ranker-nil"' in ranker


# -- the task screen -----------------------------------------------------------------------------------
def _task(candidate_probability=None, entity="Q1", note=""):
    m = Mention.from_text("Collins waves", "Collins", id="mid")
    task = Task("t1", 1, "mid", m, None, None, "", "f.jsonl", "line 1", 0)
    extra = {} if candidate_probability is None else {"probability": candidate_probability}
    cands = [{"id": "Q1", "name": "Eileen Collins", "score": 3.0, **extra},
             {"id": "Q2", "name": "Phil Collins", "score": 2.0, **({"probability": 0.1} if extra else {})}]
    preds = {"gemel+bm25": PredictionView(1, "gemel+bm25", entity, "Eileen Collins", -0.1, cands,
                                          {"kind": "gemel", "note": note}, None, "kb"),
             "dim": PredictionView(2, "dim", entity, "Eileen Collins", 3.0, cands, {"kind": "dim", "note": note},
                                   None, "kb")}
    return TaskView(task, preds, Progress(2, 0, "alice", 0, 0))


def test_the_task_screen_shows_calibrated_probabilities_or_labels_the_softmax():
    stored = render_task(_task(0.55), project="p")
    assert stored.count(CALIBRATED + "</span>") == 2 and 'data-p="0.55"' in stored and "55%" in stored
    plain = render_task(_task(), project="p")
    assert UNCALIBRATED in plain and "softmax" in plain and CALIBRATED + "</span>" not in plain
    cal = Calibration("dim", temperature=2.0, none_logit=1.0, fitted_on={"dataset": "wikimel", "split": "train"},
                      metrics={"train": {"ece_after": 0.031}})
    computed = render_task(_task(), project="p", calibrations={"dim": cal})   # from the stored scores
    p = cal.probabilities([3.0, 2.0])
    assert f'data-p="{float(p[0])}"' in computed and "ECE 0.0310" in computed
    other_kb = Calibration("dim", temperature=2.0, none_logit=1.0, fitted_on={"kb": "wikimel.sqlite"})
    mismatched = render_task(_task(), project="p", calibrations={"dim": other_kb})  # the predictions' KB is "kb"
    assert f'data-p="{float(p[0])}"' not in mismatched and UNCALIBRATED in mismatched
    nil = render_task(_task(entity=None, note="NIL: the best candidate's probability 0.3 is below the threshold 0.4"),
                      project="p")
    assert nil.count("is below the threshold 0.4") == 2 and 'data-gemel-entity=""' in nil


# -- the default generator -----------------------------------------------------------------------------
def test_the_default_generator_is_gemel_bm25_and_whole_kb_is_one_switch_away(monkeypatch):
    import app
    monkeypatch.delenv("MEL_GENERATOR", raising=False)
    assert ServiceConfig().generator == "gemel+bm25"
    assert app.parse_args([]).generator == "gemel+bm25"
    assert app.parse_args(["--generator", "gemel"]).generator == "gemel"
    monkeypatch.setenv("MEL_GENERATOR", "gemel")
    assert app.parse_args([]).generator == "gemel"
    describe = {"preset": "offline", "device": "cpu", "kb": "demo", "kb_size": 30, "pool": "p",
                "ranker": {"linker": "dim", "wanted": "dim", "status": "ok"}}
    default = status_html({**describe, "generator": {"linker": "gemel+bm25", "status": "ok"}})
    assert "gemel+bm25: the LLM scores BM25" in default and "--generator gemel<" in default
    paper = status_html({**describe, "generator": {"linker": "gemel", "status": "ok"}})
    assert "gemel: whole KB, as in the paper" in paper and "mel-generator-switch" not in paper


@pytest.mark.slow
def test_the_app_links_with_gemel_bm25_and_the_switch_gives_whole_kb_gemel(tmp_path):
    """On the offline demo KB (its FTS gives BM25): the default generator runs and is named; `gemel`
    generates over the whole KB; a project's "gemel" shares the app's demonstration pool."""
    from annotations.projects import ProjectSettings, create_project
    from demo.service import LinkService
    from mel.calibration import calibration_summary
    default = LinkService(ServiceConfig(preset="offline", data_dir=str(tmp_path / "a"), warm_up=False)).load()
    try:
        assert default.generator.name == "gemel+bm25" and default.describe()["generator"]["linker"] == "gemel+bm25"
        view = default.link("Collins waves from the shuttle hatch.", 0, 7)
        assert view.generator.error is None and view.generator.result.linker == "gemel+bm25"
        assert "GEMEL (gemel+bm25" in render_generator(view)
        assert view.generator.calibration == calibration_summary(default.generator)
        assert view.generator.calibration["calibrated"] is False and UNCALIBRATED in render_generator(view)
        # a calibrated ranker (as on WikiMEL): its probabilities, then NIL below a threshold, through the service
        from mel.calibration import use_calibration
        cal = Calibration(default.ranker.name, temperature=1.5, none_logit=0.0, fitted_on={"split": "train"})
        use_calibration(default.ranker, cal)
        assert default.calibrations()[default.ranker.name] is cal
        view = default.link("Collins waves from the shuttle hatch.", 0, 7)
        probs = [c.probability for c in view.ranker.result.candidates]
        assert probs[0] is not None and [r[-1] for r in candidate_rows(view)] == [round(p, 4) for p in probs]
        assert candidate_headers(view)[-1] == "calibrated p" and view.ranker.calibration["calibrated"]
        use_calibration(default.ranker, cal, nil=0.999)
        view = default.link("Collins waves from the shuttle hatch.", 0, 7)
        assert view.ranker.result.prediction is None and "below the threshold 0.999" in render_ranker_note(view)
        use_calibration(default.ranker, None)
        project = create_project(default.store, "whole", kb=default.kb.path,
                                 settings=ProjectSettings(linkers=["gemel", "dim"]))
        whole = default.project_linkers(project)["gemel"]
        assert whole.linker.name == "gemel" and whole.linker.pool is default.pool() and whole.generator
    finally:
        default.store.close()
    paper = LinkService(ServiceConfig(preset="offline", data_dir=str(tmp_path / "b"), warm_up=False,
                                      generator="gemel")).load()
    try:
        view = paper.link("Collins waves from the shuttle hatch.", 0, 7)
        assert paper.generator.name == "gemel" and view.generator.result.linker == "gemel"
        assert "GEMEL (gemel: whole KB, as in the paper)" in render_generator(view)
    finally:
        paper.store.close()
