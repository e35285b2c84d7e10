"""Annotation projects: import from every format, idempotence, malformed records, crash safety, and
the queue (order, skip, history, undo, flags, doubled and stale saves)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

import annotations.projects as projects
from annotations.projects import (
    ProjectSettings,
    create_project,
    get_project,
    import_tasks,
    list_projects,
    list_tasks,
    progress,
)
from annotations.queue import AnnotationQueue, StaleTaskError
from annotations.store import AnnotationStore, NotAllowedError
from mel.datasets import load_dataset, write_jsonl_examples
from mel.errors import InputError
from mel.types import NIL

LIMIT = 5


@pytest.fixture
def store(tmp_path):
    with AnnotationStore(tmp_path / "data") as s:
        yield s


def _wikimel_dev_records(shared_data: Path, n: int) -> list[dict]:
    data = json.loads((shared_data / "wikimel" / "Wikidata-MEL.json").read_text(encoding="utf-8"))
    ids = json.loads((shared_data / "wikimel" / "splits.json").read_text(encoding="utf-8"))["dev"]
    return [data[i] for i in ids if i in data][:n]


def _as_mimic(records, root: Path) -> Path:
    """The MIMIC layout keeps MELBench's record keys: the real WikiMEL records, written as MIMIC writes them."""
    root.mkdir()
    (root / "dev.json").write_text(json.dumps([dict(r, imgPath="") for r in records]), encoding="utf-8")
    return root


