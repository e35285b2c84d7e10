"""The demo app: span handling, HTML escaping, access rules, and its API through gradio_client
against a launched app (offline preset, bundled demo KB, password login)."""
from __future__ import annotations

import sqlite3

import pytest

from demo.service import LinkView, PanelResult
from demo.spans import highlight_html, index_to_utf16, resolve_span, span_from_selection, utf16_to_index
from demo.ui import Access, candidate_rows, counter_html, gallery_items, render_cue, render_generator
from mel.errors import InputError
from mel.types import Candidate, Entity, LinkResult, Mention

ROCKET_CAPTION = "🚀 Falcon climbs away from the pad at dawn."


# -- spans: the browser counts UTF-16 units, Python counts code points ----------------------------
def test_utf16_offsets_convert_around_emoji():
    text = "🚀 Falcon and 👩‍🚀 Collins"
    for i in range(len(text) + 1):
        assert utf16_to_index(text, index_to_utf16(text, i)) == i
    assert index_to_utf16(text, 2) == 3            # "F" comes after a 2-unit emoji and a space
    assert utf16_to_index(text, 1) == 0            # half an emoji: the start of that character
    with pytest.raises(InputError, match="past the end"):
        utf16_to_index(text, 100)


def test_a_browser_selection_becomes_the_python_span():
    assert span_from_selection(ROCKET_CAPTION, 3, 9, "Falcon") == (2, 8)
    assert span_from_selection(ROCKET_CAPTION, 3, 10, "Falcon ") == (2, 8)   # double click takes the space
    assert span_from_selection("Hopper spoke.", 0, 6, "Hopper") == (0, 6)   # ASCII: units are characters
    # the caption changed since the selection: the selected text is located instead
    assert span_from_selection("Today: 🚀 Falcon", 3, 9, "Falcon") == (9, 15)
    with pytest.raises(InputError):
        span_from_selection(ROCKET_CAPTION, 2, 3, " ")


def test_resolve_span_prefers_matching_offsets_and_locates_typed_mentions():
    caption = "Collins met Collins."
    assert resolve_span(caption, "Collins", 12, 19) == (12, 19)     # the second one, as selected
    assert resolve_span(caption, "collins", None, None) == (0, 7)   # typed: first occurrence, any case
    assert resolve_span(caption, "Collins", 3, 9) == (0, 7)         # offsets that do not match are ignored
    assert resolve_span(caption, "", 12, 19) == (12, 19)
    for bad in [("", None, None), ("Hopper", None, None), ("", 5, 2), ("", 0, 99)]:
        with pytest.raises(InputError):
            resolve_span(caption, *bad)
    with pytest.raises(InputError, match="caption is empty"):
        resolve_span("  ", "x", None, None)


# -- everything rendered as HTML is escaped -------------------------------------------------------
EVIL = '<img src=x onerror="alert(1)">'


def _view(name=EVIL, description=EVIL, caption=f"{EVIL} Collins"):
    m = Mention.from_text(caption, "Collins")
    e = Entity("Q1<b>", name, description=description)
    result = LinkResult("gemel", m, e, [Candidate(e, -0.5, "gemel")], -0.5,
                        details={"generated": name, "visual_note": EVIL,
                                 "demonstrations": [{"caption": EVIL, "mention": "Collins", "gold_id": "Q1",
                                                     "gold_name": name, "similarity": 0.9, "image": None}]})
    ranked = LinkResult("dim", m, e, [Candidate(e, 0.7, "dim")], 0.7, details={"cue": {"text": EVIL, "provider": EVIL}})
    return LinkView(m, "mid", None, PanelResult("generator", "gemel", result), PanelResult("ranker", "dim", ranked),
                    cue={"text": EVIL, "provider": EVIL}, demonstrations=[
                        {"caption": EVIL, "mention": "Collins", "gold_id": "Q1", "gold_name": name,
                         "similarity": 0.9, "image": None}], timings={}, preset={})


