"""The Annotate tab end to end, keyboard only, in headless Chromium (Debian's /usr/bin/chromium, as in
test_e2e_browser.py): a 20-task project imported with the library and pre-annotated, then decided
with one key per task; undo, back / change, skip (comes back at the end), flag with a comment;
shortcuts typed into the search and comment boxes stay text; a doubled key press, a key pressed
while the next task loads and a stale save record nothing wrong. Checked in SQLite.

The GEMEL slot is pre-annotated by the BM25 linker (a real linker, stored under the project's
"gemel" name) so that the test runs in about a minute on a CPU; the DIM slot by the app's DIM.
The queue does not depend on which linker made a stored prediction.
"""
from __future__ import annotations

import json
import sqlite3
import uuid

import pytest

pytestmark = pytest.mark.slow
N_TASKS = 20


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from conftest import launch_app

    from bench.app_server import make_demo_project
    from mel.linkers import build_linker
    running = launch_app(tmp_path_factory.mktemp("e2e-queue"))
    svc = running.service

    def fast(project):
        return {"gemel": build_linker("bm25", svc.kb, svc.preset), "dim": svc.project_linkers(project)["dim"]}
    project, report, pre = make_demo_project(svc, "demo-20", n=N_TASKS, linkers=fast,
                                             folder=tmp_path_factory.mktemp("tasks"))
    assert report.n_imported == N_TASKS and sum(pre.failed.values()) == 0
    yield running
    running.close()


def _login(browser, url, user="alice"):
    """A 1366x768 page logged in as `user` once the first task is drawn (waits up to 60 s, then 30 s)."""
    from conftest import open_logged_in
    page = open_logged_in(browser, url, user, viewport=(1366, 768), wait=("#mel-q-view[data-state=task]",))
    page.set_default_timeout(30_000)
    return page


def _screen(page) -> dict:
    return page.evaluate("""() => { const d = document.getElementById('mel-q-view').dataset;
        return {task: d.taskId, state: d.state, gemel: d.gemelEntity, dim: JSON.parse(d.dimIds || '[]'),
                shown: JSON.parse(d.predictionIds || '[]'), nonce: d.nonce}; }""")


def _answered(page, n_before: int) -> dict:
    page.wait_for_function("n => window.melQueue.log.length > n && !window.melQueue.loading", arg=n_before,
                           timeout=30_000)
    return page.evaluate("window.melQueue.log[window.melQueue.log.length - 1]")


def _press(page, key: str) -> dict:
    """Press one key that sends a command; wait for the answer on screen; return its log entry."""
    n = page.evaluate("window.melQueue.log.length")
    page.keyboard.press(key)
    return _answered(page, n)


def _standing(db) -> dict[str, tuple]:
    conn = sqlite3.connect(db)
    rows = conn.execute(
        "SELECT task_id, action, entity_id FROM corrections c WHERE annotator = 'alice' AND task_id IS NOT NULL "
        "AND undone_at IS NULL AND c.id = (SELECT max(id) FROM corrections d WHERE d.task_id = c.task_id "
        "AND d.annotator = 'alice' AND d.undone_at IS NULL)").fetchall()
    conn.close()
    return {r[0]: (r[1], r[2]) for r in rows}


