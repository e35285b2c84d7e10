"""The Gradio UI: inputs on the left, both linkers' outputs on the right, annotation below.

    demo = build_demo(kb_path=None, pool=None, preset="offline", data_dir="data/app")
    demo.queue(default_concurrency_limit=4).launch(**launch_options(demo))

The UI only renders: LinkService (demo/service.py) does the work. Everything rendered as HTML
is escaped here (captions, entity names and descriptions come from users and KB files).

Who is annotating (`Access`): with `auth` (password login) the Gradio username; on a Hugging
Face Space with OAuth the HF username; with neither, locally, everyone is `open_annotator`
("local"), who is also the admin. Without any login on a Space, annotation is refused.

API (gradio_client): /link (the Link button), and /correct, /undo, /search, /counts.
"""
from __future__ import annotations

import functools
import html
import logging
from dataclasses import dataclass, field

import gradio as gr
from PIL import Image, ImageDraw

from annotations import FORMATS
from mel.errors import MELError
from mel.paths import cache_dir

from .bundled import bundled_examples
from .service import LinkService, LinkView, ServiceConfig
from .spans import highlight_html, resolve_span, span_from_selection

log = logging.getLogger(__name__)

ACTION_LABELS = {"accept_gemel": "accepted GEMEL's entity", "accept_dim": "accepted a DIM candidate",
                 "search": "picked from the KB search", "nil": "marked NIL (not in the KB)", "skip": "skipped"}
THUMBNAIL = 256
MAX_UPLOAD = "20mb"  # Gradio refuses larger uploads before they reach the app; mel.imageio caps pixels


@dataclass(frozen=True)
class Access:
    mode: str = "open"                      # "open" | "password" | "oauth"
    admins: frozenset[str] = field(default_factory=frozenset)
    open_annotator: str | None = "local"    # who annotates in open mode; None = nobody may annotate

    def annotator(self, request: gr.Request | None, profile: gr.OAuthProfile | None = None) -> str | None:
        if self.mode == "password":
            return getattr(request, "username", None) or None
        if self.mode == "oauth":
            return profile.username if profile is not None else None
        return self.open_annotator

    def is_admin(self, annotator: str | None) -> bool:
        if not annotator:
            return False
        if self.mode == "open":
            return annotator == self.open_annotator  # the person at the machine owns the data
        return annotator in self.admins


def hand_over_unopened(image: gr.Image) -> gr.Image:
    """Make `image` (type="filepath") hand the uploaded file to the app without opening it.

    gr.Image opens every upload with PIL before the handler runs and decodes (converts) every
    image that is not RGB. A text file, a decompression bomb or a truncated PNG then fails inside
    Gradio with a generic "could not preprocess" error, and a 100-megapixel grey PNG is decoded
    in full before any check. With this the path goes straight to LinkService.link, where
    mel.imageio.load_image reads the size from the header first and says what is wrong.
    (An instance attribute, not a subclass: Gradio writes a .pyi stub beside the module of every
    Component subclass.)
    """
    opened = image.preprocess

    def preprocess(payload):
        if payload is None:
            return None
        path = getattr(payload, "path", None)
        if path:
            return str(path)
        try:  # an inline data: URL (not what the browser sends for an upload, but possible from the API)
            return opened(payload)
        except Exception as exc:
            raise gr.Error(f"the image could not be read ({type(exc).__name__}: {exc}); upload a JPEG or PNG "
                           f"file") from None

    image.preprocess = preprocess
    return image


CSS = """
.mel-caption { font-size: 1.1em; line-height: 1.6; }
.mel-caption mark.mel-mention { background: #ffe58a; padding: 0 2px; border-radius: 3px; }
.mel-panel { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px 12px; }
.mel-panel h4 { margin: 0 0 4px 0; }
.mel-error { color: #b42318; }
.mel-note { color: var(--body-text-color-subdued); font-size: 0.9em; }
.mel-kbd { border: 1px solid #999; border-radius: 3px; padding: 0 4px; font-family: monospace; font-size: 0.85em; }
"""

