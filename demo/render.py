"""HTML for the app: the Link tab's panels and the Annotate tab's task screen.

Everything shown here comes from users, datasets or KB files, so every piece of text is escaped
(`_esc`); table cells (gr.Dataframe) are plain text. Nothing here touches the database or a model:
the functions take what the service returned (LinkView, annotations.queue.TaskView) and return
strings, so they are fast and testable on their own.

Confidences (the Link tab and the task screen): where a linker is calibrated (mel.calibration: a
temperature and a "none of these" option fitted on a train slice) its candidates carry
`probability`, shown as "calibrated probability" with a tooltip saying how it was fitted (and its
ECE where recorded); a NIL answered because the best probability is under the threshold is shown
as NIL with the result's note. Where no calibration applies (a custom KB), the candidate scores go
through a softmax at the temperature that linker's scores are made for (`RANKER_TEMPERATURES`;
DIM's scores are logits, GEMEL's are sequence log-probabilities, cosines of the dense baseline
need a small temperature), labelled as an uncalibrated relative confidence: the linker's share
among its own candidates, not a probability of being right.
"""
from __future__ import annotations

import base64
import functools
import html
import io
import json
import math
import time
from pathlib import Path

from PIL import Image, ImageDraw

from mel.backends.cue import PERSON_CUE_HEAD
from mel.errors import MELError
from mel.types import NIL, DimDetails, GemelDetails, details_from_dict

CALIBRATED = "calibrated probability"
UNCALIBRATED = "relative confidence (uncalibrated)"
CALIBRATED_HOW = ('temperature scaling with a "none of these" option, fitted on a train slice '
                  "(python -m mel calibrate)")
# What each generator does, for the panel's title and the status line (`--generator` of app.py).
GENERATOR_MODES = {"gemel": "whole KB, as in the paper",
                   "gemel+bm25": "the LLM scores BM25's top 20",
                   "gemel+dense": "the LLM scores the dense top 20",
                   "gemel+dim": "the LLM scores DIM's top 20",
                   "gemel-free": "free generation, no trie"}
WHOLE_KB_SWITCH = "python app.py --generator gemel"

THUMBNAIL = 256
TASK_IMAGE = (360, 240)   # the task screen's image, at most (width, height) in pixels
MAX_DIM_SHOWN = 10        # keys 1-9 and 0
MAX_DEMOS_SHOWN = 3
# a task's descriptions: one line with an ellipsis on a wide screen (the whole text on hover), a few
# wrapped lines on a phone, which cannot hover (demo/assets/queue.css)
DESCRIPTION_CHARS = 220
# The temperature each linker's scores are made for (see mel/gemel/linker.py FUSION_DEFAULTS: DIM's
# scores are softmax logits, dense scores are cosines, BM25 scores are unbounded sums).
RANKER_TEMPERATURES = {"dim": 1.0, "dense": 0.02, "bm25": 1.0, "gemel": 1.0}

ACTION_TEXT = {"accept_gemel": "accepted GEMEL's entity", "accept_dim": "picked a DIM candidate",
               "search": "picked from the KB search", "nil": "NIL (not in the KB)", "skip": "skipped"}


def _esc(value) -> str:
    return html.escape("" if value is None else str(value))


def _description_html(text, tag: str) -> str:
    """An entity's description on a task screen: clipped, the whole of it on hover."""
    return f'<{tag} class="mel-q-desc" title="{_attr(text)}">{_esc(_clip(text, DESCRIPTION_CHARS))}</{tag}>'


def _attr(value) -> str:
    """A value for an HTML attribute (double-quoted)."""
    return html.escape("" if value is None else str(value), quote=True)