def _as_gemel(records, root: Path) -> Path:
    root.mkdir()
    rows = [{"id": f"{r['id']}-{i}", "mention": m, "text": r["sentence"], "golden": qid, "target": name}
            for r in records
            for i, (m, qid, name) in enumerate(zip(r["mentions"], r["answer"], r["entities"], strict=True))]
    (root / "dev.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows), encoding="utf-8")
    return root


@pytest.mark.parametrize("fmt", ["wikimel", "richpedia", "wikidiverse", "mimic", "gemel", "jsonl"])
def test_import_every_dataset_format_once(fmt, store, shared_data, tmp_path):
    if fmt in ("wikimel", "richpedia", "wikidiverse"):
        data = shared_data / fmt
    elif fmt == "jsonl":
        data = tmp_path / "jsonl"
        write_jsonl_examples(load_dataset("wikimel", shared_data / "wikimel", "dev").examples[:LIMIT],
                             data / "dev.jsonl")
    else:
        records = _wikimel_dev_records(shared_data, LIMIT)
        data = (_as_mimic if fmt == "mimic" else _as_gemel)(records, tmp_path / fmt)
    expected = load_dataset(fmt, data, "dev").examples[:LIMIT]
    project = create_project(store, f"p-{fmt}")

    report = import_tasks(store, project, fmt, data, split="dev", limit=LIMIT)
    assert (report.n_imported, report.n_already_present) == (LIMIT, 0), report.summary()
    tasks = list_tasks(store, project)
    assert [(t.mention.caption, t.mention.text, t.gold_id) for t in tasks] == [
        (e.mention.caption, e.mention.text, e.gold_id) for e in expected]
    assert [t.position for t in tasks] == list(range(LIMIT))
    assert all(t.source_record == e.sample_id for t, e in zip(tasks, expected, strict=True))

    again = import_tasks(store, project, fmt, data, split="dev", limit=LIMIT)
    assert (again.n_imported, again.n_already_present) == (0, LIMIT)
    assert len(list_tasks(store, project)) == LIMIT
    assert [t.id for t in list_tasks(store, project)] == [t.id for t in tasks], "task ids are stable"


def test_dataset_mentions_the_reader_could_not_use_are_reported(store, tmp_path):
    root = tmp_path / "gemel"
    root.mkdir()
    rows = [{"mention": "Ada", "text": "Ada Lovelace wrote notes.", "golden": "Q7259"},
            {"mention": "Babbage", "text": "A portrait of Lovelace.", "golden": "Q46633"}]
    (root / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report = import_tasks(store, create_project(store, "p"), "gemel", root)
    assert (report.n_imported, report.n_malformed) == (1, 1)
    (bad,) = report.malformed
    assert bad.record == "1#0" and "'Babbage' is not in its caption" in bad.reason and str(root) in bad.file


def _images(tmp_path: Path, shared_data: Path) -> Path:
    folder = tmp_path / "pics"
    folder.mkdir()
    for name in sorted(p.name for p in (shared_data / "wikimel" / "images").iterdir())[:2]:
        shutil.copy(shared_data / "wikimel" / "images" / name, folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_import_csv_with_images_reports_malformed_rows_and_imports_the_rest(store, shared_data, tmp_path):
    pics = _images(tmp_path, shared_data)
    first, second = sorted(p.name for p in pics.glob("*.jpg"))
    rows = [
        {"caption": "Collins before the launch", "mention": "Collins", "image": first, "gold_id": "Q1"},
        {"caption": "Grace Hopper at Harvard", "start": "0", "end": "12", "gold_id": "nil"},
        {"caption": "Phil Collins on stage", "mention": "Collins", "start": "5", "end": "12", "image": second},
        {"caption": "Nobody here", "mention": "Hopper"},                                     # row 4: not in caption
        {"caption": "Falcon 9 lifts off", "mention": "Falcon", "image": "https://x.org/a.jpg"},  # row 5: a URL
        {"caption": "Falcon 9 lifts off", "mention": "Falcon", "image": "gone.jpg"},           # row 6: missing
        {"caption": "Falcon 9 lifts off", "mention": "Falcon", "image": "../tasks.csv"},       # row 7: leaves folder
        {"caption": "Falcon 9 lifts off", "mention": "Falcon", "image": "notes.txt"},          # row 8: no image
        {"caption": "Falcon 9 lifts off", "start": "x", "end": "3"},                          # row 9: bad offset
        {"caption": "", "mention": "x"},                                                      # row 10: no caption
        {"caption": "Falcon 9 lifts off", "mention": "Falcon 9", "id": "rec-11"},
        {"caption": "Chelsea naps; Chelsea won.", "start": "13", "end": "20"},                 # row 12: off by one
    ]
    data = tmp_path / "tasks.csv"
    with open(data, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "caption", "mention", "start", "end", "image", "gold_id"])
        writer.writeheader()
        writer.writerows(rows)
    project = create_project(store, "team")
    report = import_tasks(store, project, "csv", data, images=pics)
    assert (report.n_read, report.n_imported, report.n_malformed) == (12, 4, 8), report.summary()
    reasons = {m.record: m.reason for m in report.malformed}
    assert all(m.file == str(data) for m in report.malformed)
    assert set(reasons) == {f"row {n}" for n in (*range(4, 11), 12)}
    assert "' Chelse'" in reasons["row 12"] and "off by one" in reasons["row 12"]
    assert "does not occur in the caption" in reasons["row 4"]
    assert "URL" in reasons["row 5"] and "not downloaded" in reasons["row 5"]
    assert "not in the image folder" in reasons["row 6"]
    assert "outside the image folder" in reasons["row 7"]
    assert "notes.txt" in reasons["row 8"]
    assert "whole numbers" in reasons["row 9"]
    assert "caption" in reasons["row 10"]

    tasks = list_tasks(store, project)
    assert [(t.mention.text, t.gold_id) for t in tasks] == [
        ("Collins", "Q1"), ("Grace Hopper", NIL), ("Collins", None), ("Falcon 9", None)]
    assert tasks[3].source_record == "row 11 (id rec-11)"
    with_image = [t for t in tasks if t.image_sha256]
    assert len(with_image) == 2 and all(Path(t.mention.image).is_file() for t in with_image)
    assert Path(with_image[0].mention.image).parent == store.images_dir, "images are stored by content hash"

    again = import_tasks(store, project, "csv", data, images=pics)
    assert (again.n_imported, again.n_already_present, again.n_malformed) == (0, 4, 8)


def test_csv_with_an_unknown_column_is_refused_before_anything_is_imported(store, tmp_path):
    data = tmp_path / "t.csv"
    data.write_text("caption,mentoin\nA b,A\n", encoding="utf-8")
    with pytest.raises(InputError, match="unknown: mentoin"):
        import_tasks(store, create_project(store, "p"), "csv", data)
    assert list_tasks(store, "p") == []


def test_import_tasks_jsonl_with_bad_lines(store, shared_data, tmp_path):
    pics = _images(tmp_path, shared_data)
    image = sorted(p.name for p in pics.glob("*.jpg"))[0]
    lines = [json.dumps({"caption": "Ada Lovelace wrote notes", "mention": "Ada Lovelace", "image": image,
                         "gold_id": "Q7259", "gold_name": "Ada Lovelace"}),
             "{not json",
             json.dumps(["a list"]),
             json.dumps({"caption": "x y", "mention": "x", "colour": "red"}),
             json.dumps({"caption": "Babbage's engine", "start": 0, "end": 7}),
             json.dumps({"caption": "Babbage's engine", "start": True, "end": 7})]
    data = tmp_path / "tasks.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = import_tasks(store, create_project(store, "p"), "tasks-jsonl", data, images=pics)
    assert (report.n_imported, report.n_malformed) == (2, 4)
    assert [m.record for m in report.malformed] == ["line 2", "line 3", "line 4", "line 6"]
    assert "colour" in report.malformed[2].reason
    tasks = list_tasks(store, "p")
    assert [(t.mention.text, t.gold_id, t.gold_name) for t in tasks] == [
        ("Ada Lovelace", "Q7259", "Ada Lovelace"), ("Babbage", None, "")]


def test_same_mention_with_another_gold_is_reported_not_imported_twice(store, tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"caption": "Paris at dawn", "mention": "Paris", "gold_id": "Q90"}) + "\n"
                    + json.dumps({"caption": "Paris at dawn", "mention": "Paris", "gold_id": "Q167646"}) + "\n"
                    + json.dumps({"caption": "Paris at dawn", "mention": "Paris", "gold_id": "Q90"}) + "\n")
    report = import_tasks(store, create_project(store, "p"), "tasks-jsonl", data)
    assert (report.n_imported, report.n_already_present, report.n_malformed) == (1, 1, 1)
    assert report.malformed[0].record == "line 2" and "gold 'Q90', not 'Q167646'" in report.malformed[0].reason


