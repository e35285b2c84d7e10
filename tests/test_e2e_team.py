"""End to end in headless Chromium (issue #12): a two-annotator, one-reviewer session ending in a
correct export, through the team tabs (demo/team_ui.py) of a real app on 127.0.0.1.

The annotators' decisions are made through the library (annotations.queue, with `by=` each
annotator), as the Annotate tab makes them: this app has only the team tabs. Their morning is
replayed on a simulated clock (the store's timestamps), so that the dashboard shows hours, seconds
per task and acceptance as a real session would; everything else runs as it does in production.
The reviewer then works in the browser: chooses among the annotators' choices with the keyboard
and with the mouse, sets a label from the KB search, sends a flagged task back with a comment; the
annotators decide it again; the admin exports from the dashboard through the one-time link, and
the export holds the right label for every task, NIL included.

Screenshots (1366x768) go to $MEL_SCREENSHOT_DIR (the repository's docs/review.png and
docs/dashboard.png are made with MEL_SCREENSHOT_DIR=docs), else to the test's tmp dir.
Needs playwright and Debian's chromium (see tests/test_e2e_browser.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from test_team_ui import USERS, _result, build_small_kb

from annotations.projects import ProjectSettings, create_project, import_tasks, list_tasks
from annotations.queue import AnnotationQueue
from annotations.store import AnnotationStore
from mel.types import NIL

pytestmark = pytest.mark.slow
PROJECT = "collins-and-co"
ADMINS, REVIEWERS = frozenset({"alice"}), frozenset({"rita"})
E, P, J = "demo:eileen-collins", "demo:phil-collins", "demo:joan-collins"

# caption, mention, truth, GEMEL's answer, DIM's ranking, ann1's label, ann2's label
TASKS = [
    ("Eileen Collins waves before boarding the Space Shuttle.", "Collins", E, E, [P, E, J], E, P),
    ("Phil Collins plays the drums on stage with Genesis.", "Phil Collins", P, P, [P, J], P, P),
    ("Grace Hopper holds a reel of COBOL code.", "Hopper", "demo:grace-hopper", "demo:hopper-gpu",
     ["demo:edward-hopper", "demo:grace-hopper"], "demo:grace-hopper", "demo:edward-hopper"),
    ("A Falcon 9 booster lands on the drone ship.", "Falcon 9", "demo:falcon-9", "demo:falcon-9",
     ["demo:falcon-9", "demo:falcon-heavy"], "demo:falcon-9", "demo:falcon-9"),
    ("Joan Collins at the premiere in London.", "Joan Collins", J, J, [J, E], J, J),
    ("Java beans roasting in a small shop.", "Java", "demo:java-coffee", "demo:java-island",
     ["demo:java-coffee", "demo:espresso"], "demo:java-coffee", "demo:java-coffee"),
    ("Chelsea fans celebrate at Stamford Bridge.", "Chelsea", "demo:chelsea-fc", "demo:chelsea-fc",
     ["demo:chelsea-fc", "demo:chelsea-london"], "demo:chelsea-fc", "demo:chelsea-fc"),
    ("Michael Collins in the command module simulator.", "Michael Collins", "demo:michael-collins-astronaut",
     "demo:michael-collins-irish", ["demo:michael-collins-astronaut", "demo:michael-collins-irish"],
     "demo:michael-collins-astronaut", "demo:michael-collins-irish"),
    ("Our office cat, Hopper, asleep on the keyboard.", "Hopper", NIL, "demo:grace-hopper",
     ["demo:hopper-container", "demo:dennis-hopper"], NIL, NIL),
    ("The Millennium Falcon model at the toy fair.", "Millennium Falcon", "demo:millennium-falcon",
     "demo:millennium-falcon", ["demo:millennium-falcon", "demo:peregrine-falcon"], "demo:millennium-falcon",
     "demo:millennium-falcon"),
    ("A peregrine falcon nesting on a skyscraper.", "falcon", "demo:peregrine-falcon", "demo:falcon-9",
     ["demo:peregrine-falcon", "demo:atlanta-falcons"], "demo:peregrine-falcon", "demo:peregrine-falcon"),
    ("SpaceX engineers watch the launch.", "SpaceX", "demo:spacex", "demo:spacex", ["demo:spacex", "demo:nasa"],
     "demo:spacex", "demo:spacex"),
    ("Chelsea Clinton speaks at the conference.", "Chelsea Clinton", "demo:chelsea-clinton", "demo:chelsea-clinton",
     ["demo:chelsea-clinton", "demo:chelsea-fc"], "demo:chelsea-clinton", "demo:chelsea-clinton"),
    ("Edward Hopper's Nighthawks on the museum wall.", "Hopper", "demo:edward-hopper", "demo:edward-hopper",
     ["demo:edward-hopper", "demo:dennis-hopper"], "demo:edward-hopper", "demo:edward-hopper"),
]
FLAG = (3, "ann2", "the booster only, or the whole rocket?")   # task index, who, comment


@contextlib.contextmanager
def simulated_clock(start: datetime):
    """The store's clock (utc_now, in every module that stamps rows) replaced by `clock[0]`."""
    import annotations.projects as projects
    import annotations.queue as queue
    import annotations.review as review
    import annotations.store as store
    clock = [start]
    modules = [m for m in (store, queue, review, projects) if hasattr(m, "utc_now")]
    saved = {m: m.utc_now for m in modules}
    fake = lambda: clock[0].strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"  # noqa: E731
    for m in modules:
        m.utc_now = fake
    try:
        yield clock
    finally:
        for m, f in saved.items():
            m.utc_now = f


