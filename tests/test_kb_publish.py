"""A KB and its dense indexes are published as one unit (issue #16, data loss).

`kb build` is killed (SIGKILL, in a forked child) at every file-system step it takes; the KB is then
opened: it must be the old unit or the new unit, or be refused with a message that says which file
is from which build and how to rebuild: never wrong search results, never a KeyError. The next
build deletes what the killed one left. The same holds for the other files the library publishes.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading

import numpy as np
import pytest
import sqlite_utils
from conftest import wait_for_child
from PIL import Image

from mel.errors import KBError
from mel.index import DenseIndex, normalize
from mel.kb import KnowledgeBase, build_kb, entity_text, sidecar
from mel.types import Entity

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked build with SIGKILL")
pytestmark = pytest.mark.forks  # `make test` runs this module in a pytest process of its own

OLD_WORDS = ["amber", "basalt", "cobalt", "dune"]
NEW_WORDS = ["ember", "fjord", "glacier", "harbor", "iris", "juniper"]  # longer: its rows run past the old KB


def entities(words: list[str], prefix: str, images: dict | None = None) -> list[Entity]:
    images = images or {}
    return [Entity(f"{prefix}{i}", f"{w.title()} {prefix}", [], f"the {w} one", "thing",
                   [images[w]] if w in images else []) for i, w in enumerate(words)]


class ColourEncoder:
    """Image encoder stub: a one-hot vector from the image's red value (each test image has its own)."""

    name, dim = "test-colour", 16

    def encode(self, images, batch_size=16):
        out = np.zeros((len(images), self.dim), np.float32)
        for row, image in enumerate(images):
            out[row, image.getpixel((0, 0))[0] % self.dim] = 1.0
        return out


def image_files(tmp_path, words: list[str], first: int) -> dict[str, str]:
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    out = {}
    for n, w in enumerate(words):
        path = folder / f"{w}.png"
        Image.new("RGB", (4, 4), (first + n, 0, 0)).save(path)
        out[w] = str(path)
    return out


class Unit:
    """What a build writes: the entities, and which dense indexes go with them."""

    def __init__(self, ents: list[Entity], image: bool):
        self.entities, self.image = ents, image

    def build(self, out, encoder, **kwargs):
        return build_kb(self.entities, out, text_encoder=encoder, image_encoder=ColourEncoder() if self.image else None,
                        progress=False, build_command="python -m mel kb build --format jsonl --source kb.jsonl "
                                                      "--out kb.sqlite --preset offline", **kwargs)


def assert_clear_refusal(message: str) -> None:
    assert "does not belong to kb.sqlite" in message, message
    assert "kb.sqlite is from " in message and "safetensors is from " in message, message
    assert "Rebuild the KB with: python -m mel kb build --format jsonl --source kb.jsonl" in message, message


def open_unit(path, units: dict[str, Unit], encoder) -> str:
    """Open the KB at `path` and say which unit it is ('old' / 'new'), or 'refused' (with the clear
    message). Fails the test on any other outcome: wrong search results, a KeyError, a mixed KB."""
    try:
        kb = KnowledgeBase(path)
    except KBError as exc:
        assert_clear_refusal(str(exc))
        return "refused"
    ids = [e.id for _, e in kb.iter_entities()]
    matches = [name for name, unit in units.items() if ids == [e.id for e in unit.entities]]
    assert len(matches) == 1, f"the KB holds neither unit: {ids}"
    unit = units[matches[0]]
    assert kb.has_dense("text")
    scores, rows = kb.search_dense(encoder.encode([entity_text(e) for e in unit.entities]), k=1)
    assert [e.id for e in kb.entities_at(rows[:, 0])] == [e.id for e in unit.entities], "dense search is wrong"
    _, every = kb.search_dense(encoder.encode(["the one"]), k=kb.size + 10)
    assert sorted(every[0].tolist()) == list(range(kb.size))  # every row of the index names an entity of this KB
    assert kb.has_dense("image") == unit.image
    if unit.image:
        with_image = [e for e in unit.entities if e.images]
        vectors = ColourEncoder().encode([Image.open(e.images[0]) for e in with_image])
        _, rows = kb.search_dense(vectors, k=1, kind="image")
        assert [e.id for e in kb.entities_at(rows[:, 0])] == [e.id for e in with_image], "image search is wrong"
    return matches[0]


