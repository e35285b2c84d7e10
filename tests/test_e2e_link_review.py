"""The Link tab as an annotator uses it, in headless Chromium (the points of a browser review):
a refused link says what is wrong once, in the status line, and marks no result panel as failed;
a file that is not an image is refused at upload and nothing typed is lost; typing a mention moves
the offsets with it; nothing is chosen for the annotator ("d" with nothing chosen saves nothing);
every shown candidate has its key (0 for the 10th); the candidates are readable on a phone, and
no header of DIM's table wraps ("key" read "ke / y", "p (uncalibrated)" took three lines); the counter counts distinct decided mentions, and every save it reports is in SQLite.
"""
from __future__ import annotations

import sqlite3

import pytest

pytestmark = pytest.mark.slow

MENTION_BOX = "#mel-mention input, #mel-mention textarea"
# Gradio's own "Error" badge, drawn on an output by its status tracker when an event fails
FAILED_OUTPUTS_JS = """() => [...document.querySelectorAll('.error')]
    .filter(e => !String(e.className).includes('toast') && e.closest('[id^="mel-"]'))
    .map(e => e.closest('[id^="mel-"]').id)"""


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    from conftest import launch_app
    app = launch_app(tmp_path_factory.mktemp("e2e-link-review"))
    yield app
    app.close()


@pytest.fixture
def page(browser, running):
    from conftest import open_logged_in
    page = open_logged_in(browser, running.url, "bob")
    yield page
    page.close()


def _type(page, caption: str, mention: str) -> None:
    page.locator("#mel-caption textarea").fill(caption)
    page.locator(MENTION_BOX).first.fill(mention)


def _link(page) -> None:
    page.click("#mel-link")
    page.wait_for_selector("#mel-gemel-result", timeout=180_000)
    page.wait_for_selector("#mel-dim-choice input[type=radio]")


def _rows(running, annotator: str) -> list[tuple]:
    conn = sqlite3.connect(running.data_dir / "annotations.sqlite")
    rows = conn.execute("SELECT mention_id, action, entity_id, undone_at FROM corrections WHERE annotator = ? "
                        "ORDER BY id", (annotator,)).fetchall()
    conn.close()
    return rows


def test_a_refused_link_says_why_once_and_marks_no_output_as_failed(page):
    for caption, mention, said in [("Hopper at the podium.", "Collins", "does not occur in the caption"),
                                   ("", "Collins", "caption is empty")]:
        _type(page, caption, mention)
        page.click("#mel-link")
        page.wait_for_selector(f"text={said}")
        page.wait_for_timeout(500)  # what a failed event would draw, drawn by now
        assert page.evaluate(FAILED_OUTPUTS_JS) == []          # no result panel marked as failed
        assert page.locator(".toast-body").count() == 0       # said once: in the status line only
        status = page.inner_text("#mel-link-status")
        assert said in status and ("select it in the caption" in status or not caption)
    _type(page, "Hopper at the podium.", "Hopper")            # a good link clears the status line
    _link(page)
    assert page.inner_text("#mel-link-status").strip() == ""


def test_a_file_that_is_not_an_image_is_refused_at_upload_and_nothing_typed_is_lost(page, tmp_path):
    fake = tmp_path / "holiday.png"
    fake.write_text("this is a text file, not a photo\n")
    _type(page, "Collins met Collins at the bar.", "Collins")
    page.set_input_files("#mel-image input[type=file]", str(fake))
    page.wait_for_selector("#mel-upload-refused")
    said = page.inner_text("#mel-upload-refused")
    assert "holiday.png" in said and "not an image" in said and "JPEG, PNG" in said
    assert page.locator("#mel-caption textarea").input_value() == "Collins met Collins at the bar."
    assert page.locator(MENTION_BOX).first.input_value() == "Collins"
    page.wait_for_function("() => !document.querySelector('#mel-image img')")  # not attached
    assert page.evaluate(FAILED_OUTPUTS_JS) == []


