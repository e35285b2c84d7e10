"""The correction store (annotations/store.py) and its export (annotations/export.py)."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import annotations.store as store_module
from annotations import SCHEMA_VERSION, Ack, AnnotationStore, AnnotationStoreError, NotAllowedError, export_corrections
from annotations.export import inside, split_of
from mel.datasets import load_dataset, read_kb_entities
from mel.errors import InputError
from mel.types import NIL, Candidate, Entity, LinkResult, Mention

REPO = Path(__file__).resolve().parents[1]


def _photo(path: Path, seed: int = 0, fmt: str = "PNG") -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def _mention(store: AnnotationStore, caption="Collins waves from the hatch.", text="Collins", image=None) -> str:
    return store.record_mention(Mention.from_text(caption, text, image=str(image) if image else None))


@pytest.fixture
def store(tmp_path):
    s = AnnotationStore(tmp_path / "data")
    yield s
    s.close()


# -- schema, journal, migrations -------------------------------------------------------------------
def test_new_store_has_schema_wal_and_full_sync(store):
    assert store.schema_version() == SCHEMA_VERSION
    conn = store.db.conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert {"mentions", "predictions", "corrections", "images", "schema_version"} <= set(store.db.table_names())


def test_reopening_does_not_migrate_again(tmp_path):
    AnnotationStore(tmp_path).close()
    with AnnotationStore(tmp_path) as again:
        rows = again.db.execute("SELECT version FROM schema_version").fetchall()
    assert rows == [(version,) for version, _ in store_module.MIGRATIONS]  # each migration recorded once
    assert rows[-1] == (SCHEMA_VERSION,)


def test_a_newer_schema_is_refused_untouched(tmp_path):
    AnnotationStore(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "annotations.sqlite")
    conn.execute("INSERT INTO schema_version VALUES (?, 'later')", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(AnnotationStoreError, match="newer than this code"):
        AnnotationStore(tmp_path)


def test_migrations_run_in_order_once_and_a_failing_one_rolls_back(tmp_path, monkeypatch):
    AnnotationStore(tmp_path).close()
    extra = [(SCHEMA_VERSION + 1, ["ALTER TABLE corrections ADD COLUMN note TEXT"])]
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS + extra)
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with AnnotationStore(tmp_path) as s:
        assert s.schema_version() == SCHEMA_VERSION + 1
        assert "note" in s.db["corrections"].columns_dict
    broken = [(SCHEMA_VERSION + 2, ["ALTER TABLE mentions ADD COLUMN lang TEXT", "THIS IS NOT SQL"])]
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS + broken)
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 2)
    with pytest.raises(AnnotationStoreError):
        AnnotationStore(tmp_path)
    conn = sqlite3.connect(tmp_path / "annotations.sqlite")
    columns = [r[1] for r in conn.execute("PRAGMA table_info(mentions)")]
    version = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]
    conn.close()
    assert "lang" not in columns and version == SCHEMA_VERSION + 1  # the half-applied step left no trace


# -- images ----------------------------------------------------------------------------------------
def test_images_are_stored_under_their_content_hash(store, tmp_path):
    import hashlib
    upload = _photo(tmp_path / "..evil name;rm -rf.png")
    sha = store.save_image(upload)
    assert sha == hashlib.sha256(upload.read_bytes()).hexdigest()
    stored = store.image_path(sha)
    assert stored == store.images_dir / f"{sha}.png"
    assert stored.read_bytes() == upload.read_bytes()
    assert store.save_image(upload.read_bytes()) == sha  # same bytes, same file, one row
    assert store.db.execute("SELECT count(*) FROM images").fetchone()[0] == 1
    assert [p.name for p in store.images_dir.iterdir()] == [stored.name]


def test_the_extension_comes_from_the_content_not_the_name(store, tmp_path):
    jpeg_named_png = _photo(tmp_path / "photo.png", fmt="JPEG")
    assert store.image_path(store.save_image(jpeg_named_png)).suffix == ".jpg"


def test_a_non_image_upload_is_refused(store, tmp_path):
    fake = tmp_path / "cat.png"
    fake.write_bytes(b"<script>alert(1)</script>")
    with pytest.raises(InputError, match="not an image"):
        store.save_image(fake)
    assert list(store.images_dir.iterdir()) == []


# -- mentions, predictions, corrections ------------------------------------------------------------
def test_mentions_are_idempotent_and_predictions_recorded(store, tmp_path):
    image = _photo(tmp_path / "a.png")
    m = Mention.from_text("Hopper in uniform 🎖️.", "Hopper", image=str(image))
    first, second = store.record_mention(m), store.record_mention(m)
    assert first == second
    row = store.mention(first)
    assert row["mention"] == "Hopper" and row["image_sha256"] is not None
    e = Entity("Q1", "Grace Hopper", description="computer scientist")
    result = LinkResult("dim", m, e, [Candidate(e, 0.9, "dim")], 0.9, {"total": 12.5}, "offline",
                        {"text_encoder": "minilm"}, {"cue": {"text": "military uniform"}, "vec": np.ones(2)})
    ids = store.record_predictions(first, [result, {"linker": "gemel", "error": "no checkpoint"}], kb="demo.sqlite",
                                   shown_to="alice")
    rows = store.predictions(first)
    assert [r["id"] for r in rows] == ids
    assert rows[0]["entity_id"] == "Q1" and rows[0]["candidates"][0]["name"] == "Grace Hopper"
    assert rows[0]["models"] == {"text_encoder": "minilm"} and rows[0]["details"]["vec"] == [1.0, 1.0]
    assert rows[1]["entity_id"] is None and rows[1]["error"] == "no checkpoint"


def test_correction_is_acknowledged_after_commit(store):
    mid = _mention(store)
    ack = store.record_correction("alice", mid, "Q7", "accept_dim", entity_name="Eileen Collins")
    assert isinstance(ack, Ack) and ack.annotator_total == 1
    # a fresh connection (another process would see the same) finds the committed row
    conn = sqlite3.connect(store.path)
    row = conn.execute("SELECT annotator, entity_id, action FROM corrections WHERE id = ?", (ack.correction_id,)).fetchone()
    conn.close()
    assert row == ("alice", "Q7", "accept_dim")


@pytest.mark.parametrize("args, message", [
    (("alice", "MID", "Q1", "delete"), "unknown action"),
    (("alice", "MID", "Q1", "nil"), "takes no entity"),
    (("alice", "MID", None, "accept_dim"), "needs the id"),
    (("alice", "MID", NIL, "search"), "needs the id"),
    (("", "MID", "Q1", "accept_dim"), "no annotator"),
    (("alice", "unknown-mention", "Q1", "accept_dim"), "unknown mention"),
])
def test_bad_corrections_are_refused(store, args, message):
    mid = _mention(store)
    args = tuple(mid if a == "MID" else a for a in args)
    with pytest.raises(InputError, match=message):
        store.record_correction(*args)
    assert store.db.execute("SELECT count(*) FROM corrections").fetchone()[0] == 0


def test_nil_and_skip_are_stored_as_such(store):
    mid = _mention(store)
    nil = store.record_correction("alice", mid, None, "nil")
    skip = store.record_correction("alice", mid, "Q1", "skip")  # a skip never carries an entity
    assert (nil.entity_id, skip.entity_id) == (NIL, None)
    assert store.counts_by_annotator()["alice"] == {"total": 2, "linked": 0, "nil": 1, "skip": 1, "undone": 0}


def test_undo_only_touches_the_annotators_own_corrections(store):
    mid = _mention(store)
    a1 = store.record_correction("alice", mid, "Q1", "accept_gemel")
    b1 = store.record_correction("bob", mid, "Q2", "search")
    a2 = store.record_correction("alice", mid, None, "nil")
    assert store.undo_last("alice")["id"] == a2.correction_id
    assert store.undo_last("alice")["id"] == a1.correction_id
    assert store.undo_last("alice") is None
    assert store.correction(b1.correction_id)["undone_at"] is None  # bob's still stands
    with pytest.raises(NotAllowedError, match="another annotator"):
        store.undo("alice", b1.correction_id)
    assert store.correction(b1.correction_id)["undone_at"] is None
    assert store.counts_by_annotator() == {
        "alice": {"total": 0, "linked": 0, "nil": 0, "skip": 0, "undone": 2},
        "bob": {"total": 1, "linked": 1, "nil": 0, "skip": 0, "undone": 0}}


def test_latest_standing_correction_per_mention_wins(store):
    mid = _mention(store)
    other = _mention(store, "Falcon lifts off.", "Falcon")
    store.record_correction("alice", mid, "Q1", "accept_dim")
    store.record_correction("bob", mid, "Q2", "search")
    store.record_correction("bob", other, "Q3", "accept_gemel")
    assert [(c["mention_id"], c["entity_id"]) for c in store.latest_corrections()] == [(mid, "Q2"), (other, "Q3")]
    store.undo_last("bob")  # undoes bob's Q3 on `other`
    store.undo_last("bob")  # undoes bob's Q2: alice's Q1 stands again
    assert [(c["mention_id"], c["entity_id"]) for c in store.latest_corrections()] == [(mid, "Q1")]


def test_two_annotators_saving_at_once_lose_nothing(tmp_path):
    store = AnnotationStore(tmp_path)
    mid = _mention(store)
    errors, acks = [], []

    def work(name):
        try:
            for i in range(40):
                acks.append(store.record_correction(name, mid, f"Q{i}", "accept_dim"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in ("alice", "bob", "carol")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    counts = store.counts_by_annotator()
    assert {n: c["total"] for n, c in counts.items()} == {"alice": 40, "bob": 40, "carol": 40}
    assert len({a.correction_id for a in acks}) == 120
    store.close()


def test_connections_opening_a_new_database_at_once_all_get_in(tmp_path):
    # Both switch the new file to WAL; without the open lock SQLite refused one of them with
    # SQLITE_BUSY at once (16% of trials with 4 openers before the fix).
    def open_store(data_dir, barrier, errors):
        barrier.wait()
        try:
            with AnnotationStore(data_dir) as s:
                s.counts_by_annotator()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    for trial in range(60):
        data_dir, barrier, errors = tmp_path / str(trial), threading.Barrier(4), []
        threads = [threading.Thread(target=open_store, args=(data_dir, barrier, errors)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, (trial, errors)


WRITER = """
import sys
from annotations import AnnotationStore
from mel.types import Mention
store = AnnotationStore(sys.argv[1])
mid = store.record_mention(Mention.from_text("Falcon lifts off.", "Falcon"))
i = 0
while True:
    ack = store.record_correction(sys.argv[2], mid, f"Q{i}", "accept_dim")
    print(ack.correction_id, flush=True)   # the acknowledgement the user would see
    i += 1
