"""Reliability and security (issue #7): concurrent annotators, a server killed mid-write, bad input
through the app's API and the CLI, dataset readers under random damage, and checkpoint loading.

The app tests run the real `python app.py` in its own process (bench/app_server.py AppProcess) and the
load code of bench/bench_load.py, for a few seconds instead of a minute.
"""
from __future__ import annotations

import ast
import copy
import json
import os
import re
import sqlite3
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import bench_load  # the test runs the benchmark's own load and checks
from mel import cli
from mel.datasets import load_dataset, read_kb_entities
from mel.errors import CheckpointError, DatasetFormatError, InputError
from mel.kb import SCHEMA_VERSION as KB_SCHEMA_VERSION
from mel.kb import build_kb
from mel.types import Entity, Example, Mention

REPO = Path(__file__).resolve().parents[1]



# -- images that must be refused -------------------------------------------------------------------
def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that announces width x height (8-bit RGB) in ~70 bytes: its header is all a check may read."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + _png_chunk(b"IEND", b""))


def png_grey_compressed(width: int, height: int) -> bytes:
    """A complete, valid grey PNG of width x height black pixels, compressed to ~0.1% of its size."""
    row = b"\x00" * (width + 1)  # filter byte + pixels
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-images")
    files = {
        "not_an_image": ("holiday.png", b"these are my holiday notes, not a photo\n"),
        "bomb": ("bomb.png", png_header_only(20_000, 20_000)),          # 400 MP: PIL's decompression-bomb error
        "100mp": ("huge.png", png_grey_compressed(10_000, 10_000)),    # 100 MP, valid, ~100 KB on disk
        "truncated": ("cut.png", png_grey_compressed(64, 64)[:60]),
    }
    out = {}
    for key, (name, data) in files.items():
        (root / name).write_bytes(data)
        out[key] = root / name
    assert out["100mp"].stat().st_size < 1_000_000
    return out


# Each case: (caption, mention, start, end) and a regex the message must match (what was wrong
# and what to do); the same cases go through the app's API and the CLI.
TEXT_CASES = {
    "empty caption": (("", "Falcon", None, None), r"caption is empty.*type or paste"),
    "100,000-character caption": (("Falcon " * 14_285 + "Falco", "Falcon", None, None),
                                  r"100,000 characters.*limit of 20,000.*keep only the sentence"),
    "empty span": (("Falcon lifts off.", "", 3, 3), r"span \[3, 3\) is outside the caption.*or empty.*select"),
    "span outside the caption": (("Falcon lifts off.", "", 5, 99),
                                 r"span \[5, 99\) is outside the caption \(length 17\).*select"),
    "mention not in the caption": (("Falcon lifts off.", "Hopper", None, None),
                                   r"'Hopper' does not occur in the caption.*type it exactly"),
    "control character in the caption": (("Falcon\x07 lifts off.", "Falcon", None, None),
                                         r"caption contains the control character U\+0007 at position 6.*remove"),
    "NUL in the caption": (("Falcon lifts\x00 off.", "Falcon", None, None), r"control character U\+0000"),
    "control character in the mention": (("Falcon lifts off.", "Fal\x1bcon", None, None),
                                         r"mention contains the control character U\+001B"),
    "half an emoji": (("Falcon \ud83d lifts off.", "Falcon", None, None), r"half of an emoji.*again"),
}
IMAGE_CASES = {
    "not_an_image": r"holiday\.png is not an image file.*expected JPEG, PNG",
    "bomb": r"bomb\.png looks like a decompression bomb.*at most 40 megapixels",
    "100mp": r"huge\.png is 10000x10000 = 100\.0 megapixels.*resize it",
    "truncated": r"cut\.png could not be decoded.*(truncated|corrupt)",
}


# -- the live app: one `python app.py` process, restarted when a test killed it ----------------------
@dataclass
class LiveApp:
    root: Path
    accounts: dict[str, str]
    app: object = None
    starts: int = 0

    def get(self):
        if self.app is None or not self.app.alive:
            self.starts += 1
            self.app = bench_load.AppProcess.start(self.root / f"data-{self.starts}", users=self.accounts,
                                                   args=["--threads", "1"], timeout=240)
        return self.app

    def group(self, n: int, first: int) -> dict[str, str]:
        names = list(self.accounts)[first:first + n]
        return {name: self.accounts[name] for name in names}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    holder = LiveApp(tmp_path_factory.mktemp("live-app"), bench_load.make_accounts(9))
    yield holder
    if holder.app is not None:
        holder.app.stop()