def _rows(db, sql, *args):
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def test_a_project_keyboard_only(browser, app):
    db = app.data_dir / "annotations.sqlite"
    page = _login(browser, app.url)
    page.locator("#mel-q-view .mel-q-bar").click()   # focus on the page, not in a text box
    expected: dict[str, tuple] = {}
    keys: dict[str, int] = {}

    # -- shortcuts never fire in a text box, and never change one ------------------------------
    first = _screen(page)
    sent = page.evaluate("window.melQueue.sent.length")
    page.keyboard.press("/")                                   # focuses the KB search box, types nothing
    assert page.evaluate("document.activeElement.closest('#mel-q-search') !== null")
    page.keyboard.type("gn1s u0")
    assert page.locator("#mel-q-search input, #mel-q-search textarea").first.input_value() == "gn1s u0"
    page.keyboard.press("Escape")
    page.keyboard.press("x")                                   # focuses the comment box
    page.keyboard.type("g1 n/s")
    assert page.locator("#mel-q-comment input, #mel-q-comment textarea").first.input_value() == "g1 n/s"
    page.keyboard.press("Escape")
    assert page.evaluate("window.melQueue.sent.length") == sent
    assert _screen(page)["task"] == first["task"] and _standing(db) == {}
    page.keyboard.press("h")                                   # help with the guidelines
    assert page.locator("#mel-q-guide").is_visible() and "Demo guidelines" in page.inner_text("#mel-q-guide")
    page.keyboard.press("h")
    assert not page.locator("#mel-q-guide").is_visible()

    # -- one key per decision ------------------------------------------------------------------
    plan = ["g", "1", "n", "s", "Enter", "2", "g", "s", "1", "n"]
    skipped = []
    for i in range(12):
        screen = _screen(page)
        key = plan[i % len(plan)]
        if key in ("g", "Enter") and not screen["gemel"]:
            key = "1"
        entry = _press(page, key)
        keys[screen["task"]] = keys.get(screen["task"], 0) + 1
        assert entry["ok"] and entry["from"] == screen["task"] and entry["to"] != screen["task"]
        assert screen["task"] in page.inner_text("#mel-q-ack")    # says what was saved, for which task
        if key in ("g", "Enter"):
            expected[screen["task"]] = ("accept_gemel", screen["gemel"])
        elif key in "1234567890":
            expected[screen["task"]] = ("accept_dim", screen["dim"][(int(key) + 9) % 10])
        elif key == "n":
            expected[screen["task"]] = ("nil", "NIL")
        else:
            skipped.append(screen["task"])
            expected[screen["task"]] = ("skip", None)
    assert _standing(db) == expected
    # the header's counter follows the queue (it was drawn once, at page load)
    decided = sum(1 for action, _ in expected.values() if action != "skip")
    page.wait_for_function("n => document.getElementById('mel-decided')?.dataset.decided === String(n)",
                           arg=decided, timeout=10_000)

    # -- undo puts the last task back; deciding it again -----------------------------------------
    last = page.evaluate("window.melQueue.log[window.melQueue.log.length - 1].from")
    entry = _press(page, "u")
    assert entry["to"] == last and "undone" in page.inner_text("#mel-q-ack")
    screen = _screen(page)
    _press(page, "1")
    keys[last] += 2                                            # u, then 1
    expected[last] = ("accept_dim", screen["dim"][0])

    # -- back to a past decision and change it; forward again ------------------------------------
    entry = _press(page, "ArrowLeft")
    back_task = entry["to"]
    assert "history" in page.inner_text("#mel-q-view .mel-q-bar")
    _press(page, "n")                                          # the change supersedes the old decision
    expected[back_task] = ("nil", "NIL")
    assert _rows(db, "SELECT count(*) FROM corrections WHERE task_id = ? AND supersedes IS NOT NULL",
                 back_task)[0][0] == 1
    while _screen(page)["state"] == "task" and _screen(page)["task"] in expected and \
            expected[_screen(page)["task"]][0] != "skip":
        _press(page, "ArrowRight")                             # to the end of the history, then new tasks

    # -- flag with a comment (typed in the box; Enter flags) -------------------------------------
    flagged = _screen(page)["task"]
    page.keyboard.press("x")
    page.keyboard.type("is this the astronaut?")
    n = page.evaluate("window.melQueue.log.length")
    page.keyboard.press("Enter")
    _answered(page, n)
    assert _rows(db, "SELECT comment FROM flags WHERE task_id = ?", flagged) == [("is this the astronaut?",)]
    assert _screen(page)["task"] == flagged                    # flagging does not move on

    # -- a doubled key press saves once; a key during the load saves nothing ----------------------
    screen = _screen(page)
    n = page.evaluate("window.melQueue.log.length")
    page.evaluate("""() => { for (const k of ['n', 'n', 's']) document.dispatchEvent(
                          new KeyboardEvent('keydown', {key: k, bubbles: true})); }""")
    _answered(page, n)
    assert page.evaluate("window.melQueue.ignored") >= 2
    expected[screen["task"]] = ("nil", "NIL")
    keys[screen["task"]] = 1
    after = _screen(page)
    assert after["task"] != screen["task"] and after["task"] not in _standing(db)  # the 's' did not skip it
    assert _rows(db, "SELECT count(*) FROM corrections WHERE task_id = ?", screen["task"])[0][0] == 1

    # -- a stale save (a task no longer on screen), and a reused token, record nothing ------------
    before = _rows(db, "SELECT count(*) FROM corrections")[0][0]
    token = _rows(db, "SELECT client_token FROM corrections WHERE task_id = ?", screen["task"])[0][0]
    for cmd in ({"action": "accept_dim", "task_id": screen["task"], "entity_id": screen["dim"][0],
                 "shown": screen["shown"], "token": str(uuid.uuid4())},            # the task before this one
                {"action": "nil", "task_id": after["task"], "shown": after["shown"], "token": token}):  # reused
        n = page.evaluate("window.melQueue.log.length")
        page.evaluate("c => window.melQueue.sendRaw(c)", {"project": "demo-20", **cmd})
        page.wait_for_function("() => !window.melQueue.loading")
        assert page.locator("#mel-q-ack.err").count() == 1, page.inner_text("#mel-q-ack")
        assert _screen(page)["task"] == after["task"]
    assert _rows(db, "SELECT count(*) FROM corrections")[0][0] == before
    assert _standing(db) == expected

    # -- the rest, then the skipped ones come back at the end -------------------------------------
    seen_again = []
    while _screen(page)["state"] == "task":
        screen = _screen(page)
        if expected.get(screen["task"], (None,))[0] == "skip":
            seen_again.append(screen["task"])
        key = "g" if screen["gemel"] else "1"
        _press(page, key)
        keys[screen["task"]] = keys.get(screen["task"], 0) + 1
        expected[screen["task"]] = ("accept_gemel", screen["gemel"]) if key == "g" else ("accept_dim", screen["dim"][0])
    assert seen_again == skipped                               # in the order they were skipped, at the end
    assert "Nothing left" in page.inner_text("#mel-q-view")

    # -- the database holds exactly what was decided ---------------------------------------------
    standing = _standing(db)
    assert standing == expected and len(standing) == N_TASKS
    assert all(a != "skip" for a, _ in standing.values())
    accepted = [t for t, (a, _) in standing.items() if a in ("accept_gemel", "accept_dim")]
    assert accepted and all(keys.get(t, 0) <= 2 for t in accepted), keys
    rows = _rows(db, "SELECT task_id, shown_predictions, prediction_id, client_token FROM corrections "
                     "WHERE annotator = 'alice'")
    for _task_id, shown, pid, token in rows:                    # every save carried the predictions on screen
        ids = json.loads(shown)
        assert len(ids) == 2 and token and (pid is None or pid in ids)
    assert len({r[3] for r in rows}) == len(rows)              # one token per key press
    page.close()