def test_a_dropped_file_that_is_not_an_image_is_said_on_screen(page):
    """Gradio's image drops a PDF without a word (no event reaches the server), and the status line
    kept the refusal of the file before: the page now says what was dropped, on screen, in its place."""
    page.set_viewport_size({"width": 1366, "height": 768})
    page.set_input_files("#mel-image input[type=file]", {"name": "holiday.png", "mimeType": "image/png",
                                                         "buffer": b"this is a text file, not a photo\n"})
    page.wait_for_selector("#mel-upload-refused")                         # the server's refusal
    page.evaluate("() => window.scrollTo(0, 0)")                          # back at the image
    drop = page.evaluate_handle("""() => { const dt = new DataTransfer();
        dt.items.add(new File(['%PDF-1.4'], 'minutes.pdf', {type: 'application/pdf'})); return dt; }""")
    image = page.locator("#mel-image")
    for event in ("dragenter", "dragover", "drop"):
        image.dispatch_event(event, {"dataTransfer": drop})
    said = page.locator("#mel-drop-refused")
    said.wait_for()
    assert "minutes.pdf is not an image (application/pdf)" in said.inner_text() and "JPEG, PNG" in said.inner_text()
    assert not page.locator("#mel-upload-refused").is_visible()          # not the earlier file's refusal
    assert said.evaluate("e => { const r = e.getBoundingClientRect(); return r.top >= 0 && r.bottom <= innerHeight; }")
    _type(page, "Hopper at the podium.", "Hopper")
    _link(page)                                                           # the next link takes it away
    assert page.locator("#mel-drop-refused").count() == 0


def test_typing_a_mention_after_a_highlight_moves_or_clears_the_offsets(page):
    caption = "Collins met Collins at the bar."
    page.locator("#mel-caption textarea").fill(caption)
    page.evaluate("""() => { const t = document.querySelector('#mel-caption textarea'); t.focus();
                             t.setSelectionRange(12, 19); }""")  # the browser fires one select event
    page.wait_for_function("() => document.querySelector('#mel-start input').value === '12'")
    box = page.locator(MENTION_BOX).first
    box.fill("")
    box.press_sequentially("bar")
    # each keystroke moves the offsets ("ba" is at 27-29 too): wait for the last one's, both of them
    page.wait_for_function("() => document.querySelector('#mel-start input').value === '27' && "
                           "document.querySelector('#mel-end input').value === '30'")
    box.press_sequentially("tender")                       # "bartender" is not in the caption: no stale span
    page.wait_for_function("() => document.querySelector('#mel-start input').value === '' && "
                           "document.querySelector('#mel-end input').value === ''")


OFFSETS_JS = """() => [document.querySelector('#mel-start input').value, document.querySelector('#mel-end input').value]"""


def test_a_pasted_or_deleted_mention_or_caption_moves_the_offsets(page):
    """Gradio's Textbox sends .input on key presses only: a mention pasted over a highlight (one
    input event, no key) kept the highlight's offsets (mention "bar", offsets of "Collins"), and
    Backspace in the mention or a caption pasted over the old one moved nothing."""
    caption, box = page.locator("#mel-caption textarea"), page.locator(MENTION_BOX).first
    caption.fill("Collins met Collins at the bar.")
    page.evaluate("""() => { const t = document.querySelector('#mel-caption textarea'); t.focus();
                             t.setSelectionRange(12, 19); }""")  # the browser fires one select event
    page.wait_for_function("() => document.querySelector('#mel-start input').value === '12'")
    box.fill("bar")                                                      # a paste: no key pressed
    page.wait_for_function("() => document.querySelector('#mel-start input').value === '27' && "
                           "document.querySelector('#mel-end input').value === '30'")
    box.press("End")
    box.press("Backspace")                                               # "ba": still at 27, one shorter
    page.wait_for_function("() => document.querySelector('#mel-end input').value === '29'")
    caption.fill("Hopper at the bar.")                                   # a caption pasted over the old one
    page.wait_for_function("() => document.querySelector('#mel-start input').value === '14' && "
                           "document.querySelector('#mel-end input').value === '16'")
    assert box.input_value() == "ba"


