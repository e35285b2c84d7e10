"""Bad command-line input found by probing the CLI: each gets one clear line (exit 2) and loses no data.

A failed or interrupted `eval` keeps the previous predictions/report files; an `--out` under a file or
in a read-only folder, a huge count, an unknown engine or device, a KB whose meta is not JSON, bad
`bench scale --sizes`, a read-only KB for `kb prior` and an `--opt` without `=` are refused with a
message that says what was wrong and what to do.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mel import cli
from mel.errors import MAX_WHOLE, InputError, KBError, require_whole
from mel.kb import KnowledgeBase, build_kb
from mel.types import Entity

REPO = Path(__file__).resolve().parents[1]
HUGE = "99999999999999999999"

ENTITIES = [Entity("Q1", "Bianca Ryan", ["Ryan"], "American singer"),
            Entity("Q2", "Paul Ryan", ["Ryan"], "American politician"),
            Entity("Q3", "We Are Kings", [], "2014 film"),
            Entity("Q4", "Phil Collins", ["Collins"], "English drummer")]
MENTIONS = [("Ryan at the 2014 premiere of We Are Kings", 0, 4, "Q1"), ("Paul Ryan speaks in Congress", 0, 9, "Q2"),
            ("Collins on drums", 0, 7, "Q4"), ("We Are Kings poster", 0, 12, "Q3")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A jsonl dataset (kb.jsonl, train.jsonl, dev.jsonl) of four entities and four mentions."""
    root = tmp_path_factory.mktemp("ds")
    (root / "kb.jsonl").write_text("".join(json.dumps({"id": e.id, "name": e.name, "aliases": e.aliases,
                                                       "description": e.description}) + "\n" for e in ENTITIES))
    for split in ("train", "dev"):
        (root / f"{split}.jsonl").write_text("".join(
            json.dumps({"mention": {"caption": c, "start": s, "end": e}, "gold_id": g, "sample_id": f"{split}{i}"})
            + "\n" for i, (c, s, e, g) in enumerate(MENTIONS)))
    return root


@pytest.fixture(scope="module")
def kb_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kb") / "kb.sqlite"
    build_kb(ENTITIES, path, progress=False)  # BM25 only
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])  # any exception but a MELError fails the test here
    out, err = capsys.readouterr()
    return code, out, err


def assert_clear_error(code: int, err: str, pattern: str) -> None:
    assert code == 2, err
    assert err.startswith("error: "), err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(pattern, err), err


def argparse_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main([str(a) for a in argv])
    assert exc.value.code == 2
    return capsys.readouterr().err


# -- 1. a failed or interrupted eval keeps the previous output files -------------------------------------
@pytest.mark.parametrize("linker", ["bm25", "exact", "dense"])
@pytest.mark.parametrize("batch_size", ["0", "-1"])
def test_eval_refuses_a_bad_batch_size_and_keeps_the_old_files(linker, batch_size, dataset, kb_path, tmp_path,
                                                                 capsys):
    preds, report = tmp_path / "preds.jsonl", tmp_path / "report.json"
    preds.write_text('{"old": 1}\n')
    report.write_text('{"old": 2}\n')
    code, _, err = run_cli(capsys, "eval", "--format", "jsonl", "--data", dataset, "--split", "dev", "--kb", kb_path,
                           "--linker", linker, "--batch-size", batch_size, "--predictions", preds, "--json", report,
                           "--quiet")
    assert_clear_error(code, err, rf"--batch-size must be a whole number >= 1, got {batch_size}")
    assert preds.read_text() == '{"old": 1}\n'
    assert report.read_text() == '{"old": 2}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.jsonl", "report.json"]  # no temporary left


