import sqlite3
import threading

import numpy as np
import pytest

from mel.errors import InputError, KBError
from mel.index import DenseIndex, normalize
from mel.kb import KnowledgeBase, build_kb, fts_query, normalize_name
from mel.linkers import build_linker
from mel.presets import Preset
from mel.types import Entity, Mention

ENTITIES = [
    Entity("Q1", "Eileen Collins", ["Collins"], "American astronaut, first woman to command a Space Shuttle", "person"),
    Entity("Q2", "Phil Collins", ["Collins"], "English drummer and singer of the band Genesis", "person"),
    Entity("Q3", "Grace Hopper", ["Amazing Grace"], "American computer scientist and Navy rear admiral", "person"),
    Entity("Q4", "Falcon 9", ["Falcon"], "reusable rocket made by SpaceX", "product"),
    Entity("Q5", "Peregrine falcon", ["Falcon"], "bird of prey, the fastest animal", "taxon"),
    Entity("Q6", "Zoë Saldaña", [], "actress", "person"),
]


@pytest.fixture
def kb(tmp_path, hashing_encoder):
    return build_kb(ENTITIES, tmp_path / "kb.sqlite", text_encoder=hashing_encoder, progress=False)


def test_build_and_info(kb, tmp_path):
    info = kb.info()
    assert info["n_entities"] == 6 and info["dense_indexes"]["text"] and not info["dense_indexes"]["image"]
    assert info["text_encoder"] == "test-hashing"
    assert kb.get("Q3").name == "Grace Hopper" and kb.get("Q3").aliases == ["Amazing Grace"]
    assert not list(tmp_path.glob(".*building*")), "no temp files left behind"


def test_exact_lookup_is_normalised(kb):
    assert [kb.entity_at(i).id for i, _ in kb.lookup_name("grace  HOPPER")] == ["Q3"]
    assert {kb.entity_at(i).id for i, _ in kb.lookup_name("Collins")} == {"Q1", "Q2"}
    assert [kb.entity_at(i).id for i, _ in kb.lookup_name("Zoe Saldana")] == ["Q6"]  # accents folded
    assert normalize_name("  Falcon-9! ") == "falcon 9"


def test_bm25_prefers_name_hits_and_survives_any_query(kb):
    top = kb.search_bm25("Falcon", k=5)
    assert {kb.entity_at(i).id for i, _ in top[:2]} == {"Q4", "Q5"}
    assert all(a[1] >= b[1] for a, b in zip(top, top[1:], strict=False))
    for nasty in ['"', "AND OR NOT", "*", "x) OR (y", "", "   ", "NEAR(a b)", "名前"]:
        kb.search_bm25(nasty)  # must not raise an FTS syntax error
    assert fts_query('a"b c') == '"a" OR "b" OR "c"'


def test_unknown_entity_is_a_clear_error(kb):
    with pytest.raises(InputError, match="not in the knowledge base"):
        kb.get("Q999")


def test_exact_linker_tie_break_uses_context_not_popularity(kb):
    linker = build_linker("exact", kb, Preset("t", "", "", "", "", ""))
    r = linker.link(Mention("Collins, the drummer of Genesis, on stage", 0, 7))
    assert [c.entity.id for c in r.candidates] == ["Q2", "Q1"]
    r = linker.link(Mention("Collins floats in the Space Shuttle as an astronaut", 0, 7))
    assert r.prediction.id == "Q1"
    assert linker.link(Mention("Nobody here", 0, 6)).prediction is None


def test_missing_wrong_and_old_kb_files(tmp_path, kb):
    with pytest.raises(KBError, match="does not exist"):
        KnowledgeBase(tmp_path / "nope.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(KBError, match="not a readable SQLite|cannot be read"):
        KnowledgeBase(junk)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("create table x(a)").connection.commit()
    with pytest.raises(KBError, match="not a mel knowledge base"):
        KnowledgeBase(other)
    conn = sqlite3.connect(kb.path)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    with pytest.raises(KBError, match="schema version 99"):
        KnowledgeBase(kb.path)


def test_bad_entities_are_refused(tmp_path):
    with pytest.raises(KBError, match="no entities"):
        build_kb([], tmp_path / "empty.sqlite", progress=False)
    with pytest.raises(KBError, match="has no name"):
        build_kb([Entity("Q1", "  ")], tmp_path / "noname.sqlite", progress=False)
    assert not (tmp_path / "noname.sqlite").exists()


def test_kb_reads_from_many_threads(kb):
    errors = []

    def work():
        try:
            for _ in range(20):
                assert kb.search_bm25("Hopper")[0][0] == kb.idx_of("Q3")
        except Exception as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors


@pytest.mark.parametrize("engine", ["numpy", "faiss-flat", "faiss-ivf", "faiss-hnsw"])
def test_dense_engines_agree_with_brute_force(engine, tmp_path):
    rng = np.random.default_rng(0)
    vectors = normalize(rng.normal(size=(2000, 32)))
    queries = normalize(rng.normal(size=(5, 32)))
    index = DenseIndex(vectors, engine=engine)
    scores, ids = index.search(queries, k=10)
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
    assert recall >= (1.0 if engine in ("numpy", "faiss-flat") else 0.8)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    index.save(tmp_path / "i.safetensors", {"encoder": "x"})
    loaded, meta = DenseIndex.load(tmp_path / "i.safetensors", engine="numpy")
    assert meta == {"encoder": "x"} and np.array_equal(loaded.search(queries, 10)[1], truth)


def test_dimension_mismatch_is_explained(kb):
    with pytest.raises(KBError, match="another encoder"):
        kb.search_dense(np.ones((1, 5), np.float32))