def test_all_of_the_caption_selected_and_typed_over_is_not_left_as_the_mention(page):
    """Select all of the caption (the mention becomes all of it), type a new caption over it: the
    mention was left as the old caption, also when the select's answer came after the typing began.
    A selected mention the edit took out of the caption is cleared; a typed one stays."""
    caption, mention = page.locator("#mel-caption textarea"), page.locator(MENTION_BOX).first
    old = "Collins met Collins at the bar."
    for delay in (40, 0):                                   # typed after the answer to the select, and at once
        caption.fill(old)
        caption.click()
        page.keyboard.press("Control+a")
        if delay:
            page.wait_for_function("m => document.querySelector(m).value === 'Collins met Collins at the bar.'",
                                   arg="#mel-mention input, #mel-mention textarea")
        page.keyboard.type("Hopper at the podium.", delay=delay)
        page.wait_for_timeout(1500)                           # every answer is in
        assert caption.input_value() == "Hopper at the podium."
        assert mention.input_value() == "" and page.evaluate(OFFSETS_JS) == ["", ""], delay
    # a selected word whose caption is edited elsewhere stays, its offsets following it (the second
    # "Collins" stays the second: they went to the first, and the decision was saved for that one)
    caption.fill(old)
    page.evaluate("""() => { const t = document.querySelector('#mel-caption textarea'); t.focus();
                             t.setSelectionRange(12, 19); }""")  # the browser fires one select event
    page.wait_for_function("() => document.querySelector('#mel-start input').value === '12'")
    caption.press("Home")
    caption.press_sequentially("Eileen ")
    page.wait_for_function("() => document.querySelector('#mel-start input').value === '19'")   # the same word
    assert mention.input_value() == "Collins" and page.evaluate(OFFSETS_JS) == ["19", "26"]
    caption.press("End")
    caption.press_sequentially(" Collins again.")                                # after it: nothing moves
    page.wait_for_timeout(800)
    assert page.evaluate(OFFSETS_JS) == ["19", "26"]
    page.evaluate("""() => { const t = document.querySelector('#mel-caption textarea'); t.focus();
                             t.setSelectionRange(26, 26); }""")                # the caret after the selected word
    caption.press("Backspace")                                                 # an edit through it: cleared
    page.wait_for_function("m => document.querySelector(m).value === ''", arg=MENTION_BOX)
    assert page.evaluate(OFFSETS_JS) == ["", ""]
    # a mention typed by hand is never cleared by an edit of the caption (the Link button says what is wrong)
    mention.fill("")
    mention.press_sequentially("Grace")                      # not in the caption: no offsets
    caption.press("End")
    caption.press_sequentially(" Later.")
    page.wait_for_timeout(1500)
    assert mention.input_value() == "Grace" and page.evaluate(OFFSETS_JS) == ["", ""]




def test_an_example_mention_counts_as_selected_for_the_edits_after_it(page):
    """An example fills the boxes without an .input event, so the server still had the span of before
    the example: an edit through the example's mention now clears it, as for a selected word, and an
    edit before it moves it."""
    caption, mention = page.locator("#mel-caption textarea"), page.locator(MENTION_BOX).first
    text = "Collins smiles for the official portrait before the mission."
    for edit in ("before", "through"):
        page.get_by_text("Collins: Collins is a singer").first.click()
        page.wait_for_function("t => document.querySelector('#mel-caption textarea').value === t", arg=text)
        page.wait_for_timeout(1000)                               # the example's answer is in
        caption.click()
        if edit == "before":
            caption.press("Control+Home")
            caption.press_sequentially("Eileen ")
            page.wait_for_function("() => document.querySelector('#mel-start input').value === '7'")
            assert mention.input_value() == "Collins" and page.evaluate(OFFSETS_JS) == ["7", "14"]
        else:
            page.evaluate("""() => { const t = document.querySelector('#mel-caption textarea'); t.focus();
                                     t.setSelectionRange(3, 3); }""")     # the caret inside "Collins"
            caption.press("Backspace")                                     # "Colins": the word is gone
            page.wait_for_function("m => document.querySelector(m).value === ''", arg=MENTION_BOX)
            assert page.evaluate(OFFSETS_JS) == ["", ""]


def test_two_quick_edits_around_a_selected_word_keep_it(page):
    """Text typed before the selected word, then at once after it: the second edit was checked against
    the offsets the boxes still showed from before the first (the answer not in yet), so it looked
    like an edit through the word and cleared it (3 times in 9 in a browser review)."""
    caption, mention = page.locator("#mel-caption textarea"), page.locator(MENTION_BOX).first
    text = "Phil met Collins, and later Collins flew the shuttle."
    for delay in (0, 20, 50):
        caption.fill(text)
        page.evaluate("""() => { const t = document.querySelector('#mel-caption textarea'); t.focus();
                                 t.setSelectionRange(28, 35); }""")
        page.wait_for_function("() => document.querySelector('#mel-start input').value === '28'")
        page.keyboard.press("Home")
        page.keyboard.type("A B ", delay=delay)
        page.keyboard.press("End")
        page.keyboard.type(" Yes.", delay=50)
        page.wait_for_timeout(1500)                           # every answer is in
        assert (mention.input_value(), page.evaluate(OFFSETS_JS)) == ("Collins", ["32", "39"]), delay