def test_captions_names_and_descriptions_are_escaped():
    view = _view()
    for html_text in (render_generator(view), render_cue(view), highlight_html(view.mention.caption, view.mention.start, view.mention.end),
                      counter_html(EVIL, {"total": 0, "linked": 0, "nil": 0, "skip": 0}, False)):
        assert "<img" not in html_text
        assert "&lt;img" in html_text
    assert candidate_rows(view)[0][1] == EVIL   # table cells are text, not HTML (Dataframe datatype str)
    assert "<mark" in highlight_html("a <b>Collins</b>", 6, 13)
    assert gallery_items(view)[0][1].startswith("Collins → ")


def test_access_rules():
    class Req:
        def __init__(self, username):
            self.username = username
    password = Access("password", admins=frozenset({"alice"}))
    assert password.annotator(Req("bob")) == "bob"
    assert password.annotator(Req(None)) is None
    assert password.is_admin("alice")
    assert not password.is_admin("bob")
    assert not password.is_admin(None)
    assert Access("open").annotator(Req(None)) == "local"
    assert Access("open").is_admin("local")
    assert Access("open", open_annotator=None).annotator(Req(None)) is None  # a Space without login
    assert Access("oauth").annotator(Req("x"), None) is None


def test_app_auth_parsing():
    import app
    assert app.parse_auth("alice:pw:with:colons, bob:x") == [("alice", "pw:with:colons"), ("bob", "x")]
    assert app.parse_auth(None) == []
    assert app.parse_auth("") == []
    with pytest.raises(SystemExit, match="MEL_AUTH"):
        app.parse_auth("alice")
    assert app.linker_options(["generator.n_demos=8", "ranker.checkpoint=runs/dim"]) == (
        {"n_demos": 8}, {"checkpoint": "runs/dim"})


def test_without_a_login_only_the_person_at_the_machine_annotates():
    """No MEL_AUTH: "local" (the admin, who may download the annotation database) only on a loopback
    address; on --host 0.0.0.0, another interface or --share annotation is off unless --allow-anonymous."""
    import app
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert app.open_access(host, False, False, False)[0] == "local", host
    for host, share in (("0.0.0.0", False), ("::", False), ("192.168.1.20", False), ("myhost", False),
                        ("127.0.0.1", True)):
        annotator, said = app.open_access(host, share, False, False)
        assert annotator is None and "--allow-anonymous" in said and "MEL_AUTH" in said, (host, share)
        assert app.open_access(host, share, False, True)[0] == "local"
    assert app.open_access("127.0.0.1", False, True, True)[0] is None     # a Space: never anonymous
    assert app.parse_args(["--host", "0.0.0.0", "--allow-anonymous"]).allow_anonymous


# -- the launched app through gradio_client -------------------------------------------------------
@pytest.fixture(scope="module")
def running(tmp_path_factory):
    from conftest import launch_app
    app = launch_app(tmp_path_factory.mktemp("app-data"))
    yield app
    app.close()


@pytest.fixture(scope="module")
def alice(running):
    from conftest import APP_USERS
    from gradio_client import Client
    return Client(running.url, auth=("alice", APP_USERS["alice"]), verbose=False)


@pytest.fixture(scope="module")
def bob(running):
    from conftest import APP_USERS
    from gradio_client import Client
    return Client(running.url, auth=("bob", APP_USERS["bob"]), verbose=False)


def _link(client, image, caption, mention, start=None, end=None) -> dict:
    from gradio_client import handle_file
    outputs = client.predict(handle_file(str(image)) if image else None, caption, mention, start, end, api_name="/link")
    return next(o for o in outputs if isinstance(o, dict) and "mention_id" in o)


@pytest.mark.slow
def test_the_app_needs_a_login(running):
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError
    with pytest.raises(AuthenticationError, match="credentials were not provided"):
        Client(running.url, verbose=False)
    with pytest.raises(ValueError, match="Could not login"):  # the login page refuses the wrong password
        Client(running.url, auth=("alice", "wrong"), verbose=False)