@pytest.mark.slow
def test_bad_input_through_the_apps_api_gives_clear_errors(live, bad_images):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    app = live.get()
    user, password = next(iter(live.group(1, 8).items()))
    client = bench_load.connect(app.url, user, password)

    def rows():
        conn = sqlite3.connect(app.db_path)
        try:
            return tuple(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("images", "mentions"))
        finally:
            conn.close()
    images_before, mentions_before = rows()
    try:
        for name, ((caption, mention, start, end), pattern) in TEXT_CASES.items():
            if name == "half an emoji":
                continue  # gradio_client cannot encode it; a browser's JSON can: see test_resolve_span_...
            with pytest.raises(AppError, match=pattern):
                client.predict(None, caption, mention, start, end, api_name="/link")
        for key, pattern in IMAGE_CASES.items():
            with pytest.raises(AppError, match=pattern):
                client.predict(handle_file(str(bad_images[key])), "Falcon lifts off.", "Falcon", None, None,
                               api_name="/link")
        # emoji are text: the browser's and Python's offsets differ around them (demo/spans.py), the API's do not
        outputs = client.predict(None, "🚀 Falcon lifts off, 👩‍🚀 Collins waves.", "👩‍🚀 Collins", None, None,
                                 api_name="/link")
        raw = next(o for o in outputs if isinstance(o, dict) and "mention_id" in o)
        assert raw["text"] == "👩‍🚀 Collins"
        assert raw["mention"]["start"] == 20
        assert app.alive, "bad input must never bring the server down"
        assert not list((REPO / "demo").glob("*.pyi")), "no Gradio stub written into the source tree"
        # none of the refused inputs left a row or an image behind: only the emoji mention was recorded
        assert rows() == (images_before, mentions_before + 1)
        assert sorted(p.name for p in (app.data_dir / "images").iterdir()) == sorted(
            p.name for p in (app.data_dir / "images").iterdir() if not p.name.startswith(".upload-"))
    finally:
        client.close()


@pytest.mark.slow
def test_twenty_clients_saving_at_once_lose_and_duplicate_nothing(live):
    app = live.get()
    accounts = live.group(4, 0)
    load = bench_load.run_load(app.url, accounts, clients=20, seconds=8, mentions=2, undo_every=7, request_timeout=30)
    checks = bench_load.verify(app.data_dir, load["requests"], load["accounts"])
    summary = bench_load.summarize(load, checks)
    assert summary["passed"], json.dumps(summary, indent=2)
    assert checks["integrity_check"] == "ok"
    assert checks["lost"] == 0
    assert checks["duplicated"] == 0
    assert checks["acknowledged"] == checks["stored"] >= 40, checks       # ≥ 5 per second with 20 clients
    assert summary["undo"]["acknowledged"] > 0
    assert checks["undo_violations"] == 0
    assert {r.annotator for r in load["requests"]} == set(accounts)       # every account took part


@pytest.mark.slow
def test_server_sigkilled_mid_write_keeps_every_acknowledged_correction(live):
    app = live.get()
    accounts = live.group(4, 4)
    load = bench_load.run_load(app.url, accounts, clients=10, seconds=6, mentions=1, undo_every=5,
                               request_timeout=20, kill=app.kill, kill_after=2.5)
    assert not app.alive
    assert load["killed_at_s"] is not None
    requests = load["requests"]
    assert any(r.ack is not None for r in requests), "the kill should fall between acknowledged writes and failed ones"
    assert any(r.error for r in requests), "the kill should fall between acknowledged writes and failed ones"
    checks = bench_load.verify(app.data_dir, requests, load["accounts"])  # opens it as the app does, after a kill
    assert checks["integrity_check"] == "ok", checks
    assert checks["lost"] == 0, checks
    assert checks["duplicated"] == 0, checks
    assert checks["undo_violations"] == 0, checks
    # a request cut off by the kill is either committed once (answer lost) or not at all
    assert checks["stored"] == checks["acknowledged"] + checks["unacked_stored"]


# -- the CLI -----------------------------------------------------------------------------------------
ENTITIES = [Entity("Q1", "Falcon 9", ["Falcon"], "reusable rocket"), Entity("Q2", "Eileen Collins", ["Collins"],
                                                                             "astronaut")]