def test_a_word_selected_then_text_typed_before_it_at_once_stays_selected(page):
    """A word selected, then text typed at once before it, in another word: the edits, answered while
    the mention box was still empty (the selection's answer not on the page yet), set the server's span
    to none, and the selection, landing after them, was then cleared as if an edit had gone through it
    (6 times in 6 on a loaded machine; a randomised browser review found it)."""
    caption, mention = page.locator("#mel-caption textarea"), page.locator(MENTION_BOX).first
    for text in ("Phil met Collins, and later Collins flew.", "Phil  met Collins, and later Collins flew."):
        mention.fill("")                      # else the second selection repeats the mention shown: no event
        # set as a paste sets it: fill() selects all first, and a select still waiting for its answer
        # makes Gradio (always_last) drop the next one, the selection of "and" below
        page.evaluate("""t => { const box = document.querySelector('#mel-caption textarea'); box.value = t;
                                box.dispatchEvent(new Event('input', {bubbles: true})); }""", text)
        page.wait_for_timeout(800)
        # "and" selected; once the browser has fired its select event (Gradio reads the selection
        # then), the caret goes into "Phil"
        page.evaluate("""s => new Promise(done => { const t = document.querySelector('#mel-caption textarea');
                            t.addEventListener('select', () => setTimeout(done, 0), {once: true});
                            t.focus(); t.setSelectionRange(s, s + 3); })""", text.index("and"))
        page.evaluate("() => document.querySelector('#mel-caption textarea').setSelectionRange(1, 1)")
        page.keyboard.type(" new ")                                                  # at once, in "Phil"
        page.wait_for_timeout(2000)                           # every answer is in
        assert caption.input_value() == "P new " + text[1:]
        start = text.index("and") + 5
        assert (mention.input_value(), page.evaluate(OFFSETS_JS)) == ("and", [str(start), str(start + 3)])


def test_offsets_typed_by_hand_with_no_mention_move_with_a_caption_edit(page):
    """Offsets typed into the boxes, no mention: an edit before them moved the server's span but left
    the boxes showing the old offsets, so what the page showed and what a link used differed."""
    caption, mention = page.locator("#mel-caption textarea"), page.locator(MENTION_BOX).first
    caption.fill("Phil met Collins.")
    mention.fill("")
    page.wait_for_timeout(800)
    for box, value in (("#mel-start input", "9"), ("#mel-end input", "16")):
        page.locator(box).fill(value)
        page.locator(box).dispatch_event("input")
        page.wait_for_timeout(500)
    caption.click()
    page.keyboard.press("Home")
    page.keyboard.type("Then ", delay=30)
    page.wait_for_timeout(1500)                                # every answer is in
    assert caption.input_value() == "Then Phil met Collins."
    assert page.evaluate(OFFSETS_JS) == ["14", "21"]


def test_a_mention_typed_after_the_caption_was_typed_over_stays_typed(page):
    """A typed mention, then all of the caption selected and typed over, then another mention typed:
    a select answer landing after the new caption turned the selected old caption into a "typed"
    mention, which the caption edit then kept, and the annotator typed into it."""
    caption, mention = page.locator("#mel-caption textarea"), page.locator(MENTION_BOX).first
    for delay in (30, 0):
        caption.fill("Tab here and Collins there")    # (fill selects all of the old caption first: a select
        page.wait_for_timeout(800)                     # event whose answer is let in before the mention is typed)
        mention.fill("Collins")
        page.wait_for_function("() => document.querySelector('#mel-start input').value === '13'")
        caption.click()
        page.keyboard.press("Control+a")
        page.keyboard.type("Collins flew.", delay=delay)
        mention.click()
        page.keyboard.press("End")
        page.keyboard.type("Hopper", delay=30)
        page.wait_for_timeout(1500)                           # every answer is in
        assert mention.input_value() in ("Hopper", "CollinsHopper"), (delay, mention.input_value())
        assert caption.input_value() == "Collins flew."