@pytest.mark.slow
def test_link_shows_both_linkers_and_records_the_predictions(running, alice):
    from demo.bundled import package_image
    result = _link(alice, package_image("skimage:rocket"), ROCKET_CAPTION, "Falcon")
    assert result["text"] == "Falcon"
    assert result["mention"]["start"] == 2
    assert result["mention"]["end"] == 8
    assert result["generator"]["error"] is None, result["generator"]
    assert result["generated"]["name"]
    assert result["generated"]["id"]
    assert result["candidates"]
    assert result["candidates"][0]["rank"] == 1
    assert result["cue"]["provider"] == "faces"  # the offline person-aware cue (labels when no face is found)
    assert result["cue"]["text"]
    assert len(result["demonstrations"]) >= 1
    assert {"caption", "gold_name", "similarity"} <= set(result["demonstrations"][0])
    assert result["preset"]["name"] == "offline"
    assert result["timings"]["total"] > 0
    assert result["image_sha256"]
    conn = sqlite3.connect(running.data_dir / "annotations.sqlite")
    rows = conn.execute("SELECT linker, preset, models, shown_to FROM predictions WHERE mention_id = ?",
                        (result["mention_id"],)).fetchall()
    conn.close()
    assert {r[0] for r in rows} == {running.service.generator.name, running.service.ranker_name}
    assert all(r[1] == "offline" and r[3] == "alice" for r in rows)
    assert (running.data_dir / "images" / f"{result['image_sha256']}.png").exists()


@pytest.mark.slow
def test_bad_input_gives_a_clear_error(alice):
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError, match="does not occur in the caption"):
        _link(alice, None, "Hopper at the podium.", "Collins")


@pytest.mark.slow
def test_corrections_undo_and_ownership(running, alice, bob):
    from gradio_client.exceptions import AppError
    linked = _link(alice, None, "Java first thing in the morning.", "Java")
    mid, top = linked["mention_id"], linked["candidates"][0]["id"]
    ack = alice.predict(mid, "accept_dim", top, api_name="/correct")
    assert ack["annotator"] == "alice"
    assert ack["entity_id"] == top
    assert ack["correction_id"] > 0
    nil = bob.predict(mid, "nil", "", api_name="/correct")
    assert nil["annotator"] == "bob"
    assert nil["entity_id"] == "NIL"
    with pytest.raises(AppError, match="not in the knowledge base"):
        alice.predict(mid, "search", "demo:no-such-entity", api_name="/correct")
    assert bob.predict(api_name="/undo")["id"] == nil["correction_id"]
    assert bob.predict(api_name="/undo") == {}                      # nothing of bob's left: alice's untouched
    assert running.service.store.correction(ack["correction_id"])["undone_at"] is None
    counts = alice.predict(api_name="/counts")
    assert counts["annotator"] == "alice"
    assert counts["total"] >= 1


@pytest.mark.slow
def test_search_and_live_pool(running, alice):
    found = alice.predict("Grace Hopper", 5, api_name="/search")
    assert found[0]["id"] == "demo:grace-hopper"
    caption = "Hopper signs the guest book at the naval academy."
    linked = _link(alice, None, caption, "Hopper")
    ack = alice.predict(linked["mention_id"], "search", "demo:grace-hopper", api_name="/correct")
    # the correction is now a demonstration: linking the same mention retrieves it
    again = _link(alice, None, caption, "Hopper")
    sample_ids = [d["sample_id"] for d in again["demonstrations"]]
    assert f"correction-{ack['correction_id']}" in sample_ids
    alice.predict(api_name="/undo")  # ... and undoing it takes it out of the pool again
    after = _link(alice, None, caption, "Hopper")
    assert f"correction-{ack['correction_id']}" not in [d["sample_id"] for d in after["demonstrations"]]


@pytest.mark.slow
def test_html_outputs_of_the_api_are_escaped(alice):
    outputs = alice.predict(None, "<b>Collins</b> waves <script>alert(1)</script>", "Collins", None, None,
                            api_name="/link")
    highlight = outputs[0]
    assert "<script>" not in highlight
    assert "&lt;script&gt;" in highlight
    assert "<mark" in highlight


