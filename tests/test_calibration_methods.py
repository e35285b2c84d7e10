"""The calibration methods beyond temperature + "none" (mel.calibration): top-1 NLL, the isotonic
map of the top probability, the automatic choice on train folds; and old configs loading as before."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_calibration import person_dataset

from mel import calibration as calmod
from mel.calibration import (
    METHODS,
    Calibration,
    Scored,
    apply_top_map,
    candidate_probabilities,
    choose_method,
    fit,
    fit_method,
    fit_temperature,
    fit_top_map,
)
from mel.errors import InputError

# a config.json as `mel calibrate` wrote it before the methods existed (no "top_map")
OLD_CONFIG = {
    "kind": "mel-calibration", "linker": "gemel+bm25", "temperature": 2.060627, "none_logit": -3.488162,
    "nil_threshold": 0.270542, "method": "temperature+none", "fingerprint": "708757b3544d01eb",
    "fitted_on": {"dataset": "wikimel", "split": "train", "n": 300}, "metrics": {"train": {"ece_after": 0.0675}},
}


def test_an_old_config_loads_and_gives_the_same_probabilities(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(OLD_CONFIG))
    cal = Calibration.load(tmp_path / "old")
    assert cal.method == "temperature+none" and cal.top_map is None
    for scores in ([-1e-9, -21.4, -22.3], [-0.5, -0.9, float("-inf")], [-3.0], []):
        expected = candidate_probabilities(scores, 2.060627, -3.488162)
        assert np.array_equal(cal.probabilities(scores), expected)  # bit for bit
    assert "isotonic" not in calmod.describe_calibration(cal)
    # saved again, it keeps its meaning (top_map null)
    again = Calibration.load(cal.save(tmp_path / "again"))
    assert again == cal and json.loads((tmp_path / "again" / "config.json").read_text())["top_map"] is None


def _synthetic(n, seed=0, width=6, overconfident=3.0):
    """Scores whose softmax is overconfident: the gold is drawn from softmax(z / overconfident)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        z = np.sort(rng.normal(0, 3, width))[::-1]
        p = candidate_probabilities(z, overconfident, 0.0)
        pick = rng.choice(width + 1, p=np.append(p, max(0.0, 1 - p.sum())))
        ids = [f"e{i}_{j}" for j in range(width)]
        rows.append(Scored(ids[pick] if pick < width else f"absent{i}", ids, z.tolist(), f"s{i}"))
    return rows


class _Named:
    name = "fixed"

    def models(self):
        return {}


def test_the_default_method_is_the_old_fit():
    rows = _synthetic(400)
    t, b = fit_temperature(rows)
    cal = fit(rows, _Named(), nil_share=0.0)
    assert cal.method == "temperature+none" and cal.top_map is None and "selection" not in cal.fitted_on
    assert (cal.temperature, cal.none_logit) == (round(t, 6), round(b, 6))


def test_top_map_keeps_order_and_mass():
    top_map = {"x": [0.0, 0.5, 0.9, 1.0], "y": [0.05, 0.3, 0.7, 0.95]}
    p = candidate_probabilities([3.0, 2.0, 0.0], 1.0, 0.0)
    q = apply_top_map(p, top_map)
    assert q[0] == pytest.approx(np.interp(p[0], top_map["x"], top_map["y"]))
    assert q.sum() <= 1 + 1e-12 and (q >= 0).all()
    assert q[1] / q[2] == pytest.approx(p[1] / p[2])  # the others keep their shares
    # a map that would put the top one below the second is held at the second's level
    q = apply_top_map(candidate_probabilities([1.0, 0.9], 1.0, -5.0), {"x": [0.0, 1.0], "y": [0.01, 0.02]})
    assert q[0] >= q[1] - 1e-12 and q.sum() <= 1 + 1e-12
    assert apply_top_map(np.array([]), top_map).size == 0
    assert apply_top_map(np.array([1.0]), top_map) == pytest.approx([0.95])


def test_isotonic_map_is_monotone_and_bounded():
    conf = np.linspace(0.1, 1.0, 50)
    ok = np.arange(50) % 3 != 0
    m = fit_top_map(conf, ok)
    assert all(b >= a for a, b in zip(m["y"], m["y"][1:], strict=False))
    assert min(m["y"]) >= 1 / 100 and max(m["y"]) <= 1 - 1 / 100
    with pytest.raises(InputError):
        Calibration("x", top_map={"x": [0.5, 0.1], "y": [0.1, 0.2]})
    with pytest.raises(InputError):
        Calibration("x", top_map={"x": [0.1], "y": [0.1, 0.2]})