def build_bm25_kb(tmp_path_factory) -> Path:
    """A two-entity KB for the CLI tests (here and in test_input_fidelity)."""
    path = tmp_path_factory.mktemp("cli-kb") / "kb.sqlite"
    build_kb(ENTITIES, path, progress=False)  # BM25 only: no encoder needed
    return path


@pytest.fixture(scope="module")
def bm25_kb(tmp_path_factory) -> Path:
    return build_bm25_kb(tmp_path_factory)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])  # any exception other than MELError would fail the test here
    out, err = capsys.readouterr()
    return code, out, err


def assert_clear_error(code: int, err: str, pattern: str) -> None:
    assert code == 2, err
    assert err.startswith("error: "), err
    assert "Traceback" not in err, err
    assert re.search(pattern, err, re.S), err


@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_bad_text_through_the_cli(case, bm25_kb, capsys):
    (caption, mention, start, end), pattern = TEXT_CASES[case]
    argv = ["link", "--kb", bm25_kb, "--linker", "bm25", "--caption", caption]
    argv += ["--start", start, "--end", end] if start is not None else ["--mention", mention]
    assert_clear_error(*run_cli(capsys, *argv)[::2], pattern)


@pytest.mark.parametrize("key", list(IMAGE_CASES))
def test_bad_images_through_the_cli(key, bm25_kb, bad_images, capsys):
    code, _, err = run_cli(capsys, "link", "--kb", bm25_kb, "--linker", "bm25", "--caption", "Falcon lifts off.",
                           "--mention", "Falcon", "--image", bad_images[key])
    assert_clear_error(code, err, IMAGE_CASES[key])


def test_emoji_are_text_in_the_cli(bm25_kb, capsys):
    code, out, err = run_cli(capsys, "link", "--kb", bm25_kb, "--linker", "bm25", "--caption",
                             "🚀 Falcon lifts off 👩‍🚀", "--mention", "falcon", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["mention"]["start"] == 2
    assert result["prediction"]["id"] == "Q1"


def test_missing_foreign_and_locked_kb_through_the_cli(bm25_kb, tmp_path, capsys, monkeypatch):
    assert_clear_error(*run_cli(capsys, "kb", "info", tmp_path / "nope.sqlite")[::2],
                       r"nope\.sqlite does not exist; build one with `python -m mel kb build")
    old = tmp_path / "old.sqlite"
    old.write_bytes(bm25_kb.read_bytes())
    conn = sqlite3.connect(old)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (json.dumps(KB_SCHEMA_VERSION + 1),))
    conn.commit()
    conn.close()
    assert_clear_error(*run_cli(capsys, "link", "--kb", old, "--linker", "bm25", "--caption", "Falcon",
                                "--mention", "Falcon")[::2],
                       rf"KB schema version {KB_SCHEMA_VERSION + 1}, this library reads version "
                       rf"{KB_SCHEMA_VERSION}; rebuild it")
    notkb = tmp_path / "notes.sqlite"
    notkb.write_text("just text")
    assert_clear_error(*run_cli(capsys, "kb", "info", notkb)[::2], r"not a readable SQLite file|cannot be read")

    # another process holds an exclusive lock (as `mel kb build` writing in place would)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"), str(bm25_kb)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr("mel.kb.LOCK_WAIT_S", 0.3)
        assert_clear_error(*run_cli(capsys, "link", "--kb", bm25_kb, "--linker", "bm25", "--caption", "Falcon",
                                    "--mention", "Falcon")[::2],
                           r"kb\.sqlite is locked by another process; try again when it has finished writing")
    finally:
        holder.kill()
        holder.wait()
    code, out, _ = run_cli(capsys, "kb", "info", bm25_kb)
    assert code == 0
    assert '"n_entities": 2' in out  # untouched by all of the above