def test_ctrl_enter_then_a_key_decides_and_does_not_type_into_the_caption(page, running):
    """Select in the caption, Ctrl+Enter, g: the caret was still in the caption, so "g" replaced the
    selected mention there and nothing was saved; Esc did not leave the caption either."""
    caption = page.locator("#mel-caption textarea")
    caption.fill("Hopper at the podium.")
    page.evaluate("""() => { const t = document.querySelector('#mel-caption textarea'); t.focus();
                             t.setSelectionRange(0, 6); }""")
    page.wait_for_function("m => document.querySelector(m).value === 'Hopper'", arg=MENTION_BOX)
    before = len(_rows(running, "bob"))
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#mel-gemel-result", timeout=180_000)
    page.keyboard.press("g")
    page.wait_for_selector("#mel-ack-ok")
    assert caption.input_value() == "Hopper at the podium."
    assert len(_rows(running, "bob")) == before + 1 and _rows(running, "bob")[-1][1] == "accept_gemel"
    caption.click()
    page.keyboard.press("Escape")                            # Esc leaves the caption for the keys
    page.keyboard.press("n")
    page.wait_for_function("() => document.querySelectorAll('#mel-ack-ok').length === 1 && "
                           "document.querySelector('#mel-ack-ok').textContent.toLowerCase().includes('nil')")
    assert caption.input_value() == "Hopper at the podium." and _rows(running, "bob")[-1][1] == "nil"


def test_nothing_is_chosen_for_the_annotator_and_every_candidate_has_a_key(page, running):
    _type(page, "Hopper at the podium.", "Hopper")
    _link(page)
    radios = page.locator("#mel-dim-choice input[type=radio]")
    assert radios.count() == 10
    assert page.locator("#mel-dim-choice input:checked").count() == 0
    labels = page.locator("#mel-dim-choice label").all_inner_texts()
    assert [label.strip()[:3] for label in labels] == [f"[{k}]" for k in "1234567890"]
    before = len(_rows(running, "bob"))
    page.locator("h2").first.click()
    page.keyboard.press("d")                                # nothing chosen: nothing saved
    page.wait_for_selector("#mel-ack-refused:has-text('choose a candidate first')")
    assert len(_rows(running, "bob")) == before
    assert page.evaluate(FAILED_OUTPUTS_JS) == []
    page.locator("#mel-search input, #mel-search textarea").first.fill("Hopper")
    page.click("#mel-search-btn")
    page.wait_for_selector("#mel-search-results input[type=radio]")
    assert page.locator("#mel-search-results input:checked").count() == 0
    page.click("#mel-pick")
    page.wait_for_function("() => document.querySelectorAll('#mel-ack-refused').length === 1 && "
                           "document.querySelector('#mel-ack-refused').textContent.includes('search the KB')")
    assert len(_rows(running, "bob")) == before
    page.locator("h2").first.click()
    page.keyboard.press("0")                                # the 10th candidate, by its key
    assert radios.nth(9).is_checked()
    tenth = radios.nth(9).get_attribute("value")
    page.keyboard.press("d")
    page.wait_for_selector("#mel-ack-ok")
    rows = _rows(running, "bob")
    assert len(rows) == before + 1 and rows[-1][1:] == ("accept_dim", tenth, None)


def test_down_arrow_from_the_search_box_reaches_the_results_as_in_annotate(page, running):
    """`/`, a query, Enter, then ↓ and Enter: the caret stayed in the search box and nothing was saved
    (the Annotate tab's search takes ↓ to its results; a browser review)."""
    _type(page, "Hopper at the podium.", "Hopper")
    _link(page)
    before = len(_rows(running, "bob"))
    page.locator("h2").first.click()
    page.keyboard.press("/")
    page.keyboard.type("Hopper")
    page.keyboard.press("Enter")
    page.wait_for_selector("#mel-search-results input[type=radio]")
    page.keyboard.press("ArrowDown")
    assert page.evaluate("() => document.activeElement.closest('#mel-search-results') !== null")
    radios = page.locator("#mel-search-results input[type=radio]")
    assert radios.count() >= 3
    for key in ("ArrowDown", "ArrowDown", "ArrowUp"):    # ↓↓ Enter linked the first result (a second review)
        page.keyboard.press(key)
    second = radios.nth(1).get_attribute("value")
    assert page.evaluate("() => document.activeElement.value") == second
    page.keyboard.press("Enter")
    page.wait_for_selector("#mel-ack-ok")
    rows = _rows(running, "bob")
    assert len(rows) == before + 1 and rows[-1][1] == "search" and rows[-1][2] == second


