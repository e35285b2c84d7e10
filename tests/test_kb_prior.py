"""The link prior stored in a KB (issue #15): `python -m mel kb prior`, mel.kb.build_link_prior / write_link_prior.
Tiny KBs without dense indexes: no model is loaded."""
from __future__ import annotations

import json
import sqlite3

import pytest

from mel.cli import main
from mel.errors import InputError
from mel.kb import KnowledgeBase, build_kb, count_link_prior, link_prior_key, write_link_prior
from mel.types import Entity, Example, Mention

ENTITIES = [Entity("Q1", "Meg Ryan", ["Ryan"], "Sex: female. Birth: 1961."),
            Entity("Q2", "Paul Ryan", [], "Sex: male. Birth: 1970."),
            Entity("Q3", "Nolan Ryan", [], "Sex: male. Birth: 1947."),
            Entity("Q4", "Paris", [], "City.")]


def _example(sid: str, caption: str, mention: str, gold: str) -> Example:
    start = caption.index(mention)
    return Example(Mention(caption, start, start + len(mention), id=sid), gold, gold, sid, "jsonl", "train")


TRAIN = [_example("1#0", "Ryan at the 2014 premiere", "Ryan", "Q1"),
         _example("1#1", "Ryan and Paris", "Paris", "Q4"),
         _example("2#0", "RYAN, in Washington", "RYAN", "Q2"),
         _example("3#0", "Ryan at the 2016 premiere", "Ryan", "Q1"),
         _example("4#0", "Someone unknown", "Someone", "Q99"),
         _example("5#0", "Nobody", "Nobody", "NIL")]


@pytest.fixture
def kb_path(tmp_path):
    path = tmp_path / "kb.sqlite"
    build_kb(ENTITIES, path, progress=False)
    return path


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "kb.jsonl").write_text("".join(json.dumps(e.to_dict()) + "\n" for e in ENTITIES))
    (d / "train.jsonl").write_text("".join(json.dumps(e.to_dict()) + "\n" for e in TRAIN))
    (d / "dev.jsonl").write_text(json.dumps(TRAIN[0].to_dict()) + "\n")
    return d


def test_counts_and_report(kb_path):
    kb = KnowledgeBase(kb_path)
    pairs, report = count_link_prior(TRAIN, kb)
    assert link_prior_key("RYAN,") == "ryan"
    assert pairs == {("ryan", 0): 2, ("ryan", 1): 1, ("paris", 3): 1}
    # a gold that is not in the KB is counted and named, never dropped silently; NIL is counted apart
    assert report["n_not_in_kb"] == 1 and report["examples_not_in_kb"] == ["Q99"] and report["n_nil"] == 1
    assert report["n_counted"] == 4 and report["n_records"] == 5


def test_a_kb_without_a_prior_works_as_before(kb_path):
    kb = KnowledgeBase(kb_path)
    assert not kb.has_link_prior() and kb.link_prior_info() is None
    assert kb.link_prior_counts(["ryan"]) == {"ryan": {}} and kb.link_prior_entity_counts() == {}
    assert "link_prior" not in kb.info()


def test_cli_builds_reads_and_rebuilds_whole(kb_path, data_dir, capsys):
    assert main(["kb", "prior", "--kb", str(kb_path), "--format", "jsonl", "--data", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "1 mentions whose gold is not in the KB" in out and "Q99" in out
    kb = KnowledgeBase(kb_path)
    info = kb.link_prior_info()
    assert info["dataset"] == "jsonl" and info["split"] == "train" and info["n_counted"] == 4 and info["created"]
    assert kb.info()["link_prior"]["n_pairs"] == 3  # provenance readable with `mel kb info`
    assert kb.link_prior_counts(["ryan", "nobody"]) == {"ryan": {0: 2, 1: 1}, "nobody": {}}
    assert kb.link_prior_entity_counts() == {0: 2, 1: 1, 3: 1}
    # a rebuild replaces the table whole (no row of the previous one survives)
    write_link_prior(kb_path, {("meg", 0): 5}, {"dataset": "x", "split": "train"})
    kb = KnowledgeBase(kb_path)
    assert kb.link_prior_counts(["ryan", "meg"]) == {"ryan": {}, "meg": {0: 5}}
    assert kb.link_prior_info()["dataset"] == "x"


def test_a_failed_build_leaves_the_kb_as_it_was(kb_path):
    write_link_prior(kb_path, {("ryan", 0): 1}, {"dataset": "a", "split": "train"})
    before = kb_path.read_bytes()
    with pytest.raises(TypeError):  # fails inside the transaction, after the new rows were inserted
        write_link_prior(kb_path, {("paris", 3): 7}, {"dataset": "b", "split": "train", "bad": object()})
    kb = KnowledgeBase(kb_path)
    assert kb.link_prior_counts(["ryan", "paris"]) == {"ryan": {0: 1}, "paris": {}}
    assert kb.link_prior_info()["dataset"] == "a"
    assert kb_path.read_bytes() == before
    with sqlite3.connect(kb_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_bad_input_is_refused(kb_path, data_dir):
    from mel.kb import build_link_prior
    with pytest.raises(InputError, match="train split only"):
        build_link_prior(kb_path, "jsonl", data_dir, "dev")
    with pytest.raises(InputError, match="no entity"):
        write_link_prior(kb_path, {("ryan", 17): 1}, {})
    with pytest.raises(InputError, match="no entity"):
        write_link_prior(kb_path, {("ryan", 0): 0}, {})
    assert not KnowledgeBase(kb_path).has_link_prior()
    other = kb_path.with_name("other.sqlite")
    build_kb([Entity("Z1", "Zed")], other, progress=False)
    with pytest.raises(InputError, match="none of the"):
        build_link_prior(other, "jsonl", data_dir, "train")


def test_a_killed_build_leaves_the_kb_as_it_was(kb_path):
    import subprocess
    import sys
    import textwrap
    write_link_prior(kb_path, {("ryan", 0): 1}, {"dataset": "a", "split": "train"})
    code = textwrap.dedent(f"""
        import os
        import mel.kb as K
        K.json.dumps = lambda *a, **k: os._exit(9)  # dies inside the transaction, after the inserts, before COMMIT
        K.write_link_prior({str(kb_path)!r}, {{("paris", 3): 7}}, {{"dataset": "b"}})
    """)
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    kb = KnowledgeBase(kb_path)
    assert kb.link_prior_info()["dataset"] == "a"
    assert kb.link_prior_counts(["ryan", "paris"]) == {"ryan": {0: 1}, "paris": {}}
    write_link_prior(kb_path, {("paris", 3): 7}, {"dataset": "c"})  # the next build goes through
    assert KnowledgeBase(kb_path).link_prior_counts(["ryan", "paris"]) == {"ryan": {}, "paris": {3: 7}}