def test_a_crash_mid_import_leaves_nothing_of_it(store, tmp_path, monkeypatch):
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"caption": f"Task number {i} here", "mention": f"{i}"}) + "\n"
                            for i in range(5)))
    project = create_project(store, "p")
    real, calls = projects._insert_task, []

    def crash_on_the_third(*args):
        calls.append(1)
        if len(calls) == 3:  # two rows are written, then the process "dies"
            raise RuntimeError("simulated crash")
        return real(*args)

    monkeypatch.setattr(projects, "_insert_task", crash_on_the_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        import_tasks(store, project, "tasks-jsonl", data, settings=ProjectSettings(guidelines="# New"))
    assert list_tasks(store, project) == [], "one transaction: all of the import or nothing"
    assert store.db.execute("SELECT count(*) FROM mentions").fetchone()[0] == 0
    assert get_project(store, project).settings.guidelines == ""

    monkeypatch.setattr(projects, "_insert_task", real)
    report = import_tasks(store, project, "tasks-jsonl", data, settings=ProjectSettings(guidelines="# New"))
    assert (report.n_imported, report.n_already_present, report.n_batches) == (5, 0, 1)
    assert [t.position for t in list_tasks(store, project)] == [0, 1, 2, 3, 4]
    assert get_project(store, project).settings.guidelines == "# New"


def test_projects_settings_and_names(store, hashing_encoder, tmp_path):
    from mel.kb import build_kb
    from mel.types import Entity
    kb = build_kb([Entity("Q1", "Ada Lovelace")], tmp_path / "kb.sqlite", text_encoder=hashing_encoder,
                  progress=False)
    p = create_project(store, "guided", kb=kb.path, settings=ProjectSettings(guidelines="# Rules", linkers=["bm25"]))
    assert p.kb_stamp.startswith("kb.sqlite (") and p.settings.guidelines == "# Rules"
    assert get_project(store, "guided").settings.linkers == ["bm25"]
    with pytest.raises(InputError, match="already exists"):
        create_project(store, "guided")
    with pytest.raises(InputError, match="no project 'nope'.*guided"):
        get_project(store, "nope")
    with pytest.raises(InputError, match="annotations_per_task"):
        ProjectSettings(annotations_per_task=0)
    assert [x.name for x in list_projects(store)] == ["guided"]


# -- the queue ------------------------------------------------------------------------------------
def _project_with_tasks(store, tmp_path, n: int = 4, name: str = "q", **settings) -> str:
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"caption": f"Item {i} of the queue", "mention": f"Item {i}"}) + "\n"
                            for i in range(n)))
    create_project(store, name, settings=ProjectSettings(**settings))
    import_tasks(store, name, "tasks-jsonl", data)
    return name