def test_a_search_result_chosen_before_a_link_is_never_saved_for_it(page, running):
    _type(page, "Hopper at the podium.", "Hopper")
    _link(page)
    page.locator("#mel-search input, #mel-search textarea").first.fill("Hopper")
    page.click("#mel-search-btn")
    page.wait_for_selector("#mel-search-results input[type=radio]")
    page.locator("#mel-search-results label").first.click()   # chosen for this link, then not used
    assert page.locator("#mel-search-results input:checked").count() == 1
    before = len(_rows(running, "bob"))
    page.click("#mel-link")                                   # the next link starts with nothing chosen
    page.wait_for_function("() => !document.querySelector('#mel-search-results input:checked')")
    page.click("#mel-pick")
    page.wait_for_selector("#mel-ack-refused:has-text('search the KB')")
    assert len(_rows(running, "bob")) == before
    page.locator("#mel-search-results label").first.click()
    page.locator("#mel-caption textarea").press("End")
    page.locator("#mel-caption textarea").type(" Again.")     # a new caption ends the link and the choice
    page.wait_for_function("() => !document.querySelector('#mel-search-results input:checked')")


def test_another_mention_selected_after_a_link_ends_that_link(page, running):
    """Selecting another word after a link (the way a mention is picked) kept the link, so n / NIL /
    d saved for the mention linked before and replaced its label. Another selection, or other
    offsets typed by hand, end it; selecting the linked words again keeps it."""
    _type(page, "Hopper at the podium.", "Hopper")
    _link(page)
    select = """([s, e]) => { const t = document.querySelector('#mel-caption textarea'); t.focus();
                              t.setSelectionRange(s, e); t.dispatchEvent(new Event('select', {bubbles: true})); }"""
    page.evaluate(select, [0, 6])                         # the linked words again: the link stays
    page.wait_for_timeout(800)
    page.locator("h2").first.click()
    page.keyboard.press("n")
    page.wait_for_selector("#mel-ack-ok")
    rows = _rows(running, "bob")
    assert rows[-1][1] == "nil"
    page.evaluate(select, [14, 20])                       # "podium"
    page.wait_for_function("m => document.querySelector(m).value === 'podium'", arg=MENTION_BOX)
    page.locator("h2").first.click()
    page.keyboard.press("s")
    page.wait_for_selector("#mel-ack-refused:has-text('link a mention first')")
    assert _rows(running, "bob") == rows                  # nothing saved for Hopper
    page.evaluate(select, [0, 6])
    page.wait_for_function("m => document.querySelector(m).value === 'Hopper'", arg=MENTION_BOX)
    _link(page)
    page.wait_for_function("() => !document.querySelector('#mel-ack-refused')", timeout=180_000)   # linked again
    before = _rows(running, "bob")
    page.locator("#mel-start input").fill("14")           # offsets typed by hand: another span
    page.locator("h2").first.click()
    page.keyboard.press("s")
    page.wait_for_selector("#mel-ack-refused:has-text('link a mention first')")
    assert _rows(running, "bob") == before


def test_escape_leaves_the_search_box_for_the_keys(page):
    """On the Link tab Esc did not leave the KB search box (the Annotate tab's does), so the next key
    typed into it: "/", x, Esc, n left "xn" in the box."""
    page.locator("h2").first.click()
    page.keyboard.press("/")
    page.keyboard.type("x")
    page.keyboard.press("Escape")
    page.keyboard.press("n")                               # a key again: no link, so it says so
    page.wait_for_selector("#mel-ack-refused:has-text('link a mention first')")
    assert page.locator("#mel-search input, #mel-search textarea").first.input_value() == "x"