def run_killed_at(step: int, work, patch=()) -> bool:
    """Run `work()` in a forked child that SIGKILLs itself just before its `step`-th file-system
    mutation (os.replace / os.rename / os.unlink, plus the callables in `patch`: (owner, name)).
    True when the child was killed, False when it finished first."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            calls = [0]

            def hooked(real):
                def call(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == step:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*args, **kwargs)
                return call

            for owner, name in [(os, "replace"), (os, "rename"), (os, "unlink"), *patch]:
                setattr(owner, name, hooked(getattr(owner, name)))
            work()
            os._exit(0)
        except BaseException:
            os._exit(3)
    status = wait_for_child(pid)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the build failed instead of being killed"
    return False


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()
                  if ".building-" in p.name or ".tmp-" in p.name or p.name.endswith(".part"))


def make_legacy(path) -> None:
    """Turn a KB into one written before build ids: no build id in its meta or in its side files."""
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM meta WHERE key IN ('build_id', 'dense_indexes', 'build_command')")
    for kind in ("text", "image"):
        side = sidecar(path, kind)
        if side.exists():
            index, meta = DenseIndex.load(side, engine="numpy")
            index.save(side, {k: v for k, v in meta.items() if not k.startswith("kb_")})


# (old unit, new unit, old KB written before build ids)
SCENARIOS = {
    "text-to-text": (False, False, False),
    "text+image-to-text": (True, False, False),   # the new build removes the old image index
    "text-to-text+image": (False, True, False),
    "legacy-to-text+image": (True, True, True),   # the first build after upgrading mel
}


@needs_fork
@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_build_killed_at_every_step_leaves_old_unit_new_unit_or_clear_refusal(scenario, tmp_path, hashing_encoder):
    old_image, new_image, legacy = SCENARIOS[scenario]
    old = Unit(entities(OLD_WORDS, "A", image_files(tmp_path, OLD_WORDS, 0) if old_image else None), old_image)
    new = Unit(entities(NEW_WORDS, "B", image_files(tmp_path, NEW_WORDS, 8) if new_image else None), new_image)
    units = {"old": old, "new": new}
    seen = []
    for step in range(1, 60):
        folder = tmp_path / f"step{step}"
        out = folder / "kb.sqlite"
        old.build(out, hashing_encoder)
        if legacy:
            make_legacy(out)
        killed = run_killed_at(step, functools.partial(new.build, out, hashing_encoder))
        outcome = open_unit(out, units, hashing_encoder)
        seen.append(outcome)
        if not killed:
            assert outcome == "new"
            break
        new.build(out, hashing_encoder)  # the next build: the new unit, and nothing of the killed one left
        assert open_unit(out, units, hashing_encoder) == "new"
        assert leftovers(folder) == [], f"killed at step {step}: the next build left {leftovers(folder)}"
        shutil.rmtree(folder)
    else:
        pytest.fail("the build never finished")
    assert seen[0] == "old" and seen[-1] == "new" and "refused" in seen, seen


def test_a_build_that_fails_leaves_the_old_unit_and_no_temp_files(tmp_path, hashing_encoder):
    old = Unit(entities(OLD_WORDS, "A"), False)
    out = tmp_path / "kb.sqlite"
    old.build(out, hashing_encoder)

    class Broken:
        name, dim = "broken", 64

        def encode(self, texts, batch_size=64):
            raise RuntimeError("the encoder ran out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        build_kb(entities(NEW_WORDS, "B"), out, text_encoder=Broken(), progress=False)
    assert open_unit(out, {"old": old}, hashing_encoder) == "old"
    assert leftovers(tmp_path) == []


def test_old_kb_with_new_index_is_refused_clearly(tmp_path, hashing_encoder):
    old = Unit(entities(OLD_WORDS, "A"), False).build(tmp_path / "old" / "kb.sqlite", hashing_encoder)
    new = Unit(entities(NEW_WORDS, "B"), False).build(tmp_path / "new" / "kb.sqlite", hashing_encoder)
    old_id, new_id = old.meta["build_id"], new.meta["build_id"]
    assert old_id and new_id and old_id != new_id

    opened = KnowledgeBase(old.path)  # then the index is swapped under an open KB
    shutil.copyfile(sidecar(new.path, "text"), sidecar(old.path, "text"))
    with pytest.raises(KBError) as exc:
        opened.search_dense(hashing_encoder.encode(["amber"]))
    assert_clear_refusal(str(exc.value))

    with pytest.raises(KBError) as exc:
        KnowledgeBase(old.path)
    message = str(exc.value)
    assert_clear_refusal(message)
    assert f"kb.sqlite is from build {old_id} (created {old.meta['created']})" in message
    assert f"kb.text.safetensors is from build {new_id}" in message


def test_index_from_an_older_mel_beside_a_new_kb_is_refused(tmp_path, hashing_encoder):
    kb = Unit(entities(OLD_WORDS, "A"), False).build(tmp_path / "kb.sqlite", hashing_encoder)
    index, meta = DenseIndex.load(sidecar(kb.path, "text"))
    index.save(sidecar(kb.path, "text"), {"encoder": meta["encoder"], "dim": meta["dim"]})  # no build id
    with pytest.raises(KBError, match="kb.text.safetensors is from a build without a build id"):
        KnowledgeBase(kb.path)


def test_kb_and_index_from_before_build_ids_still_open(tmp_path, hashing_encoder):
    old = Unit(entities(OLD_WORDS, "A"), False)
    kb = old.build(tmp_path / "kb.sqlite", hashing_encoder)
    make_legacy(kb.path)
    assert open_unit(kb.path, {"old": old}, hashing_encoder) == "old"


def test_kb_rebuilt_under_an_open_reader_is_refused_in_new_threads(tmp_path, hashing_encoder):
    out = tmp_path / "kb.sqlite"
    kb = Unit(entities(OLD_WORDS, "A"), False).build(out, hashing_encoder)
    Unit(entities(NEW_WORDS, "B"), False).build(out, hashing_encoder)
    errors = []

    def read():
        try:
            kb.search_bm25("amber")
        except KBError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=read)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "was rebuilt" in errors[0] and "open it again" in errors[0], errors


def test_dataset_build_records_its_exact_command(tmp_path):
    from mel.datasets.jsonl import write_jsonl_kb
    from mel.kb import build_dataset_kb

    source = tmp_path / "kb.jsonl"
    write_jsonl_kb(entities(OLD_WORDS, "A"), source)
    kb = build_dataset_kb("jsonl", source, tmp_path / "kb.sqlite", preset=None, limit=3, progress=False)
    assert kb.meta["build_command"] == (f"python -m mel kb build --format jsonl --source {source} "
                                        f"--out {tmp_path / 'kb.sqlite'} --no-dense --limit 3")
    assert kb.rebuild_command() == kb.meta["build_command"]


def test_stray_files_of_dead_builds_are_removed_live_ones_kept(tmp_path, hashing_encoder):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        def strays(pid):
            return [f".kb.sqlite.building-{pid}", f".kb.sqlite.building-{pid}-journal",
                    f".kb.sqlite.building-{pid}-0badf00d", f".kb.text.safetensors.building-{pid}",
                    f".kb.image.safetensors.building-{pid}-12ab34cd", f".kb.text.safetensors.tmp-{pid}-0a1b2c3d"]
        for name in strays(dead.pid) + strays(live.pid) + [f".other.sqlite.building-{dead.pid}", "notes.part"]:
            (tmp_path / name).write_bytes(b"partial")
        (tmp_path / "kb.text.safetensors.part").write_bytes(b"partial")  # what builds before build ids left
        Unit(entities(OLD_WORDS, "A"), False).build(tmp_path / "kb.sqlite", hashing_encoder)
        remaining = {p.name for p in tmp_path.iterdir()}
        assert not remaining & set(strays(dead.pid)), "the files of a dead build must be removed"
        assert "kb.text.safetensors.part" not in remaining
        assert set(strays(live.pid)) <= remaining, "the files of a running build must be left alone"
        assert all((tmp_path / n).read_bytes() == b"partial" for n in strays(live.pid))
        assert {f".other.sqlite.building-{dead.pid}", "notes.part"} <= remaining, "another KB's files are not ours"
    finally:
        live.kill()
        live.wait()


# -- the other files the library publishes ---------------------------------------------------------
@needs_fork
def test_enrich_killed_at_every_step_leaves_a_whole_enriched_kb_or_none(tmp_path, hashing_encoder):
    from mel.dim.enrich import enrich_kb, original_descriptions

    src_unit = Unit(entities(OLD_WORDS, "A", image_files(tmp_path, OLD_WORDS, 0)), True)
    src = src_unit.build(tmp_path / "src" / "kb.sqlite", hashing_encoder)

    def fake_llm(prompts):
        return [f"Rewritten {p.split('facts about ')[1].split()[0].lower()} text." for p in prompts]

    for step in range(1, 80):
        folder = tmp_path / f"step{step}"
        folder.mkdir()
        out = folder / "enriched.sqlite"
        killed = run_killed_at(step, functools.partial(enrich_kb, src.path, out, fake_llm, text_encoder=hashing_encoder,
                                                       progress=False, llm_name="fake"),
                               patch=[(shutil, "copyfile"), (sqlite_utils.Database, "__init__")])
        if out.exists():  # published: it must be whole
            kb = KnowledgeBase(out)
            assert original_descriptions(kb) == {e.id: e.description for e in src_unit.entities}
            assert kb.meta["enrichment"]["llm"] == "fake" and kb.meta["n_entity_images"] == len(OLD_WORDS)
            enriched = Unit([e for _, e in kb.iter_entities()], True)
            assert all(e.description.startswith("Rewritten") for e in enriched.entities)
            assert open_unit(out, {"enriched": enriched}, hashing_encoder) == "enriched"
        else:
            with pytest.raises(KBError, match="does not exist"):
                KnowledgeBase(out)
        if not killed:
            assert out.exists()
            break
    else:
        pytest.fail("enrich never finished")


@needs_fork
def test_dense_index_save_killed_mid_write_keeps_the_old_file(tmp_path):
    import safetensors.numpy

    rng = np.random.default_rng(0)
    old_vectors = normalize(rng.normal(size=(5, 8)))
    path = tmp_path / "index.safetensors"
    DenseIndex(old_vectors).save(path, {"encoder": "old"})
    real_save = safetensors.numpy.save_file

    def half_written_then_killed(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    def work():
        safetensors.numpy.save_file = half_written_then_killed
        DenseIndex(normalize(rng.normal(size=(9, 8)))).save(path, {"encoder": "new"})

    assert run_killed_at(10**6, work)
    index, meta = DenseIndex.load(path, engine="numpy")
    assert meta == {"encoder": "old"} and np.array_equal(index.vectors, old_vectors)


def test_candidate_lists_file_is_whole_or_untouched(tmp_path):
    from mel.dim.candidates import load_candidate_lists, save_candidate_lists

    path = tmp_path / "lists.jsonl"
    save_candidate_lists({"m1": ["Q1", "Q2"], "m2": ["Q3"]}, path)
    before = path.read_bytes()
    with pytest.raises(TypeError):  # the writer dies after the first lines
        save_candidate_lists({"m1": ["Q9"], "m2": ["Q8"], "m3": [object()]}, path)
    assert path.read_bytes() == before and load_candidate_lists(path) == {"m1": ["Q1", "Q2"], "m2": ["Q3"]}
    assert [p.name for p in tmp_path.iterdir()] == ["lists.jsonl"], "no temporary file left"


def test_trie_cache_pair_from_two_saves_is_refused(tmp_path):
    from mel.gemel.trie import TokenTrie

    def trie(entity: int) -> TokenTrie:
        return TokenTrie(np.array([0, 1, 1]), np.array([5]), np.array([1]), np.array([-1, 0]), np.array([0, 1]),
                         np.array([entity]), [[f"name {entity}"]], None, 5)

    trie(0).save(tmp_path / "a")
    trie(3).save(tmp_path / "b")
    assert TokenTrie.load(tmp_path / "a").entities(0) == [0]
    shutil.copyfile(tmp_path / "b.json", tmp_path / "a.json")  # a save killed between its two files
    with pytest.raises(KBError, match="two different saves"):
        TokenTrie.load(tmp_path / "a")


def test_killed_smollm2_conversions_are_cleaned_running_ones_kept(monkeypatch, tmp_path):
    from mel.backends import llm

    monkeypatch.setenv("MEL_CACHE", str(tmp_path))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"gguf")
    monkeypatch.setattr(llm, "smollm2_gguf_path", lambda: gguf)

    def fake_convert(gguf, target):
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"x")
        (target / llm._MARKER).write_text(json.dumps({"format": llm._CONVERSION_FORMAT,
                                                      "gguf_size": gguf.stat().st_size}))

    monkeypatch.setattr(llm, "_convert_smollm2", fake_convert)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    models = tmp_path / "models"
    killed = models / f".{llm.SMOLLM2_CACHE_NAME}.tmp-{dead.pid}-0a1b2c3d"
    running = models / f".{llm.SMOLLM2_CACHE_NAME}.tmp-{os.getppid()}-0a1b2c3e"
    for folder in (killed, running):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half a model")
    assert llm.ensure_converted_smollm2() == models / llm.SMOLLM2_CACHE_NAME
    assert not killed.exists(), "a killed conversion's half-written copy must be deleted"
    assert (running / "model.safetensors").exists(), "a running conversion's folder must be left alone"
