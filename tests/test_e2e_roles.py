"""The whole app (build_demo: Annotate, Link, Review, Dashboard, Projects) with every role at once,
in headless Chromium (Debian's /usr/bin/chromium, as in test_e2e_browser.py), at 1366x768:
annotators (ann1, ann2), a reviewer (rita, as MEL_REVIEWERS) and an admin (alice, MEL_ADMINS).
Regressions found by a walk through the app as each role:

- page load: nobody gets an error toast; someone off the project's team is told so, shown no task (non-reviewers must not hear "X is not a reviewer"); each
  role sees its tabs only; a tab clicked while the page loads stays selected;
- Annotate: the flag comment box is emptied once the flag is sent (Enter in it later flagged the
  next task with the old comment); Tab from the KB search box goes to the first result (it went to
  the comment box); the help overlay fits in the window;
- Review: the choices, the buttons and the acknowledgement of a save fit in 768 pixels.
"""
from __future__ import annotations

import sqlite3

import pytest

pytestmark = pytest.mark.slow
USERS = {"ann1": "ann1-pw-1", "ann2": "ann2-pw-2", "rita": "rita-pw-3", "alice": "alice-pw-4"}  # test only
N_TASKS = 8


def launch_team_project(tmp_path_factory, name: str, n: int):
    """The real app (build_demo, every tab) with project `name` of `n` demo tasks, k = 2, team ann1 and
    ann2, pre-annotated; started again after the project exists, as after a restart."""
    import dataclasses

    from annotations.projects import get_project, update_settings
    from bench.app_server import launch_in_process, make_demo_project
    from mel.linkers import build_linker
    data = tmp_path_factory.mktemp(f"e2e-{name}")
    running = launch_in_process(data, users=USERS, admins={"alice"}, reviewers={"rita"})
    svc = running.service

    def fast(project):  # BM25 in GEMEL's slot: a real linker, quick on a CPU (as test_e2e_queue.py)
        return {"gemel": build_linker("bm25", svc.kb, svc.preset), "dim": svc.project_linkers(project)["dim"]}
    project, _, _ = make_demo_project(svc, name, n=n, linkers=fast, folder=tmp_path_factory.mktemp("tasks"))
    update_settings(svc.store, project, dataclasses.replace(get_project(svc.store, name).settings,
                                                            annotations_per_task=2, annotators=["ann1", "ann2"]))
    running.close()
    return launch_in_process(data, users=USERS, admins={"alice"}, reviewers={"rita"})


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    running = launch_team_project(tmp_path_factory, "team-8", N_TASKS)
    yield running
    running.close()


def _login(browser, url: str, user: str, wait: str = "#mel-tabs"):
    from conftest import open_logged_in
    return open_logged_in(browser, url, user, USERS[user], viewport=(1366, 768), wait=(wait,), timeout_ms=30_000,
                          console_errors=True)


def _toasts(page) -> list[str]:
    return page.evaluate("() => Array.from(document.querySelectorAll('.toast-item'), (e) => e.innerText.trim())")


def _tabs(page) -> list[str]:
    return [t.strip() for t in page.get_by_role("tab").all_inner_texts()]


def _press(page, key: str) -> dict:
    n = page.evaluate("window.melQueue.log.length")
    page.keyboard.press(key)
    page.wait_for_function("n => window.melQueue.log.length > n && !window.melQueue.loading", arg=n)
    return page.evaluate("window.melQueue.log[window.melQueue.log.length - 1]")


def test_each_role_sees_its_tabs_and_no_error_at_page_load(browser, app):
    expected = {"ann1": ["Annotate", "Link"], "rita": ["Annotate", "Link", "Review", "Dashboard"],
                "alice": ["Annotate", "Link", "Dashboard", "Projects (admin)"]}
    for user, tabs in expected.items():
        page = _login(browser, app.url, user, wait="#mel-q-view:not([data-state=loading])")
        page.wait_for_timeout(2500)                       # every load event has answered
        assert _tabs(page) == tabs, user
        assert _toasts(page) == [], (user, _toasts(page))
        assert page.mel_console == [], (user, page.mel_console)
        # off the team (ann1, ann2): no task shown, a plain reason, no "server failed"
        state = page.get_attribute("#mel-q-view", "data-state")
        assert state == ("task" if user == "ann1" else "none"), (user, state)
        assert "server failed" not in page.inner_text("#mel-q-view")
        assert not page.locator("#mel-q-cmd").is_visible()  # the script's command box stays hidden
        page.close()


def test_a_tab_clicked_while_the_page_loads_stays_selected(browser, app):
    page = _login(browser, app.url, "ann2")
    page.get_by_role("tab", name="Link").click()          # before the load events answer
    page.wait_for_selector("#mel-q-view[data-state=task]", state="attached")
    page.wait_for_timeout(2500)
    assert page.evaluate("document.querySelector('[role=tab][aria-selected=true]').innerText").strip() == "Link"
    assert page.locator("#mel-caption").is_visible()
    page.close()