@pytest.mark.slow
def test_export_and_backup_are_for_admins_only(running, alice):
    import zipfile

    from annotations import NotAllowedError
    linked = _link(alice, None, "Collins sang the opening number.", "Collins")
    alice.predict(linked["mention_id"], "search", "demo:phil-collins", api_name="/correct")
    service = running.service
    with pytest.raises(NotAllowedError, match="admin"):
        service.export("bob", "jsonl", is_admin=False)
    with pytest.raises(NotAllowedError, match="admin"):
        service.backup("bob", is_admin=False)
    archive, summary = service.export("alice", "jsonl", is_admin=True)
    assert "examples" in summary
    with zipfile.ZipFile(archive) as z:
        assert {"train.jsonl", "kb.jsonl", "export_report.json"} <= set(z.namelist())
        assert "Phil Collins" in z.read("train.jsonl").decode()
    # the export itself stays inside the data dir's exports/ folder
    assert all(p.parent == running.data_dir / "exports" for p in (running.data_dir / "exports").iterdir())
    copy = service.backup("alice", is_admin=True)
    conn = sqlite3.connect(copy)
    assert conn.execute("SELECT count(*) FROM corrections WHERE entity_id = 'demo:phil-collins'").fetchone()[0] >= 1
    conn.close()


@pytest.mark.slow
def test_a_refused_import_is_said_once_in_the_report_line(running, tmp_path):
    """The Projects tab's import, refused (a file that is not a tasks file): said once, in the report
    line, with no other output touched (a gr.Error drew Gradio's red Error badge on every output and a
    toast); a role refusal stays an error."""
    import gradio as gr

    from annotations.projects import list_projects
    (on_import,) = [b.fn for b in running.demo.fns.values() if getattr(b.fn, "__name__", "") == "on_import"]
    bad = tmp_path / "tasks.csv"
    bad.write_text("just text\n", encoding="utf-8")
    before = [p.name for p in list_projects(running.service.store)]
    out = on_import("refused-import", 1, str(bad), None, "", None, request=gr.Request(username="alice"))
    assert 'id="mel-adm-import-refused"' in out[0] and "tasks.csv" in out[0], out[0]
    assert all(o == gr.skip() for o in out[1:]), out[1:]           # the pickers and the tab stay as they are
    assert [p.name for p in list_projects(running.service.store)] == before
    with pytest.raises(gr.Error, match="admin role"):              # not an admin: still an error
        on_import("refused-import", 1, str(bad), None, "", None, request=gr.Request(username="bob"))
    # A project imported while the Annotate tab has none: it opens on it, with its first task (it was
    # left blank, with no project chosen); the Review and Dashboard pickers offer it when opened.
    good = tmp_path / "first.csv"
    good.write_text("caption,mention\nHopper painted the diner.,Hopper\n", encoding="utf-8")
    out = on_import("first-import", 1, str(good), None, "", None, request=gr.Request(username="alice"))
    assert out[2]["value"] == "first-import" and "first-import" in out[2]["choices"] and "Hopper" in out[4]
    out = on_import("second-import", 1, str(good), None, "", "first-import", request=gr.Request(username="alice"))
    assert "value" not in out[2] and out[4] == gr.skip()           # the admin's Annotate project stays
    (on_dash_selected,) = [b.fn for b in running.demo.fns.values() if getattr(b.fn, "__name__", "") == "on_dash_selected"]
    _, shown = on_dash_selected("first-import", request=gr.Request(username="alice"))   # the admin watches
    assert "second-import" in shown["choices"] and shown["value"] == "first-import"
    (on_review_selected,) = [b.fn for b in running.demo.fns.values()
                             if getattr(b.fn, "__name__", "") == "on_review_selected"]
    assert on_review_selected(None, request=gr.Request(username="bob")) == gr.skip()   # not a reviewer