def _text(view) -> str:
    return view.task.mention.text


def test_queue_order_and_skip_goes_to_the_end(store, tmp_path):
    queue = AnnotationQueue(store, _project_with_tasks(store, tmp_path))
    view = queue.next_task("alice")
    assert _text(view) == "Item 0" and str(view.progress) == "alice 0 / 4, project 0 / 4"
    assert _text(queue.next_task("alice")) == "Item 0", "asking again (a reload) gives the same task"
    queue.skip("alice", view.task.id, token="k1")
    order = []
    tokens = iter(f"t{i}" for i in range(10))
    while (view := queue.next_task("alice")) is not None:
        order.append(_text(view))
        queue.decide("alice", view.task.id, "nil", token=next(tokens))
    assert order == ["Item 1", "Item 2", "Item 3", "Item 0"]
    assert str(queue.progress("alice")) == "alice 4 / 4, project 4 / 4"


def test_two_skipped_tasks_come_back_in_the_order_they_were_skipped(store, tmp_path):
    queue = AnnotationQueue(store, _project_with_tasks(store, tmp_path, 3))
    queue.skip("a", queue.next_task("a").task.id, token="1")   # Item 0
    queue.skip("a", queue.next_task("a").task.id, token="2")   # Item 1
    assert _text(queue.next_task("a")) == "Item 2"
    queue.decide("a", queue.next_task("a").task.id, "nil", token="3")
    assert _text(queue.next_task("a")) == "Item 0"
    queue.skip("a", queue.next_task("a").task.id, token="4")   # Item 0 again: behind Item 1 now
    assert _text(queue.next_task("a")) == "Item 1"


def test_a_doubled_key_press_saves_once(store, tmp_path):
    queue = AnnotationQueue(store, _project_with_tasks(store, tmp_path))
    view = queue.next_task("alice")
    first = queue.decide("alice", view.task.id, "nil", token="press-1")
    again = queue.decide("alice", view.task.id, "nil", token="press-1")
    assert again == first and again.replayed and not first.replayed
    assert "already saved" in again.describe() and view.task.id in first.describe()
    assert store.db.execute("SELECT count(*) FROM corrections WHERE client_token = 'press-1'").fetchone()[0] == 1
    assert store.db.execute("SELECT count(*) FROM corrections").fetchone()[0] == 1
    other = queue.next_task("bob")
    with pytest.raises(InputError, match="already used"):
        queue.decide("bob", other.task.id, "nil", token="press-1")