@pytest.mark.parametrize("method", METHODS)
def test_each_method_fits_saves_and_loads(tmp_path, method):
    rows = _synthetic(300, seed=1)
    cal = fit_method(rows, method, "fixed")
    assert cal.method == method and (cal.top_map is not None) == method.endswith("+isotonic")
    back = Calibration.load(cal.save(tmp_path / "c"))
    assert back == cal
    for r in rows[:20]:
        assert back.probabilities(r.scores) == pytest.approx(cal.probabilities(r.scores))
    fresh = _synthetic(2000, seed=5)
    conf, ok = calmod.top_confidences(fresh, cal)
    raw, _ = calmod.top_confidences(fresh, None)
    assert calmod.expected_calibration_error(conf, ok) < calmod.expected_calibration_error(raw, ok)


@pytest.mark.slow  # about 10 s: 5 folds x 4 methods of L-BFGS-B
def test_auto_chooses_on_train_folds_and_records_it():
    rows = _synthetic(300, seed=2)
    chosen, selection = choose_method(rows, seed=0)
    assert chosen in METHODS and set(selection["ece"]) == set(METHODS) and selection["chosen"] == chosen
    assert chosen == min(METHODS, key=lambda m: (selection["ece"][m], METHODS.index(m)))
    assert choose_method(rows, seed=0) == (chosen, selection)  # deterministic
    cal = fit(rows, _Named(), nil_share=0.1, method="auto")
    assert cal.method == chosen and cal.fitted_on["selection"] == selection and cal.nil_threshold is not None
    with pytest.raises(InputError, match="unknown calibration method"):
        fit(rows, _Named(), method="platt")


def test_calibrate_cli_method_auto_and_saved_scores(tmp_path, hashing_encoder, capsys):
    """`mel calibrate --method auto` records its choice; `--scores` refits from saved scores (checked)."""
    from mel.cli import main
    data, kb = person_dataset(tmp_path, hashing_encoder, {"train": 60, "dev": 20})
    base = ["calibrate", "--format", "jsonl", "--data", str(data), "--split", "train", "--limit", "0",
            "--kb", str(kb.path), "--linker", "bm25", "--method", "auto", "--measure-split", "dev", "--quiet"]
    first = tmp_path / "first.json"
    assert main(base + ["--out", str(tmp_path / "a"), "--save-scores", str(tmp_path / "s"),
                        "--json", str(first)]) in (0, None)
    a = Calibration.load(tmp_path / "a")
    assert a.method in METHODS and a.fitted_on["selection"]["chosen"] == a.method
    assert "method chosen on train" in capsys.readouterr().out
    second = tmp_path / "second.json"
    assert main(base + ["--out", str(tmp_path / "b"), "--scores", str(tmp_path / "s"), "--json", str(second)]) in (0, None)
    b = Calibration.load(tmp_path / "b")
    assert (b.method, b.temperature, b.none_logit, b.top_map, b.nil_threshold) == \
        (a.method, a.temperature, a.none_logit, a.top_map, a.nil_threshold)
    assert "scores_from" in b.fitted_on and "scores_from" in json.loads(second.read_text())["measure"]
    assert json.loads(second.read_text())["measure"]["ece_after"] == json.loads(first.read_text())["measure"]["ece_after"]
    # saved scores of other mentions, or that the linker no longer gives, are refused
    lines = (tmp_path / "s.train.jsonl").read_text().splitlines()
    (tmp_path / "t.train.jsonl").write_text("\n".join(lines[1:]) + "\n")
    assert main(base + ["--out", str(tmp_path / "c"), "--scores", str(tmp_path / "t")]) == 2
    assert "other mentions" in capsys.readouterr().err
    row = json.loads(lines[0])
    row["scores"] = [x + 1.0 for x in row["scores"]]
    (tmp_path / "u.train.jsonl").write_text("\n".join([json.dumps(row)] + lines[1:]) + "\n")
    assert main(base + ["--out", str(tmp_path / "d"), "--scores", str(tmp_path / "u")]) == 2
    assert "other candidates or scores" in capsys.readouterr().err
    # float32 batching noise (a mention scored in another batch: a few 1e-6) is not a change of models
    row["scores"] = [x - 1.0 + 3e-6 * max(1.0, abs(x)) for x in row["scores"]]
    (tmp_path / "v.train.jsonl").write_text("\n".join([json.dumps(row)] + lines[1:]) + "\n")
    (tmp_path / "v.dev.jsonl").write_text((tmp_path / "s.dev.jsonl").read_text())
    assert main(base + ["--out", str(tmp_path / "e"), "--scores", str(tmp_path / "v")]) in (0, None)