def test_the_cue_panel_lists_apparent_faces_and_says_they_are_no_facts():
    from types import SimpleNamespace

    from demo.render import APPARENT
    cue = {"text": "a photo of one person, apparently a woman aged about 30-40", "provider": "faces", "question": "",
           "note": "", "faces": [{"box": [1, 2, 3, 4], "gender": "female", "gender_probability": 0.89, "age": 31.9,
                                  "age_range": [30, 40]}]}
    html_text = render_cue(SimpleNamespace(cue=cue))
    assert "apparently female (p 0.89), about 32 years" in html_text and APPARENT in html_text
    assert "face-api.js" in html_text and "dlib" in html_text  # how the cue was obtained
    labels = render_cue(SimpleNamespace(cue={"text": "espresso, coffee mug", "provider": "faces", "faces": [],
                                             "note": "no face detection, ImageNet labels instead: dlib missing"}))
    assert APPARENT not in labels and "ImageNet labels instead" in labels  # no face: no apparent attributes
    assert "provider: faces: no face found: ImageNet labels" in labels  # not "(faces)" beside object labels
    assert "no face found" not in html_text
    blip = render_cue(SimpleNamespace(cue={"text": "an astronaut", "provider": "blip2:Salesforce/blip2-opt-2.7b",
                                           "question": "Who is this?"}))
    assert "BLIP-2 answering" in blip and "asked: Who is this?" in blip


def test_the_task_screen_says_when_the_person_cue_found_no_face():
    from annotations.projects import Progress, Task
    from annotations.queue import PredictionView, TaskView
    from demo.render import render_task
    from mel.types import Mention

    def task_with_cue(cue):
        m = Mention.from_text("Collins waves", "Collins", id="mid")
        details = {"kind": "dim", "feature_mask": {"image": True, "cue": True}, "cue": cue}
        pred = PredictionView(1, "dim", "Q1", "Eileen Collins", 3.0, [{"id": "Q1", "name": "Eileen Collins", "score": 3.0}],
                              details, None, "kb")
        return render_task(TaskView(Task("t1", 1, "mid", m, None, None, "", "f.jsonl", "line 1", 0), {"dim": pred},
                                    Progress(1, 0, "alice", 0, 0)), project="p")

    labels = task_with_cue({"text": "espresso, coffee mug", "provider": "faces", "faces": []})
    assert "espresso, coffee mug" in labels and "(faces: no face found: ImageNet labels)" in labels
    face = {"box": [1, 2, 3, 4], "gender": "female", "gender_probability": 0.89, "age": 31.9, "age_range": [30, 40]}
    person = task_with_cue({"text": "a photo of one person", "provider": "faces", "faces": [face]})
    assert "(faces)" in person and "no face found" not in person
    stored = task_with_cue({"text": "a photo of one person, apparently a man", "provider": "faces"})
    assert "no face found" not in stored          # stored before cues kept their faces: the text says it
    counted = task_with_cue({"text": "espresso", "provider": "faces (no age/gender)", "faces": []})
    assert "(faces (no age/gender): no face found: ImageNet labels)" in counted


# -- the review of the Link tab by an annotator (fast parts; the browser parts: test_e2e_link_review.py)
def test_a_typed_mention_moves_the_offsets_or_clears_them():
    from demo.service import retarget_offsets
    caption = "Collins met Collins at the bar."
    assert retarget_offsets(caption, "Collins", 12, 19) == (12, 19)   # the highlight still holds it: kept
    assert retarget_offsets(caption, "bar", 12, 19) == (27, 30)       # typed over the highlight: follows the text
    assert retarget_offsets(caption, "Coll", 12, 19) == (0, 4)        # not the old span: the first occurrence
    assert retarget_offsets(caption, "Hopper", 12, 19) == (None, None)  # not in the caption: cleared, never stale
    assert retarget_offsets(caption, "", 12, 19) == (None, None)
    assert retarget_offsets("", "Collins", 0, 7) == (None, None)



