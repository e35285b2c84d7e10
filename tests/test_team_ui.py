"""The team tabs of the app (issue #12, demo/team_ui.py) through the HTTP API of a real app on
127.0.0.1 with password login: roles checked on the server for every endpoint, no endpoint shows an
annotator's decisions to a non-reviewer, a reviewer's final label reaches the export, send-back
returns the task to its annotators, admins' settings and one-time export links.

Annotators' decisions are made through the library (annotations.queue, with `by=` the annotator),
as the app's Annotate tab does; the team app here has only the team tabs (build_team_app).
"""
from __future__ import annotations

import io
import json
import re
import uuid
import zipfile
from pathlib import Path

import httpx
import pytest

from annotations.projects import ProjectSettings, create_project, get_project, import_tasks, list_tasks
from annotations.queue import AnnotationQueue
from annotations.review import ReviewQueue
from annotations.store import AnnotationStore
from mel.types import NIL

REPO = Path(__file__).resolve().parents[1]
USERS = {"ann1": "ann1-pw-1", "ann2": "ann2-pw-2", "rita": "rita-pw-3", "alice": "alice-pw-4", "bob": "bob-pw-5"}
ADMINS = frozenset({"alice"})
REVIEWERS = frozenset({"rita"})
PROJECT = "collins"

# (caption, mention, GEMEL's answer, DIM's ranking, ann1's label, ann2's label, ann1's flag)
TASKS = [
    ("Eileen Collins piloted the Space Shuttle in 1995.", "Collins", "demo:eileen-collins",
     ["demo:phil-collins", "demo:eileen-collins", "demo:joan-collins"], "demo:eileen-collins", "demo:phil-collins", ""),
    ("Phil Collins played the drums for Genesis.", "Phil Collins", "demo:phil-collins",
     ["demo:phil-collins", "demo:joan-collins"], "demo:phil-collins", "demo:phil-collins", ""),
    ("Grace Hopper wrote the first COBOL compiler.", "Hopper", "demo:hopper-gpu",
     ["demo:edward-hopper", "demo:grace-hopper"], "demo:grace-hopper", "demo:edward-hopper", ""),
    ("A Falcon 9 lifted off at dawn.", "Falcon 9", "demo:falcon-9", ["demo:falcon-9", "demo:falcon-heavy"],
     "demo:falcon-9", "demo:falcon-9", "is this the booster or the whole rocket?"),
    ("Java was busy this morning.", "Java", "demo:java-language", ["demo:java-island", "demo:java-coffee"],
     NIL, NIL, ""),
]


def build_small_kb(path: Path) -> Path:
    """The bundled demo KB (30 entities), without dense indexes (BM25 and names only): seconds."""
    from mel.datasets import read_kb_entities
    from mel.kb import build_kb
    if not path.exists():
        build_kb(read_kb_entities("jsonl", REPO / "demo" / "assets" / "kb.jsonl"), path, progress=False)
    return path


def _result(linker: str, kb, entity_id: str | None, ranked: list[str], mention):
    from mel.types import Candidate, LinkResult
    entity = kb.get(entity_id) if entity_id else None
    candidates = [Candidate(kb.get(e), round(0.9 - 0.1 * i, 2)) for i, e in enumerate(ranked)]
    return LinkResult(linker, mention, entity, candidates, candidates[0].score if candidates else None)


def make_team_project(data_dir: Path, kb_path: Path, tasks=TASKS, name: str = PROJECT,
                      team: tuple[str, str] = ("ann1", "ann2")) -> list[str]:
    """A k = 2 project with `tasks`, both models' predictions, and both annotators' decisions (and
    flags) made through the library as the Annotate tab makes them. Returns the task ids in order."""
    from mel.kb import KnowledgeBase
    kb = KnowledgeBase(kb_path)
    source = data_dir.parent / f"{name}-tasks.jsonl"
    source.write_text("".join(json.dumps({"caption": c, "mention": m}) + "\n" for c, m, *_ in tasks))
    with AnnotationStore(data_dir) as store:
        create_project(store, name, settings=ProjectSettings(annotations_per_task=2, annotators=list(team)))
        import_tasks(store, name, "tasks-jsonl", source)
        ids = [t.id for t in list_tasks(store, name)]
        for task, (_, _, gemel, dim, *_rest) in zip(list_tasks(store, name), tasks, strict=True):
            store.record_predictions(task.mention_id, [_result("gemel", kb, gemel, [gemel] if gemel else [],
                                                               task.mention),
                                                       _result("dim", kb, dim[0], dim, task.mention)])
        queue = AnnotationQueue(store, name, kb=kb)
        for who, column in ((team[0], 4), (team[1], 5)):
            for _ in tasks:
                view = queue.next_task(who, by=who)
                spec = tasks[ids.index(view.task.id)]
                label, preds = spec[column], view.predictions
                if label == NIL:
                    action, entity = "nil", None
                elif preds["gemel"].entity_id == label:
                    action, entity = "accept_gemel", label
                elif preds["dim"].entity_id == label:
                    action, entity = "accept_dim", label
                else:
                    action, entity = "search", label
                queue.decide(who, view.task.id, action, entity, token=uuid.uuid4().hex,
                             shown_prediction_ids=view.prediction_ids, by=who)
                if who == team[0] and spec[6]:
                    queue.flag(who, view.task.id, spec[6], by=who)
    return ids