def test_on_a_phone_every_candidate_is_read_whole_before_a_tap_saves_it(browser):
    """At 412x915 a DIM candidate's name and description were cut to one line ("Hopper (microarchitect…"):
    a phone cannot hover to read the rest, and one tap saves (a browser review). The task screen as the
    app renders it, with the app's stylesheet."""
    from annotations.projects import Progress, Task
    from annotations.queue import PredictionView, TaskView
    from demo.render import render_task
    from mel.paths import REPO_ROOT
    from mel.types import Mention
    mention = Mention.from_text("Hopper at the podium in 1983.", "Hopper", id="m")
    long_name = "Grace Brewster Murray Hopper (United States Navy rear admiral and computer scientist)"
    dim = [{"id": f"demo:q{k}", "name": f"{long_name} {k}", "score": 3.0 - k} for k in range(5)]
    view = TaskView(Task("t1", 1, "m", mention, None, None, "", "f.jsonl", "line 1", 0),
                    {"dim": PredictionView(12, "dim", "demo:q0", long_name, 3.0, dim, {"kind": "dim"}, None, "kb")},
                    Progress(20, 3, "ann", 2, 1))
    html = render_task(view, project="p", describe=lambda i: "American computer scientist and United States "
                       "Navy rear admiral, a pioneer of computer programming who invented one of the first "
                       "linkers")
    assert html.count("invented one of the first linkers") >= 5 * 2   # not clipped on the server (and its title)
    css = (REPO_ROOT / "demo" / "assets" / "queue.css").read_text(encoding="utf-8")
    page = browser.new_page(viewport={"width": 412, "height": 915})
    try:
        page.set_content(f"<style>{css}</style>{html}")
        assert page.locator("#mel-q-view .mel-q-cand").count() == 5
        cut = page.evaluate("""() => [...document.querySelectorAll('#mel-q-view .mel-q-cand .mel-q-name, '
                                                                 + '#mel-q-view .mel-q-cand .mel-q-desc')]
            .filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.textContent)""")
        assert cut == []
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 412   # and nothing scrolls sideways
    finally:
        page.close()