def test_an_edit_elsewhere_in_the_caption_moves_a_selected_mention_by_the_edit():
    """The second "Collins" selected, then "Yesterday " typed at the start: the offsets went to the first
    "Collins" (its first occurrence) and the decision was saved for that one."""
    from demo.service import follow_caption_edit
    from mel.spans import follow_edit, span_holds
    before = "Phil met Collins, and later Collins flew the shuttle."
    after = "Yesterday " + before
    assert follow_caption_edit(before, 28, 35, after, "Collins", True) == (38, 45)           # the same word
    assert follow_caption_edit(before, 28, 35, before + " Later.", "Collins", True) == (28, 35)  # edit after it
    through = before.replace("later Collins", "later Col")                                    # Backspace in it
    assert follow_caption_edit(before, 28, 35, through, "Collins", True) is None              # selected: cleared
    assert follow_caption_edit(before, 28, 35, through, "Collins", False) == (9, 16)          # typed: its text
    assert follow_caption_edit(None, 28, 35, after, "Collins", True) is None       # place unknown: cleared, never
    assert follow_caption_edit(None, 28, 35, after, "Collins", False) == (19, 26)  # another copy (a typed one: found)
    assert follow_caption_edit(before, 28, 35, "Hopper.", "Collins", True) is None
    assert follow_caption_edit(before, 28, 35, "Hopper.", "Collins", False) == (None, None)
    # two quick edits: the second is followed from the span the first left (the boxes may still show
    # the older 28/35, which the race cleared as "an edit through the word")
    from demo.ui import _edited_from, span_seen
    first = "A B " + before
    assert _edited_from(span_seen(first, 32, 39), "Collins", 28, 35) == (first, 32, 39)
    assert follow_caption_edit(*_edited_from(span_seen(first, 32, 39), "Collins", 28, 35), first + " Yes.",
                               "Collins", True) == (32, 39)
    assert _edited_from(span_seen(first, 0, 4), "Collins", 28, 35) == (None, 28, 35)   # not the mention there
    assert _edited_from(None, "Collins", 28, 35) == (None, 28, 35)
    # an edit answered while the mention box is still empty (a selection's answer on its way): the
    # server's span follows the edit, or is none when the edit went through it
    from demo.ui import span_followed
    assert span_followed(span_seen(before, 28, 35), after) == span_seen(after, 38, 45)
    assert span_followed(span_seen(before, 28, 35), through) == span_seen(through, None, None)
    assert span_followed(span_seen(after, 38, 45), after) == span_seen(after, 38, 45)
    assert span_followed(None, after) == span_seen(after, None, None)
    assert span_followed(span_seen(before, None, None), after) == span_seen(after, None, None)
    assert follow_edit("ab", "xab", 0, 1) == (1, 2) and follow_edit("ab", "ab!", 0, 2) == (0, 2)
    # offsets typed by hand with no mention: the boxes show the server's span, and move with it
    from demo.ui import _boxes_show_seen
    assert _boxes_show_seen(span_seen(before, 28, 35), 28, 35)
    assert not _boxes_show_seen(span_seen(before, 28, 35), 9, 16)    # older offsets: an answer replaces them
    assert not _boxes_show_seen(span_seen(before, None, None), None, None) and not _boxes_show_seen(None, 28, 35)
    assert follow_edit("abc", "aXc", 1, 2) is None
    # two quick edits answered as one (before and after the word): the word is matched between them
    assert follow_edit("A " + before, "A B " + before + " Y", 30, 37) == (32, 39)
    assert follow_edit("A " + before, "A B " + before.replace("later Collins", "later Colxlins") + " Y", 30, 37) is None
    from mel.spans import MAX_MATCHED_MIDDLE
    long = "word " * MAX_MATCHED_MIDDLE                                            # too long to match: touched
    assert follow_edit(long, "x" + long + "y", 10, 14) is None
    assert span_holds(before, "Collins", 28, 35) and not span_holds(before, "Collins", 27, 34)
    assert not span_holds(before, "Collins", None, 35) and not span_holds(before, " ", 8, 9)