def test_eval_interrupted_midway_keeps_the_old_predictions(kb_path, tmp_path):
    from mel.evaluate import evaluate
    from mel.linkers import build_linker
    from mel.types import Example, Mention

    linker = build_linker("bm25", KnowledgeBase(kb_path), None)
    real_pipe = linker.pipe

    def pipe_then_ctrl_c(mentions, **kwargs):
        for i, result in enumerate(real_pipe(mentions, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield result

    linker.pipe = pipe_then_ctrl_c
    examples = [Example(Mention.from_text(c, c[s:e]), g, c[s:e], sample_id=str(i))
                for i, (c, s, e, g) in enumerate(MENTIONS)]
    preds = tmp_path / "preds.jsonl"
    preds.write_text('{"old": 1}\n')
    with pytest.raises(KeyboardInterrupt):
        evaluate(linker, examples, progress=False, predictions_path=preds)
    assert preds.read_text() == '{"old": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["preds.jsonl"]
    linker.pipe = real_pipe
    report = evaluate(linker, examples, progress=False, predictions_path=preds)  # a finished run replaces it whole
    assert report["n"] == 4
    assert [json.loads(line)["sample_id"] for line in preds.read_text().splitlines()] == ["0", "1", "2", "3"]


def test_eval_writes_its_report_whole(dataset, kb_path, tmp_path, capsys, monkeypatch):
    report = tmp_path / "report.json"
    report.write_text('{"old": 2}\n')
    argv = ["eval", "--format", "jsonl", "--data", dataset, "--split", "dev", "--kb", kb_path, "--linker", "bm25",
            "--json", report, "--quiet"]

    def failing_dump(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the report is written

    monkeypatch.setattr(json, "dump", failing_dump)
    assert cli.main([str(a) for a in argv]) == 130  # "interrupted"
    assert report.read_text() == '{"old": 2}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert json.loads(report.read_text())["n"] == 4


# -- 2. kb build --out under a file or in a read-only folder --------------------------------------------
def test_kb_build_out_under_a_file_is_a_clear_error(dataset, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    code, _, err = run_cli(capsys, "kb", "build", "--format", "jsonl", "--source", dataset, "--out",
                           afile / "kb.sqlite", "--no-dense", "--quiet")
    assert_clear_error(code, err, r"afile is a file; name a folder to write into")
    with pytest.raises(InputError, match="afile is a file"):  # what `kb enrich` writes through
        build_kb(ENTITIES, afile / "e.sqlite", progress=False)
    assert afile.read_text() == ""


UNPRIVILEGED_SCRIPT = """
import sys
from mel import cli
data, ro = sys.argv[1], sys.argv[2]
for argv in (["kb", "build", "--format", "jsonl", "--source", data, "--out", ro + "/new.sqlite", "--no-dense",
              "--quiet"],
             ["kb", "prior", "--kb", ro + "/kb.sqlite", "--format", "jsonl", "--data", data]):
    print(cli.main(argv), flush=True)
"""


def test_read_only_folder_and_kb_are_clear_errors(dataset, kb_path, tmp_path):
    """kb build into a read-only folder, kb prior on a read-only KB: run without the permission override
    root has (setpriv drops it), so that the folder really is read-only to the process."""
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copy(kb_path, ro / "kb.sqlite")
    before = (ro / "kb.sqlite").read_bytes()
    os.chmod(ro / "kb.sqlite", 0o444)
    os.chmod(ro, 0o555)
    command = [sys.executable, "-c", UNPRIVILEGED_SCRIPT, str(dataset), str(ro)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: a read-only folder is writable to this process")
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *command]
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", MEL_THREADS="1"))
    finally:
        os.chmod(ro, 0o755)
    assert proc.stdout.split() == ["2", "2"], proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, proc.stderr
    assert re.search(r"cannot write into .*ro; pick a writable path", errors[0]), errors
    assert re.search(r"cannot write into the KB .*kb\.sqlite: the file is read-only for this user \(permissions\); "
                     r"make it writable", errors[1]), errors
    assert (ro / "kb.sqlite").read_bytes() == before
    assert sorted(p.name for p in ro.iterdir()) == ["kb.sqlite"]


# -- 3. huge whole numbers -------------------------------------------------------------------------------
def test_require_whole_has_an_upper_bound():
    assert require_whole("k", MAX_WHOLE, 1) == MAX_WHOLE
    assert require_whole("k", 10**12, 1, None) == 10**12
    with pytest.raises(InputError, match=r"k is too large \(at most 2,147,483,647\), got 2147483648"):
        require_whole("k", MAX_WHOLE + 1, 1)
    with pytest.raises(InputError, match=r"n is too large \(at most 5\), got 6"):
        require_whole("n", 6, 0, 5)
    with pytest.raises(InputError, match=r"k is too large .* got a number of about 5,00\d digits"):
        require_whole("k", 10**5000, 1)  # str() of it would raise ValueError
    with pytest.raises(InputError, match=r"k must be a whole number >= 1, got -1"):
        require_whole("k", -1, 1)


def test_huge_counts_through_the_cli(kb_path, capsys):
    link = ["link", "--kb", kb_path, "--linker", "bm25", "--caption", "Ryan x"]
    too_large = r"is too large \(at most 2,147,483,647\), got " + HUGE
    assert_clear_error(*run_cli(capsys, "kb", "search", kb_path, "Ryan", "-k", HUGE)[::2], "k .*" + too_large)
    assert_clear_error(*run_cli(capsys, *link, "--mention", "Ryan", "-k", HUGE)[::2], "k .*" + too_large)
    assert_clear_error(*run_cli(capsys, "--threads", HUGE, "kb", "info", kb_path)[::2],
                       r"--threads is too large \(at most 1,024\)")
    assert_clear_error(*run_cli(capsys, *link, "--start", "0", "--end", HUGE + "000")[::2],
                       r"--end is too large \(at most 2,147,483,647\)")
    code, out, err = run_cli(capsys, *link, "--start", "0", "--end", "4")  # an ordinary span still links
    assert code == 0, err
    assert "Ryan" in out
    err = argparse_error(capsys, "eval", "--format", "jsonl", "--data", ".", "--kb", kb_path, "--linker", "bm25",
                         "--limit", HUGE)
    assert re.search(r"argument --limit: the number is too large \(at most 2,147,483,647\)", err), err


# -- 4. unknown dense search engine -------------------------------------------------------------------------
def test_unknown_engine_is_refused(dataset, kb_path, capsys):
    for linker in ("bm25", "dense"):
        err = argparse_error(capsys, "eval", "--format", "jsonl", "--data", dataset, "--kb", kb_path,
                             "--linker", linker, "--engine", "bogus")
        assert "argument --engine: invalid choice: 'bogus'" in err, err
    with pytest.raises(InputError, match=r"unknown dense search engine 'bogus'; choose one of auto, numpy"):
        KnowledgeBase(kb_path, engine="bogus")
    import numpy as np

    from mel.index import DenseIndex
    with pytest.raises(InputError, match=r"unknown dense search engine 'bogus'"):
        DenseIndex(np.eye(2, dtype=np.float32), engine="bogus")


# -- 5. a KB whose meta is not JSON ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["garbage", None])
def test_kb_with_a_meta_value_that_is_not_json(value, kb_path, tmp_path, capsys):
    bad = tmp_path / "bad.sqlite"
    shutil.copy(kb_path, bad)
    conn = sqlite3.connect(bad)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (value,))
    conn.commit()
    conn.close()
    assert_clear_error(*run_cli(capsys, "kb", "info", bad)[::2],
                       r"bad\.sqlite is not a KB built by this version of mel \(its meta value 'schema_version' is "
                       r"not JSON.*\); rebuild it with `python -m mel kb build`")
    with pytest.raises(KBError, match="not a KB built by this version"):
        KnowledgeBase(bad)


# -- 6. bench scale --sizes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes, pattern", [
    ("abc", r"--sizes takes KB sizes as whole numbers separated by commas \(e\.g\. 10000,100000\), got 'abc'"),
    ("300,,1200", r"--sizes takes KB sizes as whole numbers .* got ''"),
    ("0", r"--sizes: each KB size \(entities\) must be a whole number >= 1, got 0"),
    ("300,-5", r"--sizes: each KB size \(entities\) must be a whole number >= 1, got -5"),
    (HUGE, r"--sizes: each KB size \(entities\) is too large")])
def test_bench_scale_refuses_bad_sizes(sizes, pattern, tmp_path, capsys):
    out = tmp_path / "results"
    code, _, err = run_cli(capsys, "bench", "scale", "--sizes", sizes, "--engines", "numpy", "--dim", "8",
                           "--queries", "3", "--encoder-names", "0", "--out", out)
    assert_clear_error(code, err, pattern)
    assert not out.exists()  # refused before anything was made


def test_bench_scale_refuses_unknown_engines(tmp_path, capsys):
    code, _, err = run_cli(capsys, "bench", "scale", "--sizes", "100", "--engines", "numpy,bogus",
                           "--out", tmp_path / "results")
    assert_clear_error(code, err, r"--engines: unknown engine\(s\) 'bogus'; choose from auto, numpy")


# -- 7. models --device -------------------------------------------------------------------------------------
def test_unknown_device_is_refused(capsys):
    from mel.cli_kit import check_device
    assert [check_device(d) for d in ("cpu", "cuda", "cuda:1", "mps", "auto", None, " CPU ")] == \
        ["cpu", "cuda", "cuda:1", "mps", None, None, "cpu"]
    for device in ("bogus", "cuda:", "cuda:x", "gpu"):
        with pytest.raises(InputError, match=rf"unknown device {re.escape(repr(device))}: use cpu, cuda, cuda:N"):
            check_device(device)
    assert_clear_error(*run_cli(capsys, "models", "--preset", "offline", "--device", "bogus")[::2],
                       r"unknown device 'bogus': use cpu, cuda, cuda:N .*mps, or auto")
    code, out, err = run_cli(capsys, "models", "--preset", "offline", "--device", "cpu")
    assert code == 0, err
    assert "device: cpu" in out


# -- 8. kb prior on a read-only KB: see test_read_only_folder_and_kb_are_clear_errors; here the message alone ---
def test_kb_prior_says_the_kb_is_read_only(dataset, kb_path, tmp_path, capsys, monkeypatch):
    kb = tmp_path / "kb.sqlite"
    shutil.copy(kb_path, kb)
    before = kb.read_bytes()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == kb and mode == os.W_OK
                        else real_access(p, mode, **kw))
    assert_clear_error(*run_cli(capsys, "kb", "prior", "--kb", kb, "--format", "jsonl", "--data", dataset)[::2],
                       r"cannot write into the KB .*kb\.sqlite: the file is read-only for this user \(permissions\); "
                       r"make it writable \(chmod u\+w .*kb\.sqlite\), or copy the KB into a writable folder")
    assert kb.read_bytes() == before
    monkeypatch.undo()
    code, out, err = run_cli(capsys, "kb", "prior", "--kb", kb, "--format", "jsonl", "--data", dataset)
    assert code == 0, err
    assert "4 counted" in out


# -- 9. --opt without '=' ---------------------------------------------------------------------------------------
def test_linker_option_without_equals(kb_path, capsys):
    from mel.linkers import parse_options
    link = ["link", "--kb", kb_path, "--linker", "bm25", "--caption", "Ryan x", "--mention", "Ryan"]
    assert_clear_error(*run_cli(capsys, *link, "--opt", "foo")[::2],
                       r"linker option 'foo' is not KEY=VALUE: .*e\.g\. --opt top_k=10")
    assert_clear_error(*run_cli(capsys, *link, "--opt", "=3")[::2], r"linker option '=3' is not KEY=VALUE")
    assert_clear_error(*run_cli(capsys, *link, "--opt", "foo=1")[::2], r"linker 'bm25' has no option 'foo'")
    assert parse_options(["top_k=10", "candidates=bm25", "note="]) == {"top_k": 10, "candidates": "bm25", "note": ""}
