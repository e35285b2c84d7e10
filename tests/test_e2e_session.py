"""Issue #12's session, every step in the browser (headless Debian chromium, 1366x768): two
annotators work through a k = 2 project keyboard-only in the Annotate tab, the reviewer settles
every disagreement in the Review tab with the keyboard, and the project's export holds exactly the
labels they chose: the agreed label where the two agreed, the reviewer's where they did not, NIL
included. What each key chose is read from the page at the moment of the key press (the task's
data attributes), so the test knows the truth without asking the database.
"""
from __future__ import annotations

import json
import re

import pytest
from test_e2e_roles import _login, _press, _toasts, launch_team_project

pytestmark = pytest.mark.slow
N_TASKS = 6
KEYS = {"ann1": "1ng", "ann2": "1gn"}  # the same first key, then different: agreements and disagreements


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    running = launch_team_project(tmp_path_factory, "session", N_TASKS)
    yield running
    running.close()


def _annotate(browser, url: str, user: str) -> dict[str, str]:
    """Decide every task the queue gives `user`; returns {task id: the entity id (or NIL) chosen}."""
    page = _login(browser, url, user, wait="#mel-q-view[data-state=task]")
    page.locator("#mel-q-view .mel-q-bar").click()
    chosen: dict[str, str] = {}
    while page.get_attribute("#mel-q-view", "data-state") == "task":
        view = page.locator("#mel-q-view")
        task, gemel = view.get_attribute("data-task-id"), view.get_attribute("data-gemel-entity")
        dim_ids = json.loads(view.get_attribute("data-dim-ids") or "[]")
        key = KEYS[user][len(chosen) % len(KEYS[user])]
        if key == "g" and not gemel:
            key = "1"
        label = {"g": gemel, "1": dim_ids[0] if dim_ids else None, "n": "NIL"}[key]
        assert label, (user, key, task)
        entry = _press(page, key)
        assert entry["ok"] and entry["from"] == task, entry
        chosen[task] = label
    assert page.get_attribute("#mel-q-view", "data-state") == "done"
    assert _toasts(page) == [] and page.mel_console == [], (_toasts(page), page.mel_console)
    page.close()
    return chosen


def test_two_annotators_and_a_reviewer_in_the_browser_end_in_a_correct_export(browser, app, tmp_path):
    from annotations.export import export_corrections
    ann1, ann2 = _annotate(browser, app.url, "ann1"), _annotate(browser, app.url, "ann2")
    assert set(ann1) == set(ann2) and len(ann1) == N_TASKS, "k = 2: both annotators decide every task"
    disagreed = {t for t in ann1 if ann1[t] != ann2[t]}
    assert disagreed and len(disagreed) < N_TASKS, "the key patterns give agreements and disagreements"
    final = {t: ann1[t] for t in ann1 if t not in disagreed}

    rita = _login(browser, app.url, "rita")
    rita.get_by_role("tab", name="Review").click()
    ack = ""
    for _ in disagreed:
        rita.wait_for_selector("#mel-review-task")
        rita.locator("#mel-review-choices input[type=radio]").first.wait_for()
        rita.locator("h2").first.click()  # focus out of any field: the keys are the reviewer's
        rita.keyboard.press("1")
        rita.keyboard.press("f")
        rita.wait_for_function("old => { const a = document.querySelector('#mel-review-ack-ok');"
                               " return a && a.innerText.trim() && a.innerText.trim() !== old; }", arg=ack)
        ack = rita.inner_text("#mel-review-ack-ok").strip()
        m = re.search(r"task (\S+) -> final label (?:NIL \(not in the KB\)|.* \(([^()]+)\))$", ack)
        assert m, ack
        task, entity = m.group(1), m.group(2) or "NIL"
        assert task in disagreed and task not in final, (task, ack)
        assert entity in (ann1[task], ann2[task]), "choice 1 is one of the annotators' labels"
        final[task] = entity
    assert _toasts(rita) == [] and rita.mel_console == []
    rita.close()
    assert set(final) == set(ann1)

    report = export_corrections(app.service.store, tmp_path / "export", "parquet", project="session")
    import pyarrow.parquet as pq
    rows = pq.read_table(tmp_path / "export" / report.files[0]).to_pylist()
    assert {r["task_id"]: r["entity_id"] for r in rows} == final
    assert {r["task_id"] for r in rows if r["reviewer"] == "rita"} == disagreed