def test_an_example_counts_as_a_selected_mention_for_the_edits_after_it(running):
    """gr.Examples fills the boxes without an .input event, so the span the server saw stayed the one
    before the example: its mention is now a selection, with its span, as soon as it is loaded."""
    fns = running.demo.fns
    (loaded,) = [b for b in fns.values() if getattr(b.fn, "__name__", "") == "on_example_loaded"]
    (load,) = [b for b in fns.values() if b is fns.get(loaded.trigger_after)]
    assert getattr(load.fn, "__name__", "") == "load_example"   # right after the example fills the boxes
    ids = {running.demo.blocks[i].elem_id: i for i in running.demo.blocks if running.demo.blocks[i].elem_id}
    assert [b._id for b in loaded.inputs] == [ids[k] for k in ("mel-caption", "mel-mention", "mel-start", "mel-end")]
    caption = "Collins smiles for the official portrait before the mission."
    picked, seen = loaded.fn(caption, "Collins", 0, 7)
    assert picked == "Collins" and seen == {"caption": caption, "start": 0, "end": 7}
    from demo.service import follow_caption_edit  # so an edit through it clears it, as a selected word's
    assert follow_caption_edit(seen["caption"], 0, 7, caption.replace("Collins", "Colins"), "Collins",
                               picked == "Collins") is None


def test_the_link_check_says_what_is_wrong_and_what_to_do():
    from demo.service import locate_mention
    assert locate_mention("Hopper at the podium.", "Hopper", None, None) == (0, 6)
    with pytest.raises(InputError, match="does not occur in the caption; select it"):
        locate_mention("Hopper at the podium.", "Collins", None, None)
    with pytest.raises(InputError, match="caption is empty: type or paste"):
        locate_mention("", "Collins", None, None)
    with pytest.raises(InputError, match="no mention: select it"):
        locate_mention("Hopper at the podium.", "", None, None)


def test_an_upload_that_is_not_an_image_is_refused_with_the_formats_that_work(tmp_path):
    from PIL import Image

    from demo.service import check_upload
    fake = tmp_path / "notes.png"
    fake.write_text("shopping list: milk, eggs\n")
    with pytest.raises(InputError, match=r"'notes\.png' is not an image.*JPEG, PNG, WebP, GIF, BMP or TIFF.*kept"):
        check_upload(fake)
    real = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(real)
    check_upload(real)   # no error
    check_upload(None)


def test_every_shown_candidate_has_its_key_and_none_is_chosen_for_the_annotator():
    from types import SimpleNamespace

    from demo.render import candidate_choices, candidate_key
    assert [candidate_key(r) for r in range(1, 12)] == ["1", "2", "3", "4", "5", "6", "7", "8", "9", "0", ""]
    ranked = [{"rank": i, "id": f"demo:{i}", "name": f"Name {i}"} for i in range(1, 11)]
    labels = [label for label, _ in candidate_choices(SimpleNamespace(ranked=ranked))]
    assert labels[0] == "[1] Name 1 (demo:1)" and labels[9] == "[0] Name 10 (demo:10)"
    view = _view()
    assert candidate_rows(view)[0][0] == "1"   # the table's first column is the key too


def test_the_counter_counts_distinct_decided_mentions_as_the_store_has_them(tmp_path):
    from annotations import AnnotationStore
    from demo.service import LinkService, ServiceConfig
    service = LinkService(ServiceConfig(data_dir=str(tmp_path)))
    service.store = AnnotationStore(tmp_path)
    a = service.store.record_mention(Mention.from_text("Collins sang.", "Collins"))
    b = service.store.record_mention(Mention.from_text("Hopper spoke.", "Hopper"))
    c = service.store.record_mention(Mention.from_text("Java at dawn.", "Java"))
    for mid, entity, action in [(a, "demo:phil-collins", "search"), (a, "demo:phil-collins", "search"),
                                (a, "NIL", "nil"), (b, "demo:grace-hopper", "accept_dim"), (c, None, "skip")]:
        service.store.record_correction("alice", mid, entity, action)
    service.store.record_correction("bob", b, "NIL", "nil")        # another annotator's: not alice's count
    counts = service.counts("alice")
    assert counts["total"] == 5                                   # saves, as before
    assert (counts["decided"], counts["decided_linked"], counts["decided_nil"], counts["decided_skip"]) == (2, 1, 1, 1)
    html_text = counter_html("alice", counts, False)
    assert ">2</b> mentions decided (1 linked, 1 NIL), 1 skipped" in html_text and "5 saves" in html_text
    assert "distinct mentions" in html_text                       # the tooltip says what is counted
    service.store.undo_last("alice")                              # the skip of c: c is no longer decided
    service.store.undo_last("alice")                              # b's link undone: b is no longer alice's
    counts = service.counts("alice")
    assert (counts["decided"], counts["decided_linked"], counts["decided_nil"], counts["decided_skip"]) == (1, 0, 1, 0)


