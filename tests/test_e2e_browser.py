"""End to end in headless Chromium: log in, upload an image, select a mention (after an emoji, so
the browser's UTF-16 offsets differ from Python's), link, correct with the mouse and with the
keyboard shortcuts, and find the corrections in SQLite. Saves a screenshot.

Needs the `playwright` Python package and Debian's chromium at /usr/bin/chromium (the Makefile's
test target installs both; `playwright install` downloads a browser build and is not used).
The screenshot goes to the test's tmp dir, or to $MEL_SCREENSHOT_DIR when set.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

CAPTION = "🚀 Falcon climbs away from the pad at dawn."

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    from conftest import launch_app
    app = launch_app(tmp_path_factory.mktemp("e2e-data"))
    yield app
    app.close()


def test_upload_select_link_correct_and_find_it_in_sqlite(browser, running, tmp_path):
    from conftest import open_logged_in

    from demo.bundled import package_image

    page = open_logged_in(browser, running.url, "alice")  # Gradio's password form
    assert "alice" in page.inner_text("#mel-who")

    # upload, type the caption, select "Falcon" with the keyboard like a user would
    page.set_input_files("#mel-image input[type=file]", str(package_image("skimage:rocket")))
    page.wait_for_selector("#mel-image img")
    box = page.locator("#mel-caption textarea")
    box.fill(CAPTION)
    box.click()
    page.keyboard.press("Home")
    page.keyboard.press("ArrowRight")         # past the emoji (2 UTF-16 units, 1 code point)
    page.keyboard.press("ArrowRight")         # past the space
    for _ in range(len("Falcon")):
        page.keyboard.press("Shift+ArrowRight")
    page.wait_for_function("() => document.querySelector('#mel-mention input, #mel-mention textarea').value === 'Falcon'")
    assert page.locator("#mel-start input").input_value() == "2"   # Python offsets, not the browser's 3
    assert page.locator("#mel-end input").input_value() == "8"

    page.click("#mel-link")
    page.wait_for_selector("#mel-gemel-result", timeout=180_000)
    assert "Falcon" in page.inner_text("#mel-highlight mark")
    page.wait_for_selector("#mel-dim-choice input[type=radio]")

    # correct: search the KB, pick "Falcon 9"
    page.locator("#mel-search input, #mel-search textarea").first.fill("Falcon 9")
    page.click("#mel-search-btn")
    page.wait_for_selector("#mel-search-results input[type=radio]")
    assert page.locator("#mel-search-results input:checked").count() == 0   # nothing chosen for the annotator
    page.locator("#mel-search-results label").filter(has_text="Falcon 9").first.click()
    page.click("#mel-pick")
    page.wait_for_selector("#mel-ack-ok")
    assert "Falcon 9" in page.inner_text("#mel-ack-ok")

    # keyboard: n = NIL, then u = undo it (focus outside text boxes first)
    page.locator("h2").first.click()
    page.keyboard.press("n")
    page.wait_for_function("() => (document.querySelector('#mel-ack-ok') || {}).textContent?.includes('NIL')")
    page.keyboard.press("u")
    page.wait_for_selector("#mel-undo-ok")
    assert "again" in page.inner_text("#mel-undo-ok") and "Falcon 9" in page.inner_text("#mel-undo-ok")  # what stands
    page.wait_for_function("() => document.querySelector('#mel-counter').textContent.includes('1 undone')")

    # a new caption typed after the link ends it: the keys ask for a link instead of saving a label for
    # the mention linked before; a failed link does the same
    page.locator("#mel-caption textarea").fill("Jordan played in Chicago.")
    page.locator("h2").first.click()
    page.keyboard.press("n")
    page.wait_for_selector("text=link a mention first")
    refused = page.get_attribute("#mel-ack-refused", "data-n")
    page.locator("#mel-mention input, #mel-mention textarea").first.fill("Pippen")
    page.click("#mel-link")
    page.wait_for_selector("#mel-link-refused:has-text('does not occur in the caption')")
    page.locator("h2").first.click()
    page.keyboard.press("g")
    page.wait_for_function(f"() => document.querySelector('#mel-ack-refused').dataset.n !== '{refused}' && "
                           "document.querySelector('#mel-ack-refused').textContent.includes('link a mention first')")

    shot_dir = Path(os.environ.get("MEL_SCREENSHOT_DIR") or tmp_path)
    shot_dir.mkdir(parents=True, exist_ok=True)
    shot = shot_dir / "e2e_app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
    page.close()

    conn = sqlite3.connect(running.data_dir / "annotations.sqlite")
    rows = conn.execute(
        'SELECT c.annotator, c.action, c.entity_id, c.undone_at, m.caption, m.start, m."end", m.image_sha256 '
        "FROM corrections c JOIN mentions m ON m.id = c.mention_id ORDER BY c.id").fetchall()
    conn.close()
    assert len(rows) == 2
    picked, nil = rows
    assert picked[:4] == ("alice", "search", "demo:falcon-9", None)
    assert picked[4:7] == (CAPTION, 2, 8) and CAPTION[2:8] == "Falcon"
    assert nil[1:3] == ("nil", "NIL") and nil[3] is not None          # undone, kept for the record
    assert (running.data_dir / "images" / f"{picked[7]}.png").exists()  # the upload, stored by content hash
