"""The Annotate tab's server side without a browser: rendering (escaped, probabilities), commands
through QueueScreens (stale, doubled and reused-token saves), the safe unzip of the admin import,
the per-annotator view of GEMEL's pool, the Link tab's examples from the loaded KB, and the
service's one Mention (the NFD caption bug)."""
from __future__ import annotations

import json
import os
import re
import stat
import zipfile

import numpy as np
import pytest

from annotations.projects import Progress, Task
from annotations.queue import PredictionView, TaskView
from demo.queue_ui import parse_command, safe_extract_zip
from demo.render import probabilities, render_search_results, render_task
from mel.errors import InputError
from mel.gemel.demos import DemonstrationPool
from mel.types import Entity, Example, Mention

EVIL = '<img src=x onerror="alert(1)">'


# -- rendering ------------------------------------------------------------------------------------
def test_probabilities_are_a_softmax_at_the_linkers_temperature():
    p = probabilities([2.0, 1.0, None, float("nan")])
    assert p[2] is None and p[3] is None
    assert abs(p[0] + p[1] - 1) < 1e-9 and abs(p[0] / p[1] - np.e) < 1e-9
    cold = probabilities([0.9, 0.8], temperature=0.02)  # cosines: a small temperature separates them
    assert cold[0] > 0.99
    assert probabilities([]) == [] and probabilities([None]) == [None]


def _task_view(caption=f"{EVIL} Collins", gemel="Q1", dim=("Q2", "Q1")):
    m = Mention.from_text(caption, "Collins", id="mid")
    task = Task("t1", 1, "mid", m, None, None, "", "f.jsonl", "line 1", 0)
    preds = {
        "gemel": PredictionView(11, "gemel", gemel, EVIL, -0.1, [{"id": gemel, "name": EVIL, "score": -0.1},
                                                                  {"id": "Q9", "name": "x", "score": -2.3}],
                                {"kind": "gemel", "generated": EVIL, "demonstrations": [
                                    {"caption": EVIL, "mention": EVIL, "gold_id": "Q1", "gold_name": EVIL,
                                     "similarity": 0.9}]}, None, "kb"),
        "dim": PredictionView(12, "dim", dim[0], "n", 3.0, [{"id": i, "name": EVIL, "score": 3.0 - k}
                                                           for k, i in enumerate(dim)],
                              {"kind": "dim", "cue": {"text": EVIL, "provider": "p"}}, None, "kb"),
    }
    return TaskView(task, preds, Progress(20, 3, "alice", 2, 1))


def test_the_task_screen_is_escaped_and_carries_what_a_save_needs():
    html = render_task(_task_view(), project=EVIL, message=EVIL, nonce="tok-1",
                       describe=lambda i: EVIL)
    assert "<img src=x" not in html and "&lt;img" in html
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', html))
    assert attrs["task-id"] == "t1" and attrs["nonce"] == "tok-1"
    assert json.loads(attrs["prediction-ids"].replace("&quot;", '"')) == [11, 12]
    assert attrs["gemel-entity"] == "Q1" and attrs["gemel-prediction"] == "11" and attrs["dim-prediction"] == "12"
    assert json.loads(attrs["dim-ids"].replace("&quot;", '"')) == ["Q2", "Q1"]
    assert "you <b>2 / 20</b>" in html and "project <b>3 / 20</b>" in html
    assert "disagree" in html                                  # GEMEL Q1, DIM's first Q2
    assert "agree" in render_task(_task_view(dim=("Q1", "Q2")), project="p") and \
        "disagree" not in render_task(_task_view(dim=("Q1", "Q2")), project="p")
    assert "73%" in html                                       # softmax(3, 2) -> 0.73 for DIM's first
    assert "softmax" in html                                   # the probabilities say what they are
    assert "(the 1 most similar of the 1 in the prompt)" in html  # it said "4 in the prompt" over 3 listed
    found = render_search_results([Entity("Q<1>", EVIL, description=EVIL)])
    assert "<img src" not in found and 'data-entity-id="Q&lt;1&gt;"' in found


def test_commands_are_bounded_json_objects():
    assert parse_command('{"action": "nil"}') == {"action": "nil"}
    for bad in ("[1]", "nope", None, "x" * 100_000):
        with pytest.raises(InputError):
            parse_command(bad)