def test_malformed_dataset_files_through_the_cli(tmp_path, capsys):
    wikimel = tmp_path / "wikimel"
    wikimel.mkdir()
    (wikimel / "splits.json").write_text(json.dumps({"dev": ["1"]}))
    (wikimel / "Wikidata-MEL.json").write_text('{"1": {"sentence": "Ann met Bo.", "mentions": ["Ann"],')
    assert_clear_error(*run_cli(capsys, "data", "info", "--format", "wikimel", "--data", wikimel)[::2],
                       r"Wikidata-MEL\.json: not valid JSON")
    (wikimel / "Wikidata-MEL.json").write_text(json.dumps({"1": {"sentence": "Ann met Bo.", "mentions": ["Ann"]}}))
    assert_clear_error(*run_cli(capsys, "data", "info", "--format", "wikimel", "--data", wikimel)[::2],
                       r"Wikidata-MEL\.json, record '1': missing required key 'answer'")
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    (jsonl / "kb.jsonl").write_text('{"id": "Q1", "name": "Ann"}\n{"id": "Q1", "name": "Ann again"}\n')
    assert_clear_error(*run_cli(capsys, "kb", "build", "--format", "jsonl", "--source", jsonl, "--out",
                                tmp_path / "kb.sqlite", "--no-dense", "--quiet")[::2],
                       r"kb\.jsonl, record 'line 2': duplicate entity id 'Q1'")
    assert not (tmp_path / "kb.sqlite").exists()


@pytest.mark.slow
def test_the_cli_process_prints_one_line_and_no_traceback(bm25_kb, bad_images):
    proc = subprocess.run([sys.executable, "-m", "mel", "link", "--kb", str(bm25_kb), "--linker", "bm25",
                           "--caption", "Falcon lifts off.", "--mention", "Falcon", "--image",
                           str(bad_images["bomb"])], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: the image "), lines
    assert "bomb.png looks like a decompression bomb" in lines[0]


@pytest.mark.slow
def test_the_app_refuses_to_start_on_a_bad_kb_with_a_message(tmp_path, bm25_kb, monkeypatch):
    import app
    monkeypatch.delenv("MEL_AUTH", raising=False)
    for kb, pattern in [(tmp_path / "missing.sqlite", "does not exist"), (tmp_path / "junk.sqlite", "not a")]:
        if kb.name == "junk.sqlite":
            kb.write_text("not a database")
        with pytest.raises(SystemExit) as info:
            app.main(["--kb", str(kb), "--preset", "offline", "--data-dir", str(tmp_path / "data"),
                      "--generator", "", "--ranker", "bm25"])
        assert re.search(rf"^\[app\] cannot start: .*{pattern}", str(info.value.code)), info.value.code


def test_secrets_come_from_the_environment_only(capsys, monkeypatch):
    """Passwords reach the app in MEL_AUTH only: no command-line option takes one (a command line is
    visible to every user of the machine in `ps`)."""
    import app
    with pytest.raises(SystemExit):
        app.parse_args(["--help"])
    help_text = capsys.readouterr().out.lower()
    assert not re.search(r"--\S*(auth|pass|token|secret|key)", help_text), help_text
    assert app.parse_auth("ann:s3cret") == [("ann", "s3cret")]
    with open(REPO / "app.py", encoding="utf-8") as f:
        assert 'os.environ.get("MEL_AUTH")' in f.read()


def test_resolve_span_checks_the_caption_before_searching_it():
    from demo.spans import resolve_span
    with pytest.raises(InputError, match="100,000 characters"):
        resolve_span("x" * 100_000, "Hopper", None, None)   # not "Hopper does not occur"
    with pytest.raises(InputError, match="control character U\\+0007"):
        resolve_span("a\x07b Hopper", "Hopper", None, None)
    assert resolve_span("tab\tand\r\nnewlines are fine: Hopper", "Hopper", None, None) == (28, 34)
    with pytest.raises(InputError, match="half of an emoji"):
        resolve_span(json.loads('"\\ud83d Hopper"'), "Hopper", None, None)  # what a JSON escape can carry
    with pytest.raises(InputError, match="caption is empty"):
        Mention.from_text("", "Hopper")                      # not "the mention does not occur"


# -- dataset readers under random damage: read, or DatasetFormatError naming the file ---------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
    max_leaves=8)
KEYS = st.sampled_from(["id", "sentence", "mentions", "entities", "answer", "mention", "caption", "start", "end",
                        "image", "gold_id", "name", "aliases", "images", "dev", "train"]) | st.text(max_size=6)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutate(draw, obj):
    """obj with 1-3 random edits: a value replaced, a key deleted or added, a list item dropped or added."""
    obj = copy.deepcopy(obj)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(obj))))
        parent = obj
        for step in path[:-1]:
            parent = parent[step]
        node = parent[path[-1]] if path else obj
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        if op == "replace" or (op == "delete" and not path):
            value = draw(JSON_VALUES)
            if path:
                parent[path[-1]] = value
            else:
                obj = value
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(node, dict):
            node[draw(KEYS)] = draw(JSON_VALUES)
        elif isinstance(node, list):
            node.append(draw(JSON_VALUES))
    return obj