def _score(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _clip(text: str, n: int) -> str:
    text = text or ""
    return text if len(text) <= n else text[: n - 1] + "…"


# -- the Link tab ----------------------------------------------------------------------------------
def generator_title(name: str) -> str:
    """GEMEL (name: what it does), e.g. GEMEL (gemel+bm25: the LLM scores BM25's top 20)."""
    mode = GENERATOR_MODES.get(name)
    return f"GEMEL ({name}: {mode})" if mode else f"GEMEL ({name})"


def confidences(candidates, summary: dict | None, kind: str) -> tuple[list[float | None], bool, str]:
    """(a confidence per candidate, whether they are calibrated, the tooltip saying what they are).

    `candidates`: mel Candidates or dicts with "score" (and "probability"), best first; `summary`:
    mel.calibration.calibration_summary of the linker (None: unknown). Calibrated: the candidates'
    own `probability`; else a softmax of the scores at RANKER_TEMPERATURES[kind]."""
    def get(c, key):
        return c.get(key) if isinstance(c, dict) else getattr(c, key, None)
    probs = [get(c, "probability") for c in candidates]
    if any(isinstance(p, (int, float)) for p in probs):
        about = (summary or {}).get("about") or CALIBRATED_HOW
        threshold = (summary or {}).get("nil_threshold")
        nil = f"; answers NIL when the best is below {threshold:.3f}" if isinstance(threshold, (int, float)) else ""
        return probs, True, f"{CALIBRATED}: {about}{nil}"
    temperature = RANKER_TEMPERATURES.get(kind, 1.0)
    scores = [get(c, "score") for c in candidates]
    why = (summary or {}).get("about") or "no calibrated probability came with these candidates"
    return (probabilities(scores, temperature), False,
            f"{UNCALIBRATED}: softmax of the scores (T = {temperature:g}) over its {len(scores)} candidates, "
            f"not a probability of being right; {why}")


def _why_nil(note: str) -> str:
    """A result's note shown after the word NIL (without saying "NIL: " twice)."""
    return note[len("NIL: "):] if note.startswith("NIL: ") else note


def _p_label(calibrated: bool, tooltip: str) -> str:
    return (f'<span class="mel-p-label" title="{_attr(tooltip)}" data-calibrated="{str(calibrated).lower()}">'
            f'{CALIBRATED if calibrated else UNCALIBRATED}</span>')


def render_generator(view) -> str:
    panel = view.generator
    if panel is None:
        return '<div class="mel-panel"><h4>GEMEL</h4><span class="mel-note">turned off</span></div>'
    if panel.result is None:
        return (f'<div class="mel-panel"><h4>{_esc(generator_title(panel.linker))}</h4>'
                f'<span class="mel-error">unavailable: {_esc(panel.error)}</span></div>')
    g = view.generated
    result = panel.result
    details = result.details
    nil = result.prediction is None
    notes = [details.note] if details.note and not nil else []
    if isinstance(details, GemelDetails):
        notes += [n for n in (details.visual_note, details.demonstrations_note) if n]
        amb = details.ambiguity
        if amb is not None:
            notes.append(f"the name {amb.name} fits {len(amb.entity_ids)} entities; chose {amb.chosen} ({amb.rule})")
    probs, calibrated, tooltip = confidences(result.candidates, panel.calibration, "gemel")
    if nil:
        entity = ('<div id="mel-gemel-nil">entity: <b>NIL</b> (not in the KB)'
                  + (f': <span class="mel-note">{_esc(_why_nil(details.note))}</span>' if details.note else "")
                  + "</div>")
        confidence = ""
    else:
        entity = (f'<div>entity: <b>{_esc(g["name"])}</b> <code>{_esc(g["id"])}</code> · score {_score(g["score"])}'
                  f"</div>")
        p = next((q for c, q in zip(result.candidates, probs, strict=True) if c.entity.id == g["id"]), None)
        confidence = (f'<div class="mel-confidence">{_p_label(calibrated, tooltip)}: '
                      f'<b class="mel-p" data-p="{_attr(p)}">{_pct(p)}</b></div>')
    return (f'<div class="mel-panel" id="mel-gemel-result"><h4>{_esc(generator_title(result.linker))}</h4>'
            f'<div>generated: <b>{_esc(g["generated"])}</b></div>{entity}{confidence}'
            f'<div class="mel-note">{_esc(g["description"])}</div>'
            + "".join(f'<div class="mel-note">{_esc(n)}</div>' for n in notes) + "</div>")


# How each cue provider obtains its text, shown under the cue (the provider's name comes first).
CUE_HOW = {
    "faces": ("faces found by dlib's detector; each face's apparent gender and age guessed by face-api.js's "
              "age/gender network; ImageNet labels (EfficientNet-Lite0) when no face is found"),
    "faces (no age/gender)": "faces found by dlib's detector, counted without apparent age/gender",
    "faces (labels only)": "ImageNet labels (EfficientNet-Lite0): the face models are not installed",
    "imagenet-labels": "the top ImageNet labels of EfficientNet-Lite0",
    "blip2": "BLIP-2 answering the question below",
    "blip": "a BLIP caption of the photo",
}
APPARENT = "Apparent attributes read from the pixels of this photo, never facts about a person."
NO_FACE_FOUND = "no face found: ImageNet labels"


def cue_source(provider: str, faces, text: str = "") -> str:
    """The provider's name as shown beside a cue; the person cue that found no face says its text is
    ImageNet labels, or "(faces)" would stand beside a list of object labels. (A face cue's text is
    "a photo of ...": predictions stored before cues kept their faces have none listed.)"""
    looked_for_faces = provider.startswith("faces") and provider != "faces (labels only)"
    if looked_for_faces and not faces and not str(text or "").startswith(PERSON_CUE_HEAD):
        return f"{provider}: {NO_FACE_FOUND}"
    return provider


def render_cue(view) -> str:
    cue = view.cue
    if not cue:
        return '<div class="mel-panel"><h4>Expert cue</h4><span class="mel-note">no image: no cue</span></div>'
    if cue.get("error"):
        return (f'<div class="mel-panel"><h4>Expert cue</h4><span class="mel-note">{_esc(cue["error"])}</span>'
                f' <span class="mel-note">({_esc(cue.get("provider"))})</span></div>')
    provider = str(cue.get("provider") or "")
    how = CUE_HOW.get(provider) or CUE_HOW.get(provider.split(":", 1)[0], "")
    provider = cue_source(provider, cue.get("faces"), cue.get("text"))
    question = f'<div class="mel-note">asked: {_esc(cue["question"])}</div>' if cue.get("question") else ""
    faces = [f for f in cue.get("faces") or [] if f.get("gender") or f.get("age") is not None]
    face_rows = "".join(
        f"<li>face {i}: apparently {_esc(f.get('gender') or 'unknown gender')}"
        + (f" (p {f['gender_probability']:.2f})" if f.get("gender_probability") is not None else "")
        + (f", about {f['age']:.0f} years" if f.get("age") is not None else "") + "</li>"
        for i, f in enumerate(faces, start=1))
    apparent = (f'<ul class="mel-cue-faces">{face_rows}</ul><div class="mel-note">{APPARENT}</div>'
                if faces else "")
    note = f'<div class="mel-note">{_esc(cue["note"])}</div>' if cue.get("note") else ""
    return (f'<div class="mel-panel" id="mel-cue-result"><h4>Expert cue</h4><div><b>{_esc(cue.get("text"))}</b></div>'
            f'{apparent}<div class="mel-note">provider: {_esc(provider)}' + (f": {_esc(how)}" if how else "")
            + f"</div>{question}{note}</div>")


def render_ranker_note(view) -> str:
    panel = view.ranker
    parts = []
    if panel.note:
        parts.append(f'<span class="mel-note">{_esc(panel.note)}</span>')
    if panel.error:
        parts.append(f'<span class="mel-error">{_esc(panel.linker)} failed: {_esc(panel.error)}</span>')
    result = panel.result
    details = result.details if result is not None else None
    if result is not None and result.prediction is None and result.candidates:
        parts.append('<span id="mel-ranker-nil"><b>NIL</b> (not in the KB)'
                     + (f": {_esc(_why_nil(details.note))}" if details is not None and details.note else "")
                     + "</span>")
    if isinstance(details, DimDetails) and details.protocol:
        parts.append(f'<span class="mel-note">protocol: {_esc(details.protocol)}</span>')
    if result is not None and result.candidates:
        _, calibrated, tooltip = confidences(result.candidates, panel.calibration, linker_kind(panel.linker))
        # the legend of the table's p column, whose header is short (P_HEADERS)
        column = P_HEADERS["calibrated p" if calibrated else "p (uncalibrated)"]
        parts.append(f'<span class="mel-note" id="mel-p-legend">{_esc(column)}: {_p_label(calibrated, tooltip)}</span>')
    return "<div>" + " · ".join(parts) + "</div>" if parts else ""


def candidate_key(rank: int) -> str:
    """The key that chooses the candidate of this rank (1-based): "1".."9", "0" for the 10th, "" after."""
    return str(rank % 10) if 1 <= rank <= MAX_DIM_SHOWN else ""


def candidate_choices(view) -> list[tuple[str, str]]:
    """The DIM choice radio's (label, entity id), each label led by the key that chooses it."""
    out = []
    for c in view.ranked:
        key = candidate_key(c["rank"])
        lead = f"[{key}] " if key else f"{c['rank']}. "
        out.append((f"{lead}{c['name']} ({c['id']})", c["id"]))
    return out


def candidate_headers(view) -> list[str]:
    """The ranked table's columns: the key that chooses a row first, the last says whether p is calibrated."""
    r = view.ranker.result
    calibrated = r is not None and confidences(r.candidates, view.ranker.calibration, "")[1]
    return ["key", "name", "id", "description", "score", "calibrated p" if calibrated else "p (uncalibrated)"]


def candidate_rows(view) -> list[list]:
    r = view.ranker.result
    probs = confidences(r.candidates, view.ranker.calibration, linker_kind(view.ranker.linker))[0] if r else []
    return [[candidate_key(c["rank"]) or str(c["rank"]), c["name"], c["id"], _clip(c["description"], 160),
             round(c["score"], 4), None if p is None else round(p, 4)] for c, p in zip(view.ranked, probs, strict=True)]


# What the ranked table shows as the p column's header: short enough for one line in its 120 px column
# ("p (uncalibrated)" took three); the legend above the table (render_ranker_note) says it in full,
# with the tooltip, and so does the header's own tooltip (demo/assets/app.js). A no-break space keeps
# "p" and its qualifier together.
P_HEADERS = {"p (uncalibrated)": "p\u00a0(uncal.)", "calibrated p": "p\u00a0(calib.)"}


def candidate_table(view) -> dict:
    """The ranked table's value (gr.Dataframe): its rows and headers (the p column's header short, P_HEADERS)."""
    return {"data": candidate_rows(view), "headers": [P_HEADERS.get(h, h) for h in candidate_headers(view)]}


@functools.lru_cache(maxsize=1)
def _placeholder() -> Image.Image:
    im = Image.new("RGB", (THUMBNAIL, THUMBNAIL), (238, 238, 238))
    ImageDraw.Draw(im).text((THUMBNAIL // 2 - 24, THUMBNAIL // 2 - 6), "no image", fill=(60, 60, 60))
    return im


@functools.lru_cache(maxsize=256)
def _thumbnail(path: str) -> Image.Image:
    from mel.imageio import load_image
    im = load_image(path)
    im.thumbnail((THUMBNAIL, THUMBNAIL))
    return im


def gallery_items(view) -> list[tuple[Image.Image, str]]:
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


COUNTER_HOW = ("mentions decided: distinct mentions (tasks) whose latest decision by you stands in the annotation "
               "database; saving a mention again changes its decision, not this count. saves: every save, "
               "re-saves included")


def counter_html(annotator: str | None, counts: dict, is_admin: bool) -> str:
    """Who is annotating and how far: distinct mentions decided (LinkService.counts "decided*",
    as the store holds them), then the saves behind them."""
    if not annotator:
        return ('<span class="mel-note">Not logged in: linking works, saving corrections needs a login (a server '
                'without logins saves none until its admin sets MEL_AUTH).</span>')
    role = " (admin)" if is_admin else ""
    decided, skipped = counts.get("decided", 0), counts.get("decided_skip", 0)
    return (f'<span id="mel-counter" title="{_attr(COUNTER_HOW)}">Annotating as <b>{_esc(annotator)}</b>{role}: '
            f'<b id="mel-decided" data-decided="{decided}">{decided}</b> '
            f'mention{"" if decided == 1 else "s"} decided ({counts.get("decided_linked", 0)} linked, '
            f'{counts.get("decided_nil", 0)} NIL)' + (f", {skipped} skipped" if skipped else "")
            + f' <span class="mel-note">· {counts.get("total", 0)} save{"" if counts.get("total", 0) == 1 else "s"}'
            + (f", {counts['undone']} undone" if counts.get("undone") else "") + "</span></span>")


def refusal_html(message: str, element_id: str, *, escaped: bool = False) -> str:
    """What was refused and what to do, in one place (a status area, role="alert"); `escaped`:
    `message` is HTML-escaped already (a gr.Error's message). data-n changes with every message."""
    text = message if escaped else _esc(message)
    return (f'<div id="{_attr(element_id)}" class="mel-refusal mel-error" role="alert" '
            f'data-n="{time.monotonic_ns()}">{text}</div>')


def status_html(describe: dict) -> str:
    gen, rank = describe["generator"], describe["ranker"]

    def state(s):
        return "ready" if s == "ok" else ("off" if s == "off" else f"unavailable: {s}")
    ranker = (rank["linker"] if rank["linker"] == rank["wanted"]
              else f"{rank['wanted']} unavailable ({rank['status']}); using {rank['linker']}")
    name = gen.get("linker") or ""
    generator = f"{generator_title(name)}: {state(gen['status'])}" if name else "GEMEL: off"
    switch = (f' <span class="mel-note" id="mel-generator-switch">(the paper\'s whole-KB generation: '
              f"<code>{_esc(WHOLE_KB_SWITCH)}</code>)</span>" if name and name != "gemel" else "")
    return (f'<div class="mel-note">preset <b>{_esc(describe["preset"])}</b> on {_esc(describe["device"])}'
            + (f" ({_esc(describe['reason'])})" if describe.get("reason") else "")
            + f' · KB {_esc(describe["kb"])}, {describe["kb_size"]:,} entities · pool {_esc(describe["pool"])}'
            f' · <span id="mel-generator">{_esc(generator)}</span>{switch}'
            f' · ranking: {_esc(ranker if rank["status"] != "ok" else ranker + " ready")}</div>')


# -- the Annotate tab --------------------------------------------------------------------------------
def probabilities(scores: list[float | None], temperature: float = 1.0) -> list[float | None]:
    """softmax(score / temperature) over the scores given; None where a score is missing or not finite."""
    usable = [s / temperature for s in scores if isinstance(s, (int, float)) and math.isfinite(s)]
    if not usable:
        return [None] * len(scores)
    top = max(usable)
    total = sum(math.exp(s - top) for s in usable)
    return [math.exp(s / temperature - top) / total if isinstance(s, (int, float)) and math.isfinite(s) else None
            for s in scores]


def linker_kind(name: str) -> str:
    """'gemel' for gemel, gemel+dense...; else the base name (dim, dense, bm25)."""
    return name.split("+")[0].split("-")[0]


def _pct(p: float | None) -> str:
    return "–" if p is None else (f"{p * 100:.0f}%" if p >= 0.01 else "<1%")


@functools.lru_cache(maxsize=512)
def image_data_uri(path: str) -> str | None:
    """A small JPEG of the image as a data: URL (inline: the task arrives with its image in one answer)."""
    from mel.imageio import load_image
    try:
        im = load_image(path).convert("RGB")
    except (MELError, OSError):
        return None
    im.thumbnail(TASK_IMAGE)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _highlight(caption: str, start: int, end: int) -> str:
    return (f'<p class="mel-caption mel-q-caption">{_esc(caption[:start])}<mark class="mel-mention">'
            f"{_esc(caption[start:end])}</mark>{_esc(caption[end:])}</p>")


def split_predictions(view) -> tuple[object | None, object | None]:
    """(GEMEL's prediction, the ranker's) of a TaskView: the generator is the gemel* linker."""
    gemel = ranker = None
    for name, pred in view.predictions.items():
        if linker_kind(name) == "gemel":
            gemel = gemel or pred
        else:
            ranker = ranker or pred
    return gemel, ranker


def _details(pred):
    try:
        return details_from_dict(pred.details or {}, pred.linker)
    except MELError:
        return None


def _task_confidences(pred, kind: str, calibrations) -> tuple[list[float | None], bool, str]:
    """`confidences` of a stored prediction: its candidates' "probability" when the store kept them,
    else computed from the scores with `calibrations[pred.linker]` (a mel Calibration) when given."""
    cal = (calibrations or {}).get(pred.linker)
    fitted_kb = cal.fitted_on.get("kb") if cal is not None else None
    if fitted_kb and getattr(pred, "kb", "") and Path(str(pred.kb)).name != Path(str(fitted_kb)).name:
        cal = None  # fitted on another KB's scores: its probabilities would mean nothing here
    candidates = pred.candidates
    summary = None
    if cal is not None:
        from mel.calibration import describe_calibration
        summary = {"about": describe_calibration(cal)}
        if not any(isinstance(c.get("probability"), (int, float)) for c in candidates):
            probs = cal.probabilities([c.get("score") if isinstance(c.get("score"), (int, float)) else -math.inf
                                       for c in candidates])
            candidates = [{**c, "probability": float(q)} for c, q in zip(candidates, probs, strict=True)]
    return confidences(candidates, summary, kind)


def _nil_reason(details) -> str:
    note = getattr(details, "note", "") if details is not None else ""
    return f'<div class="mel-note mel-q-nil">{_esc(_clip(_why_nil(note), 200))}</div>' if note else ""


def _gemel_panel(pred, describe, calibrations=None) -> tuple[str, str | None]:
    if pred is None:
        return ('<section class="mel-q-panel mel-q-gemel"><h3>GEMEL</h3><p class="mel-note">no prediction yet '
                '(the linker is off or failed)</p></section>', None)
    if pred.error:
        return (f'<section class="mel-q-panel mel-q-gemel"><h3>GEMEL ({_esc(pred.linker)})</h3>'
                f'<p class="mel-error">failed: {_esc(_clip(pred.error, 200))}</p></section>', None)
    details = _details(pred)
    probs, calibrated, tooltip = _task_confidences(pred, "gemel", calibrations)
    entity = pred.entity_id if pred.entity_id not in (None, NIL) else None
    p = next((q for c, q in zip(pred.candidates, probs, strict=True) if c.get("id") == entity), None)
    if entity is None:
        answer = ('<div class="mel-q-entity"><b>NIL</b> <span class="mel-note">(no KB entity)</span></div>'
                  + _nil_reason(details))
    else:
        answer = (f'<div class="mel-q-entity"><b>{_esc(pred.entity_name)}</b> <code>{_esc(entity)}</code> '
                  f'<span class="mel-q-p" title="{_attr(tooltip)}" data-p="{_attr(p)}">p {_pct(p)}</span></div>'
                  f'{_description_html(describe(entity), "div")}'
                  f'<div class="mel-note mel-q-plabel">p: {_p_label(calibrated, tooltip)}</div>')
    extra = []
    if isinstance(details, GemelDetails):
        if details.generated is not None:
            extra.append(f'<div class="mel-note">generated: “{_esc(_clip(details.generated, 80))}”</div>')
        demos = list(reversed(details.demonstrations))[:MAX_DEMOS_SHOWN]  # most similar first
        if demos:
            items = "".join(f'<li>{_esc(_clip(d.mention, 30))} → {_esc(_clip(d.gold_name, 40))} '
                            f'<span class="mel-note">{d.similarity:.2f}</span></li>' for d in demos)
            extra.append(f'<div class="mel-q-demos"><span class="mel-note">demonstrations (the {len(demos)} most '
                         f'similar of the {len(details.demonstrations)} in the prompt):</span><ol>{items}</ol></div>')
        elif details.demonstrations_note:
            extra.append(f'<div class="mel-note">{_esc(details.demonstrations_note)}</div>')
    return (f'<section class="mel-q-panel mel-q-gemel"><h3>GEMEL <kbd>Enter</kbd> <kbd>g</kbd></h3>{answer}'
            + "".join(extra) + "</section>", entity)


def _dim_panel(pred, describe, calibrations=None) -> tuple[str, list[str]]:
    if pred is None:
        return ('<section class="mel-q-panel mel-q-dim"><h3>DIM</h3><p class="mel-note">no prediction yet</p>'
                '</section>', [])
    if pred.error:
        return (f'<section class="mel-q-panel mel-q-dim"><h3>{_esc(pred.linker)}</h3>'
                f'<p class="mel-error">failed: {_esc(_clip(pred.error, 200))}</p></section>', [])
    details = _details(pred)
    kind = linker_kind(pred.linker)
    shown = pred.candidates[:MAX_DIM_SHOWN]
    probs, calibrated, tooltip = _task_confidences(pred, kind, calibrations)
    cue = ""
    if isinstance(details, DimDetails):
        if details.cue is not None and details.cue.text:
            cue = (f'<div class="mel-q-cue">expert cue: <b>{_esc(_clip(details.cue.text, 120))}</b> '
                   f'<span class="mel-note">({_esc(cue_source(details.cue.provider, details.cue.faces, details.cue.text))})</span></div>')
        elif not details.feature_mask.image:
            cue = '<div class="mel-q-cue mel-note">no image: no expert cue</div>'
    rows = []
    for i, (c, p) in enumerate(zip(shown, probs, strict=False)):  # probs: over all candidates, not only those shown
        key = (i + 1) % 10
        rows.append(f'<li class="mel-q-cand" data-action="accept_dim" data-index="{i}" '
                    f'data-entity-id="{_attr(c.get("id"))}" role="button" tabindex="-1">'
                    f'<kbd>{key}</kbd><span class="mel-q-name"><b>{_esc(c.get("name"))}</b> '
                    f'<code>{_esc(c.get("id"))}</code></span>'
                    f'{_description_html(describe(c.get("id")), "span")}'
                    f'<span class="mel-q-p" data-p="{_attr(p)}">{_pct(p)}</span></li>')
    label = "DIM" if kind == "dim" else f"{_esc(pred.linker)} (DIM unavailable)"
    note = f'<div class="mel-note mel-q-plabel">p: {_p_label(calibrated, tooltip)}</div>'
    if pred.entity_id in (None, NIL) and pred.candidates:  # NIL below the threshold: the candidates stay
        cue += '<div class="mel-q-entity"><b>NIL</b> <span class="mel-note">(no KB entity)</span></div>' + \
            _nil_reason(details)
    return (f'<section class="mel-q-panel mel-q-dim"><h3>{label} <kbd>1</kbd>–<kbd>0</kbd></h3>{cue}'
            f'<ol class="mel-q-cands">{"".join(rows) or "<li class=mel-note>no candidates</li>"}</ol>{note}</section>',
            [str(c.get("id")) for c in shown])


ACTIONS_BAR = [("accept_gemel", "Enter / g", "Accept GEMEL"), ("nil", "n", "NIL"), ("skip", "s", "Skip"),
               ("undo", "u", "Undo"), ("back", "←", "Back"), ("forward", "→", "Forward"),
               ("search", "/", "Search KB"), ("flag", "x", "Flag"), ("help", "h", "Help")]


def _actions_bar() -> str:
    buttons = "".join(f'<button type="button" class="mel-q-btn" data-action="{a}"><kbd>{_esc(k)}</kbd> {_esc(t)}'
                      f"</button>" for a, k, t in ACTIONS_BAR)
    return f'<nav class="mel-q-actions" aria-label="decisions">{buttons}</nav>'


def render_message(message: str = "", ok: bool = True) -> str:
    if not message:
        return '<span id="mel-q-ack" class="mel-q-ack" role="status" aria-live="polite"></span>'
    cls = "ok" if ok else "err"
    return f'<span id="mel-q-ack" class="mel-q-ack {cls}" role="status" aria-live="polite">{_esc(message)}</span>'


def render_task(view, *, project: str, message: str = "", ok: bool = True, nonce: str = "",
                undo_id: int | None = None, describe=lambda entity_id: "", empty: str = "",
                calibrations=None) -> str:
    """The task screen of a TaskView (None: nothing left). `describe(entity_id)` gives a KB
    description; `nonce` is the token of the command this answers (the page unlocks on it).
    `empty`: why there is no task, when not because everything is decided (the message says more).
    `calibrations` ({linker name: mel Calibration}, e.g. LinkService.calibrations()): probabilities
    for stored predictions whose candidates do not carry them, and the tooltip saying how."""
    common = f'data-project="{_attr(project)}" data-nonce="{_attr(nonce)}"'
    if view is None and empty:
        return (f'<div id="mel-q-view" class="mel-q" data-state="none" data-task-id="" {common}>'
                f'<div class="mel-q-bar">{render_message(message, ok)}</div>'
                f'<div class="mel-q-done"><h3>No task for you in {_esc(project)}: {_esc(empty)}.</h3></div></div>')
    if view is None:
        return (f'<div id="mel-q-view" class="mel-q" data-state="done" data-task-id="" {common}>'
                f'<div class="mel-q-bar">{render_message(message, ok)}</div>'
                f'<div class="mel-q-done"><h3>Nothing left for you in {_esc(project)}.</h3>'
                f'<p>Every task assigned to you is decided. <kbd>←</kbd> goes back through your decisions; '
                f'<kbd>u</kbd> undoes the last one.</p></div>{_actions_bar()}</div>')
    task = view.task
    m = task.mention
    gemel_pred, dim_pred = split_predictions(view)
    gemel_html, gemel_entity = _gemel_panel(gemel_pred, describe, calibrations)
    dim_html, dim_ids = _dim_panel(dim_pred, describe, calibrations)
    if gemel_pred is None or dim_pred is None or not dim_ids:
        agree = ""
    elif gemel_entity is not None and gemel_entity == dim_ids[0]:
        agree = '<div class="mel-q-agree yes" id="mel-q-agree">✓ GEMEL and DIM agree</div>'
    else:
        agree = '<div class="mel-q-agree no" id="mel-q-agree">≠ GEMEL and DIM disagree: look closely</div>'
    prog = view.progress
    share = prog.total if prog.annotator_share is None else prog.annotator_share
    progress = (f'<span class="mel-q-progress" id="mel-q-progress" title="tasks you decided / assigned to you; '
                f'tasks decided by enough annotators / in the project">you <b>{prog.annotator_done} / {share}</b> · '
                f'project <b>{prog.project_done} / {prog.total}</b>'
                + (f" · {prog.annotator_skipped} skipped" if prog.annotator_skipped else "") + "</span>")
    if view.history_index is not None:
        d = view.decision
        what = ACTION_TEXT.get(d.action, d.action) + (f": {d.entity_name or d.entity_id}" if d.action in
                                                       ("accept_gemel", "accept_dim", "search") else "")
        where = (f'<span class="mel-q-pos hist">history {view.history_index + 1} / {view.history_length} · '
                 f'you decided {_esc(what)}; a key changes it</span>')
    elif view.review_note:  # sent back by a reviewer: not new; the note below says what it is
        where = ""
    else:
        where = '<span class="mel-q-pos">new task</span>'
    notes = []
    if view.review_note:
        notes.append(f'<div class="mel-q-review">sent back by a reviewer: {_esc(view.review_note)}</div>')
    for f in view.flags:
        notes.append(f'<div class="mel-note">you flagged this: {_esc(_clip(f.comment, 120))}</div>')
    uri = image_data_uri(m.image) if m.image else None
    image = (f'<img class="mel-q-img" src="{uri}" alt="the task\'s image">' if uri
             else '<div class="mel-q-noimg">no image</div>')
    pred_ids = json.dumps(view.prediction_ids)
    data = (f'data-state="task" data-task-id="{_attr(task.id)}" {common} data-prediction-ids="{_attr(pred_ids)}" '
            f'data-gemel-entity="{_attr(gemel_entity or "")}" '
            f'data-gemel-prediction="{_attr(gemel_pred.id if gemel_pred else "")}" '
            f'data-dim-ids="{_attr(json.dumps(dim_ids))}" data-dim-prediction="{_attr(dim_pred.id if dim_pred else "")}" '
            f'data-undo-id="{_attr(undo_id or "")}"')
    return (f'<div id="mel-q-view" class="mel-q" {data}>'
            f'<div class="mel-q-bar">{progress}{where}{render_message(message, ok)}</div>'
            f'<div class="mel-q-main"><div class="mel-q-item">{image}{_highlight(m.caption, m.start, m.end)}'
            f'<div class="mel-q-meta">task <code>{_esc(task.id)}</code> · {_esc(_clip(task.source_record, 40))}</div>'
            f'{"".join(notes)}{_actions_bar()}</div>'
            f'<div class="mel-q-answers">{agree}<div class="mel-q-cols">{gemel_html}{dim_html}</div></div></div>'
            f'</div>')


def render_search_results(entities) -> str:
    if not entities:
        return '<div class="mel-note" id="mel-q-found">nothing found</div>'
    rows = "".join(f'<li><button type="button" class="mel-q-pick" data-action="search" data-entity-id="{_attr(e.id)}">'
                   f'<b>{_esc(e.name)}</b> <code>{_esc(e.id)}</code> <span class="mel-q-desc">'
                   f'{_esc(_clip(e.description, 100))}</span></button></li>' for e in entities)
    return (f'<div id="mel-q-found"><span class="mel-note">Tab or ↓ to a result, Enter (or a click) links the task to it'
            f'</span><ol class="mel-q-results">{rows}</ol></div>')


def render_import_report(report) -> str:
    malformed = "".join(f"<li>{_esc(m)}</li>" for m in report.malformed[:50])
    more = len(report.malformed) - 50
    return (f'<div class="mel-panel" id="mel-import-report"><b>{_esc(report.project)}</b>: '
            f'{report.n_imported:,} tasks imported, {report.n_already_present:,} already present, '
            f'{report.n_malformed:,} malformed records ({report.n_read:,} read)'
            + (f'<details open><summary>malformed records</summary><ol>{malformed}</ol>'
               + (f"<p>... and {more:,} more</p>" if more > 0 else "") + "</details>" if malformed else "")
            + "</div>")


def render_preannotation(status: dict, state: str) -> str:
    parts = []
    for name, s in status.items():
        pct = 100 * s.done / s.total if s.total else 100
        parts.append(f'<div class="mel-q-bargraph"><span>{_esc(name)} {s.done:,} / {s.total:,}</span>'
                     f'<progress max="{max(s.total, 1)}" value="{s.done}">{pct:.0f}%</progress></div>')
    return f'<div class="mel-panel" id="mel-preannotate-status"><b>{_esc(state)}</b>{"".join(parts)}</div>'


__all__ = ["render_generator", "render_cue", "render_ranker_note", "candidate_rows", "candidate_headers",
           "candidate_table", "P_HEADERS", "candidate_key", "candidate_choices", "refusal_html", "confidences",
           "generator_title", "gallery_items",
           "counter_html", "status_html", "render_task", "render_search_results", "render_import_report",
           "render_preannotation", "probabilities", "image_data_uri", "split_predictions"]