# -- safe unzip -----------------------------------------------------------------------------------
def _zip(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


@pytest.mark.parametrize("name,mode,why", [("/etc/evil.png", None, "outside"), ("../evil.png", None, "outside"),
                                           ("pics/../../evil.png", None, "outside"),
                                           ("link.png", stat.S_IFLNK | 0o777, "link")])
def test_unsafe_zip_members_are_refused_before_anything_is_written(tmp_path, name, mode, why):
    archive = _zip(tmp_path / "a.zip", [("ok.png", b"x", None), (name, b"/etc/passwd", mode)])
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(InputError, match=why):
        safe_extract_zip(archive, dest)
    assert list(dest.iterdir()) == [] and not (tmp_path / "evil.png").exists()


def test_zip_bombs_and_too_much_are_refused(tmp_path):
    bomb = _zip(tmp_path / "bomb.zip", [("big.png", b"\0" * (8 << 20), None)])
    (tmp_path / "o1").mkdir()
    with pytest.raises(InputError, match="zip bomb"):
        safe_extract_zip(bomb, tmp_path / "o1")
    many = _zip(tmp_path / "many.zip", [(f"{i}.png", b"12345", None) for i in range(5)])
    (tmp_path / "o2").mkdir()
    with pytest.raises(InputError, match="limit"):
        safe_extract_zip(many, tmp_path / "o2", max_files=4)
    (tmp_path / "o3").mkdir()
    with pytest.raises(InputError, match="MiB"):
        safe_extract_zip(many, tmp_path / "o3", max_bytes=12)
    (tmp_path / "o4").mkdir()
    text = tmp_path / "not.zip"
    text.write_text("hello")
    with pytest.raises(InputError, match="not a zip"):
        safe_extract_zip(text, tmp_path / "o4")


def test_a_good_zip_unpacks_into_its_one_folder(tmp_path):
    archive = _zip(tmp_path / "a.zip", [("pics/", b"", stat.S_IFDIR | 0o755), ("pics/a.png", b"A", None),
                                        ("pics/sub/b.png", b"B", None)])
    dest = tmp_path / "out"
    dest.mkdir()
    folder = safe_extract_zip(archive, dest)
    assert folder == dest / "pics" and (folder / "a.png").read_bytes() == b"A"
    assert (folder / "sub" / "b.png").read_bytes() == b"B"


# -- the pool, per annotator ------------------------------------------------------------------------
class _Encoder:
    name, dim = "toy", 4

    def encode(self, texts, batch_size=128):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            out[i, hash(t.split()[0]) % self.dim] = 1.0
        return out


def _ex(sample_id, text="Collins"):
    return Example(Mention(f"{text} waves.", 0, len(text)), gold_id="Q1", gold_name="n", sample_id=sample_id)


def test_retrieval_keeps_to_the_allowed_sample_ids():
    pool = DemonstrationPool([_ex("base-1"), _ex("correction-1"), _ex("correction-2")], _Encoder(), use_cache=False)
    query = Mention("Collins smiles.", 0, 7)
    assert {d.example.sample_id for d in pool.retrieve(query, 5)} == {"base-1", "correction-1", "correction-2"}
    assert {d.example.sample_id for d in pool.retrieve(query, 5, allowed={"base-1", "correction-2"})} == \
        {"base-1", "correction-2"}
    with pool.only(lambda sid: not sid.startswith("correction-")):
        assert [d.example.sample_id for d in pool.retrieve(query, 5)] == ["base-1"]
        assert [[d.example.sample_id for d in r] for r in pool.retrieve_many([query], 5)] == [["base-1"]]
    assert len(pool.retrieve(query, 5)) == 3                   # only() ends with its block
    other = DemonstrationPool([_ex("x")], _Encoder(), use_cache=False)
    with pool.only(set()):
        assert len(other.retrieve(query, 5)) == 1              # ... and applies to its own pool only


# -- against the real service (offline preset, bundled KB) ------------------------------------------
@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from demo.service import LinkService, ServiceConfig
    svc = LinkService(ServiceConfig(preset="offline", data_dir=str(tmp_path_factory.mktemp("svc")), warm_up=False))
    svc.load()
    yield svc
    svc.store.close()


@pytest.mark.slow
def test_a_decomposed_caption_keeps_its_span_with_an_image(service, tmp_path):
    from demo.bundled import package_image
    caption = "Zoe\u0308 met Collins at the pad."               # NFD: the NFC caption is one character shorter
    start = caption.index("Collins")
    view = service.link(caption, start, start + 7, str(package_image("skimage:astronaut")), annotator="alice")
    assert view.mention.text == "Collins" and view.mention.image
    row = service.store.mention(view.mention_id)
    assert row["caption"][row["start"]:row["end"]] == "Collins"


@pytest.mark.slow
def test_one_annotators_corrections_do_not_reach_anothers_suggestions(service):
    pool = service.pool()
    assert pool is not None
    view = service.link("Zorblax waves from the shuttle hatch.", 0, 7, annotator="alice")
    ack = service.correct("alice", view.mention_id, "search", "demo:phil-collins")
    sid = f"correction-{ack.correction_id}"
    mine = service.link("Zorblax waves from the shuttle hatch.", 0, 7, annotator="alice")
    theirs = service.link("Zorblax waves from the shuttle hatch.", 0, 7, annotator="bob")
    assert sid in pool.keys()
    assert sid in [d["sample_id"] for d in mine.demonstrations]
    assert sid not in [d["sample_id"] for d in theirs.demonstrations]
    assert service.pool_view("bob")(sid) is False and service.pool_view(None)(sid) is False
    assert service.pool_view("alice")(sid) is True and service.pool_view("bob")("demo-pool-1") is True


def _fast_demo_project(service, name: str, n: int, folder):
    """A demo project pre-annotated by quick real linkers (BM25 in GEMEL's slot, dense in DIM's)."""
    from bench.app_server import make_demo_project
    from mel.linkers import build_linker
    make_demo_project(service, name, n=n, folder=folder,
                      linkers=lambda p: {"gemel": build_linker("bm25", service.kb, service.preset),
                                         "dim": build_linker("dense", service.kb, service.preset)})


@pytest.mark.slow
def test_queue_commands_refuse_stale_and_reused_saves(service, tmp_path):
    from demo.queue_ui import QueueScreens
    _fast_demo_project(service, "unit", 4, tmp_path)
    screens = QueueScreens(service)

    def attrs(html):
        return {k: v.replace("&quot;", '"') for k, v in re.findall(r'data-([a-z-]+)="([^"]*)"', html)}
    first = attrs(screens.handle("carol", {"project": "unit", "action": "next"}))
    save = {"project": "unit", "action": "accept_dim", "task_id": first["task-id"], "token": "k1",
            "entity_id": json.loads(first["dim-ids"])[0], "prediction_id": first["dim-prediction"],
            "shown": json.loads(first["prediction-ids"])}
    second_html = screens.handle("carol", save)
    second = attrs(second_html)
    assert second["task-id"] != first["task-id"] and "mel-q-ack ok" in second_html
    again = screens.handle("carol", save)                      # the same key press again: saved once
    assert "already saved" in again and attrs(again)["task-id"] == second["task-id"]
    stale = screens.handle("carol", {**save, "token": "k2"})   # the task is no longer on screen
    assert "not saved" in stale and "mel-q-ack err" in stale
    reused = screens.handle("carol", {**save, "task_id": second["task-id"], "token": "k1"})
    assert "mel-q-ack err" in reused
    rows = service.store.corrections(annotator="carol")
    assert len(rows) == 1 and rows[0]["client_token"] == "k1"
    unknown = screens.handle("dave", {"project": "nope", "action": "next"})
    assert unknown.count("mel-q-ack err") == 1 and "no project &#x27;nope&#x27; here" in unknown
    # an annotator is told neither the server's database path nor the other projects' names
    assert str(service.store.path) not in unknown and "unit" not in unknown, unknown
    assert "log in" in screens.handle(None, {"project": "unit", "action": "next"})
    screens.close()


@pytest.mark.slow
def test_link_tab_examples_come_from_the_loaded_kb(service):
    from demo.bundled import bundled_examples, examples_for
    assert [e.caption for e in examples_for(service)] == [e.caption for e in bundled_examples()]
    service.config.kb = str(service.kb.path)                   # as if another KB was given: its own mentions
    try:
        examples = examples_for(service)
    finally:
        service.config.kb = None
    pool_captions = {ex.mention.caption for ex in service.pool().examples}
    task_captions = {t["caption"] for t in service.store.db.query("SELECT caption FROM mentions")}
    assert examples and all(e.caption in pool_captions | task_captions for e in examples)
    assert all(e.caption[e.start:e.end] == e.mention for e in examples)


def test_no_absolute_paths_of_this_machine_in_the_assets():
    from pathlib import Path

    from demo.ui import ASSETS
    machine_paths = (str(ASSETS.resolve().parents[1]), str(Path.home()))  # the checkout and the home folder
    for name in os.listdir(ASSETS):
        if name.endswith((".js", ".css")):
            text = (ASSETS / name).read_text(encoding="utf-8")
            for path in machine_paths:
                assert path not in text, (name, path)


def test_the_import_report_names_the_uploaded_file_not_the_servers_temporary_path(tmp_path):
    # An admin's CSV arrives as /tmp/gradio/<hash>/tasks.csv: the report said that path, not the file's name.
    from annotations.projects import ImportReport, MalformedRecord
    from demo.queue_ui import _named_as_uploaded
    from demo.render import render_import_report
    upload = tmp_path / "gradio" / ("ab" * 32) / "tasks.csv"
    unpacked = tmp_path / "mel-import-x1" / "images"   # the images zip, unpacked on the server
    report = ImportReport(project="p", format="csv", source=str(upload), n_read=3, n_malformed=2,
                          malformed=[MalformedRecord(str(upload), "row 2", "no mention"),
                                     MalformedRecord(str(upload), "row 3",
                                                     f"the image 'missing.png' is not in the image folder {unpacked}")])
    html = render_import_report(_named_as_uploaded(report, upload, unpacked))
    assert "tasks.csv, record row 2: no mention" in html and str(upload.parent) not in html
    assert "&#x27;missing.png&#x27; is not in the uploaded images zip" in html and str(unpacked) not in html


@pytest.mark.slow
def test_someone_taken_off_the_team_neither_sees_nor_decides_the_task_left_on_screen(service, tmp_path):
    # rita opened a task before the admin set the team (ann1, ann2): her key press was saved against that
    # task, then the answer failed ("the server failed (NotAllowedError)... reload the page").
    import dataclasses

    from annotations.projects import get_project, update_settings
    from demo.queue_ui import QueueScreens
    _fast_demo_project(service, "teamed", 3, tmp_path)
    screens = QueueScreens(service)
    shown = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', screens.handle("rita", {"project": "teamed",
                                                                                 "action": "next"})))
    assert shown["state"] == "task"
    project = get_project(service.store, "teamed")
    update_settings(service.store, project, dataclasses.replace(project.settings, annotators=["ann1", "ann2"]))
    html = screens.handle("rita", {"project": "teamed", "action": "nil", "task_id": shown["task-id"],
                                   "token": "r1", "shown": []})
    assert 'data-state="none"' in html and "not on the team" in html and "mel-q-ack err" in html
    assert "server failed" not in html and shown["task-id"] not in html
    assert service.store.corrections(annotator="rita") == []
    assert 'data-state="task"' in screens.handle("ann1", {"project": "teamed", "action": "next"})
    screens.close()