def test_a_save_for_a_task_not_on_screen_is_refused(store, tmp_path):
    queue = AnnotationQueue(store, _project_with_tasks(store, tmp_path))
    t0 = queue.next_task("alice").task.id
    t1 = list_tasks(store, "q")[1].id
    with pytest.raises(StaleTaskError, match=f"task {t1} is not the task on alice's screen"):
        queue.decide("alice", t1, "nil", token="a")
    queue.decide("alice", t0, "nil", token="b")
    # the next task is loading: a key pressed now still names t0, which is no longer on screen
    with pytest.raises(StaleTaskError, match="no task is"):
        queue.decide("alice", t0, "accept_dim", "Q1", token="c")
    assert _text(queue.next_task("alice")) == "Item 1"
    with pytest.raises(StaleTaskError, match="Item|task"):
        queue.decide("alice", t0, "nil", token="d")
    with pytest.raises(InputError, match="no task 'zzz'"):
        queue.decide("alice", "zzz", "nil", token="e")
    rows = store.db.execute("SELECT task_id, client_token FROM corrections").fetchall()
    assert rows == [(t0, "b")], "only the save for the task on screen was recorded"


def test_predictions_on_screen_are_checked_and_recorded(store, tmp_path):
    queue = AnnotationQueue(store, _project_with_tasks(store, tmp_path))
    t0, t1 = list_tasks(store, "q")[:2]
    (pid0,) = store.record_predictions(t0.mention_id, [{"linker": "dim", "error": "down"}])
    (pid1,) = store.record_predictions(t1.mention_id, [{"linker": "dim", "error": "down"}])
    view = queue.next_task("alice")
    assert view.prediction_ids == [pid0]
    with pytest.raises(InputError, match=f"\\[{pid1}\\] do not belong"):
        queue.decide("alice", t0.id, "nil", token="a", shown_prediction_ids=[pid0, pid1])
    with pytest.raises(InputError, match="not among the predictions on screen"):
        queue.decide("alice", t0.id, "accept_dim", "Q5", token="b", shown_prediction_ids=[], prediction_id=pid0)
    ack = queue.decide("alice", t0.id, "accept_dim", "Q5", token="c", shown_prediction_ids=view.prediction_ids,
                       prediction_id=pid0, entity_name="Five")
    assert ack.shown_prediction_ids == (pid0,) and ack.prediction_id == pid0 and ack.entity_name == "Five"


def test_only_the_projects_linkers_are_shown_and_recorded(store, tmp_path):
    """The Link tab linked a task's mention with its gemel+bm25 (same mention id, same KB): that
    prediction was shown with the task, sent back as on screen, and the Dashboard gained a third
    model, "GEMEL+BM25 accepted 0% of 2 decisions" (a browser review)."""
    queue = AnnotationQueue(store, _project_with_tasks(store, tmp_path, linkers=["gemel", "dim"]))
    t0 = list_tasks(store, "q")[0]
    gemel, dim = store.record_predictions(t0.mention_id, [{"linker": "gemel", "entity_id": "Q1"},
                                                          {"linker": "dim", "entity_id": "Q2"}])
    store.record_predictions(t0.mention_id, [{"linker": "gemel+bm25", "entity_id": "Q3"}])   # the Link tab's
    view = queue.next_task("alice")
    assert set(view.predictions) == {"gemel", "dim"} and sorted(view.prediction_ids) == sorted([gemel, dim])
    queue.decide("alice", t0.id, "accept_dim", "Q2", token="a", shown_prediction_ids=view.prediction_ids,
                 prediction_id=dim)
    from annotations.dashboard import dashboard_data
    from annotations.review import ReviewQueue
    assert dashboard_data(store, "q").models == ("gemel", "dim")
    assert set(ReviewQueue(store, "q", reviewer="rita", is_reviewer=True).item(t0.id).predictions) == {"gemel", "dim"}