def test_enter_on_a_search_result_links_to_it(page, running):
    """Enter on a KB search result reached from the keyboard did nothing (only the button linked)."""
    _type(page, "Hopper at the podium.", "Hopper")
    _link(page)
    page.wait_for_function("() => !document.querySelector('#mel-ack-refused, #mel-ack-ok')", timeout=180_000)
    page.locator("#mel-search input, #mel-search textarea").first.fill("Grace Hopper")
    page.locator("#mel-search input, #mel-search textarea").first.press("Enter")
    page.wait_for_selector("#mel-search-results input[type=radio]")
    before = len(_rows(running, "bob"))
    page.locator("#mel-search-results input[type=radio]").first.focus()
    page.keyboard.press("Enter")
    page.wait_for_selector("#mel-ack-ok")
    rows = _rows(running, "bob")
    assert len(rows) == before + 1 and rows[-1][1] == "search"
    assert rows[-1][2] == page.locator("#mel-search-results input[type=radio]").first.get_attribute("value")


def test_the_candidates_are_readable_on_a_phone(page):
    _type(page, "Hopper at the podium.", "Hopper")
    _link(page)
    page.set_viewport_size({"width": 412, "height": 915})
    page.wait_for_timeout(800)
    widths = page.evaluate("""() => Object.fromEntries([1, 3].map(col => [col, Math.min(...[...document
        .querySelectorAll(`#mel-dim [data-col="${col}"]`)].map(c => c.getBoundingClientRect().width))]))""")
    assert widths["1"] >= 120 and widths["3"] >= 200, widths   # names and descriptions in readable columns
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 412  # the page itself does not scroll


# the number of lines each header of DIM's table takes (a 40 px "key" column wrapped it to "ke / y")
HEADER_LINES_JS = """() => Object.fromEntries([...document.querySelectorAll('#mel-dim th span.header')].map(span => {
    const range = document.createRange(); range.selectNodeContents(span);
    return [span.textContent.trim(), new Set([...range.getClientRects()].map(r => Math.round(r.top))).size]; }))"""


def test_every_header_of_dims_table_fits_on_one_line(page):
    """Every header on one line ("p (uncalibrated)" took three): the p column's header is short, and
    that its values are uncalibrated is still said, by the header, the legend above the table and the
    header's tooltip."""
    _type(page, "Hopper at the podium.", "Hopper")
    _link(page)
    for width, height in ((1366, 768), (412, 915)):
        page.set_viewport_size({"width": width, "height": height})
        page.wait_for_timeout(500)
        lines = page.evaluate(HEADER_LINES_JS)
        assert set(lines) >= {"key", "name", "id", "description", "score"}, lines
        assert all(n == 1 for n in lines.values()), (width, sorted(lines.items()))
    (p_header,) = [h for h in lines if h.startswith("p")]
    assert "uncal" in p_header, p_header                                  # the demo KB has no calibration
    legend = page.inner_text("#mel-p-legend").replace("\u00a0", " ")     # the legend above the table
    assert legend.startswith(p_header.replace("\u00a0", " ") + ":") and "relative confidence (uncalibrated)" in legend
    header = page.locator("#mel-dim th").filter(has_text="uncal").first
    header.hover()
    title = header.get_attribute("title")
    assert title.startswith("relative confidence (uncalibrated)") and "not a probability of being right" in title


def test_the_counter_counts_decided_mentions_not_saves_and_every_save_is_in_sqlite(page, running):
    _type(page, "Collins sang the opening number.", "Collins")
    _link(page)
    page.locator("h2").first.click()
    for _ in range(2):                                       # the same mention saved twice
        page.keyboard.press("n")
        page.wait_for_selector("#mel-ack-ok")
        page.wait_for_timeout(300)
    page.locator("#mel-search input, #mel-search textarea").first.fill("Phil Collins")
    page.click("#mel-search-btn")
    page.wait_for_selector("#mel-search-results input[type=radio]")
    page.locator("#mel-search-results input[type=radio]").first.check()
    page.click("#mel-pick")
    page.wait_for_function("() => document.querySelector('#mel-ack-ok').textContent.includes('Phil Collins')")
    rows = _rows(running, "bob")
    standing = [r for r in rows if r[3] is None]
    decided = len({r[0] for r in standing})
    page.wait_for_function(f"() => document.querySelector('#mel-decided').dataset.decided === '{decided}'")
    counter = page.inner_text("#mel-counter")
    assert f"{decided} mention" in counter and f"{len(standing)} saves" in counter
    assert len(standing) > decided                          # saves of one mention counted once
    assert "distinct mentions" in page.get_attribute("#mel-counter", "title")