def test_a_refused_import_leaves_no_empty_project_and_names_the_uploaded_file(tmp_path, capsys):
    """A tasks file the importer refuses (an unknown header, not UTF-8) created the project anyway:
    an empty project was left in every project picker, and the error named the server's temporary
    path of the upload. Now the new project is taken back (an existing one is kept), in the app and
    the CLI, and the error names the file as uploaded."""
    from types import SimpleNamespace

    from annotations import AnnotationStore
    from annotations.projects import list_projects
    from demo.queue_ui import _import_upload
    from mel.cli import main
    from mel.errors import MELError
    upload = tmp_path / "gradio" / ("ab" * 32) / "tasks.csv"
    upload.parent.mkdir(parents=True)
    with AnnotationStore(tmp_path / "data") as store:
        service = SimpleNamespace(store=store, kb=SimpleNamespace(path=None))
        screens = SimpleNamespace(forget=lambda name: None)

        def names():
            return [p.name for p in list_projects(store)]
        for content in (b"just text\n", b"\xff\xfe\x00garbage\n"):
            upload.write_bytes(content)
            with pytest.raises(MELError) as info:
                _import_upload(service, screens, "p", None, str(upload), None, "")
            assert "tasks.csv" in str(info.value) and str(upload.parent) not in str(info.value), str(info.value)
            assert names() == []
        upload.write_text("caption,mention\nHopper painted the diner.,Hopper\n", encoding="utf-8")
        report, _project = _import_upload(service, screens, "p", None, str(upload), None, "")
        assert report.n_imported == 1 and names() == ["p"]
        upload.write_text("just text\n", encoding="utf-8")
        with pytest.raises(MELError):
            _import_upload(service, screens, "p", None, str(upload), None, "")
        assert names() == ["p"]                                  # an existing project stays, with its task

    assert main(["annotations", "import", "--db", str(tmp_path / "data"), "--project", "cli", "--format", "csv",
                 "--data", str(upload)]) == 2
    assert "the header must name columns" in capsys.readouterr().err
    with AnnotationStore(tmp_path / "data") as store:
        assert [p.name for p in list_projects(store)] == ["p"]