def test_flag_comment_search_tab_and_help_at_1366x768(browser, app):
    db = app.data_dir / "annotations.sqlite"
    page = _login(browser, app.url, "ann1", wait="#mel-q-view[data-state=task]")
    page.locator("#mel-q-view .mel-q-bar").click()

    page.keyboard.press("h")                              # the help fits in the window
    box = page.evaluate("() => { const r = document.getElementById('mel-q-help').getBoundingClientRect(); "
                        "return [r.left, r.right, window.innerWidth]; }")
    assert 0 <= box[0] and box[1] <= box[2], box
    page.keyboard.press("Escape")

    flagged = page.get_attribute("#mel-q-view", "data-task-id")
    page.keyboard.press("x")
    page.keyboard.type("which Collins?")
    assert _press(page, "Enter")["ok"]
    comment = page.locator("#mel-q-comment textarea, #mel-q-comment input").first
    assert comment.input_value() == ""                    # sent: the box is empty again
    assert _press(page, "g")["from"] == flagged           # decide it; the next task is on screen
    nxt = page.get_attribute("#mel-q-view", "data-task-id")
    assert nxt != flagged

    page.keyboard.press("/")
    page.keyboard.type("Joan Collins")
    page.keyboard.press("Enter")
    page.wait_for_selector("#mel-q-found .mel-q-pick")
    page.keyboard.press("Tab")                            # to the first result, not into the comment box
    assert page.evaluate("document.activeElement.dataset.entityId") == "demo:joan-collins"
    assert page.locator("#mel-q-found .mel-q-pick").first.bounding_box()["y"] < 768
    entry = _press(page, "Enter")
    assert entry["ok"] and entry["from"] == nxt
    conn = sqlite3.connect(db)
    try:
        flags = conn.execute("SELECT task_id, comment FROM flags WHERE annotator = 'ann1'").fetchall()
        saved = conn.execute("SELECT action, entity_id FROM corrections WHERE annotator = 'ann1' AND task_id = ? "
                             "AND undone_at IS NULL", (nxt,)).fetchall()
    finally:
        conn.close()
    assert flags == [(flagged, "which Collins?")]        # one flag, on the task it was typed for
    assert saved == [("search", "demo:joan-collins")]
    assert _toasts(page) == [] and page.mel_console == []
    page.close()


def test_review_buttons_and_acknowledgement_fit_in_768_pixels(browser, app):
    for user, keys in (("ann1", "1n1"), ("ann2", "2gn")):  # disagreements for the reviewer
        page = _login(browser, app.url, user, wait="#mel-q-view[data-state=task]")
        page.locator("#mel-q-view .mel-q-bar").click()
        for key in keys:
            assert _press(page, key)["ok"]
        page.close()
    page = _login(browser, app.url, "rita")
    page.get_by_role("tab", name="Review").click()
    page.wait_for_selector("#mel-review-task")
    page.locator("#mel-review-choices input[type=radio]").first.wait_for()
    for sel in ("#mel-review-task", "#mel-review-choices", "#mel-review-final", "#mel-review-next"):
        b = page.locator(sel).first.bounding_box()
        assert b["y"] + b["height"] <= 768, (sel, b)
    page.locator("h2").first.click()
    page.keyboard.press("1")
    page.keyboard.press("f")
    page.wait_for_selector("#mel-review-ack-ok")
    b = page.locator("#mel-review-ack-ok").bounding_box()
    assert b["y"] + b["height"] <= 768, b
    assert _toasts(page) == [] and page.mel_console == []
    page.close()


def test_opening_review_shows_what_was_decided_elsewhere(browser, app):
    """Review kept what it drew at page load until the reviewer pressed something: opened after the
    tasks on it were settled elsewhere (here: by the same reviewer in another window), it still
    offered them. Opening the tab redraws it (its select event; the tab is hidden until the page
    load shows it to reviewers)."""
    from annotations.queue import AnnotationQueue
    from annotations.review import ReviewQueue
    store, name = app.service.store, "team-8"
    queue = AnnotationQueue(store, name, kb=app.service.kb)
    view = queue.next_task("ann2", by="ann2")                  # at least one task to review: a flag
    queue.flag("ann2", view.task.id, "is this the right one?", by="ann2")

    page = _login(browser, app.url, "rita")
    page.get_by_role("tab", name="Review").click()
    page.wait_for_selector("#mel-review-choices input[type=radio]")
    assert "Nothing to review" not in page.inner_text("#mel-review-task-box")
    review = ReviewQueue(store, name, reviewer="rita", is_reviewer=True, kb=app.service.kb)
    items = review.items()
    assert items
    for item in items:                                          # settled elsewhere, all of them
        review.finalize(item.task.id, "NIL", token=f"elsewhere-{item.task.id}",
                        seen_decision_ids=list(item.decision_ids), seen_review_id=item.review_id)
    assert review.items() == []
    page.wait_for_timeout(1000)
    assert "Nothing to review" not in page.inner_text("#mel-review-task-box")   # nothing pressed: as drawn
    page.get_by_role("tab", name="Link").click()
    page.get_by_role("tab", name="Review").click()
    page.wait_for_selector("#mel-review-empty", timeout=15_000)
    assert "<b>0</b>" in page.inner_html("#mel-review-counts")
    assert _toasts(page) == [] and page.mel_console == []
    page.close()