def test_saved_scores_of_a_smaller_limit_are_extended(tmp_path, hashing_encoder, capsys):
    """`--scores` of an earlier run with a smaller --limit / --measure-limit: those mentions are read
    (the first checked), the rest scored now, and the result is what one run of the larger limits gives."""
    from mel.cli import main
    data, kb = person_dataset(tmp_path, hashing_encoder, {"train": 60, "dev": 20})
    base = ["calibrate", "--format", "jsonl", "--data", str(data), "--split", "train",
            "--kb", str(kb.path), "--linker", "bm25", "--measure-split", "dev", "--quiet", "--verify-scores", "3"]
    assert main(base + ["--limit", "25", "--measure-limit", "8", "--out", str(tmp_path / "small"),
                        "--save-scores", str(tmp_path / "s")]) in (0, None)
    assert main(base + ["--limit", "50", "--measure-limit", "0", "--out", str(tmp_path / "whole"),
                        "--save-scores", str(tmp_path / "w"), "--json", str(tmp_path / "w.json")]) in (0, None)
    assert main(base + ["--limit", "50", "--measure-limit", "0", "--out", str(tmp_path / "extended"),
                        "--scores", str(tmp_path / "s"), "--save-scores", str(tmp_path / "e"),
                        "--json", str(tmp_path / "e.json")]) in (0, None)
    for split in ("train", "dev"):
        assert (tmp_path / f"e.{split}.jsonl").read_text() == (tmp_path / f"w.{split}.jsonl").read_text()
    assert len((tmp_path / "s.train.jsonl").read_text().splitlines()) == 25
    extended, whole = Calibration.load(tmp_path / "extended"), Calibration.load(tmp_path / "whole")
    assert (extended.temperature, extended.none_logit, extended.nil_threshold) == \
        (whole.temperature, whole.none_logit, whole.nil_threshold)
    assert extended.fitted_on["scores_from"].startswith("25 of 50 from s.train.jsonl")
    measured = json.loads((tmp_path / "e.json").read_text())["measure"]
    assert measured["scores_from"].startswith("8 of 20 from s.dev.jsonl")
    assert measured["ece_after"] == json.loads((tmp_path / "w.json").read_text())["measure"]["ece_after"]
    # a file holding more mentions than this run asks for is not a prefix of it: refused
    assert main(base + ["--limit", "10", "--out", str(tmp_path / "less"), "--scores", str(tmp_path / "s")]) == 2
    assert "or more of them" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [[0.1, 0.2], "x", {"x": ["a", 0.5], "y": [0.1, 0.2]}, {"x": [0.5], "y": [2.0]}])
def test_a_malformed_top_map_is_refused_with_a_clear_error(bad):
    from mel.calibration import Calibration
    with pytest.raises(InputError, match="top_map"):
        Calibration(linker="bm25", temperature=1.0, top_map=bad)


def _calibrate_args(tmp_path, hashing_encoder) -> list[str]:
    data, kb = person_dataset(tmp_path, hashing_encoder, {"train": 60, "dev": 20})
    return ["calibrate", "--format", "jsonl", "--data", str(data), "--split", "train", "--limit", "0",
            "--kb", str(kb.path), "--linker", "bm25", "--measure-split", "dev", "--quiet"]


def _contents(paths) -> dict:
    return {p.name: p.read_bytes() for p in paths}