@pytest.mark.slow
def test_decision_keys_with_nothing_left_say_so(service, tmp_path):
    """With every task decided ("Nothing left" on screen) a decision key sent no task id and was
    answered "GEMEL gave no entity for this task" or "task_id is missing ...; reload the page":
    neither is what happened. It says there is no task to decide, and saves nothing."""
    from demo.queue_ui import QueueScreens
    _fast_demo_project(service, "done-1", 1, tmp_path)
    screens = QueueScreens(service)
    first = screens.handle("erin", {"project": "done-1", "action": "next"})
    task_id = re.search(r'data-task-id="([^"]+)"', first).group(1)
    done = screens.handle("erin", {"project": "done-1", "action": "nil", "task_id": task_id, "token": "e1"})
    assert 'data-state="done"' in done and 'data-task-id=""' in done
    for i, cmd in enumerate([{"action": "accept_gemel", "entity_id": ""}, {"action": "nil"}, {"action": "skip"},
                             {"action": "accept_dim", "entity_id": "demo:grace-hopper"}]):
        html = screens.handle("erin", {"project": "done-1", "task_id": "", "token": f"x{i}", "shown": [], **cmd})
        assert "no task on screen to decide" in html and "mel-q-ack err" in html, (cmd, html[:300])
        assert "reload the page" not in html and "GEMEL gave no entity" not in html
    assert [r["client_token"] for r in service.store.corrections(annotator="erin")] == ["e1"]
    screens.close()