def test_history_back_forward_and_changing_a_past_decision(store, tmp_path):
    queue = AnnotationQueue(store, _project_with_tasks(store, tmp_path))
    t0 = queue.next_task("alice").task.id
    first = queue.decide("alice", t0, "accept_dim", "Q10", token="1", entity_name="Ten")
    t1 = queue.next_task("alice").task.id
    queue.decide("alice", t1, "nil", token="2")
    t2 = queue.next_task("alice").task.id          # a new task on screen

    view = queue.back("alice")
    assert view.task.id == t1 and view.decision.action == "nil" and (view.history_index, view.history_length) == (1, 2)
    view = queue.back("alice")
    assert view.task.id == t0 and view.decision.entity_id == "Q10"
    assert queue.back("alice").task.id == t0, "the first entry stays"
    changed = queue.decide("alice", t0, "search", "Q11", token="3", entity_name="Eleven")
    assert changed.supersedes == first.correction_id
    rows = store.db.execute("SELECT entity_id, undone_at FROM corrections WHERE task_id = ? ORDER BY id",
                            (t0,)).fetchall()
    assert rows == [("Q10", None), ("Q11", None)], "nothing deleted: the change is a new row"
    assert [d.task_id for d in queue.history("alice")] == [t0, t1], "a change keeps its place in the history"
    assert queue.history("alice")[0].entity_id == "Q11"
    assert str(queue.progress("alice")) == "alice 2 / 4, project 2 / 4", "a change counts once"

    assert queue.reopen("alice", t0).decision.entity_id == "Q11"
    assert queue.forward("alice").task.id == t1
    assert queue.forward("alice").task.id == t2, "past the history's end: the queue again"
    with pytest.raises(NotAllowedError, match="not in alice's history"):
        queue.reopen("alice", list_tasks(store, "q")[3].id)


def test_undo_puts_the_task_back_and_a_second_undo_of_the_same_decision_changes_nothing(store, tmp_path):
    queue = AnnotationQueue(store, _project_with_tasks(store, tmp_path))
    t0 = queue.next_task("alice").task.id
    ack = queue.decide("alice", t0, "nil", token="1")
    result = queue.undo("alice", ack.correction_id)
    assert result.undone.id == ack.correction_id and result.undone.undone_at and result.view.task.id == t0
    again = queue.undo("alice", ack.correction_id)
    assert again.undone.undone_at == result.undone.undone_at
    assert store.db.execute("SELECT count(*) FROM corrections WHERE undone_at IS NULL").fetchone()[0] == 0
    assert queue.next_task("alice").task.id == t0, "the undone task is on screen again"
    queue.decide("alice", t0, "nil", token="2")
    with pytest.raises(NotAllowedError, match="another annotator"):
        queue.undo("bob", ack.correction_id)
    assert queue.undo("carol") is None


def test_flag_for_review(store, tmp_path):
    queue = AnnotationQueue(store, _project_with_tasks(store, tmp_path))
    t0 = queue.next_task("alice").task.id
    with pytest.raises(InputError, match="needs a comment"):
        queue.flag("alice", t0, "  ")
    flag = queue.flag("alice", t0, "two people called Collins in the picture")
    assert flag.task_id == t0 and flag.annotator == "alice"
    with pytest.raises(StaleTaskError, match="nothing was flagged"):
        queue.flag("alice", list_tasks(store, "q")[2].id, "never seen")
    assert queue.next_task("alice").flags == [flag]
    assert [f.comment for f in queue.flags()] == ["two people called Collins in the picture"]
    queue.resolve_flag(flag.id, "reviewer")
    assert queue.flags() == [] and queue.flags(unresolved_only=False)[0].resolved_by == "reviewer"