def test_calibrate_checks_the_measure_splits_scores_before_writing_anything(tmp_path, hashing_encoder, capsys):
    """`--scores P --measure-split dev` saved the calibration (and the train scores) before reading
    P.dev.jsonl: a missing or mismatched one failed after the shipped calibration was replaced.
    Everything is read and checked first; a refusal leaves every output as it was."""
    from mel.cli import main
    base = _calibrate_args(tmp_path, hashing_encoder)
    outputs = ["--out", str(tmp_path / "a"), "--save-scores", str(tmp_path / "s"), "--json", str(tmp_path / "m.json")]
    assert main(base + outputs) in (0, None)
    kept = [tmp_path / "a" / "config.json", tmp_path / "s.train.jsonl", tmp_path / "s.dev.jsonl", tmp_path / "m.json"]
    before = _contents(kept)
    (tmp_path / "t.train.jsonl").write_bytes(before["s.train.jsonl"])  # no t.dev.jsonl
    assert main(base + outputs + ["--scores", str(tmp_path / "t")]) == 2
    assert "t.dev.jsonl" in capsys.readouterr().err
    assert _contents(kept) == before
    dev = before["s.dev.jsonl"].decode().splitlines()
    (tmp_path / "t.dev.jsonl").write_text("\n".join(dev[1:]) + "\n")  # other mentions
    assert main(base + outputs + ["--scores", str(tmp_path / "t")]) == 2
    assert "other mentions" in capsys.readouterr().err
    assert _contents(kept) == before


def test_saved_scores_that_are_not_numbers_are_refused(tmp_path, hashing_encoder, capsys):
    """A saved `null` score crashed the --scores check with a TypeError traceback, and a saved NaN
    where the linker now gives a number passed as identical."""
    from mel.cli import main
    base = _calibrate_args(tmp_path, hashing_encoder)[:-3] + ["--quiet"]  # no measure split
    assert main(base + ["--out", str(tmp_path / "a"), "--save-scores", str(tmp_path / "s")]) in (0, None)
    lines = (tmp_path / "s.train.jsonl").read_text().splitlines()
    for bad in (None, "0.5", True, [0.5]):
        row = json.loads(lines[0])
        row["scores"][0] = bad
        (tmp_path / "u.train.jsonl").write_text("\n".join([json.dumps(row)] + lines[1:]) + "\n")
        assert main(base + ["--out", str(tmp_path / "b"), "--scores", str(tmp_path / "u")]) == 2
        err = capsys.readouterr().err
        assert "u.train.jsonl" in err and repr(row["sample_id"]) in err and "not a number" in err, err
    row = json.loads(lines[0])
    row["scores"][0] = float("nan")
    (tmp_path / "u.train.jsonl").write_text("\n".join([json.dumps(row)] + lines[1:]) + "\n")
    assert main(base + ["--out", str(tmp_path / "b"), "--scores", str(tmp_path / "u")]) == 2
    assert "other candidates or scores" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("target", ["s.train.jsonl", "s.dev.jsonl", "m.json"])
def test_calibrate_outputs_are_replaced_whole_or_not_at_all(tmp_path, hashing_encoder, monkeypatch, target):
    """--save-scores and --json were written in place: a process killed (or a disk full) while
    writing left a truncated file instead of the previous one. They are published by a rename."""
    import mel.paths
    from mel.cli import main
    base = _calibrate_args(tmp_path, hashing_encoder)
    outputs = ["--out", str(tmp_path / "a"), "--save-scores", str(tmp_path / "s"), "--json", str(tmp_path / "m.json")]
    assert main(base + outputs) in (0, None)
    path = tmp_path / target
    before = path.read_bytes()
    real = mel.paths.publish

    def killed_before_the_rename(tmp, dest):
        if Path(dest).name == target:
            raise OSError("simulated: killed while writing")
        real(tmp, dest)

    monkeypatch.setattr(mel.paths, "publish", killed_before_the_rename)
    with pytest.raises(OSError, match="simulated"):
        main(base + outputs + ["--seed", "1"])
    assert path.read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{target}.")], "no temporary file left"


def read_only_dir(path: Path, monkeypatch) -> Path:
    """A folder no file can be written into (chmod 555; as root, which writes anyway, `os.access` is
    made to say so for it and everything under it: it is what the output checks ask)."""
    import os
    path.mkdir()
    path.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access

        def access(p, mode, *args, **kwargs):
            if mode & os.W_OK and path.resolve() in (Path(p).resolve(), *Path(p).resolve().parents):
                return False
            return real(p, mode, *args, **kwargs)
        monkeypatch.setattr(os, "access", access)
    return path


@pytest.mark.parametrize("case", ["out-file", "out-read-only", "save-scores-read-only", "save-scores-file",
                                  "plot-without-measure"])