def test_a_refused_import_keeps_the_projects_guidelines(tmp_path):
    """The import form set the guidelines given with it (committed) before the import ran: a refused
    file still replaced an existing project's guidelines. Now they are written with the tasks."""
    from types import SimpleNamespace

    from annotations import AnnotationStore
    from annotations.projects import ProjectSettings, create_project, get_project, list_tasks
    from demo.queue_ui import _import_upload
    from mel.errors import MELError
    upload = tmp_path / "gradio" / ("ab" * 32) / "tasks.jsonl"
    upload.parent.mkdir(parents=True)
    good = "".join(json.dumps({"caption": f"Task number {i} here", "mention": f"{i}"}) + "\n" for i in range(300))
    with AnnotationStore(tmp_path / "data") as store:
        create_project(store, "p", settings=ProjectSettings(guidelines="# Old rules"))
        service = SimpleNamespace(store=store, kb=SimpleNamespace(path=None))
        screens = SimpleNamespace(forget=lambda name: None)
        upload.write_bytes(good.encode("utf-8") + b'{"caption": "caf\xe9", "mention": "caf"}\n')
        with pytest.raises(MELError, match="not UTF-8"):
            _import_upload(service, screens, "p", None, str(upload), None, "# New rules")
        assert get_project(store, "p").settings.guidelines == "# Old rules" and list_tasks(store, "p") == []
        upload.write_text(good, encoding="utf-8")
        report, project = _import_upload(service, screens, "p", None, str(upload), None, "# New rules")
        assert report.n_imported == 300 and project.settings.guidelines == "# New rules"
        assert get_project(store, "p").settings.guidelines == "# New rules"


def test_a_sent_back_task_shows_the_reviewers_note_and_no_new_task_badge():
    """A task a reviewer sent back showed "new task" next to "sent back by a reviewer: …"; it is not
    new: only the note is shown (a fresh task keeps its badge)."""
    import dataclasses
    fresh = render_task(_task_view(), project="p")
    assert "new task" in fresh and "sent back" not in fresh
    back = render_task(dataclasses.replace(_task_view(), review_note="read the rule"), project="p")
    assert "sent back by a reviewer: read the rule" in back and "new task" not in back