def _damage_bytes(draw, data: bytes) -> bytes:
    """Sometimes damage the encoded file itself: cut it short, or splice in random bytes."""
    how = draw(st.sampled_from(["none", "none", "none", "truncate", "splice"]))
    if how == "truncate" and data:
        return data[:draw(st.integers(0, len(data) - 1))]
    if how == "splice":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(min_size=1, max_size=8)) + data[i:]
    return data


def _read_or_name_the_file(fmt: str, root: Path, names: set[str], split: str = "dev") -> None:
    for read in (lambda: load_dataset(fmt, root, split), lambda: list(read_kb_entities(fmt, root))):
        try:
            result = read()
        except DatasetFormatError as e:
            assert Path(e.path).name in names, (str(e), names)
            assert Path(e.path).name in str(e), (str(e), names)
            continue
        except InputError as e:  # the only other answer: the split asked for is not in the (damaged) split list
            assert "has no split 'dev'" in str(e), str(e)
            continue
        if isinstance(result, list):
            assert all(isinstance(x, Entity) for x in result)
        else:
            r = result.report
            assert len(result) == r.n_examples
            assert r.n_mentions >= r.n_examples
            for ex in result:
                assert isinstance(ex, Example)
                assert ex.mention.caption[ex.mention.start:ex.mention.end] == ex.mention.text


JSONL_SPLIT = [Example(Mention("Ann met Bo in Rome.", 0, 3), "Q1", "Ann", "s1").to_dict(),
               Example(Mention("Bo waves.", 0, 2, image="bo.jpg"), "NIL", "", "s2", "mine", "dev").to_dict()]
JSONL_KB = [Entity("Q1", "Ann", ["Annie"], "a person").to_dict(), Entity("Q2", "Bo", images=["bo.jpg"]).to_dict()]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_jsonl_reader_reads_or_names_the_file(data):
    files = {"dev.jsonl": JSONL_SPLIT, "kb.jsonl": JSONL_KB}
    target = data.draw(st.sampled_from(sorted(files)))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, records in files.items():
            if name == target:
                i = data.draw(st.integers(0, len(records) - 1))
                records = records[:i] + [_mutate(data.draw, records[i])] + records[i + 1:]
            text = "".join(json.dumps(r, ensure_ascii=data.draw(st.booleans())) + "\n" for r in records)
            raw = text.encode("utf-8")
            (root / name).write_bytes(_damage_bytes(data.draw, raw) if name == target else raw)
        _read_or_name_the_file("jsonl", root, set(files))


WIKIMEL_FILES = {
    "Wikidata-MEL.json": {"1": {"id": "1", "sentence": "Ann met Bo in Rome.", "mentions": ["Ann", "Rome"],
                                "entities": ["Ann", "Rome"], "answer": ["Q1", "Q2"]},
                          "2": {"id": "2", "sentence": "Bo waves.", "mentions": "Bo", "entities": "Bo",
                                "answer": "nil"}},
    "splits.json": {"train": ["2"], "dev": ["1", "2"]},
    "qid2ne.json": {"Q1": "Ann", "Q2": "Rome", "Q3": "Bo"},
    "qid2abs.json": {"Q1": "a person", "Q2": "a city"},
    "ne2qid.json": {"Annie": "Q1", "Roma": "Q2"},
}
RICHPEDIA_FILES = {
    "train.json": {"Q1": WIKIMEL_FILES["Wikidata-MEL.json"]["1"]},
    "dev.json": {"Q3": WIKIMEL_FILES["Wikidata-MEL.json"]["2"]},
    "qid2ne.json": WIKIMEL_FILES["qid2ne.json"],
    "qid2abs.json": WIKIMEL_FILES["qid2abs.json"],
}


@pytest.mark.parametrize("fmt, files", [("wikimel", WIKIMEL_FILES), ("richpedia", RICHPEDIA_FILES)])
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_melbench_style_readers_read_or_name_the_file(fmt, files, data):
    target = data.draw(st.sampled_from(sorted(files)))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, content in files.items():
            raw = json.dumps(_mutate(data.draw, content) if name == target else content).encode("utf-8")
            (root / name).write_bytes(_damage_bytes(data.draw, raw) if name == target else raw)
        _read_or_name_the_file(fmt, root, set(files))