"""


def test_every_acknowledged_correction_survives_sigkill(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), name], stdout=subprocess.PIPE,
                              text=True, cwd=REPO) for name in ("alice", "bob")]
    acked: dict[str, list[int]] = {"alice": [], "bob": []}
    deadline = time.time() + 120
    try:
        for name, proc in zip(acked, procs, strict=True):
            while len(acked[name]) < 25 and time.time() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                acked[name].append(int(line))
    finally:
        for proc in procs:
            os.kill(proc.pid, signal.SIGKILL)  # no clean shutdown, no checkpoint
            proc.wait()
    # whatever the pipes still held was acknowledged too
    for name, proc in zip(acked, procs, strict=True):
        acked[name] += [int(x) for x in proc.stdout.read().split()]
    assert all(len(v) >= 25 for v in acked.values()), acked
    conn = sqlite3.connect(tmp_path / "annotations.sqlite")
    stored = {row[0]: row[1] for row in conn.execute("SELECT id, annotator FROM corrections")}
    conn.close()
    for name, ids in acked.items():
        assert all(stored.get(i) == name for i in ids)


def test_a_read_only_database_gives_a_clear_error_and_no_ack(tmp_path):
    with AnnotationStore(tmp_path) as s:
        mid = _mention(s)
    ro = AnnotationStore(tmp_path, read_only=True)
    with pytest.raises(AnnotationStoreError, match="read-only; nothing was saved|opened read-only"):
        ro.record_correction("alice", mid, "Q1", "accept_dim")
    ro.close()
    # SQLite's own read-only refusal (e.g. a read-only mount) maps to the same message
    s = AnnotationStore(tmp_path)
    s.db.conn.execute("PRAGMA query_only = ON")
    with pytest.raises(AnnotationStoreError, match="read-only; nothing was saved"):
        s.record_correction("alice", mid, "Q1", "accept_dim")
    s.db.conn.execute("PRAGMA query_only = OFF")
    assert s.counts_by_annotator() == {}
    s.close()


def test_a_full_disk_gives_a_clear_error_and_no_ack(tmp_path):
    s = AnnotationStore(tmp_path)
    mid = _mention(s)
    pages = s.db.conn.execute("PRAGMA page_count").fetchone()[0]
    s.db.conn.execute(f"PRAGMA max_page_count = {pages}")  # the file may not grow: as on a full disk
    saved = 0
    with pytest.raises(AnnotationStoreError, match="disk .* is full; nothing was saved"):
        for _ in range(500):  # fill the last free pages
            s.record_correction("alice", mid, "Q1", "accept_dim", entity_name="x" * 2000)
            saved += 1
    assert s.db.execute("SELECT count(*) FROM corrections").fetchone()[0] == saved  # the failing one is not there
    s.close()


# -- export ----------------------------------------------------------------------------------------
@pytest.fixture
def corrected(tmp_path):
    """A store with a linked, a NIL, a skipped, an undone and a superseded correction."""
    s = AnnotationStore(tmp_path / "data")
    img = _photo(tmp_path / "astronaut.png")
    m1 = _mention(s, "Collins waves from the hatch 🚀.", "Collins", image=img)
    m2 = _mention(s, "Hopper at the podium.", "Hopper")
    m3 = _mention(s, "Chelsea naps.", "Chelsea")
    m4 = _mention(s, "Java first thing.", "Java")
    m5 = _mention(s, "Falcon at dawn.", "Falcon")
    s.record_correction("alice", m1, "Q2", "accept_dim", entity_name="Phil Collins")
    s.record_correction("bob", m1, "Q1", "search", entity_name="Eileen Collins")      # supersedes alice's
    s.record_correction("alice", m2, "Q3", "accept_gemel", entity_name="Grace Hopper")
    s.record_correction("alice", m3, None, "nil")
    s.record_correction("bob", m4, None, "skip")
    s.record_correction("bob", m5, "Q9", "accept_dim", entity_name="Falcon 9")
    s.undo_last("bob")                                                               # m5: no standing correction
    yield s
    s.close()


@pytest.mark.parametrize("fmt", ["jsonl", "wikimel", "gemel"])
def test_export_is_readable_by_the_dataset_readers(corrected, tmp_path, fmt):
    out = tmp_path / f"export-{fmt}"
    report = export_corrections(corrected, out, fmt)
    # free-form corrections: the latest standing one per mention wins; NIL is exported, a skip is not
    assert (report.n_examples, report.n_nil, report.n_skip, report.n_undone, report.n_superseded) == (3, 1, 1, 1, 1)
    examples = load_dataset(fmt, out, "train").examples
    got = {ex.mention.text: (ex.gold_id if ex.gold_id == NIL else ex.gold_name, ex.mention.image is not None)
           for ex in examples}
    assert got == {"Collins": ("Eileen Collins", True), "Hopper": ("Grace Hopper", False), "Chelsea": (NIL, False)}
    provenance = json.loads((out / "provenance.json").read_text())
    chelsea = next(ex for ex in examples if ex.mention.text == "Chelsea")
    sid = chelsea.sample_id.split("#")[0]  # WikiMEL and GEMEL sample ids carry "#<mention>"
    (decision,) = provenance[sid]["annotations"]
    assert (decision["annotator"], decision["entity_id"], provenance[sid]["label_source"]) == ("alice", NIL,
                                                                                            "correction")
    assert decision["decided_at"].endswith("Z")
    collins = next(ex for ex in examples if ex.mention.text == "Collins")
    assert collins.mention.caption == "Collins waves from the hatch 🚀."
    assert Image.open(collins.mention.image).size == (32, 24)
    if fmt != "gemel":  # GEMEL records key entities by QID: Q1 is one, so the id comes back too
        assert collins.gold_id == "Q1"
    kb_names = {e.id: e.name for e in read_kb_entities(fmt if fmt != "gemel" else "gemel", out)}
    assert {"Q1", "Q3"} <= set(kb_names) and kb_names["Q1"] == "Eileen Collins"


def test_export_with_a_dev_split_is_deterministic(corrected, tmp_path):
    a = export_corrections(corrected, tmp_path / "a", "jsonl", dev_fraction=0.5)
    b = export_corrections(corrected, tmp_path / "b", "jsonl", dev_fraction=0.5)
    assert (a.n_train, a.n_dev) == (b.n_train, b.n_dev) and a.n_train + a.n_dev == 3
    assert split_of("abc", 0.0) == "train"


def test_export_paths_cannot_escape_the_export_directory(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    assert inside(root, "images", "x.png") == (root / "images" / "x.png").resolve()
    for bad in (("..", "x"), ("/etc/passwd",), ("images", "..", "..", "x")):
        with pytest.raises(InputError, match="outside the export directory"):
            inside(root, *bad)
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(InputError):
        inside(root, "link", "x")


def test_cli_stats_and_export(corrected, tmp_path, capsys):
    from mel.cli import main
    assert main(["annotations", "stats", "--db", str(corrected.path)]) == 0
    text = capsys.readouterr().out
    assert "alice: 3 (2 linked, 1 NIL" in text and "bob: 2 (1 linked, 0 NIL, 1 skipped, 1 undone)" in text
    out = tmp_path / "cli-export"
    assert main(["annotations", "export", "--db", str(corrected.path), "--format", "wikimel", "--out", str(out)]) == 0
    assert "3 examples" in capsys.readouterr().out
    assert json.loads((out / "splits.json").read_text())["train"]
    assert main(["annotations", "export", "--db", str(tmp_path / "nope.sqlite"), "--format", "jsonl",
                 "--out", str(out)]) == 2
    assert "annotations.sqlite" in capsys.readouterr().err


@pytest.mark.slow
def test_exported_corrections_train_one_step_of_each_model(tmp_path):
    """Labels -> `annotations export` -> one optimizer step of `mel train dim` and `mel train gemel`.

    The free-form corrections of the app, and a project where each task is decided by k = 2
    annotators, one disagreement is settled by a reviewer and some labels are NIL: its export
    (--project) feeds both trainers directly (they skip the NIL examples)."""
    from annotations.projects import ProjectSettings, create_project, import_tasks
    from annotations.queue import AnnotationQueue
    from annotations.review import ReviewQueue
    from demo.bundled import bundled_examples, ensure_demo_kb
    from mel.cli import main
    from mel.kb import KnowledgeBase
    from mel.presets import get_preset

    pytest.importorskip("mel.dim.train")
    pytest.importorskip("mel.gemel.train")
    kb_path = ensure_demo_kb(get_preset("offline"))
    gold = {"Collins": "demo:eileen-collins", "Hopper": "demo:grace-hopper", "Falcon": "demo:falcon-9",
            "Java": "demo:java-coffee"}
    examples = bundled_examples()
    with AnnotationStore(tmp_path / "data") as s:
        for ex in examples:
            mid = s.record_mention(Mention(ex.caption, ex.start, ex.end, image=ex.image))
            if ex.mention in gold:
                s.record_correction("alice", mid, gold[ex.mention], "search")
            else:
                s.record_correction("alice", mid, None, "nil")
    out = tmp_path / "export"
    assert main(["annotations", "export", "--db", str(tmp_path / "data"), "--format", "jsonl", "--out", str(out),
                 "--kb", str(kb_path)]) == 0
    free = load_dataset("jsonl", out, "train").examples
    assert sum(ex.gold_id != NIL for ex in free) == 4 and sum(ex.gold_id == NIL for ex in free) == len(examples) - 4

    # the same examples as a project with k = 2: alice and bob decide every task; bob takes Hopper for
    # Eileen Collins, the reviewer settles it; the mentions outside `gold` are NIL for both
    pictures = tmp_path / "pictures"  # the team's image folder
    pictures.mkdir()
    for ex in examples:
        if ex.image:
            (pictures / Path(ex.image).name).write_bytes(Path(ex.image).read_bytes())
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"caption": ex.caption, "start": ex.start, "end": ex.end,
                                         **({"image": Path(ex.image).name} if ex.image else {})}) + "\n"
                             for ex in examples), encoding="utf-8")
    kb = KnowledgeBase(kb_path)
    with AnnotationStore(tmp_path / "team") as s:
        create_project(s, "demo", kb=kb_path, settings=ProjectSettings(annotations_per_task=2))
        assert import_tasks(s, "demo", "tasks-jsonl", tasks, images=pictures).n_imported == len(examples)
        queue = AnnotationQueue(s, "demo", kb=kb)
        for who in ("alice", "bob"):
            while (view := queue.next_task(who)) is not None:
                text, token = view.task.mention.text, f"{who}-{view.task.id}"
                entity = "demo:eileen-collins" if (who, text) == ("bob", "Hopper") else gold.get(text)
                if entity is None:
                    queue.decide(who, view.task.id, "nil", token=token)
                else:
                    queue.decide(who, view.task.id, "search", entity, token=token)
        review = ReviewQueue(s, "demo", reviewer="rita", is_reviewer=True, kb=kb)
        (item,) = review.items()
        assert item.task.mention.text == "Hopper" and set(item.label.labels.values()) == {
            "demo:grace-hopper", "demo:eileen-collins"}
        review.finalize(item.task.id, "demo:grace-hopper", token="r1", seen_decision_ids=item.decision_ids,
                        seen_review_id=item.review_id)
    out = tmp_path / "team-export"
    assert main(["annotations", "export", "--db", str(tmp_path / "team"), "--format", "jsonl", "--out", str(out),
                 "--kb", str(kb_path), "--project", "demo"]) == 0
    exported = load_dataset("jsonl", out, "train").examples
    assert {ex.mention.text: ex.gold_id for ex in exported if ex.gold_id != NIL} == gold
    assert sum(ex.gold_id == NIL for ex in exported) == len(examples) - 4 > 0
    provenance = json.loads((out / "provenance.json").read_text())
    hopper = next(ex for ex in exported if ex.mention.text == "Hopper")
    assert provenance[hopper.sample_id]["reviewer"] == "rita" and provenance[hopper.sample_id]["agreement"] == 0.5

    assert main(["train", "dim", "--format", "jsonl", "--data", str(out), "--kb", str(kb_path), "--preset", "offline",
                 "--out", str(tmp_path / "dim"), "--dev-split", "", "--max-steps", "1", "--batch-size", "4",
                 "--epochs", "1", "--quiet", "--cache-dir", str(tmp_path / "dim-cache")]) == 0
    assert (tmp_path / "dim" / "model.safetensors").exists()
    assert main(["train", "gemel", "--format", "jsonl", "--data", str(out), "--kb", str(kb_path), "--preset", "offline",
                 "--out", str(tmp_path / "gemel"), "--max-steps", "1", "--grad-accum", "1", "--n-demos", "1",
                 "--epochs", "1", "--quiet"]) == 0
    assert (tmp_path / "gemel" / "model.safetensors").exists()


def test_backup_is_a_consistent_copy(corrected, tmp_path, capsys):
    from mel.cli import main
    target = tmp_path / "backup" / "copy.sqlite"
    assert main(["annotations", "backup", "--db", str(corrected.path), "--out", str(target)]) == 0
    conn = sqlite3.connect(target)
    assert conn.execute("SELECT count(*) FROM corrections").fetchone()[0] == 6  # undone ones included
    conn.close()
    # a backup never overwrites anything (here: a KB-sized file the user keeps under that name)
    kept = tmp_path / "backup" / "kb.sqlite"
    kept.write_bytes(b"precious" * 1000)
    for out in (kept, target, tmp_path / "backup"):
        assert main(["annotations", "backup", "--db", str(corrected.path), "--out", str(out)]) == 2
        assert "already exists; a backup never overwrites" in capsys.readouterr().err
    assert kept.read_bytes() == b"precious" * 1000 and sorted(p.name for p in kept.parent.iterdir()) == ["copy.sqlite", "kb.sqlite"]


def test_a_foreign_sqlite_file_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "annotations.sqlite"  # e.g. a KB renamed by mistake
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE entities (id TEXT)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    for read_only in (False, True):
        with pytest.raises(AnnotationStoreError, match="not an annotation database .*entities.*left untouched"):
            AnnotationStore(tmp_path, read_only=read_only)
    assert path.read_bytes() == before