def test_calibrate_refuses_bad_outputs_before_scoring_anything(tmp_path, hashing_encoder, monkeypatch, capsys, case):
    """--out a file or in a read-only folder, --save-scores into a read-only folder: FileExistsError or
    PermissionError tracebacks after every mention was scored; --plot without --measure-split wrote no
    plot and exited 0. Each is one line and exit 2 now, before the linker runs, and nothing is written."""
    from mel.cli import main
    base = _calibrate_args(tmp_path, hashing_encoder)[:-3] + ["--quiet"]  # no measure split
    (tmp_path / "afile").write_text("mine")
    ro = read_only_dir(tmp_path / "ro", monkeypatch)
    out, extra = str(tmp_path / "cal"), []
    if case == "out-file":
        out = str(tmp_path / "afile")
    elif case == "out-read-only":
        out = str(ro / "cal")
    elif case == "save-scores-read-only":
        extra = ["--save-scores", str(ro / "s")]
    elif case == "save-scores-file":
        extra = ["--save-scores", str(tmp_path / "afile" / "s")]
    else:
        extra = ["--plot", str(tmp_path / "p.png")]

    def never(*args, **kwargs):
        raise AssertionError("the linker ran before the outputs were checked")
    monkeypatch.setattr(calmod, "collect", never)
    assert main(base + ["--out", out] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert ("measure-split" in err) if case == "plot-without-measure" else ("pick" in err), err
    assert (tmp_path / "afile").read_text() == "mine" and not (tmp_path / "cal").exists() and not list(ro.iterdir())


def test_calibrate_saves_scores_into_a_folder_it_creates(tmp_path, hashing_encoder):
    """--save-scores DIR/s with DIR missing: a FileNotFoundError after scoring; the folder is made."""
    from mel.cli import main
    base = _calibrate_args(tmp_path, hashing_encoder)[:-3] + ["--quiet"]
    assert main(base + ["--out", str(tmp_path / "cal"), "--save-scores", str(tmp_path / "new" / "s")]) in (0, None)
    assert (tmp_path / "new" / "s.train.jsonl").read_text().count("\n") == 60


def test_saving_a_calibration_where_it_cannot_be_written_is_an_input_error(tmp_path):
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(InputError, match="cannot write the calibration"):
        Calibration("bm25").save(tmp_path / "afile")
    with pytest.raises(InputError, match="cannot write the calibration"):
        Calibration("bm25").save(tmp_path / "afile" / "cal")
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("field,value", [("metrics", 5), ("metrics", {"train": 5}), ("method", 5),
                                         ("method", "platt"), ("none_logit", "q"), ("nil_threshold", "x"),
                                         ("nil_threshold", True), ("temperature", "2"), ("temperature", True),
                                         ("linker", 5), ("fingerprint", 7), ("fitted_on", [1])])
def test_a_damaged_calibration_config_is_a_clear_error(tmp_path, field, value):
    """A hand-edited config.json gave AttributeError / TypeError tracebacks (or, for a string NIL
    threshold, an unclear comparison error) when `mel link --calibration DIR` loaded it."""
    (tmp_path / "cal").mkdir()
    (tmp_path / "cal" / "config.json").write_text(json.dumps({**OLD_CONFIG, field: value}))
    with pytest.raises(InputError, match=f"not a valid calibration: .*{field}") as info:
        Calibration.load(tmp_path / "cal")
    assert "config.json" in str(info.value) and "mel calibrate" in str(info.value)


def test_a_calibration_config_that_is_not_utf8_is_a_clear_error(tmp_path):
    (tmp_path / "cal").mkdir()
    (tmp_path / "cal" / "config.json").write_bytes(b'{"kind": "mel-calibration", "linker": "\xff\xfe"}')
    with pytest.raises(InputError, match="cannot read the calibration .*UnicodeDecodeError"):
        Calibration.load(tmp_path / "cal")


def test_a_calibration_of_another_linker_is_refused(tmp_path):
    """It was a UserWarning while the probabilities were still shown as calibrated."""
    from test_calibration import _Fixed

    from mel.calibration import use_calibration
    linker = _Fixed()
    Calibration("bm25", temperature=2.0).save(tmp_path / "cal")
    with pytest.raises(InputError, match="fitted for the linker 'bm25', not 'fixed'"):
        use_calibration(linker, tmp_path / "cal")
    assert linker.calibration is None or linker.calibration.linker == "fixed"