# Keyboard shortcuts for the frequent actions; never while typing in a text box.
SHORTCUTS_JS = """
<script>
(() => {
  if (window.__melShortcuts) return;  // Gradio may insert the head twice
  window.__melShortcuts = true;
  const press = (id) => {
    const el = document.getElementById(id);
    const button = el && (el.tagName === 'BUTTON' ? el : el.querySelector('button'));
    if (button && !button.disabled) { button.click(); return true; }
    return false;
  };
  const keys = {g: 'mel-accept-gemel', d: 'mel-accept-dim', n: 'mel-nil', s: 'mel-skip', u: 'mel-undo'};
  document.addEventListener('keydown', (e) => {
    const t = e.target;
    const typing = t && (t.tagName === 'TEXTAREA' || t.isContentEditable ||
                         (t.tagName === 'INPUT' && !['radio', 'checkbox', 'button'].includes(t.type)));
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { if (press('mel-link')) e.preventDefault(); return; }
    if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
    if (keys[e.key] && press(keys[e.key])) { e.preventDefault(); return; }
    if (e.key === '/') {
      const box = document.querySelector('#mel-search textarea, #mel-search input');
      if (box) { box.focus(); e.preventDefault(); }
      return;
    }
    if (/^[1-9]$/.test(e.key)) {  // choose DIM candidate N
      const radios = document.querySelectorAll('#mel-dim-choice input[type=radio]');
      const r = radios[Number(e.key) - 1];
      if (r) { r.click(); e.preventDefault(); }
    }
  });
})();
</script>
"""

SELECTION_JS = """
(caption, start, end, mention) => {
  const t = document.querySelector('#mel-caption textarea');
  if (!t || t.selectionStart === t.selectionEnd) return [caption, null, null, ''];
  return [t.value, t.selectionStart, t.selectionEnd, t.value.substring(t.selectionStart, t.selectionEnd)];
}
"""


def launch_options() -> dict:
    """Keyword arguments for Blocks.launch() that the UI needs (Gradio 6 takes css/head there).

    allowed_paths: the bundled example photos live in the cache (written there at first start).
    max_file_size: uploads over MAX_UPLOAD are refused by Gradio itself.
    """
    return {"css": CSS, "head": SHORTCUTS_JS, "allowed_paths": [str(cache_dir("demo", "images"))],
            "max_file_size": MAX_UPLOAD}


# -- rendering ---------------------------------------------------------------------------------------
def _esc(value) -> str:
    return html.escape("" if value is None else str(value))