def _label_action(view, label):
    if label == NIL:
        return "nil", None
    if view.predictions["gemel"].entity_id == label:
        return "accept_gemel", label
    if view.predictions["dim"].entity_id == label:
        return "accept_dim", label
    return "search", label


def annotators_morning(data_dir: Path, kb_path: Path) -> list[str]:
    """Both annotators decide every task, over a simulated morning (each with their own pace)."""
    from mel.kb import KnowledgeBase
    kb = KnowledgeBase(kb_path)
    source = data_dir.parent / "tasks.jsonl"
    source.write_text("".join(json.dumps({"caption": c, "mention": m}) + "\n" for c, m, *_ in TASKS))
    start = (datetime.now(timezone.utc) - timedelta(hours=5)).replace(minute=0, second=0, microsecond=0)
    with AnnotationStore(data_dir) as store, simulated_clock(start) as clock:
        create_project(store, PROJECT, settings=ProjectSettings(annotations_per_task=2, annotators=["ann1", "ann2"]))
        import_tasks(store, PROJECT, "tasks-jsonl", source)
        tasks = list_tasks(store, PROJECT)
        ids = [t.id for t in tasks]
        for task, (_, _, _, gemel, dim, *_rest) in zip(tasks, TASKS, strict=True):
            store.record_predictions(task.mention_id, [_result("gemel", kb, gemel, [gemel], task.mention),
                                                       _result("dim", kb, dim[0], dim, task.mention)])
        queue = AnnotationQueue(store, PROJECT, kb=kb)
        # ann1 starts at 0:10 and is steady (~20 s a task, a break each hour); ann2 at 1:05, quicker
        plan = {"ann1": (timedelta(minutes=10), [18, 25, 14, 31, 22, 17, 26, 20, 35, 16, 21, 19, 24, 28]),
                "ann2": (timedelta(minutes=65), [12, 9, 15, 11, 20, 8, 13, 10, 17, 9, 14, 12, 16, 11])}
        for who, (offset, seconds) in plan.items():
            clock[0] = start + offset
            for n, secs in enumerate(seconds):
                view = queue.next_task(who, by=who)
                clock[0] += timedelta(seconds=secs)
                i = ids.index(view.task.id)
                action, entity = _label_action(view, TASKS[i][5 if who == "ann1" else 6])
                queue.decide(who, view.task.id, action, entity, token=uuid.uuid4().hex,
                             shown_prediction_ids=view.prediction_ids, by=who)
                if (i, who) == FLAG[:2]:
                    queue.flag(who, view.task.id, FLAG[2], by=who)
                clock[0] += timedelta(minutes=11 if n % 4 == 3 else 3)  # reading the next caption, a pause
    return ids


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    from demo.team_ui import launch_team_app
    root = tmp_path_factory.mktemp("e2e-team")
    kb_path = build_small_kb(root / "kb.sqlite")
    ids = annotators_morning(root / "data", kb_path)
    app = launch_team_app(root / "data", users=USERS, admins=ADMINS, reviewers=REVIEWERS, kb_path=kb_path)
    app.task_ids, app.kb_path = ids, kb_path
    yield app
    app.close()