# -- the app -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from demo.team_ui import launch_team_app
    root = tmp_path_factory.mktemp("team-ui")
    kb_path = build_small_kb(root / "kb.sqlite")
    data = root / "data"
    ids = make_team_project(data, kb_path)
    running = launch_team_app(data, users=USERS, admins=ADMINS, reviewers=REVIEWERS, kb_path=kb_path)
    running.task_ids, running.kb_path = ids, kb_path
    yield running
    running.close()


def _client(app, user: str):
    from gradio_client import Client
    return Client(app.url, auth=(user, USERS[user]), verbose=False)


def _session(url: str, user: str) -> httpx.Client:
    http = httpx.Client(base_url=url, timeout=60)
    r = http.post("login", data={"username": user, "password": USERS[user]})
    assert r.status_code == 200, r.text
    return http


def _refused(client, api_name: str, *args, match: str):
    with pytest.raises(Exception) as info:
        client.predict(*args, api_name=api_name)
    assert re.search(match, str(info.value)), f"{api_name}: {info.value}"


def _events(http: httpx.Client) -> list[dict]:
    config = http.get("config").json()
    return config, [d for d in config["dependencies"] if d.get("backend_fn")]


def _run_event(http: httpx.Client, dep: dict, data: list, session: str) -> tuple[str, str]:
    """Run one event as the browser does (queue/join, then the SSE stream) in browser session
    `session`: ("ok"|"error", the raw answer)."""
    r = http.post("gradio_api/queue/join", json={"data": data, "fn_index": dep["id"], "session_hash": session,
                                                 "event_data": {"index": [0, 0], "value": "Review"},
                                                 "trigger_id": (dep["targets"] or [[None]])[0][0]})
    assert r.status_code == 200, r.text
    with http.stream("GET", f"gradio_api/queue/data?session_hash={session}", timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return ("ok" if message.get("success") else "error"), line
    raise AssertionError(f"no result from event {dep['id']}")


def _probe_data(config: dict, dep: dict, task_id: str) -> list:
    """Plausible inputs for an event: the project where a project goes, a task id in free text."""
    kinds = {c["id"]: c.get("type") for c in config["components"]}
    data = []
    for i in dep["inputs"]:
        kind = kinds.get(i)
        if kind == "dropdown":
            data.append(PROJECT)
        elif kind == "checkbox":
            data.append(True)
        elif kind == "number":
            data.append(1)
        elif kind in ("textbox", "radio"):
            data.append("demo:eileen-collins")
        elif kind == "api":  # gr.api parameters: project first, then a task id
            data.append(PROJECT if not data else task_id)
        else:
            data.append(None)
    return data


# -- roles ---------------------------------------------------------------------------------------------
def test_parse_reviewers():
    from demo.team_ui import parse_reviewers
    assert parse_reviewers({"MEL_REVIEWERS": " rita, sam ,,"}) == frozenset({"rita", "sam"})
    assert parse_reviewers({}) == frozenset()
    with pytest.raises(SystemExit, match="comma-separated"):
        parse_reviewers({"MEL_REVIEWERS": "rita:pw"})


@pytest.mark.slow
def test_non_reviewers_are_refused_on_every_team_endpoint(app):
    t = app.task_ids[0]
    for user in ("ann1", "bob", "alice"):  # an annotator of the project, another one, an admin (not a reviewer)
        client = _client(app, user)
        _refused(client, "/review_items", PROJECT, False, match="not a reviewer")
        _refused(client, "/review_task", PROJECT, t, match="not a reviewer")
        _refused(client, "/review_finalize", PROJECT, t, "demo:phil-collins", "tok-" + user, None, None, "",
                 match="not a reviewer")
        _refused(client, "/review_send_back", PROJECT, t, "look again", "tok2-" + user, None, None,
                 match="not a reviewer")
        if user != "alice":
            _refused(client, "/team_dashboard", PROJECT, match="admins .*and reviewers")
            _refused(client, "/team_export", PROJECT, "jsonl", None, False, match="not an admin")
            _refused(client, "/project_settings", PROJECT, match="not an admin")
            _refused(client, "/set_project_settings", PROJECT, 1, [], match="not an admin")
    rita = _client(app, "rita")  # a reviewer is no admin
    _refused(rita, "/team_export", PROJECT, "jsonl", None, False, match="not an admin")
    _refused(rita, "/set_project_settings", PROJECT, 1, [], match="not an admin")
    with AnnotationStore(app.data_dir, read_only=True) as store:  # nothing was saved by any of it
        assert store.db.execute("SELECT count(*) FROM reviews").fetchone()[0] == 0
        assert get_project(store, PROJECT).settings.annotations_per_task == 2


SECRETS = ("ann1", "Eileen Collins", "Grace Hopper", "booster or the whole rocket")
WRITES = ("review_finalize", "review_send_back", "set_project_settings")       # API names
WRITE_BUTTONS = ("mel-review-final", "mel-review-nil", "mel-review-pick", "mel-review-send-back",
                 "mel-settings-save", "mel-export-project")                           # the same in the UI


@pytest.mark.slow
def test_no_event_shows_decisions_to_a_non_reviewer(app):
    """Every event of the app (UI events too, as the browser runs them: page load first, then each
    event in the same browser session) as annotator ann2 and as bob: none answers with ann1's
    decisions, flags or the annotators' names. The same probes as the reviewer reach them (so the
    probe can fail)."""
    t = app.task_ids[0]
    leaked_to_reviewer = set()
    for user in ("rita", "ann2", "bob"):
        http = _session(app.url, user)
        config, deps = _events(http)
        assert not any(s in json.dumps(config) for s in SECRETS)  # nothing in the page's config either
        elem_ids = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
        session = uuid.uuid4().hex
        loads = [d for d in deps if any(e == "load" for _, e in d["targets"])]
        for dep in loads + [d for d in deps if d not in loads]:
            if dep.get("api_name") in WRITES or any(elem_ids.get(c) in WRITE_BUTTONS for c, _ in dep["targets"]):
                continue  # writes: refused in the test above; the reviewer's are tested below
            outcome, text = _run_event(http, dep, _probe_data(config, dep, t), session)
            found = [s for s in SECRETS if s in text]
            if user == "rita":
                leaked_to_reviewer.update(found)
            else:
                assert not found, f"event {dep['id']} ({dep.get('api_name')}) showed {found} to {user}: {text[:300]}"
        http.close()
    assert {"ann1", "Eileen Collins", "booster or the whole rocket"} <= leaked_to_reviewer
    with AnnotationStore(app.data_dir, read_only=True) as store:  # the probes wrote nothing
        assert store.db.execute("SELECT count(*) FROM reviews").fetchone()[0] == 0


@pytest.mark.slow
def test_every_handler_checks_the_role_itself(app):
    """The handlers behind the tabs, called directly as a logged-in annotator (as if the browser had
    sent anything at all, past Gradio's own checks of the inputs): each refuses, or answers with
    nothing of the project (the page-load handler hides the tabs, the settings loader skips)."""
    import inspect

    import gradio as gr
    refusals = 0
    for block_fn in app.demo.fns.values():
        fn = block_fn.fn
        params = inspect.signature(fn).parameters if fn is not None else {}
        if "request" not in params:
            continue  # JS-only events, clearing the comment box, the tab switch turning the timer off
        args = []
        for name, p in params.items():
            if name in ("request", "profile"):
                continue
            if name == "evt":
                args.append(gr.SelectData(None, {"index": [0, 0], "value": "x"}))
            elif name in ("st", "last"):
                args.append({"project": PROJECT, "task": app.task_ids[0], "order": app.task_ids})
            elif name in ("name", "project"):
                args.append(PROJECT)
            elif name == "task_id":
                args.append(app.task_ids[0])
            elif p.default is not inspect.Parameter.empty:
                break
            else:
                args.append("demo:eileen-collins")
        try:
            out = fn(*args, request=gr.Request(username="bob"))
        except gr.Error as exc:
            assert re.search("not a reviewer|may not see the dashboard|not an admin", str(exc)), (fn.__name__, exc)
            refusals += 1
            continue
        text = json.dumps(out, default=repr)
        assert not any(s in text for s in SECRETS + ("collins",)), (fn.__name__, text[:300])
    assert refusals >= 15


# -- review -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_reviewer_finalises_a_disagreement_and_the_export_holds_it(app):
    rita = _client(app, "rita")
    items = rita.predict(PROJECT, False, api_name="/review_items")
    by_id = {it["task_id"]: it for it in items}
    t1, t4 = app.task_ids[0], app.task_ids[3]
    assert set(by_id) >= {t1, t4} and app.task_ids[1] not in by_id     # disagreement, flagged; not the agreed one
    item = by_id[t1]
    assert item["reasons"] == ["disagreement"] and item["mention"] == "Collins"
    assert {d["annotator"]: d["label"] for d in item["decisions"]} == {"ann1": "demo:eileen-collins",
                                                                       "ann2": "demo:phil-collins"}
    assert item["predictions"]["gemel"]["entity_id"] == "demo:eileen-collins"
    assert item["predictions"]["dim"]["entity_id"] == "demo:phil-collins"
    assert by_id[t4]["reasons"] == ["flagged"] and "booster" in by_id[t4]["flags"][0]["comment"]

    # a stale screen is refused: the decision ids on screen are not the ones that stand
    with pytest.raises(Exception, match="changed since the review screen was drawn"):
        rita.predict(PROJECT, t1, "demo:eileen-collins", "stale-1", [1], None, "", api_name="/review_finalize")
    ack = rita.predict(PROJECT, t1, "demo:eileen-collins", "click-1", item["decision_ids"], item["review_id"],
                       "the astronaut: shuttle pilot", api_name="/review_finalize")
    assert ack["reviewer"] == "rita" and ack["final_label"] == "demo:eileen-collins" and ack["status"] == "reviewed"
    assert ack["message"] == f"saved: task {t1} -> final label Eileen Collins (demo:eileen-collins)"
    again = rita.predict(PROJECT, t1, "demo:eileen-collins", "click-1", item["decision_ids"], item["review_id"],
                         "the astronaut: shuttle pilot", api_name="/review_finalize")
    assert again["replayed"] and again["review_id"] == ack["review_id"]   # a repeated click saves once
    with pytest.raises(Exception, match="is not in the knowledge base"):
        rita.predict(PROJECT, t4, "demo:no-such-entity", "click-2", None, None, "", api_name="/review_finalize")
    rita.predict(PROJECT, t4, "demo:falcon-9", "click-3", by_id[t4]["decision_ids"], None, "the rocket",
                 api_name="/review_finalize")
    assert t1 not in {it["task_id"] for it in rita.predict(PROJECT, False, api_name="/review_items")}

    # the admin exports the project (jsonl); the link opens once, for that admin only
    alice = _client(app, "alice")
    out = alice.predict(PROJECT, "jsonl", None, False, api_name="/team_export")
    assert "1 reviewed" not in out["summary"] and "2 reviewed" in out["summary"]
    bob_http, alice_http = _session(app.url, "bob"), _session(app.url, "alice")
    assert bob_http.get(out["download"]).status_code == 403
    r = alice_http.get(out["download"])
    assert r.status_code == 200 and alice_http.get(out["download"]).status_code == 404
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        train = [json.loads(line) for line in z.read("train.jsonl").decode().splitlines()]
        provenance = json.loads(z.read("provenance.json"))
    gold = {e["sample_id"]: e["gold_id"] for e in train}
    # t1 reviewed, t2 agreed, t4 reviewed, t5 agreed NIL; t3 (disagreement, not reviewed) left out
    assert gold == {t1: "demo:eileen-collins", app.task_ids[1]: "demo:phil-collins", t4: "demo:falcon-9",
                    app.task_ids[4]: NIL}
    assert provenance[t1]["reviewer"] == "rita" and provenance[t1]["agreement"] == 0.5
    reviewed = alice.predict(PROJECT, "parquet", 0.0, True, api_name="/team_export")
    assert "2 left out by the filter" in reviewed["summary"]
    dash = rita.predict(PROJECT, api_name="/team_dashboard")
    assert dash["status_counts"]["reviewed"] == 2 and dash["agreement"]["pairs"][0]["n_shared"] == 5


@pytest.mark.slow
def test_send_back_returns_the_task_to_its_annotators(app):
    rita = _client(app, "rita")
    t3 = app.task_ids[2]
    item = rita.predict(PROJECT, t3, api_name="/review_task")
    with pytest.raises(Exception, match="needs a comment"):
        rita.predict(PROJECT, t3, "  ", "sb-0", item["decision_ids"], item["review_id"], api_name="/review_send_back")
    ack = rita.predict(PROJECT, t3, "Grace Hopper the computer scientist, or the painter? Read the caption.", "sb-1",
                       item["decision_ids"], item["review_id"], api_name="/review_send_back")
    assert ack["action"] == "send_back" and ack["returned_decisions"] == 2 and ack["status"] == "sent_back"
    with AnnotationStore(app.data_dir) as store:
        queue = AnnotationQueue(store, PROJECT)
        for who in ("ann1", "ann2"):
            view = queue.next_task(who, by=who)
            assert view.task.id == t3 and "painter" in view.review_note
        with pytest.raises(Exception, match="cannot act as ann1"):   # a reviewer cannot act as an annotator
            queue.next_task("ann1", by="rita")
    after = rita.predict(PROJECT, t3, api_name="/review_task")
    assert after["decisions"] == [] and after["reviews"][-1]["reviewer"] == "rita"


@pytest.mark.slow
def test_admin_sets_k_and_the_team(app):
    alice = _client(app, "alice")
    assert alice.predict(PROJECT, api_name="/project_settings")["annotators"] == ["ann1", "ann2"]
    with pytest.raises(Exception, match="needs 3 distinct annotators but the team has only 2"):
        alice.predict(PROJECT, 3, ["ann1", "ann2"], api_name="/set_project_settings")
    saved = alice.predict(PROJECT, 3, ["ann1", "ann2", "bob"], api_name="/set_project_settings")
    assert (saved["annotations_per_task"], saved["annotators"]) == (3, ["ann1", "ann2", "bob"])
    with AnnotationStore(app.data_dir, read_only=True) as store:
        assert get_project(store, PROJECT).settings.annotators == ["ann1", "ann2", "bob"]
    alice.predict(PROJECT, 2, ["ann1", "ann2"], api_name="/set_project_settings")


def test_review_screen_rendering_escapes_and_offers_every_choice(tmp_path):
    """task_html / choices_of on a task whose caption and flag hold HTML."""
    from annotations.review import ReviewQueue
    from demo.team_ui import choices_of, task_html
    kb_path = build_small_kb(tmp_path / "kb.sqlite")
    tasks = [('<b>Collins</b> <script>alert(1)</script> piloted it.', "Collins", "demo:eileen-collins",
              ["demo:phil-collins", "demo:joan-collins"], "demo:eileen-collins", NIL, "<img src=x onerror=alert(2)>")]
    make_team_project(tmp_path / "data", kb_path, tasks, name="p")
    with AnnotationStore(tmp_path / "data") as store:
        (item,) = ReviewQueue(store, "p", reviewer="rita", is_reviewer=True).items()
        page = task_html(item, 0, 1)
        assert "<script>" not in page and "&lt;script&gt;" in page and "<img src=x" not in page
        assert "annotators disagree" in page and "flagged" in page
        opts = choices_of(item)
        assert [v for _, v in opts] == ["demo:eileen-collins", NIL, "demo:phil-collins", "demo:joan-collins"]
        assert "ann1" in opts[0][0] and "GEMEL" in opts[0][0] and "DIM" in opts[2][0]


@pytest.mark.slow
def test_a_refused_review_is_said_in_the_ack_line_and_keeps_the_comment(app):
    """Set final with nothing chosen, "the selected search result" with none, Send back without a
    comment: said once in the acknowledgement line, with no output marked as failed (no gr.Error,
    which Gradio draws as an "Error" badge on every output), nothing saved; the comment the reviewer
    typed is cleared only after a save."""
    import gradio as gr
    by_button = {}
    for block_fn in app.demo.fns.values():
        for block_id, _event in block_fn.targets or []:
            elem_id = getattr(app.demo.blocks.get(block_id), "elem_id", None)
            if elem_id and getattr(block_fn.fn, "__name__", "") in ("on_final", "on_send_back"):
                by_button[elem_id] = block_fn.fn
    # what empties the comment box after a click on a save button
    clearers = [b for b in app.demo.fns.values() if [getattr(o, "elem_id", None) for o in b.outputs] ==
                ["mel-review-comment"] and b.fn is not None]
    assert clearers

    def comment_after(ack):
        return [b.fn(*[ack] * len(b.inputs)) for b in clearers]
    st = {"project": PROJECT, "task": app.task_ids[0], "order": app.task_ids, "decision_ids": [], "review_id": None}
    rita = gr.Request(username="rita")
    store = app.store
    before = store.db.execute("SELECT count(*) FROM reviews").fetchone()[0]
    for button, args, said in [
            ("mel-review-final", (None, "a comment"), "choose one of the choices first"),
            ("mel-review-pick", (None, "a comment"), "choose a result first"),
            ("mel-review-send-back", ("",), "needs a comment")]:
        out = by_button[button](dict(st), False, *args, f"tok-{uuid.uuid4().hex}", request=rita)
        assert said in out[-1] and 'id="mel-review-refused"' in out[-1], (button, out[-1])
        assert all(o == gr.skip() for o in out[:-1]), (button, out[:-1])   # the task stays as it is
        assert all(c == gr.skip() for c in comment_after(out[-1]))        # the typed comment stays
    out = by_button["mel-review-final"]({}, False, "demo:eileen-collins", "", "tok-x", request=rita)
    assert "open a task first" in out[-1]
    assert store.db.execute("SELECT count(*) FROM reviews").fetchone()[0] == before
    assert comment_after('<div class="mel-team-ok" id="mel-review-ack-ok">saved</div>') == [""] * len(clearers)


@pytest.mark.slow
def test_the_review_search_chooses_nothing_for_the_reviewer(app):
    """The KB search pre-selected its first result, so "Set final label: the selected search result"
    could save a label the reviewer never chose. Nothing is selected (as in the Link tab)."""
    import gradio as gr
    (on_search,) = {b.fn for b in app.demo.fns.values() if getattr(b.fn, "__name__", "") == "on_search"}
    update = on_search("Collins", request=gr.Request(username="rita"))
    assert len(update["choices"]) >= 2 and update["value"] is None, update


# three disagreements (ann1, ann2), for a project of its own
OPENED = [("Joan Collins starred in Dynasty.", "Collins", "demo:joan-collins", ["demo:phil-collins", "demo:joan-collins"],
           "demo:joan-collins", "demo:phil-collins", ""),
          ("Edward Hopper painted Nighthawks.", "Hopper", "demo:edward-hopper",
           ["demo:grace-hopper", "demo:edward-hopper"], "demo:edward-hopper", "demo:grace-hopper", ""),
          ("The Falcon Heavy carried a car.", "Falcon Heavy", "demo:falcon-heavy",
           ["demo:falcon-heavy", "demo:falcon-9"], "demo:falcon-heavy", "demo:falcon-9", "")]


@pytest.mark.slow
def test_opening_the_dashboard_draws_what_changed_since_it_was_drawn(app):
    """Opened, the Dashboard showed what it drew at page load (minutes old) until the timer's next tick."""
    import gradio as gr
    on_select = {b.fn.__name__: b.fn for b in app.demo.fns.values() for block_id, event in b.targets or []
                 if event == "select" and getattr(app.demo.blocks.get(block_id), "elem_id", None) == "mel-tab-dashboard"}
    assert set(on_select) == {"on_dash_selected", "on_tick"}
    make_team_project(app.data_dir, app.kb_path, tasks=OPENED, name="dash-opened")
    drawn = on_select["on_tick"]("dash-opened", ["stale"], request=gr.Request(username="rita"))
    assert drawn[0] != ["stale"] and drawn[1] != gr.skip()                       # redrawn
    again = on_select["on_tick"]("dash-opened", drawn[0], request=gr.Request(username="rita"))
    assert all(o == gr.skip() for o in again[:-1])                               # nothing changed: nothing redrawn


def test_opening_the_review_tab_redraws_what_changed_elsewhere(app):
    """The Review tab kept what it drew last until the reviewer pressed something: opened after
    decisions were made elsewhere, it showed settled tasks as still to review. Opening it (the tab's
    select event) redraws it when the database changed since, keeping the task on screen while it is
    still to review; when nothing changed it redraws nothing (one small query) and the
    acknowledgement line is never touched."""
    import gradio as gr
    ids = make_team_project(app.data_dir, app.kb_path, tasks=OPENED, name="opened")
    fns = {b.fn.__name__: b.fn for b in app.demo.fns.values() if b.fn is not None}
    on_select = {b.fn.__name__: b.fn for b in app.demo.fns.values() for block_id, event in b.targets or []
                 if event == "select" and getattr(app.demo.blocks.get(block_id), "elem_id", None) == "mel-tab-review"}
    assert set(on_select) == {"on_opened", "on_review_selected"}, "opening the Review tab redraws nothing"
    opened = [on_select["on_opened"]]   # (on_review_selected offers the projects created since the page loaded)
    on_opened, rita = opened[0], gr.Request(username="rita")

    first = on_opened("opened", False, {}, request=rita)          # the tab opened with nothing drawn yet
    assert first[0]["order"] == ids and first[0]["task"] == ids[0] and ids[0] in first[3]
    assert first[-1] == gr.skip()
    assert all(o == gr.skip() for o in on_opened("opened", False, first[0], request=rita))   # nothing changed
    # the reviewer opens the second task, then leaves the tab
    shown = fns["on_open_row"](first[0], False, gr.SelectData(None, {"index": [1, 0], "value": "x"}), request=rita)
    assert shown[0]["task"] == ids[1]

    def settle_elsewhere(task_id):   # as the same reviewer in another window
        review = ReviewQueue(app.store, "opened", reviewer="rita", is_reviewer=True)
        item = review.item(task_id)
        review.finalize(task_id, NIL, token=uuid.uuid4().hex, seen_decision_ids=list(item.decision_ids),
                        seen_review_id=item.review_id)
    settle_elsewhere(ids[2])
    again = on_opened("opened", False, shown[0], request=rita)
    assert again[0]["order"] == ids[:2] and again[0]["task"] == ids[1]   # the list is redrawn, the task kept
    assert ids[2] not in json.dumps(again[2], default=str) and again[-1] == gr.skip()
    assert "<b>2</b> to review" in again[1]
    settle_elsewhere(ids[1])                                                # the task on screen was settled
    last = on_opened("opened", False, again[0], request=rita)
    assert last[0]["order"] == ids[:1] and last[0]["task"] == ids[0] and ids[0] in last[3]


def test_the_review_tab_with_no_project_answers_every_output(app):
    """With no project picked (no project exists yet), Refresh answered 7 values for the 8 outputs it
    draws: Gradio refused the answer after the handler returned, and the reviewer saw an error badge."""
    import gradio as gr
    blocks = [b for b in app.demo.fns.values() if getattr(b.fn, "__name__", "") == "on_project"]
    assert blocks
    for block in blocks:
        out = block.fn("", False, request=gr.Request(username="rita"))
        assert len(out) == len(block.outputs)
        assert out[0] == {} and out[-1] == ""


def test_every_drawn_review_task_starts_with_no_search_result_chosen(app):
    """A result clicked while reviewing one task stayed chosen when the next was drawn, so "pick" set it
    as that task's final label. Every event that draws a task clears the results, and the drawer
    answers them with nothing chosen."""
    http = _session(app.url, "rita")
    config, deps = _events(http)
    ids = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    drawing = [d for d in deps if "mel-review-choices" in {ids.get(o) for o in d["outputs"]}]
    assert drawing, "no event draws a review task"
    assert all("mel-review-search-results" in {ids.get(o) for o in d["outputs"]} for d in drawing)
    http.close()
    from demo.team_ui import _no_results
    assert _no_results()["value"] is None and _no_results()["choices"] == []


def _export_event(http: httpx.Client, session: str) -> dict:
    """The export button's event, after the page-load events in browser session `session` (they fill
    the project picker, whose choices Gradio checks)."""
    config, deps = _events(http)
    for dep in deps:
        if any(e == "load" for _, e in dep["targets"]):
            _run_event(http, dep, _probe_data(config, dep, ""), session)
    elem_ids = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    (dep,) = [d for d in deps if any(elem_ids.get(c) == "mel-export-project" for c, _ in d["targets"])]
    return dep


@pytest.mark.slow
def test_a_refused_export_is_said_once_in_the_export_note(app):
    """--min-agreement 1.5 in the Dashboard's export (the browser sends what was typed): said once, in
    the export's note, the event succeeding (Gradio refused it before the handler, with a red Error
    badge on every output and a toast); nothing exported. A non-admin is still refused with an error."""
    exports = app.data_dir / "exports"
    before = sorted(exports.iterdir()) if exports.exists() else []
    http, session = _session(app.url, "alice"), uuid.uuid4().hex
    dep = _export_event(http, session)
    outcome, text = _run_event(http, dep, [PROJECT, "jsonl", 1.5, False], session)
    assert outcome == "ok", text
    assert "mel-export-refused" in text and "in [0, 1]" in text and "nothing was exported" in text, text
    assert "mel-export-ready" not in text
    assert (sorted(exports.iterdir()) if exports.exists() else []) == before
    http.close()
    http, session = _session(app.url, "rita"), uuid.uuid4().hex
    dep = _export_event(http, session)
    outcome, text = _run_event(http, dep, [PROJECT, "jsonl", 0.5, False], session)
    assert outcome == "error" and "not an admin" in text, text
    http.close()


def _review_item(labels: list[str], review: tuple[str, str | None, str] | None, flagged: bool = False):
    """A ReviewItem as the review list gets it: ann1, ann2... deciding `labels`, and `review`
    ((action, entity_id, entity_name)) the task's latest review, if any."""
    from annotations.projects import Task
    from annotations.review import AnnotatorLabel, Review, ReviewItem, _reasons, _task_label
    from mel.types import Mention
    decisions = [AnnotatorLabel(f"ann{i}", i, lab, lab, "search", "2024-01-01T00:00:00", None)
                 for i, lab in enumerate(labels, 1)]
    latest = None if review is None else Review(1, "t1", "rita", review[0], review[1], review[2], "", (1, 2), None,
                                                "2024-01-02T00:00:00")
    label = _task_label("t1", 0, 2, decisions, latest, flagged)
    task = Task("t1", 1, "m1", Mention.from_text("Collins flew.", "Collins", id="m1"), None, None, "", "f", "l", 0)
    return ReviewItem(task, _reasons(label, True), label, {})


def test_the_review_list_labels_settled_tasks_by_their_final_label():
    """With "also reviewed tasks" ticked, a task a reviewer had settled was still listed as "annotators
    disagree"; it is listed by what it is now (its final label), the open ones as before."""
    from demo.team_ui import list_rows
    still_open = _review_item(["demo:a", "demo:b"], None)
    settled = _review_item(["demo:a", "demo:b"], ("final", "demo:b", "Phil Collins"))
    settled_nil = _review_item(["demo:a", "demo:b"], ("final", NIL, ""), flagged=True)
    agreed_then_reviewed = _review_item(["demo:a", "demo:a"], ("final", "demo:a", "Eileen Collins"))
    rows = list_rows([still_open, settled, settled_nil, agreed_then_reviewed])
    assert [r[2] for r in rows] == ["annotators disagree", "settled: Phil Collins", "settled: NIL, flagged",
                                    "settled: Eileen Collins"]
    from demo.team_ui import task_html
    assert "annotators disagree" in task_html(still_open)       # the task panel's badges say the same
    assert "annotators disagree" not in task_html(settled) and "reviewed" in task_html(settled)


def test_every_drawn_review_task_starts_with_an_empty_search_box(app):
    """After a pick the KB search box kept the old query on the next task drawn (its results were
    cleared, the query was not). Every event that draws a task also draws the search box, empty."""
    import gradio as gr
    drawing = [b for b in app.demo.fns.values()
               if "mel-review-choices" in {getattr(o, "elem_id", None) for o in b.outputs}]
    assert drawing, "no event draws a review task"
    for block in drawing:
        assert "mel-review-search" in [getattr(o, "elem_id", None) for o in block.outputs], block.fn.__name__
    (block,) = [b for b in drawing if b.fn.__name__ == "on_project" and any(
        getattr(app.demo.blocks.get(t), "elem_id", None) == "mel-review-refresh" for t, _ in b.targets)]
    at = [getattr(o, "elem_id", None) for o in block.outputs].index("mel-review-search")
    make_team_project(app.data_dir, app.kb_path, tasks=[TASKS[0], TASKS[2]], name="search-box")  # 2 disagreements
    rita = gr.Request(username="rita")
    out = block.fn("search-box", False, request=rita)
    assert len(out) == len(block.outputs) and out[0]["task"] and out[at] == ""
    (step,) = [b for b in drawing if any(getattr(app.demo.blocks.get(t), "elem_id", None) == "mel-review-next"
                                         for t, _ in b.targets)]
    nxt = step.fn(out[0], False, request=rita)
    assert nxt[0]["task"] != out[0]["task"] and nxt[at] == ""


def test_the_per_annotator_chart_keeps_its_legend_off_the_bar_labels(app, monkeypatch):
    """On the dashboard (its figures at half width) the "Tasks decided per annotator" legend sat right
    of the bars, over the first bar's label ("12 of 12"). Every bar label and the legend are drawn
    apart, and each inside the figure."""
    import dataclasses

    import gradio as gr

    import demo.team_ui as team_ui
    from annotations.dashboard import dashboard_data
    data = dashboard_data(app.store, PROJECT)
    full = dataclasses.replace(data, annotators=tuple(
        dataclasses.replace(a, decided=12 if i == 0 else 6, share=12) for i, a in enumerate(data.annotators)))
    monkeypatch.setattr(team_ui, "dashboard_data", lambda store, name: full)
    block = next(b for b in app.demo.fns.values() if getattr(b.fn, "__name__", "") == "on_refresh")
    at = [getattr(o, "elem_id", None) for o in block.outputs].index("mel-dash-progress")
    fig = block.fn(PROJECT, request=gr.Request(username="alice"))[at]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    right = fig.axes[1]
    legend = right.get_legend().get_window_extent(renderer)
    said = [t.get_window_extent(renderer) for t in right.get_legend().get_texts()]   # what it shows
    labels = [t for t in right.texts if t.get_text().endswith("of 12")]
    assert [t.get_text() for t in labels] == ["12 of 12", "6 of 12"]
    page = fig.bbox
    for t in labels:
        box = t.get_window_extent(renderer)
        assert not box.overlaps(legend), t.get_text()
        assert page.x0 <= box.x0 and box.x1 <= page.x1
    assert said and all(page.x0 <= b.x0 and b.x1 <= page.x1 and page.y0 <= b.y0 for b in said)