def _score(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def render_generator(view: LinkView) -> str:
    panel = view.generator
    if panel is None:
        return '<div class="mel-panel"><h4>GEMEL</h4><span class="mel-note">turned off</span></div>'
    if panel.result is None:
        return (f'<div class="mel-panel"><h4>GEMEL ({_esc(panel.linker)})</h4>'
                f'<span class="mel-error">unavailable: {_esc(panel.error)}</span></div>')
    g = view.generated
    details = panel.result.details
    notes = [details.get(k) for k in ("visual_note", "note", "demonstrations_note") if details.get(k)]
    amb = details.get("ambiguity")
    if amb:
        notes.append(f"the name {amb.get('name')!s} fits {len(amb.get('entity_ids', []))} entities; chose {amb.get('chosen')}")
    return (f'<div class="mel-panel" id="mel-gemel-result"><h4>GEMEL ({_esc(panel.linker)})</h4>'
            f'<div>generated: <b>{_esc(g["generated"])}</b></div>'
            f'<div>entity: <b>{_esc(g["name"])}</b> <code>{_esc(g["id"])}</code> · score {_score(g["score"])}</div>'
            f'<div class="mel-note">{_esc(g["description"])}</div>'
            + "".join(f'<div class="mel-note">{_esc(n)}</div>' for n in notes) + "</div>")


def render_cue(view: LinkView) -> str:
    cue = view.cue
    if not cue:
        return '<div class="mel-panel"><h4>Expert cue</h4><span class="mel-note">no image: no cue</span></div>'
    if cue.get("error"):
        return (f'<div class="mel-panel"><h4>Expert cue</h4><span class="mel-note">{_esc(cue["error"])}</span>'
                f' <span class="mel-note">({_esc(cue.get("provider"))})</span></div>')
    question = f'<div class="mel-note">asked: {_esc(cue["question"])}</div>' if cue.get("question") else ""
    return (f'<div class="mel-panel" id="mel-cue-result"><h4>Expert cue</h4><div><b>{_esc(cue.get("text"))}</b></div>'
            f'<div class="mel-note">provider: {_esc(cue.get("provider"))}</div>{question}</div>')


def render_ranker_note(view: LinkView) -> str:
    panel = view.ranker
    parts = []
    if panel.note:
        parts.append(f'<span class="mel-note">{_esc(panel.note)}</span>')
    if panel.error:
        parts.append(f'<span class="mel-error">{_esc(panel.linker)} failed: {_esc(panel.error)}</span>')
    if panel.result is not None and panel.result.details.get("protocol"):
        parts.append(f'<span class="mel-note">protocol: {_esc(panel.result.details["protocol"])}</span>')
    return "<div>" + " · ".join(parts) + "</div>" if parts else ""


def candidate_rows(view: LinkView) -> list[list]:
    return [[c["rank"], c["name"], c["id"], _clip(c["description"], 160), round(c["score"], 4)] for c in view.ranked]


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


@functools.lru_cache(maxsize=1)
def _placeholder() -> Image.Image:
    im = Image.new("RGB", (THUMBNAIL, THUMBNAIL), (238, 238, 238))
    ImageDraw.Draw(im).text((THUMBNAIL // 2 - 24, THUMBNAIL // 2 - 6), "no image", fill=(120, 120, 120))
    return im


@functools.lru_cache(maxsize=256)
def _thumbnail(path: str) -> Image.Image:
    from mel.imageio import load_image
    im = load_image(path)
    im.thumbnail((THUMBNAIL, THUMBNAIL))
    return im


def gallery_items(view: LinkView) -> list[tuple[Image.Image, str]]:
    items = []
    for d in reversed(view.demonstrations):  # most similar first in the gallery
        try:
            image = _thumbnail(d["image"]) if d.get("image") else _placeholder()
        except MELError:
            image = _placeholder()
        sim = d.get("similarity")
        label = (f"{d['mention']} → {d['gold_name']} ({d['gold_id']})"
                 + (f" · similarity {sim:.2f}" if isinstance(sim, (int, float)) else "") + f"\n{d['caption']}")
        items.append((image, label))
    return items


def counter_html(annotator: str | None, counts: dict, is_admin: bool) -> str:
    if not annotator:
        return '<span class="mel-note">Not logged in: linking works, saving corrections needs a login.</span>'
    role = " (admin)" if is_admin else ""
    return (f'<span id="mel-counter">Annotating as <b>{_esc(annotator)}</b>{role}: <b>{counts["total"]}</b> corrections '
            f'({counts["linked"]} linked, {counts["nil"]} NIL, {counts["skip"]} skipped'
            + (f", {counts['undone']} undone" if counts.get("undone") else "") + ")</span>")


def status_html(describe: dict) -> str:
    gen, rank = describe["generator"], describe["ranker"]

    def state(s):
        return "ready" if s == "ok" else ("off" if s == "off" else f"unavailable: {s}")
    ranker = (rank["linker"] if rank["linker"] == rank["wanted"]
              else f"{rank['wanted']} unavailable ({rank['status']}); using {rank['linker']}")
    return (f'<div class="mel-note">preset <b>{_esc(describe["preset"])}</b> on {_esc(describe["device"])}'
            + (f" ({_esc(describe['reason'])})" if describe.get("reason") else "")
            + f' · KB {_esc(describe["kb"])}, {describe["kb_size"]:,} entities · pool {_esc(describe["pool"])}'
            f' · GEMEL: {_esc(state(gen["status"]))} · ranking: {_esc(ranker if rank["status"] != "ok" else ranker + " ready")}</div>')


# -- the app -----------------------------------------------------------------------------------------
def build_demo(kb_path: str | None = None, pool: str | None = None, preset: str = "auto", data_dir: str | None = None,
               *, service: LinkService | None = None, access: Access | None = None, load: bool = True,
               config: ServiceConfig | None = None) -> gr.Blocks:
    """The app as a gr.Blocks. `load=True` loads models now (so the app is ready when it answers)."""
    if service is None:
        config = config or ServiceConfig()
        config.kb, config.pool, config.preset = kb_path or config.kb, pool or config.pool, preset or config.preset
        config.data_dir = data_dir or config.data_dir
        service = LinkService(config)
    access = access or Access()
    if load:
        service.load()
    examples = bundled_examples()

    with gr.Blocks(title="MEL: multimodal entity linking and annotation") as demo:
        demo.mel_service = service  # for tests and benchmarks
        current = gr.State(None)     # the last link of this browser session (mention id, predictions)
        with gr.Row():
            gr.HTML("<h2 style='margin:0'>Multimodal entity linking: GEMEL + DIM</h2>")
            if access.mode == "oauth":
                gr.LoginButton()
        who = gr.HTML(elem_id="mel-who")
        info = gr.HTML(status_html(service.describe()) if service.loaded else "", elem_id="mel-info")

        with gr.Row(equal_height=False):
            with gr.Column(scale=4):
                image = hand_over_unopened(gr.Image(type="filepath", label="Image (optional)", height=260,
                                                    sources=["upload", "clipboard"], elem_id="mel-image"))
                caption = gr.Textbox(label="Caption", lines=3, elem_id="mel-caption",
                                     info="Select the mention with the mouse (or type it below)")
                with gr.Row():
                    mention = gr.Textbox(label="Mention", scale=3, elem_id="mel-mention")
                    start = gr.Number(label="start", precision=0, minimum=0, scale=1, elem_id="mel-start")
                    end = gr.Number(label="end", precision=0, minimum=0, scale=1, elem_id="mel-end")
                link_btn = gr.Button("Link  (Ctrl+Enter)", variant="primary", elem_id="mel-link")
                gr.Examples([[e.image, e.caption, e.mention, e.start, e.end] for e in examples],
                            inputs=[image, caption, mention, start, end], label="Examples: the image decides",
                            example_labels=[f"{e.mention}: {e.why}" for e in examples])
                highlighted = gr.HTML(label="highlighted mention", elem_id="mel-highlight")
            with gr.Column(scale=6):
                with gr.Row():
                    gemel_html = gr.HTML(label="GEMEL", elem_id="mel-gemel")
                    cue_html = gr.HTML(label="expert cue", elem_id="mel-cue")
                ranker_note = gr.HTML(label="ranking notes", elem_id="mel-ranker-note")
                dim_table = gr.Dataframe(headers=["rank", "name", "id", "description", "score"],
                                         datatype=["number", "str", "str", "str", "number"], interactive=False,
                                         wrap=True, max_height=320, column_widths=["7%", "22%", "20%", "41%", "10%"],
                                         label="DIM: ranked candidates (click a row to choose it)", elem_id="mel-dim")
                demos = gr.Gallery(label="GEMEL: retrieved demonstrations (most similar first)", columns=4,
                                   height=220, allow_preview=True, elem_id="mel-demos")
                with gr.Accordion("Timings, preset and models", open=False):
                    timings = gr.JSON(label="per-stage timings (ms)", elem_id="mel-timings")
                    models = gr.JSON(label="preset and models", elem_id="mel-models")
                with gr.Accordion("Raw result (JSON)", open=False):
                    raw = gr.JSON(label="link result", elem_id="mel-raw")

        with gr.Group():
            with gr.Row():
                accept_gemel = gr.Button("Accept GEMEL  [g]", elem_id="mel-accept-gemel")
                accept_dim = gr.Button("Accept DIM choice  [d]", elem_id="mel-accept-dim")
                nil_btn = gr.Button("NIL: not in KB  [n]", elem_id="mel-nil")
                skip_btn = gr.Button("Not sure / skip  [s]", elem_id="mel-skip")
                undo_btn = gr.Button("Undo my last  [u]", elem_id="mel-undo")
            dim_choice = gr.Radio(label="DIM candidate to accept (keys 1-9)", choices=[], elem_id="mel-dim-choice")
            with gr.Row():
                search_box = gr.Textbox(label="Search the KB  [/]", scale=4, elem_id="mel-search")
                search_btn = gr.Button("Search", scale=1, elem_id="mel-search-btn")
            search_results = gr.Radio(label="Search results", choices=[], elem_id="mel-search-results")
            pick_btn = gr.Button("Link to the selected search result", elem_id="mel-pick")
            live_pool = gr.Checkbox(value=service.config.live_pool, elem_id="mel-live-pool",
                                    label="My corrections join GEMEL's demonstration pool at once")
            ack = gr.HTML(label="acknowledgement", elem_id="mel-ack")

        with gr.Accordion("Admin: export corrections as training data", open=False, visible=False) as admin_box:
            export_format = gr.Dropdown(list(FORMATS), value="jsonl", label="format", elem_id="mel-export-format")
            export_btn = gr.Button("Export", elem_id="mel-export")
            export_file = gr.File(label="export (zip)", elem_id="mel-export-file")
            export_note = gr.HTML()
            backup_btn = gr.Button("Download a backup of the annotation database", elem_id="mel-backup")
            backup_file = gr.File(label="annotations.sqlite backup", elem_id="mel-backup-file")

        # -- handlers ----------------------------------------------------------------------------
        def on_load(request: gr.Request, profile: gr.OAuthProfile | None = None):
            annotator = access.annotator(request, profile)
            admin = access.is_admin(annotator)
            counts = service.counts(annotator) if annotator else {}
            return (counter_html(annotator, counts, admin), status_html(service.describe()),
                    gr.update(visible=admin))

        demo.load(on_load, None, [who, info, admin_box], api_visibility="undocumented")

        def on_select(text: str, s16, e16, selected: str):
            # s16/e16: the browser's selection in UTF-16 units (see SELECTION_JS)
            if not selected or s16 is None or e16 is None:
                return gr.skip(), gr.skip(), gr.skip()
            try:
                s, e = span_from_selection(text, int(s16), int(e16), selected)
            except MELError:
                return gr.skip(), gr.skip(), gr.skip()  # a selection of spaces, or of nothing
            return text[s:e], s, e

        # The selection is read from the textarea by JS when the handler runs, not from the event:
        # a keyboard or mouse selection fires one event per step, and Gradio's always_last mode
        # re-runs the last one without its event data. start/end/mention only carry the values in.
        caption.select(on_select, [caption, start, end, mention], [mention, start, end], js=SELECTION_JS,
                       api_visibility="private", show_progress="hidden", trigger_mode="always_last")

        def on_link(image_path, caption_text, mention_text, start_char, end_char, request: gr.Request,
                    profile: gr.OAuthProfile | None = None, progress=gr.Progress()):
            annotator = access.annotator(request, profile) or ""
            text = caption_text
            try:
                s, e = resolve_span(text, mention_text, start_char, end_char)
                view = service.link(text, s, e, image_path, annotator=annotator,
                                    progress=lambda f, d: progress(f, desc=d))
            except MELError as exc:
                raise gr.Error(str(exc)) from None
            choices = [(f"{c['rank']}. {c['name']} ({c['id']})", c["id"]) for c in view.ranked]
            state = {"mention_id": view.mention_id, "text": view.mention.text,
                     "generator": view.generated, "ranked": [(c["id"], c["name"]) for c in view.ranked]}
            result = view.to_dict()
            return (highlight_html(text, s, e), render_generator(view), render_cue(view), render_ranker_note(view),
                    candidate_rows(view), gr.update(choices=choices, value=choices[0][1] if choices else None),
                    gallery_items(view), view.timings, view.preset, result, state, view.mention.text, s, e, "")

        link_event = dict(fn=on_link, inputs=[image, caption, mention, start, end],
                          outputs=[highlighted, gemel_html, cue_html, ranker_note, dim_table, dim_choice, demos,
                                   timings, models, raw, current, mention, start, end, ack],
                          concurrency_limit=1, concurrency_id="link")
        link_btn.click(api_name="link", **link_event)

        def on_row(state, evt: gr.SelectData):
            if not state or not isinstance(evt.index, (list, tuple)):
                return gr.skip()
            row = int(evt.index[0])
            return state["ranked"][row][0] if 0 <= row < len(state["ranked"]) else gr.skip()

        dim_table.select(on_row, [current], [dim_choice], api_visibility="undocumented", queue=False)

        def save(action: str, state, entity_id, live, request, profile):
            annotator = access.annotator(request, profile)
            if not state:
                raise gr.Error("link a mention first, then correct it")
            try:
                ack_ = service.correct(annotator, state["mention_id"], action, entity_id, live_pool=bool(live))
            except (MELError, PermissionError) as exc:
                raise gr.Error(str(exc)) from None
            what = (f"→ <b>{_esc(ack_.entity_name)}</b> <code>{_esc(ack_.entity_id)}</code>"
                    if action not in ("nil", "skip") else "")
            message = (f'<div id="mel-ack-ok">Saved #{ack_.correction_id}: “{_esc(state["text"])}” {what} '
                       f'({_esc(ACTION_LABELS[action])}) at {_esc(ack_.created)}</div>')
            return message, counter_html(annotator, service.counts(annotator), access.is_admin(annotator))

        def on_accept_gemel(state, live, request: gr.Request, profile: gr.OAuthProfile | None = None):
            gen = (state or {}).get("generator")
            if state and (not gen or gen["id"] in (None, "NIL")):
                raise gr.Error("GEMEL gave no entity for this mention: pick a DIM candidate, search, or mark NIL")
            return save("accept_gemel", state, gen["id"] if gen else None, live, request, profile)

        def on_accept_dim(state, choice, live, request: gr.Request, profile: gr.OAuthProfile | None = None):
            return save("accept_dim", state, choice, live, request, profile)

        def on_pick(state, choice, live, request: gr.Request, profile: gr.OAuthProfile | None = None):
            if not choice:
                raise gr.Error("search the KB and select a result first")
            return save("search", state, choice, live, request, profile)

        def on_nil(state, live, request: gr.Request, profile: gr.OAuthProfile | None = None):
            return save("nil", state, None, live, request, profile)

        def on_skip(state, live, request: gr.Request, profile: gr.OAuthProfile | None = None):
            return save("skip", state, None, live, request, profile)

        def on_undo(request: gr.Request, profile: gr.OAuthProfile | None = None):
            annotator = access.annotator(request, profile)
            try:
                undone = service.undo(annotator)
            except (MELError, PermissionError) as exc:
                raise gr.Error(str(exc)) from None
            message = ("Nothing of yours to undo." if undone is None else
                       f'<div id="mel-undo-ok">Undone #{undone["id"]}: {_esc(ACTION_LABELS[undone["action"]])}'
                       + (f' → {_esc(undone["entity_name"])}' if undone["entity_name"] else "") + "</div>")
            return message, counter_html(annotator, service.counts(annotator), access.is_admin(annotator))

        saved = [ack, who]
        common = dict(api_visibility="undocumented", concurrency_limit=8, concurrency_id="store")
        accept_gemel.click(on_accept_gemel, [current, live_pool], saved, **common)
        accept_dim.click(on_accept_dim, [current, dim_choice, live_pool], saved, **common)
        pick_btn.click(on_pick, [current, search_results, live_pool], saved, **common)
        nil_btn.click(on_nil, [current, live_pool], saved, **common)
        skip_btn.click(on_skip, [current, live_pool], saved, **common)
        undo_btn.click(on_undo, None, saved, **common)

        def on_search(query):
            try:
                found = service.search(query, k=10)
            except MELError as exc:
                raise gr.Error(str(exc)) from None
            choices = [(f"{e.name} ({e.id}): {_clip(e.description, 90)}", e.id) for e in found]
            return gr.update(choices=choices, value=choices[0][1] if choices else None,
                             label=f"Search results ({len(choices)})" if choices else "Search results: none found")

        for trigger in (search_btn.click, search_box.submit):
            trigger(on_search, [search_box], [search_results], api_visibility="undocumented",
                    concurrency_limit=8, concurrency_id="store")

        def on_export(fmt, request: gr.Request, profile: gr.OAuthProfile | None = None):
            annotator = access.annotator(request, profile)
            try:
                path, summary = service.export(annotator, fmt, is_admin=access.is_admin(annotator))
            except (MELError, PermissionError) as exc:
                raise gr.Error(str(exc)) from None
            return str(path), f'<div class="mel-note">{_esc(summary)}</div>'

        export_btn.click(on_export, [export_format], [export_file, export_note], api_visibility="private",
                         concurrency_limit=1)

        def on_backup(request: gr.Request, profile: gr.OAuthProfile | None = None):
            annotator = access.annotator(request, profile)
            try:
                return str(service.backup(annotator, is_admin=access.is_admin(annotator)))
            except (MELError, PermissionError) as exc:
                raise gr.Error(str(exc)) from None

        backup_btn.click(on_backup, None, [backup_file], api_visibility="private", concurrency_limit=1)

        # -- a small, typed API for scripts (gradio_client) ----------------------------------
        def correct(mention_id: str, action: str, entity_id: str = "", request: gr.Request = None,
                    profile: gr.OAuthProfile | None = None) -> dict:
            """Save a correction for a linked mention; action: accept_gemel | accept_dim | search | nil | skip."""
            annotator = access.annotator(request, profile)
            try:
                return service.correct(annotator, mention_id, action, entity_id or None).to_dict()
            except (MELError, PermissionError) as exc:
                raise gr.Error(str(exc)) from None

        def undo(request: gr.Request = None, profile: gr.OAuthProfile | None = None) -> dict:
            """Undo your own most recent correction; returns it (empty when there was none)."""
            try:
                return service.undo(access.annotator(request, profile)) or {}
            except (MELError, PermissionError) as exc:
                raise gr.Error(str(exc)) from None

        def search(query: str, k: int = 10) -> list:
            """Search the KB by name, alias or description (exact matches first, then BM25)."""
            return [e.to_dict() for e in service.search(query, k=int(k))]

        def counts(request: gr.Request = None, profile: gr.OAuthProfile | None = None) -> dict:
            """Your correction counts in this database."""
            annotator = access.annotator(request, profile)
            return {"annotator": annotator, **(service.counts(annotator) if annotator else {})}

        gr.api(correct, api_name="correct", concurrency_limit=8, concurrency_id="store")
        gr.api(undo, api_name="undo", concurrency_limit=8, concurrency_id="store")
        gr.api(search, api_name="search", concurrency_limit=8, concurrency_id="store")
        gr.api(counts, api_name="counts", concurrency_limit=8, concurrency_id="store")
    return demo