def _login(browser, url: str, user: str):
    from conftest import open_logged_in
    return open_logged_in(browser, url, user, USERS[user], viewport=(1366, 768), wait=("#mel-team-about",))


def _open_tab(page, name: str):
    page.get_by_role("tab", name=name).click()


def _task_on_screen(page) -> str:
    page.wait_for_selector("#mel-review-task")
    return page.get_attribute("#mel-review-task", "data-task")


def _wait_task_change(page, old: str):
    page.wait_for_function(
        "(old) => { const t = document.querySelector('#mel-review-task'); return t && t.dataset.task !== old; }",
        arg=old)


def _choose(page, entity_id: str) -> int:
    """The 1-based key of `entity_id` among the choices on screen."""
    labels = page.locator("#mel-review-choices label").all_inner_texts()
    for n, text in enumerate(labels, 1):
        if f"({entity_id})" in text:
            return n
    raise AssertionError(f"{entity_id} is not among the choices {labels}")


def _shots() -> Path:
    return Path(os.environ.get("MEL_SCREENSHOT_DIR") or "")


def test_two_annotators_one_reviewer_and_a_correct_export(browser, running, tmp_path):
    ids = running.task_ids
    truth = {ids[i]: t[2] for i, t in enumerate(TASKS)}
    shots = _shots() if os.environ.get("MEL_SCREENSHOT_DIR") else tmp_path
    shots.mkdir(parents=True, exist_ok=True)

    # -- the annotators cannot see the team tabs ------------------------------------------------
    ann = _login(browser, running.url, "ann1")
    assert [t.strip() for t in ann.get_by_role("tab").all_inner_texts()] == ["About"]
    ann.close()

    # -- the reviewer -------------------------------------------------------------------------------
    rita = _login(browser, running.url, "rita")
    _open_tab(rita, "Review")
    first = _task_on_screen(rita)
    assert first == ids[0]                                    # disagreements and flags, in queue order
    assert "4</b> to review" in rita.inner_html("#mel-review-counts")
    table = rita.inner_text("#mel-review-task")
    assert "ann1" in table and "ann2" in table and "GEMEL" in table and "DIM" in table
    rita.locator("#mel-review-choices input[type=radio]").first.wait_for()
    rita.screenshot(path=str(shots / "review.png"))

    # task 1 with the keyboard: the choice's number, then f
    rita.locator("h2").first.click()
    rita.keyboard.press(str(_choose(rita, E)))
    rita.keyboard.press("f")
    _wait_task_change(rita, first)
    assert "final label Eileen Collins (demo:eileen-collins)" in rita.inner_text("#mel-review-ack-ok")

    # task 3 (Hopper): from the KB search, with the mouse
    third = _task_on_screen(rita)
    assert third == ids[2]
    rita.locator("#mel-review-search textarea, #mel-review-search input").first.fill("Grace Hopper")
    rita.click("#mel-review-search-btn")
    rita.wait_for_selector("#mel-review-search-results input[type=radio]")
    assert rita.locator("#mel-review-search-results input:checked").count() == 0   # nothing chosen for her
    rita.click("#mel-review-pick")                            # with nothing chosen: refused, nothing saved
    rita.wait_for_selector("#mel-review-refused:has-text('choose a result first')")
    assert _task_on_screen(rita) == third
    rita.locator("#mel-review-search-results label").filter(has_text="Grace Hopper").first.click()
    rita.click("#mel-review-pick")
    _wait_task_change(rita, third)
    assert "final label Grace Hopper (demo:grace-hopper)" in rita.inner_text("#mel-review-ack-ok")

    # task 4 (flagged, both agree): send it back with a comment (b focuses the empty comment box)
    fourth = _task_on_screen(rita)
    assert fourth == ids[3] and "flagged" in rita.inner_text("#mel-review-task")
    rita.locator("h2").first.click()
    rita.keyboard.press("b")
    rita.keyboard.type("Link the rocket (Falcon 9), not the booster; decide again.")
    rita.keyboard.press("Control+Enter")
    _wait_task_change(rita, fourth)
    assert "sent back to the annotators (2 decisions returned)" in rita.inner_text("#mel-review-ack-ok")

    # task 8 (Michael Collins): the mouse on a choice, then the button
    eighth = _task_on_screen(rita)
    assert eighth == ids[7]
    n = _choose(rita, "demo:michael-collins-astronaut")
    rita.locator("#mel-review-choices input[type=radio]").nth(n - 1).click()
    rita.click("#mel-review-final")
    rita.wait_for_selector("#mel-review-empty")
    assert "final label Michael Collins (astronaut)" in rita.inner_text("#mel-review-ack-ok")

    # -- the annotators decide the sent-back task again (the reviewer's comment comes with it) -----
    from mel.kb import KnowledgeBase
    kb = KnowledgeBase(running.kb_path)
    queue = AnnotationQueue(running.store, PROJECT, kb=kb)
    for who in ("ann1", "ann2"):
        view = queue.next_task(who, by=who)
        assert view.task.id == ids[3] and "not the booster" in view.review_note
        queue.decide(who, view.task.id, "accept_gemel", "demo:falcon-9", token=uuid.uuid4().hex,
                     shown_prediction_ids=view.prediction_ids, by=who)
    rita.close()

    # -- the admin: dashboard, then the export through the one-time link --------------------------
    alice = _login(browser, running.url, "alice")
    assert "Review" not in [t.strip() for t in alice.get_by_role("tab").all_inner_texts()]  # admin, no reviewer
    _open_tab(alice, "Dashboard")
    alice.wait_for_selector("#mel-dash-summary")
    alice.wait_for_selector("#mel-dash-agreement img")
    assert "14 / 14" in alice.inner_text("#mel-dash-summary")
    alice.wait_for_function("() => document.querySelectorAll('#mel-dash-progress img, #mel-dash-throughput img, "
                            "#mel-dash-speed img, #mel-dash-acceptance img').length === 4")
    alice.screenshot(path=str(shots / "dashboard.png"))

    alice.click("#mel-export-project")
    link = alice.wait_for_selector("#mel-export-ready a")
    assert "3 reviewed" in alice.inner_text("#mel-export-note")
    with alice.expect_download() as info:
        link.click()
    archive = tmp_path / "export.zip"
    info.value.save_as(archive)
    alice.close()
    with zipfile.ZipFile(archive) as z:
        examples = [json.loads(line) for line in z.read("train.jsonl").decode().splitlines()]
        provenance = json.loads(z.read("provenance.json"))
    assert {e["sample_id"]: e["gold_id"] for e in examples} == truth          # every task, NIL included
    assert {t for t, p in provenance.items() if p["reviewer"] == "rita"} == {ids[0], ids[2], ids[7]}
    assert provenance[ids[3]]["label_source"] == "agreement"                    # decided again after send-back
    assert sorted(a["annotator"] for a in provenance[ids[0]]["annotations"]) == ["ann1", "ann2"]