def test_reader_edge_cases_found_by_hand(tmp_path):
    """Inputs a random search rarely reaches: deep nesting (RecursionError), a '~user' image path."""
    (tmp_path / "dev.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DatasetFormatError, match=r"dev\.jsonl, record 'line 1': .*nested too deeply"):
        load_dataset("jsonl", tmp_path, "dev")
    record = Example(Mention("Ann met Bo.", 0, 3, image="~no-such-user-here/ann.jpg"), "Q1").to_dict()
    (tmp_path / "dev.jsonl").write_text(json.dumps(record) + "\n")
    split = load_dataset("jsonl", tmp_path, "dev")
    assert split[0].mention.image is None
    assert split.report.n_missing_image == 1
    wikimel = tmp_path / "w"
    wikimel.mkdir()
    (wikimel / "splits.json").write_text(json.dumps({"dev": ["1"]}))
    (wikimel / "Wikidata-MEL.json").write_text('{"a": ' * 50_000 + "1" + "}" * 50_000)
    with pytest.raises(DatasetFormatError, match=r"Wikidata-MEL\.json: .*nested too deeply"):
        load_dataset("wikimel", wikimel, "dev")


# -- checkpoints: safetensors only, weights-only torch.load, config mismatch is explained ----------------
class _Evil:
    """Unpickling this runs a command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _evil_pickle(path: Path, marker: Path) -> Path:
    torch.save({"weight": _Evil(marker)}, path)
    return path


def test_checkpoint_loaders_never_unpickle(tmp_path):
    from mel.dim.linker import load_head
    from mel.dim.model import DimFusion, FusionConfig
    from mel.gemel.mapper import FeatureMapper, MapperConfig
    from mel.training import save_pretrained_dir

    marker = tmp_path / "code-ran"
    mapper_dir = FeatureMapper(MapperConfig(d_vision=6, d_embed=4, n_tokens=2)).save_pretrained(tmp_path / "mapper")
    head = DimFusion(FusionConfig(text_dim=8, image_dim=6, cue_dim=8, d_model=8, n_heads=2, ffn_dim=8, out_dim=4))
    head_dir = save_pretrained_dir(head, head.config, tmp_path / "head")
    loaders = [(mapper_dir, lambda: FeatureMapper.from_pretrained(mapper_dir)), (head_dir, lambda: load_head(head_dir))]
    for directory, load in loaders:
        load()  # the genuine checkpoint loads
        # a pickle renamed to model.safetensors is not a safetensors file: refused, never unpickled
        _evil_pickle(directory / "model.safetensors", marker)
        with pytest.raises(CheckpointError, match=r"(?s)model\.safetensors is not a readable safetensors file.*"
                                                  r"never unpickled"):
            load()
        # only a pickle next to the config: refused with the reason
        (directory / "model.safetensors").unlink()
        _evil_pickle(directory / "pytorch_model.bin", marker)
        with pytest.raises(CheckpointError, match=r"has no model\.safetensors; pytorch_model\.bin is a pickle, "
                                                  r"which is never loaded"):
            load()
    assert not marker.exists()


@pytest.mark.slow
def test_packaged_and_hugging_face_weights_load_weights_only(tmp_path, monkeypatch):
    from transformers import AutoModel, BertConfig

    from mel.backends import efficientnet_lite
    from mel.backends.text import load_pretrained

    marker = tmp_path / "code-ran"
    evil = _evil_pickle(tmp_path / "efficientnet-lite0.pth", marker)
    monkeypatch.setattr(efficientnet_lite, "packaged_weights_path", lambda: evil)
    with pytest.raises(CheckpointError, match="cannot read EfficientNet-Lite0 weights"):
        efficientnet_lite.load_lite0.__wrapped__("cpu")  # torch.load(weights_only=True) refuses the pickle
    hf = tmp_path / "hf-model"
    BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=8).save_pretrained(hf)
    _evil_pickle(hf / "pytorch_model.bin", marker)
    with pytest.raises(CheckpointError, match=r"(?s)pickled PyTorch checkpoint that failed the safe weights-only "
                                              r"load.*not loaded any other way"):
        load_pretrained(AutoModel.from_pretrained, str(hf), True, "text encoder")
    assert not marker.exists()


LOADERS_OF_PICKLES = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("dill", "load"),
                      ("joblib", "load"), ("cloudpickle", "load"), ("np", "load"), ("numpy", "load")}


@pytest.mark.slow
def test_no_code_path_unpickles():
    """Every torch.load passes weights_only=True; no pickle/joblib/dill load; np.load never with allow_pickle."""
    found = []
    files = [REPO / "app.py", *sorted(p for d in ("mel", "annotations", "demo", "bench")
                                      for p in (REPO / d).rglob("*.py"))]
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name)):
                continue
            call = (node.func.value.id, node.func.attr)
            if call not in LOADERS_OF_PICKLES:
                continue
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if call == ("torch", "load"):
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            elif call[1] == "load" and call[0] in ("np", "numpy"):
                ok = not (isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value)
            else:
                ok = False
            found.append((where, ok))
    assert [w for w, ok in found if not ok] == []
    assert any(w.startswith("mel/backends/efficientnet_lite.py") for w, _ in found)  # the one torch.load is seen


def test_a_config_that_does_not_fit_is_explained(tmp_path):
    from mel.gemel.mapper import FeatureMapper, MapperConfig
    path = FeatureMapper(MapperConfig(d_vision=6, d_embed=4, n_tokens=2)).save_pretrained(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    cases = [
        (lambda c: c["config"].update(n_tokens=3), r"does not match FeatureMapper.*checkpoint \(8, 6\) vs model \(12, 6\)"),
        (lambda c: c["config"].pop("d_embed"), r"config\.json does not fit MapperConfig: .*d_embed"),
        (lambda c: c["config"].update(width=7), r"has fields \['width'\] that MapperConfig does not know"),
        (lambda c: c.update(model_type="DimFusion"), r"holds a DimFusion, not a FeatureMapper"),
        (lambda c: c.update(config=[1, 2]), r"not a checkpoint config"),
    ]
    for change, pattern in cases:
        broken = copy.deepcopy(config)
        change(broken)
        (path / "config.json").write_text(json.dumps(broken))
        with pytest.raises(CheckpointError, match=pattern):
            FeatureMapper.from_pretrained(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        FeatureMapper.from_pretrained(path)


def test_checkpoints_never_delete_what_the_user_keeps_at_out(tmp_path):
    from mel.dim.model import DimFusion, FusionConfig
    from mel.errors import CheckpointError
    from mel.training import load_pretrained_dir, remove_written, save_pretrained_dir, save_training_state
    head = DimFusion(FusionConfig(text_dim=8, image_dim=8, cue_dim=8, d_model=8, n_heads=2, ffn_dim=16, out_dim=8))
    out = tmp_path / "mydir"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep")
    (out / "sub" / "data.csv").write_text("1,2")
    save_pretrained_dir(head, head.config, out)
    save_pretrained_dir(head, head.config, out)  # written again (as every --save-every): still kept
    assert (out / "notes.txt").read_text() == "keep"
    assert (out / "sub" / "data.csv").read_text() == "1,2"
    assert load_pretrained_dir(DimFusion, FusionConfig, out)[0] is not None
    # a finished run removes its training state, and only that
    opt = torch.optim.AdamW(head.parameters())
    state = tmp_path / "state"
    state.mkdir()
    (state / "mine.txt").write_text("keep")
    save_training_state(state, opt, None, {"step": 1})
    remove_written(state)
    assert [p.name for p in state.iterdir()] == ["mine.txt"]
    # an existing FILE is never turned into a checkpoint directory
    precious = tmp_path / "precious.txt"
    precious.write_text("keep")
    with pytest.raises(CheckpointError, match="is an existing file"):
        save_pretrained_dir(head, head.config, precious)
    assert precious.read_text() == "keep"
    assert not list(tmp_path.glob(".precious.txt.*"))


def test_training_refuses_a_file_as_out_before_it_starts(tmp_path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep")
    code = cli.main(["train", "dim", "--format", "wikimel", "--data", str(tmp_path), "--kb", str(tmp_path / "kb.sqlite"),
                 "--preset", "offline", "--out", str(precious)])
    assert code == 2
    assert "is an existing file" in capsys.readouterr().err
    assert precious.read_text() == "keep"


# -- options, k, limits and output paths (found by probing the CLI) -------------------------------------
def test_bad_linker_options_and_k_through_the_cli(bm25_kb, capsys):
    link = ["link", "--kb", bm25_kb, "--caption", "Falcon lifts off.", "--mention", "Falcon", "--preset", "offline"]
    assert_clear_error(*run_cli(capsys, *link, "--linker", "bm25", "--opt", "foo=1")[::2],
                       r"linker 'bm25' has no option 'foo'")
    assert_clear_error(*run_cli(capsys, *link, "--linker", "bm25", "-k", "-1")[::2],
                       r"k \(how many candidates to return\) must be a whole number >= 1, got -1")
    assert_clear_error(*run_cli(capsys, *link, "--linker", "exact", "-k", "0")[::2], r"must be a whole number >= 1")
    assert_clear_error(*run_cli(capsys, "kb", "search", bm25_kb, "Falcon", "-k", "-2")[::2], r"got -2")


@pytest.mark.parametrize("option, pattern", [
    ({"num_beams": 0}, "num_beams must be a whole number >= 1, got 0"),
    ({"n_demos": -1}, "n_demos must be a whole number >= 0"),
    ({"top_k": "abc"}, "top_k must be a whole number >= 1, got 'abc'"),
    ({"llm_weight": float("nan")}, "llm_weight must be a finite number"),
    ({"constrained": "abc"}, "constrained must be true or false, got 'abc'"),
    ({"max_caption_chars": -5}, "max_caption_chars must be a whole number >= 1")])
def test_bad_gemel_options_are_refused_before_any_model_loads(bm25_kb, option, pattern):
    from mel.kb import KnowledgeBase
    from mel.linkers import build_linker
    from mel.presets import get_preset
    with pytest.raises(InputError, match=re.escape(pattern)):
        build_linker("gemel", KnowledgeBase(bm25_kb), get_preset("offline"), **option)


def test_limits_empty_evaluations_and_output_paths(bm25_kb, tmp_path, capsys):
    from mel.evaluate import evaluate
    from mel.kb import KnowledgeBase
    from mel.linkers import build_linker
    with pytest.raises(SystemExit) as exc:  # argparse: exit 2 with its usage line
        cli.main(["eval", "--format", "wikimel", "--data", str(tmp_path), "--kb", str(bm25_kb), "--linker", "bm25",
                  "--limit", "-1"])
    assert exc.value.code == 2
    assert "expected a whole number >= 0, got '-1'" in capsys.readouterr().err
    with pytest.raises(InputError, match="nothing to evaluate"):
        evaluate(build_linker("bm25", KnowledgeBase(bm25_kb), None), [], progress=False)
    assert_clear_error(*run_cli(capsys, "eval", "--format", "wikimel", "--data", tmp_path, "--kb", bm25_kb,
                                "--linker", "bm25", "--json", tmp_path)[::2], r"is a directory; name the file")
    src = tmp_path / "kb.jsonl"
    src.write_text(json.dumps({"id": "Q1", "name": "Falcon 9"}) + "\n")
    assert_clear_error(*run_cli(capsys, "kb", "build", "--format", "jsonl", "--source", src, "--out", tmp_path,
                                "--no-dense", "--quiet")[::2],
                       r"is a directory; the KB is one file")
    assert not list(tmp_path.glob(".*building*"))


def test_bad_training_settings_are_refused_before_training():
    from mel.dim.model import FusionConfig
    from mel.dim.train import DimTrainConfig
    from mel.gemel.train import GemelTrainConfig
    for make, pattern in [(lambda: DimTrainConfig(lr=-1.0), "lr must be a finite number"),
                          (lambda: DimTrainConfig(lr=float("nan")), "lr must be a finite number"),
                          (lambda: DimTrainConfig(batch_size=0), "batch-size must be a whole number >= 1"),
                          (lambda: DimTrainConfig(seed=-1), "seed must be a whole number >= 0"),
                          (lambda: GemelTrainConfig(save_every=0), "save-every must be a whole number >= 1"),
                          (lambda: GemelTrainConfig(epochs=0), "epochs must be a whole number >= 1"),
                          (lambda: FusionConfig(n_heads=7), r"d-model \(512\) must be divisible by n-heads \(7\)"),
                          (lambda: FusionConfig(dropout=2.0), "dropout must be a finite number between")]:
        with pytest.raises(InputError, match=pattern):
            make()