def test_the_counter_leaves_out_decisions_a_reviewer_sent_back(tmp_path):
    """The counter counted a queue decision a reviewer had sent back (it filtered only undone ones):
    the store's standing decisions are neither undone nor returned."""
    import json

    from annotations import AnnotationStore
    from annotations.projects import create_project, import_tasks
    from annotations.queue import AnnotationQueue
    from annotations.review import ReviewQueue
    from demo.service import LinkService, ServiceConfig
    service = LinkService(ServiceConfig(data_dir=str(tmp_path)))
    service.store = store = AnnotationStore(tmp_path)
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"caption": f"Task {i} in a caption", "mention": f"Task {i}"}) + "\n"
                            for i in (1, 2)))
    create_project(store, "p")
    import_tasks(store, "p", "tasks-jsonl", data)
    q = AnnotationQueue(store, "p")
    first = q.next_task("alice").task.id
    q.decide("alice", first, "nil", token="a1")
    second = q.next_task("alice").task.id
    q.decide("alice", second, "search", "Q1", token="a2", entity_name="Someone")
    assert service.decided("alice")["decided"] == 2
    ReviewQueue(store, "p", reviewer="rita", is_reviewer=True).send_back(first, comment="look again", token="r1")
    assert service.decided("alice") == {"decided": 1, "decided_linked": 1, "decided_nil": 0, "decided_skip": 0}


def test_the_link_tabs_undo_never_undoes_a_project_decision(tmp_path):
    """`u` on the Link tab (and /undo) undoes the annotator's last Link-tab correction, never a
    decision they made in the Annotate tab's queue: that one stood, and its queue (cursor, history,
    progress) would not know it was withdrawn."""
    import json

    from annotations import AnnotationStore
    from annotations.projects import create_project, import_tasks
    from annotations.queue import AnnotationQueue
    from demo.service import LinkService, ServiceConfig
    service = LinkService(ServiceConfig(data_dir=str(tmp_path)))
    service.store = store = AnnotationStore(tmp_path)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"caption": "Hopper spoke at the academy.", "mention": "Hopper"}) + "\n")
    create_project(store, "p")
    import_tasks(store, "p", "tasks-jsonl", tasks)
    queue = AnnotationQueue(store, "p")
    link_tab = store.record_correction("alice", store.record_mention(Mention.from_text("Collins sang.", "Collins")),
                                       "NIL", "nil")
    task = queue.next_task("alice").task.id
    decided = queue.decide("alice", task, "nil", token="t1")       # after the Link-tab correction

    undone = service.undo("alice")
    assert undone is not None and undone["id"] == link_tab.correction_id
    assert store.correction(decided.correction_id)["undone_at"] is None
    assert service.undo("alice") is None                          # nothing of alice's left on the Link tab
    assert store.correction(decided.correction_id)["undone_at"] is None
    assert queue.undo("alice") is not None                        # the queue still undoes its own


def test_the_link_tabs_undo_says_which_label_stands_for_the_mention_now():
    """Undo said "Undone #2" but not which decision of the annotator now stands for that mention."""
    from demo.ui import _undo_message
    earlier = {"id": 1, "action": "search", "entity_name": "Falcon 9"}
    message = _undo_message({"id": 2, "action": "nil", "entity_name": None, "now_standing": earlier})
    assert "Undone #2" in message and "again #1" in message and "Falcon 9" in message
    assert "no label for this mention now" in _undo_message({"id": 3, "action": "nil", "entity_name": None,
                                                            "now_standing": None})
    assert "Nothing of yours to undo" in _undo_message(None)