def test_a_team_gets_different_tasks_and_overlap_gives_each_task_twice(store, tmp_path):
    queue = AnnotationQueue(store, _project_with_tasks(store, tmp_path))
    a, b = queue.next_task("alice"), queue.next_task("bob")
    assert a.task.id != b.task.id, "a task on alice's screen is not given to bob"
    queue.decide("alice", a.task.id, "nil", token="a1")
    assert queue.next_task("carol").task.id not in (a.task.id, b.task.id)

    twice = AnnotationQueue(store, _project_with_tasks(store, tmp_path, 2, name="double", annotations_per_task=2))
    x = twice.next_task("alice")
    assert twice.next_task("bob").task.id == x.task.id, "two annotators per task"
    assert twice.next_task("carol").task.id != x.task.id, "but not three"
    twice.decide("alice", x.task.id, "nil", token="d1")
    assert progress(store, "double").project_done == 0
    twice.decide("bob", x.task.id, "nil", token="d2")
    assert progress(store, "double").project_done == 1


def test_the_cli_imports_and_lists_projects(tmp_path, shared_data, capsys):
    from mel.cli import main
    db = tmp_path / "data"
    args = ["annotations", "import", "--db", str(db), "--project", "wm", "--format", "wikimel",
            "--data", str(shared_data / "wikimel"), "--split", "dev", "--limit", "7"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "created project 'wm'" in out and "7 tasks imported, 0 already present" in out
    assert main(args) == 0
    assert "0 tasks imported, 7 already present" in capsys.readouterr().out
    assert main(["annotations", "projects", "--db", str(db), "--annotator", "alice"]) == 0
    assert "wm: alice 0 / 7, project 0 / 7; KB none" in capsys.readouterr().out
    assert main(["annotations", "import", "--db", str(db), "--project", "wm", "--format", "csv",
                 "--data", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv does not exist" in capsys.readouterr().err


def test_a_version_1_database_is_upgraded_keeping_its_corrections(tmp_path, monkeypatch):
    import annotations.store as store_module
    from mel.types import Mention
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 1)
    with AnnotationStore(tmp_path) as old:
        mention_id = old.record_mention(Mention("Ada Lovelace wrote notes", 0, 12))
        old.record_correction("alice", mention_id, "Q7259", "search", entity_name="Ada Lovelace")
    monkeypatch.undo()
    with AnnotationStore(tmp_path) as new:
        assert new.schema_version() == store_module.SCHEMA_VERSION == 3 and list_projects(new) == []
        (row,) = new.corrections()
        assert (row["entity_id"], row["task_id"], row["client_token"], row["returned_by"], row["shown_at"]) == (
            "Q7259", None, None, None, None)
        assert new.db.execute("SELECT count(*) FROM reviews").fetchone()[0] == 0
        new.record_correction("bob", mention_id, None, "nil")  # the app's single-caption path still saves


def test_queue_decisions_are_exported_as_training_data(store, tmp_path):
    from annotations.export import export_corrections
    queue = AnnotationQueue(store, _project_with_tasks(store, tmp_path, 2))
    queue.decide("alice", queue.next_task("alice").task.id, "search", "Q1", token="1", entity_name="One")
    queue.decide("alice", queue.next_task("alice").task.id, "nil", token="2")
    report = export_corrections(store, tmp_path / "out", "jsonl", project="q")
    # k = 1: each decision is its task's final label; NIL is exported too
    assert (report.n_examples, report.n_nil, report.n_undecided) == (2, 1, 0)
    assert {e.gold_id for e in load_dataset("jsonl", tmp_path / "out", "train").examples} == {"Q1", NIL}
    free_form = export_corrections(store, tmp_path / "free", "jsonl")  # project decisions are not mixed in
    assert free_form.n_examples == 0 and free_form.projects_not_exported == ["q"]


def _late_error_file(tmp_path, fmt: str, n: int = 600) -> tuple[Path, int]:
    """A task file of `n` good records, then one the reader cannot read at all (a byte that is not UTF-8
    for tasks-jsonl, a cell over the csv module's field limit for csv); (file, where the error is: the
    byte offset of the bad byte, or the record)."""
    if fmt == "tasks-jsonl":
        good = "".join(json.dumps({"caption": f"Task number {i} here", "mention": f"{i}"}) + "\n" for i in range(n))
        raw = good.encode("utf-8") + b'{"caption": "caf\xe9 au lait", "mention": "caf"}\n'
        where = raw.index(b"\xe9")
    else:
        good = "caption,mention\n" + "".join(f"Task number {i} here,{i}\n" for i in range(n))
        raw = (good + "x" * (csv.field_size_limit() + 10) + ",x\n").encode("utf-8")
        where = n + 1
    path = tmp_path / ("late.csv" if fmt == "csv" else "late.jsonl")
    path.write_bytes(raw)
    return path, where


@pytest.mark.parametrize("fmt", ["tasks-jsonl", "csv"])
def test_a_file_error_late_in_the_file_imports_nothing(store, tmp_path, fmt):
    """A file the reader cannot read to its end (not UTF-8, a broken CSV) was refused only after the
    records before the error had been committed, 200 at a time: a "refused" import that had saved
    600 tasks. The whole file is read and checked first; nothing is written. The bad byte is named
    by its offset in the file (it was an offset inside the last 8 KiB chunk read)."""
    data, where = _late_error_file(tmp_path, fmt)
    project = create_project(store, "p")
    match = f"at byte {where} \\(line 601\\)" if fmt == "tasks-jsonl" else "not a readable CSV file"
    with pytest.raises(InputError, match=match):
        import_tasks(store, project, fmt, data)
    assert list_tasks(store, project) == []
    assert store.db.execute("SELECT count(*) FROM mentions").fetchone()[0] == 0


def test_a_refused_import_in_the_cli_keeps_the_project_as_it_was(tmp_path, capsys):
    """`annotations import` of a file refused late: a new project was kept half-imported (it was not
    empty), and an existing project's guidelines were overwritten (committed before the import ran).
    Now a new project is taken back and an existing one keeps its tasks and guidelines."""
    from mel.cli import main
    db = tmp_path / "data"
    bad, _ = _late_error_file(tmp_path, "tasks-jsonl")
    old, new = tmp_path / "old.md", tmp_path / "new.md"
    old.write_text("# Old rules", encoding="utf-8")
    new.write_text("# New rules", encoding="utf-8")
    args = ["annotations", "import", "--db", str(db), "--format", "tasks-jsonl"]
    assert main(args + ["--project", "fresh", "--data", str(bad)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"caption": "Hopper painted the diner", "mention": "Hopper"}) + "\n", encoding="utf-8")
    assert main(args + ["--project", "kept", "--data", str(good), "--guidelines", str(old)]) == 0
    assert main(args + ["--project", "kept", "--data", str(bad), "--guidelines", str(new)]) == 2
    with AnnotationStore.from_db(db / "annotations.sqlite") as store:
        assert [p.name for p in list_projects(store)] == ["kept"]
        assert get_project(store, "kept").settings.guidelines == "# Old rules"
        assert [t.mention.text for t in list_tasks(store, "kept")] == ["Hopper"]
    assert main(args + ["--project", "kept", "--data", str(good), "--guidelines", str(new)]) == 0
    with AnnotationStore.from_db(db / "annotations.sqlite") as store:
        assert get_project(store, "kept").settings.guidelines == "# New rules"


def test_preannotating_with_gemel_without_a_pool_warns():
    """The command line built GEMEL with no demonstration pool (the app passes its own) and said
    nothing: annotators saw zero-shot answers. It now warns, naming the options that give one."""
    from types import SimpleNamespace

    from annotations.projects_cli import zero_shot_warnings
    warnings = zero_shot_warnings({"gemel": SimpleNamespace(pool=None), "dim": SimpleNamespace(),
                                   "gemel+bm25": SimpleNamespace(pool=object())})
    assert len(warnings) == 1 and "gemel runs zero-shot" in warnings[0] and "--opt gemel:pool_data=DIR" in warnings[0]
