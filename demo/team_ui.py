"""The team screens of the annotation app (issue #12): Review (reviewers) and Dashboard (admins
and reviewers), with the admins' project settings and project export.

    team = Team(lambda: service.store, access, lambda: service.kb,
                reviewers=parse_reviewers(os.environ), vault=demo.mel_vault)
    with gr.Tabs() as tabs:
        with gr.Tab("Link"):
            ...
        build_team_tabs(team, tabs)          # adds the "Review" and "Dashboard" tabs
    add_team_api(team)                       # /review_items, /review_finalize, ... (outside the Tabs)

    demo = build_team_app("data/app", users={"rita": "pw"}, reviewers={"rita"})   # only these tabs (tests)
    app = launch_team_app(data_dir, users=..., admins=..., reviewers=..., kb_path=...)  # on 127.0.0.1

Roles (`Team`): the logged-in user comes from the request (demo.ui.Access: the Gradio login, the HF
login, or "local" without a login), never from a field the client sends. Reviewers are MEL_REVIEWERS
(`parse_reviewers`); admins MEL_ADMINS; locally without a login, "local" is both. Every handler
checks the role on the server: a tab hidden in the browser is a convenience, not the check.

- Review (reviewers): the tasks where the annotators disagree or that are flagged (and, on request,
  the reviewed ones), each with every annotator's choice, both models' answers, the flags and the
  review history. The final label is one of the choices (keys 1-9, then f), a KB search result, or
  NIL (n); or the task goes back to its annotators with a comment (b). Every click carries its own
  token (a repeated click saves once) and the ids of the decisions on screen (a change since is
  refused and the task redrawn). The ReviewAck is shown. j / k: next / previous task; /: search.
- Dashboard (admins and reviewers): progress, decisions per hour, seconds per task, model
  acceptance and agreement (annotations.dashboard figures, as gr.Plot), the agreement and
  per-annotator tables, refreshed every REFRESH_SECONDS while the tab is shown (only when
  something changed in the database).
- Admins: the project settings (k = annotations per task, the team) and the project export
  (format, --min-agreement, --reviewed-only), downloaded through the admin's one-time link
  (demo.ui.DownloadVault), never through Gradio's shared file cache.

API (gradio_client), each refused unless the logged-in user has the role:
    /review_items(project, include_reviewed) -> [task dict]            reviewers
    /review_task(project, task_id) -> task dict                         reviewers
    /review_finalize(project, task_id, entity_id, token, seen_decision_ids, seen_review_id, comment)
    /review_send_back(project, task_id, comment, token, seen_decision_ids, seen_review_id)
    /team_dashboard(project) -> the dashboard's numbers                 admins and reviewers
    /project_settings(project) -> settings; /set_project_settings(project, annotations_per_task, annotators)
    /team_export(project, format, min_agreement, reviewed_only) -> {summary, download}   admins
"""
from __future__ import annotations

import dataclasses
import html
import json
import logging
import re
import secrets
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from annotations.dashboard import dashboard_data, figures, to_json
from annotations.export import FORMATS, export_corrections
from annotations.projects import get_project, list_projects, update_settings
from annotations.queue import StaleTaskError
from annotations.review import ReviewItem, ReviewQueue
from annotations.store import AnnotationStore, NotAllowedError
from mel.errors import InputError, MELError
from mel.types import NIL, check_typed_text

from .render import refusal_html
from .spans import highlight_html

try:  # Access and guarded live in demo/access.py (split out of demo/ui.py)
    from .access import Access, guarded
except ImportError:  # pragma: no cover - a tree from before that split
    from .ui import Access, guarded

log = logging.getLogger(__name__)

REVIEW_TAB, DASHBOARD_TAB = "Review", "Dashboard"
REFRESH_SECONDS = 10
MAX_QUERY_CHARS = 200
MAX_LIST = 500            # review rows listed at once (the queue order; the rest after these are done)
MAX_TEAM = 200            # names in a project's team
CSS_FILE = Path(__file__).resolve().parent / "assets" / "team.css"
ACTION_WORDS = {"accept_gemel": "accepted GEMEL", "accept_dim": "accepted DIM", "search": "KB search",
                "nil": "NIL", "skip": "skipped"}


def parse_reviewers(env) -> frozenset[str]:
    """MEL_REVIEWERS="rita,sam" (from `env`, a mapping such as os.environ) -> frozenset({"rita", "sam"}).
    Names are the login names (MEL_AUTH users or HF usernames); empty entries are ignored."""
    text = env.get("MEL_REVIEWERS", "") or ""
    names = []
    for item in text.split(","):
        name = item.strip()
        if not name:
            continue
        if len(name) > 200 or any(c in name for c in ":\n\r\t"):
            raise SystemExit(f"MEL_REVIEWERS must be comma-separated login names; {name[:40]!r} is not one")
        names.append(name)
    return frozenset(names)


# -- roles ------------------------------------------------------------------------------------------
@dataclass
class Team:
    """What the team tabs need: the store and KB (getters, as the app loads them after building the
    UI), who is who (Access + reviewers), and the admins' one-time download vault."""

    store_getter: Callable[[], AnnotationStore | None]
    access: Access
    kb_getter: Callable[[], Any] = lambda: None
    reviewers: frozenset[str] = field(default_factory=frozenset)
    vault: Any = None      # demo.ui.DownloadVault (the app's: demo.mel_vault); a new one when None

    def __post_init__(self):
        self.reviewers = frozenset(self.reviewers) | frozenset(getattr(self.access, "reviewers", ()) or ())
        if self.vault is None:
            self.vault = _download_vault()

    # who
    def user(self, request: gr.Request | None, profile: gr.OAuthProfile | None = None) -> str | None:
        return self.access.annotator(request, profile)

    def is_reviewer(self, user: str | None) -> bool:
        if not user:
            return False
        if self.access.mode == "open":
            return user == self.access.open_annotator  # the person at the machine owns the data
        return user in self.reviewers

    def is_admin(self, user: str | None) -> bool:
        return self.access.is_admin(user)

    def can_watch(self, user: str | None) -> bool:
        return self.is_reviewer(user) or self.is_admin(user)

    def require_reviewer(self, user: str | None) -> str:
        if not self.is_reviewer(user):
            raise NotAllowedError(f"{user or 'this session'} is not a reviewer: only reviewers (MEL_REVIEWERS) see "
                                  f"the annotators' decisions and set final labels; nothing was shown or saved")
        return user

    def require_watcher(self, user: str | None) -> str:
        if not self.can_watch(user):
            raise NotAllowedError(f"{user or 'this session'} may not see the dashboard: it is for admins "
                                  f"(MEL_ADMINS) and reviewers (MEL_REVIEWERS)")
        return user

    def require_admin(self, user: str | None) -> str:
        if not self.is_admin(user):
            raise NotAllowedError(f"{user or 'this session'} is not an admin: project settings and exports need "
                                  f"the admin role (MEL_ADMINS); nothing was changed")
        return user

    # data
    def store(self) -> AnnotationStore:
        store = self.store_getter()
        if store is None:
            raise InputError("the annotation database is not open yet; try again in a moment")
        return store

    def kb(self):
        return self.kb_getter()

    def projects(self) -> list[str]:
        return [p.name for p in list_projects(self.store())]

    def review(self, user: str, project: str) -> ReviewQueue:
        return ReviewQueue(self.store(), _project_name(project), reviewer=user, is_reviewer=self.is_reviewer(user),
                           kb=self.kb())

    def search(self, query: str, k: int = 10) -> list:
        """KB entities for a query: exact name/alias matches first, then BM25 (as the Link tab)."""
        if query is None:
            query = ""
        if not isinstance(query, str) or len(query) > MAX_QUERY_CHARS:
            raise InputError(f"the search query must be text of at most {MAX_QUERY_CHARS} characters")
        check_typed_text(query, "search query")
        query, kb = query.strip(), self.kb()
        if not query:
            return []
        if kb is None:
            raise InputError("no KB is loaded: pick one of the choices or NIL")
        idxs: list[int] = []
        for idx, _ in list(kb.lookup_name(query)) + list(kb.search_bm25(query, k=k)):
            if idx not in idxs:
                idxs.append(idx)
        return kb.entities_at(idxs[:k])


def _download_vault():
    # imported here: demo/ui.py builds the whole app and may import this module at its top
    from .ui import DownloadVault
    return DownloadVault()


def _project_name(project) -> str:
    if not isinstance(project, str) or not project.strip():
        raise InputError("pick a project first")
    if len(project) > 200:
        raise InputError("the project name is longer than 200 characters")
    return project


def _token(token) -> str:
    """The click's token (set by the browser for every click); a fresh one when a client sent none."""
    if token is None or (isinstance(token, str) and not token.strip()):
        return f"srv-{uuid.uuid4().hex}"
    if not isinstance(token, str) or len(token) > 200:
        raise InputError("the click token must be text of at most 200 characters")
    return token


def _ids(values) -> list[int] | None:
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values) or len(values) > 1000:
        raise InputError("seen_decision_ids must be the list of decision ids the screen showed (review_task's "
                         "decision_ids)")
    return list(values)


def _review_id(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise InputError("seen_review_id must be the review id the screen showed (review_task's review_id) or empty")
    return int(value)


# -- what the review screen and API show -------------------------------------------------------------
def item_dict(item: ReviewItem, project: str) -> dict:
    """A task as the review screen shows it, as JSON-ready data (the review API's answer)."""
    m, label = item.task.mention, item.label
    return {
        "project": project, "task_id": item.task.id, "position": item.task.position, "caption": m.caption,
        "mention": m.text, "start": m.start, "end": m.end, "has_image": bool(item.task.image_sha256),
        "reasons": list(item.reasons), "status": label.status, "required": label.required,
        "decisions": [{"annotator": d.annotator, "label": d.label, "entity_name": d.entity_name, "action": d.action,
                       "decided_at": d.created, "seconds_on_screen": _seconds(d.shown_at, d.created)}
                      for d in label.decisions],
        "predictions": {name: {"entity_id": p.entity_id, "entity_name": p.entity_name, "score": p.score,
                               "error": p.error, "candidates": [{"id": c.get("id"), "name": c.get("name"),
                                                                 "score": c.get("score")} for c in p.candidates[:5]]}
                        for name, p in item.predictions.items()},
        "flags": [{"annotator": f.annotator, "comment": f.comment, "created": f.created,
                   "resolved_by": f.resolved_by} for f in item.flags],
        "reviews": [{"id": r.id, "reviewer": r.reviewer, "action": r.action, "entity_id": r.entity_id,
                     "entity_name": r.entity_name, "comment": r.comment, "created": r.created} for r in item.reviews],
        "final_label": label.final_label, "final_name": label.final_name, "label_source": label.source,
        "decision_ids": list(item.decision_ids), "review_id": item.review_id,
    }


def _seconds(start: str | None, end: str) -> float | None:
    from datetime import datetime
    if not start:
        return None
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ"
    try:
        return round((datetime.strptime(end, fmt) - datetime.strptime(start, fmt)).total_seconds(), 1)
    except ValueError:
        return None


def choices_of(item: ReviewItem) -> list[tuple[str, str]]:
    """The final labels on offer for a task, as (label, entity id): the annotators' labels (most chosen
    first), then each model's answer, then DIM's next candidates; NIL only when someone chose it."""
    names: dict[str, str] = {}
    who: dict[str, list[str]] = {}
    for d in item.label.decisions:
        names.setdefault(d.label, d.entity_name)
        who.setdefault(d.label, []).append(d.annotator)
    order = sorted(who, key=lambda x: (-len(who[x]), list(who).index(x)))
    for name, p in item.predictions.items():
        if p.error is None:
            answer = p.entity_id or NIL
            names.setdefault(answer, p.entity_name or "")
            if answer not in order:
                order.append(answer)
            who.setdefault(answer, []).append(name.upper())
    dim = item.predictions.get("dim")
    for c in (dim.candidates[1:4] if dim is not None and dim.error is None else []):
        if c.get("id") and c["id"] not in order:
            order.append(c["id"])
            names.setdefault(c["id"], c.get("name") or "")
            who.setdefault(c["id"], []).append("DIM candidate")
    out = []
    for i, entity_id in enumerate(order[:9], 1):
        shown = "NIL: not in the KB" if entity_id == NIL else f"{names.get(entity_id) or entity_id} ({entity_id})"
        out.append((f"{i}. {shown} · {', '.join(who.get(entity_id, []))}", entity_id))
    return out


def _esc(value) -> str:
    return html.escape("" if value is None else str(value))


def _badge(kind: str, text: str) -> str:
    return f'<span class="mel-team-badge {_esc(kind)}">{_esc(text)}</span>'


REASON_WORDS = {"disagreement": "annotators disagree", "flagged": "flagged", "reviewed": "reviewed"}


def _reasons_now(item: ReviewItem) -> list[str]:
    """Why a task is in the review list now: a settled one (a reviewer set its final label, shown with
    "also reviewed tasks") is no longer a disagreement, and "reviewed" is said by the caller."""
    return [r for r in item.reasons if not (item.label.reviewed and r in ("disagreement", "reviewed"))]


def task_html(item: ReviewItem, index: int | None = None, total: int | None = None) -> str:
    """The review panel for one task; every piece of text escaped."""
    m, label = item.task.mention, item.label
    where = f"task {index + 1} of {total} to review · " if index is not None and total else ""
    reasons = (["reviewed"] if label.reviewed else []) + _reasons_now(item)
    head = (" ".join(_badge(r, REASON_WORDS.get(r, r)) for r in reasons)
            + f' <span class="mel-team-note">{where}position {item.task.position + 1} · id {_esc(item.task.id)} · '
            f'status {_esc(label.status.replace("_", " "))} · {len(label.decisions)} of {label.required} '
            f'decisions</span>')
    rows = []
    for d in label.decisions:
        what = "NIL (not in the KB)" if d.label == NIL else f"<b>{_esc(d.entity_name or d.label)}</b> <code>{_esc(d.label)}</code>"
        secs = _seconds(d.shown_at, d.created)
        rows.append(f'<tr><td class="mel-team-who">{_esc(d.annotator)}</td><td>{what}</td>'
                    f'<td>{_esc(ACTION_WORDS.get(d.action, d.action))}</td>'
                    f'<td class="mel-team-note">{_esc(d.created[:16].replace("T", " "))} UTC'
                    + (f" · {secs:.0f} s on screen" if secs is not None else "") + "</td></tr>")
    if not label.decisions:
        rows.append('<tr><td colspan="4" class="mel-team-note">no standing decision (sent back, or not decided '
                    'yet)</td></tr>')
    for name in ("gemel", "dim", *[n for n in item.predictions if n not in ("gemel", "dim")]):
        p = item.predictions.get(name)
        if p is None:
            rows.append(f'<tr class="model"><td class="mel-team-who">{_esc(name.upper())}</td>'
                        f'<td colspan="3" class="mel-team-note">no prediction stored</td></tr>')
            continue
        if p.error:
            answer = f'<span class="mel-team-warn">failed: {_esc(p.error)}</span>'
        elif p.entity_id in (None, NIL):
            answer = "NIL (no entity)"
        else:
            answer = f"<b>{_esc(p.entity_name or p.entity_id)}</b> <code>{_esc(p.entity_id)}</code>"
        more = ""
        if name == "dim" and p.candidates[1:]:
            more = "next: " + ", ".join(_esc(c.get("name") or c.get("id")) for c in p.candidates[1:4])
        score = f"score {p.score:.3f}" if isinstance(p.score, (int, float)) else ""
        rows.append(f'<tr class="model"><td class="mel-team-who">{_esc(name.upper())}</td><td>{answer}</td>'
                    f'<td class="mel-team-note">{score}</td><td class="mel-team-note">{more}</td></tr>')
    flags = "".join(f'<div class="mel-team-flag"><b>{_esc(f.annotator)}</b> flagged: “{_esc(f.comment)}”'
                    + (f' <span class="mel-team-note">(resolved by {_esc(f.resolved_by)})</span>' if f.resolved_by
                       else "") + "</div>" for f in item.flags)
    history = "".join(
        f'<div class="mel-team-history"><b>{_esc(r.reviewer)}</b> '
        + ("sent it back" if r.action == "send_back" else
           f"set the final label {'NIL' if r.entity_id == NIL else _esc(r.entity_name or r.entity_id)}")
        + (f": “{_esc(r.comment)}”" if r.comment else "")
        + f' <span class="mel-team-note">{_esc(r.created[:16].replace("T", " "))} UTC</span></div>'
        for r in item.reviews)
    return (f'<div class="mel-team-task" id="mel-review-task" data-task="{_esc(item.task.id)}">'
            f'<div class="mel-team-head">{head}</div>{highlight_html(m.caption, m.start, m.end)}'
            f'<table class="mel-team-choices"><tr><th>who</th><th>label</th><th>how</th><th>when</th></tr>'
            + "".join(rows) + "</table>" + flags + history + "</div>")


def _image(item: ReviewItem):
    if not item.task.mention.image:
        return None
    try:
        from mel.imageio import load_image
        image = load_image(item.task.mention.image)
        image.thumbnail((480, 480))
        return image
    except Exception:  # a missing or unreadable image: the task is still reviewable
        return None


def counts_html(counts: dict[str, int], project: str) -> str:
    parts = [f"<b>{counts['to_review']}</b> to review"] + [
        f"{counts.get(s, 0)} {s.replace('_', ' ')}" for s in ("disagreed", "agreed", "reviewed", "sent_back", "open")]
    return f'<div class="mel-team-note" id="mel-review-counts">{_esc(project)}: ' + " · ".join(parts) + "</div>"


def list_rows(items: list[ReviewItem]) -> list[list]:
    rows = []
    for it in items:
        m = it.task.mention
        labels = []
        for d in it.label.decisions:
            labels.append(f"{d.annotator}: {'NIL' if d.label == NIL else (d.entity_name or d.label)}")
        rows.append([it.task.position + 1, m.text, _why(it), "; ".join(labels)])
    return rows


def _why(item: ReviewItem) -> str:
    """The list's "why": an open task by its reasons; a settled one (a reviewer set its final label,
    listed with "also reviewed tasks") by its final label, not by the disagreement it had."""
    words = [REASON_WORDS.get(r, r) for r in _reasons_now(item)]
    if item.label.reviewed:
        final = item.label.final_label
        words.insert(0, f"settled: {'NIL' if final == NIL else (item.label.final_name or final)}")
    return ", ".join(words)


def ack_html(ack) -> str:
    return f'<div class="mel-team-ok" id="mel-review-ack-ok">{_esc(ack.describe())}</div>'


# -- the review tab -----------------------------------------------------------------------------------
TOKEN_JS = """
(...args) => {
  const bytes = new Uint8Array(16);
  (window.crypto || window.msCrypto).getRandomValues(bytes);
  args[args.length - 1] = 'click-' + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
  return args;
}
"""

# Installed once per page by a load event (no launch option needed). Keys act only while the review
# panel is on screen, and then before any other page-wide shortcut (capture phase, propagation stopped).
KEYS_JS = """
() => {
  if (window.__melTeam) return;
  window.__melTeam = true;
  const style = document.createElement('style');
  style.textContent = %s;
  document.head.appendChild(style);
  const shown = (id) => { const el = document.getElementById(id); return el && el.offsetParent !== null ? el : null; };
  const press = (id) => {
    const el = shown(id);
    const b = el && (el.tagName === 'BUTTON' ? el : el.querySelector('button'));
    if (b && !b.disabled) { b.click(); return true; }
    return false;
  };
  const keys = {f: 'mel-review-final', n: 'mel-review-nil', j: 'mel-review-next', k: 'mel-review-prev'};
  window.addEventListener('keydown', (e) => {
    if (!shown('mel-review-panel')) return;
    const t = e.target;
    const typing = t && (t.tagName === 'TEXTAREA' || t.isContentEditable ||
                         (t.tagName === 'INPUT' && !['radio', 'checkbox', 'button'].includes(t.type)));
    let done = false;
    if (typing) {
      if (e.key === 'Enter' && (e.ctrlKey || e.metaKey) && t.closest('#mel-review-comment')) done = press('mel-review-send-back');
    } else if (!(e.ctrlKey || e.metaKey || e.altKey)) {
      if (keys[e.key]) done = press(keys[e.key]);
      else if (e.key === 'b') {
        const c = document.querySelector('#mel-review-comment textarea');
        if (c && !c.value.trim()) { c.focus(); done = true; } else done = press('mel-review-send-back');
      } else if (e.key === '/') {
        const s = document.querySelector('#mel-review-search textarea, #mel-review-search input');
        if (s) { s.focus(); done = true; }
      } else if (/^[1-9]$/.test(e.key)) {
        const r = document.querySelectorAll('#mel-review-choices input[type=radio]')[Number(e.key) - 1];
        if (r) { r.click(); done = true; }
      }
    }
    if (done) { e.preventDefault(); e.stopImmediatePropagation(); }
  }, true);
}
"""


def _install_page_js() -> None:
    root = _root()
    if not getattr(root, "_mel_team_js", False):
        root._mel_team_js = True
        root.load(None, None, None, js=KEYS_JS % json.dumps(CSS_FILE.read_text()))


@dataclass
class ReviewTaskPanel:
    """The Review tab's main column: the last acknowledgement, the task, its choices and the buttons."""
    ack: gr.HTML
    task: gr.HTML
    choices: gr.Radio
    final: gr.Button
    nil: gr.Button
    prev: gr.Button
    nxt: gr.Button
    search: gr.Textbox
    search_btn: gr.Button
    results: gr.Radio
    pick: gr.Button
    comment: gr.Textbox
    send_back: gr.Button


@dataclass
class ReviewSidePanel:
    """The Review tab's side column: the project picker, the counts, the image and the list."""
    project: gr.Dropdown
    counts: gr.HTML
    include: gr.Checkbox
    refresh: gr.Button
    image: gr.Image
    listing: gr.Dataframe


@dataclass
class ReviewScreen:
    """The Review tab's components (build_review_tab)."""
    tab: gr.Tab
    state: gr.State          # the project, its review order and the task on screen (with the ids seen)
    main: ReviewTaskPanel
    side: ReviewSidePanel
    token: gr.Textbox        # a fresh token per click (TOKEN_JS)

    @property
    def drawn(self) -> list:
        """What every draw of the tab updates, in the order of draw()'s answer."""
        return [self.state, self.side.counts, self.side.listing, self.main.task, self.main.choices, self.side.image,
                self.main.results, self.main.search, self.main.ack]

    def by_name(self) -> dict:
        """The components build_review_tab returns (by name; "tab" is the gr.Tab)."""
        return {"tab": self.tab, "project": self.side.project, "include": self.side.include,
                "counts": self.side.counts, "task": self.main.task, "choices": self.main.choices,
                "image": self.side.image, "listing": self.side.listing, "ack": self.main.ack, "state": self.state}


def build_review_tab(team: Team) -> dict:
    """The Review tab (call inside a gr.Tabs). Returns its components by name ("tab" is the gr.Tab);
    it shows itself to reviewers at page load."""
    _install_page_js()
    with gr.Tab(REVIEW_TAB, id="mel-tab-review", visible=False, elem_id="mel-tab-review") as tab:
        state = gr.State({})
        # At 1366x768 the acknowledgement of a save (on top), the task, its choices and the buttons all
        # fit without scrolling: the project picker, the counts, the image and the list go on the right.
        with gr.Column(elem_id="mel-review-panel"):
            with gr.Row(equal_height=False):
                main = _review_task_panel()
                side = _review_side_panel()
        token = gr.Textbox(visible=False, elem_id="mel-review-token")
    screen = ReviewScreen(tab, state, main, side, token)
    draw = _review_drawer(team)
    _wire_review_navigation(team, screen, draw)
    _wire_review_saves(team, screen, draw)
    _wire_review_search(team, screen)
    return screen.by_name()


def _review_task_panel() -> ReviewTaskPanel:
    with gr.Column(scale=7):
        ack = gr.HTML(elem_id="mel-review-ack", min_height=0)   # what the last click saved, on top
        task = gr.HTML('<div class="mel-team-note">Pick a project: its tasks to review appear here.</div>',
                       elem_id="mel-review-task-box")
        choices = gr.Radio([], label="Final label: one of the choices (keys 1-9), then Set [f]",
                           elem_id="mel-review-choices")
        with gr.Row():
            final = gr.Button("Set final  [f]", variant="primary", elem_id="mel-review-final")
            nil = gr.Button("NIL  [n]", elem_id="mel-review-nil")
            prev = gr.Button("Previous  [k]", elem_id="mel-review-prev")
            nxt = gr.Button("Next  [j]", elem_id="mel-review-next")
        with gr.Row(equal_height=True):
            search = gr.Textbox(label="Search the KB  [/]", scale=4, max_length=MAX_QUERY_CHARS,
                                elem_id="mel-review-search")
            search_btn = gr.Button("Search", scale=1, elem_id="mel-review-search-btn")
        results = gr.Radio([], label="Search results", elem_id="mel-review-search-results")
        pick = gr.Button("Set final label: the selected search result", elem_id="mel-review-pick")
        with gr.Row(equal_height=True):
            comment = gr.Textbox(label="Comment (needed to send back; kept with a final label too)",
                                 lines=2, max_length=2000, scale=4, elem_id="mel-review-comment")
            send_back = gr.Button("Send back to the annotators  [b]", variant="stop", scale=1,
                                  elem_id="mel-review-send-back")
        gr.HTML('<div class="mel-team-keys">Keys (outside text boxes): <kbd>1</kbd>-<kbd>9</kbd> choose, '
                '<kbd>f</kbd> set final, <kbd>n</kbd> NIL, <kbd>b</kbd> send back (comment first), '
                '<kbd>/</kbd> search, <kbd>j</kbd>/<kbd>k</kbd> next/previous; Ctrl+Enter in the '
                'comment sends back.</div>')
    return ReviewTaskPanel(ack, task, choices, final, nil, prev, nxt, search, search_btn, results, pick, comment,
                           send_back)


def _review_side_panel() -> ReviewSidePanel:
    with gr.Column(scale=4):
        project = gr.Dropdown([], label="project", min_width=200, elem_id="mel-review-project")
        counts = gr.HTML(elem_id="mel-review-counts-box", min_height=0)
        with gr.Row(equal_height=True):
            include = gr.Checkbox(False, label="also reviewed tasks", elem_id="mel-review-include")
            refresh = gr.Button("Refresh", size="sm", elem_id="mel-review-refresh")
        image = gr.Image(label="image", interactive=False, height=220, visible=False,
                         elem_id="mel-review-image")
        listing = gr.Dataframe(headers=["#", "mention", "why", "choices"],
                               datatype=["number", "str", "str", "str"], interactive=False, wrap=True,
                               max_height=330, column_widths=["9%", "22%", "27%", "42%"],
                               label="To review (click a row to open it)", elem_id="mel-review-list")
    return ReviewSidePanel(project, counts, include, refresh, image, listing)


# -- the Review tab's events -------------------------------------------------------------------------
_REVIEW_EVENTS = dict(api_visibility="private", concurrency_limit=4, concurrency_id="review")


def _review_drawer(team: Team) -> Callable[..., tuple]:
    """draw(user, name, include_reviewed, task_id=None, after=None, note="", keep=None): the values of
    ReviewScreen.drawn for project `name`."""
    def draw(user: str, name: str, include_reviewed: bool, task_id: str | None = None, after: int | None = None,
             note: str = "", keep: str | None = None):
        """Everything the tab shows for `name`: the list, and `task_id` (else `keep` while it is still
        in the list, else the first task after position `after`, else the first). The state keeps the
        database's signature as it was before the list was read (what opening the tab compares with)."""
        review = team.review(user, name)
        signature = list(db_signature(team.store(), name))
        items = review.items(include_reviewed=bool(include_reviewed), limit=MAX_LIST)
        order = [it.task.id for it in items]
        chosen = None
        if task_id is not None:
            chosen = next((it for it in items if it.task.id == task_id), None) or review.item(task_id)
        elif items:
            chosen = (next((it for it in items if keep is not None and it.task.id == keep), None)
                      or next((it for it in items if after is not None and it.task.position > after), items[0]))
        st = {"project": name, "order": order, "include": bool(include_reviewed), "signature": signature}
        if chosen is None:
            body = ('<div class="mel-team-note" id="mel-review-empty">Nothing to review in this project: no '
                    'disagreement and no open flag.</div>')
            out = (body, gr.update(choices=[], value=None), gr.update(value=None, visible=False), _no_results(), "")
        else:
            index = order.index(chosen.task.id) if chosen.task.id in order else None
            st.update(task=chosen.task.id, position=chosen.task.position, decision_ids=list(chosen.decision_ids),
                      review_id=chosen.review_id)
            opts = choices_of(chosen)
            picture = _image(chosen)
            out = (task_html(chosen, index, len(order)), gr.update(choices=opts, value=None),
                   gr.update(value=picture, visible=picture is not None), _no_results(), "")
        return (st, counts_html(review.counts(), name), list_rows(items), *out, note)
    return draw


# A drawn task starts with no search results (and an empty search box, "" in draw's answer): a result
# clicked for the task before must never be picked as this one's final label.
def _no_results() -> dict:
    return gr.update(choices=[], value=None, label="Search results")


def _wire_review_navigation(team: Team, screen: ReviewScreen, draw: Callable[..., tuple]) -> None:
    """Picking a project (or the include box, or Refresh), a row of the list, Previous and Next."""
    drawn, side = screen.drawn, screen.side

    def nothing():  # one value per component of `drawn`, in its order
        return ({}, "", [], "", gr.update(choices=[], value=None), gr.update(value=None, visible=False),
                _no_results(), "", "")

    @guarded
    def on_project(name, include_reviewed, request: gr.Request, profile: gr.OAuthProfile | None = None):
        user = team.user(request, profile)
        if not name:
            return nothing()  # an empty project shows nothing, to anyone
        return draw(team.require_reviewer(user), name, include_reviewed)

    @guarded
    def on_open_row(st, include_reviewed, evt: gr.SelectData, request: gr.Request,
                    profile: gr.OAuthProfile | None = None):
        user = team.require_reviewer(team.user(request, profile))
        order = (st or {}).get("order") or []
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else None
        if not isinstance(row, int) or not 0 <= row < len(order):
            return tuple(gr.skip() for _ in drawn)
        return draw(user, st["project"], include_reviewed, order[row])

    def step(delta: int):
        @guarded
        def on_step(st, include_reviewed, request: gr.Request, profile: gr.OAuthProfile | None = None):
            user = team.require_reviewer(team.user(request, profile))
            if not (st or {}).get("project"):
                raise gr.Error("pick a project first")
            order = st.get("order") or []
            if not order:
                return draw(user, st["project"], include_reviewed)
            i = order.index(st["task"]) if st.get("task") in order else -1
            return draw(user, st["project"], include_reviewed, order[(i + delta) % len(order)])
        return on_step

    @guarded
    def on_opened(name, include_reviewed, st, request: gr.Request, profile: gr.OAuthProfile | None = None):
        """The tab was opened: what it shows is redrawn when the database changed since it was drawn
        (decisions, reviews, flags made elsewhere), keeping the task on screen while it is still to
        review (else the next one); one cheap query when nothing changed. The acknowledgement stays."""
        user = team.require_reviewer(team.user(request, profile))
        st = st or {}
        if not name:
            return tuple(gr.skip() for _ in drawn)
        same = st.get("project") == name and st.get("include") == bool(include_reviewed)
        if same and st.get("signature") == list(db_signature(team.store(), _project_name(name))):
            return tuple(gr.skip() for _ in drawn)
        out = draw(user, name, include_reviewed, keep=st.get("task") if same else None,
                   after=st.get("position") if same else None)
        return (*out[:-1], gr.skip())

    for trigger in (side.project.change, side.include.change, side.refresh.click):
        trigger(on_project, [side.project, side.include], drawn, **_REVIEW_EVENTS)
    screen.tab.select(on_opened, [side.project, side.include, screen.state], drawn, show_progress="hidden",
                      **_REVIEW_EVENTS)
    side.listing.select(on_open_row, [screen.state, side.include], drawn, **_REVIEW_EVENTS)
    screen.main.prev.click(step(-1), [screen.state, side.include], drawn, **_REVIEW_EVENTS)
    screen.main.nxt.click(step(+1), [screen.state, side.include], drawn, **_REVIEW_EVENTS)


def _review_refused(screen: ReviewScreen, message: str) -> tuple:
    """Nothing chosen, no comment...: said once, in the acknowledgement line (where the reviewer looks
    for "saved"); the task stays as it is and no other output is marked as failed."""
    return (*[gr.skip()] * (len(screen.drawn) - 1), refusal_html(message, "mel-review-refused"))


def _chosen(value) -> str:
    if not value:
        raise InputError("choose one of the choices first (keys 1-9), or search the KB, or set NIL; nothing was "
                         "saved")
    return value


def _picked(value) -> str:
    if not value:  # nothing is pre-selected in the results: the reviewer clicks the one they mean
        raise InputError("choose a result first: search the KB and click one of the results; nothing was saved")
    return value


def _clear_comment_once_saved(ack):
    return "" if 'id="mel-review-ack-ok"' in (ack or "") else gr.skip()


def _wire_review_saves(team: Team, screen: ReviewScreen, draw: Callable[..., tuple]) -> None:
    """Set final (a choice, a search result, or NIL) and Send back: saved with the click's token and
    the ids seen on screen, then the next task is drawn with the acknowledgement (or the task as it is
    now, when the screen was out of date)."""
    def save(st, include_reviewed, request, profile, act: Callable[[ReviewQueue, dict], Any]):
        user = team.require_reviewer(team.user(request, profile))
        if not (st or {}).get("task"):
            return _review_refused(screen, "open a task first (pick a project, or click a row of the list); "
                                           "nothing was saved")
        review = team.review(user, st["project"])
        try:
            saved = act(review, st)
        except StaleTaskError as exc:  # the screen was out of date: show the task as it is now
            return draw(user, st["project"], include_reviewed, st["task"],
                        note=f'<div class="mel-team-warn" id="mel-review-stale">{_esc(exc)}</div>')
        except InputError as exc:
            return _review_refused(screen, str(exc))
        return draw(user, st["project"], include_reviewed, after=st.get("position"), note=ack_html(saved))

    def finalize_with(entity_id_of: Callable[..., str]):
        @guarded
        def on_final(st, include_reviewed, value, comment, token, request: gr.Request,
                     profile: gr.OAuthProfile | None = None):
            def act(review, st):
                return review.finalize(st["task"], entity_id_of(value), token=_token(token), comment=comment or "",
                                       seen_decision_ids=st.get("decision_ids"), seen_review_id=st.get("review_id"))
            return save(st, include_reviewed, request, profile, act)
        return on_final

    @guarded
    def on_send_back(st, include_reviewed, comment, token, request: gr.Request, profile: gr.OAuthProfile | None = None):
        def act(review, st):
            return review.send_back(st["task"], comment=comment or "", token=_token(token),
                                    seen_decision_ids=st.get("decision_ids"), seen_review_id=st.get("review_id"))
        return save(st, include_reviewed, request, profile, act)

    main, state, include, token, drawn = screen.main, screen.state, screen.side.include, screen.token, screen.drawn
    saves = [
        main.final.click(finalize_with(_chosen), [state, include, main.choices, main.comment, token], drawn,
                         js=TOKEN_JS, **_REVIEW_EVENTS),
        main.pick.click(finalize_with(_picked), [state, include, main.results, main.comment, token], drawn,
                        js=TOKEN_JS, **_REVIEW_EVENTS),
        main.nil.click(finalize_with(lambda _: NIL), [state, include, main.choices, main.comment, token], drawn,
                       js=TOKEN_JS, **_REVIEW_EVENTS),
        main.send_back.click(on_send_back, [state, include, main.comment, token], drawn, js=TOKEN_JS,
                             **_REVIEW_EVENTS)]
    # a saved review clears the comment box (the next task needs its own); a refused or out-of-date
    # one keeps what the reviewer typed
    for saved in saves:
        saved.success(_clear_comment_once_saved, [main.ack], [main.comment], api_visibility="private",
                      queue=False, show_progress="hidden")


def _wire_review_search(team: Team, screen: ReviewScreen) -> None:
    """The KB search (button or Enter; reviewers only) fills the results a final label can be picked from."""
    @guarded
    def on_search(query, request: gr.Request, profile: gr.OAuthProfile | None = None):
        team.require_reviewer(team.user(request, profile))
        found = team.search(query)
        opts = [(f"{e.name} ({e.id}): {_clip(e.description, 90)}", e.id) for e in found]
        # nothing chosen until the reviewer clicks a result (as the Link tab): a pre-selected first
        # result let the pick button set a final label the reviewer never chose
        return gr.update(choices=opts, value=None,
                         label=f"Search results ({len(opts)})" if opts else "Search results: none found")

    main = screen.main
    for trigger in (main.search_btn.click, main.search.submit):
        trigger(on_search, [main.search], [main.results], api_visibility="private", concurrency_limit=2,
                concurrency_id="review-search")


def _clip(text: str, n: int) -> str:
    text = text or ""
    return text if len(text) <= n else text[: n - 1] + "…"


# -- the dashboard tab --------------------------------------------------------------------------------
PLOTS = ("progress", "throughput", "speed", "agreement", "acceptance")
FIGURE_INCHES = {"progress": (7.0, 3.2), "throughput": (7.0, 3.2), "acceptance": (7.0, 3.2), "speed": (7.0, 3.2),
                 "agreement": (5.4, 4.2)}


def _fmt_pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def summary_html(data) -> str:
    agreement, acc = data.agreement, data.acceptance
    cards = [
        ("tasks done", f"{data.progress.project_done} / {data.progress.total}",
         f"{data.status_counts.get('reviewed', 0)} reviewed · {data.status_counts.get('disagreed', 0)} in disagreement"),
        ("median time per task", "–" if data.median_seconds is None else f"{data.median_seconds:.0f} s",
         f"{sum(a.n_timed for a in data.annotators)} timed decisions"),
        ("Krippendorff's alpha", "–" if agreement.alpha is None else f"{agreement.alpha:.2f}",
         agreement.alpha_note or f"over {agreement.n_overlap} tasks with 2+ annotators"),
    ]
    for m in data.models:
        cards.append((f"{m.upper()} accepted", _fmt_pct(acc.rate(m)), f"of {acc.shown.get(m, 0)} decisions with its answer"))
    cards.append(("neither model", _fmt_pct(acc.neither_rate), f"of {acc.n} decisions"))
    body = "".join(f'<div class="mel-team-card"><div class="small">{_esc(t)}</div><div class="big">{_esc(v)}</div>'
                   f'<div class="small">{_esc(s)}</div></div>' for t, v, s in cards)
    return f'<div class="mel-team-cards" id="mel-dash-summary">{body}</div>'


def pair_rows(report) -> list[list]:
    return [[f"{p.annotator_a} / {p.annotator_b}", p.n_shared, _fmt_pct(p.observed),
             "n/a" if p.kappa is None else round(p.kappa, 3), p.note] for p in report.pairs]


def annotator_rows(data) -> list[list]:
    agree = {a.annotator: a for a in data.agreement.per_annotator}
    rows = []
    for a in data.annotators:
        g = agree.get(a.annotator)
        rows.append([a.annotator, a.decided, "" if a.share is None else a.share, a.skipped, a.nil,
                     "" if a.median_seconds is None else round(a.median_seconds, 1),
                     _fmt_pct(g.accuracy_final) if g else "–", _fmt_pct(g.accuracy_reviewed) if g else "–"])
    return rows


def db_signature(store: AnnotationStore, project: str) -> tuple:
    """Cheap: changes whenever anything the dashboard shows may have changed."""
    row = store.db.execute(
        "SELECT (SELECT max(id) FROM corrections), (SELECT count(*) FROM corrections WHERE undone_at IS NOT NULL "
        "OR returned_by IS NOT NULL), (SELECT max(id) FROM reviews), (SELECT count(*) FROM flags WHERE resolved_at "
        "IS NULL), (SELECT max(id) FROM predictions), (SELECT settings FROM projects WHERE name = ?), "
        "(SELECT count(*) FROM tasks)", (project,)).fetchone()
    return (project, *row)


def build_dashboard_tab(team: Team) -> dict:
    """The Dashboard tab (call inside a gr.Tabs), with the admins' settings and export box. Returns its
    components by name ("tab", "timer", ...); it shows itself to admins and reviewers at page load."""
    _install_page_js()
    c: dict[str, Any] = {}
    with gr.Tab(DASHBOARD_TAB, id="mel-tab-dashboard", visible=False, elem_id="mel-tab-dashboard") as tab:
        seen = gr.State(None)   # the database signature last drawn (nothing redrawn while it holds)
        with gr.Row(equal_height=False):
            project = gr.Dropdown([], label="project", scale=3, min_width=200, elem_id="mel-dash-project")
            with gr.Column(scale=2, min_width=160):
                updated = gr.HTML(elem_id="mel-dash-updated", min_height=0)
                refresh = gr.Button("Refresh now", size="sm", elem_id="mel-dash-refresh")
        summary = gr.HTML(elem_id="mel-dash-summary-box")
        plots = {}
        with gr.Row(equal_height=False):
            plots["progress"] = gr.Plot(label="progress", elem_id="mel-dash-progress", format="png", show_label=False)
            plots["throughput"] = gr.Plot(label="decisions per hour", elem_id="mel-dash-throughput", format="png", show_label=False)
        with gr.Row(equal_height=False):
            plots["acceptance"] = gr.Plot(label="model acceptance", elem_id="mel-dash-acceptance", format="png", show_label=False)
            plots["speed"] = gr.Plot(label="seconds per task", elem_id="mel-dash-speed", format="png", show_label=False)
        with gr.Row(equal_height=False):
            plots["agreement"] = gr.Plot(label="agreement", elem_id="mel-dash-agreement", format="png", scale=2, show_label=False)
            with gr.Column(scale=3):
                pairs = gr.Dataframe(headers=["pair", "shared tasks", "same label", "Cohen's kappa", "note"],
                                     datatype=["str", "number", "str", "str", "str"], interactive=False, wrap=True,
                                     label="Agreement per pair of annotators", elem_id="mel-dash-pairs")
                people = gr.Dataframe(headers=["annotator", "decided", "share", "skipped", "NIL", "median s",
                                               "agrees with final", "with reviewer"],
                                      datatype=["str", "number", "str", "number", "number", "str", "str", "str"],
                                      interactive=False, wrap=True, label="Per annotator", elem_id="mel-dash-people")
        with gr.Accordion("Admin: project settings and export", open=True, visible=False,
                          elem_id="mel-dash-admin") as admin_box:
            with gr.Row():
                k = gr.Number(label="annotations per task (k)", precision=0, minimum=1, maximum=50,
                              elem_id="mel-settings-k")
                team_box = gr.Textbox(label="team (comma-separated logins; empty: whoever asks first)", scale=3,
                                      max_length=MAX_TEAM * 40, elem_id="mel-settings-team")
                save_settings = gr.Button("Save settings", scale=1, elem_id="mel-settings-save")
            settings_note = gr.HTML(elem_id="mel-settings-note")
            with gr.Row():
                fmt = gr.Dropdown(list(FORMATS), value="jsonl", label="format", elem_id="mel-export-format")
                # no minimum/maximum here: Gradio would refuse 1.5 before the handler with an Error badge on
                # every output and a toast; export_project checks the range and on_export says it once
                min_agreement = gr.Number(None, label="--min-agreement (0-1; empty: no filter)", step=0.05,
                                          elem_id="mel-export-min-agreement")
                reviewed_only = gr.Checkbox(False, label="--reviewed-only", elem_id="mel-export-reviewed-only")
                export_btn = gr.Button("Export the project", variant="primary", elem_id="mel-export-project")
            export_link = gr.HTML(elem_id="mel-export-link")
            export_note = gr.HTML(elem_id="mel-export-note")
        timer = gr.Timer(REFRESH_SECONDS, active=False)
    c.update(tab=tab, timer=timer, project=project, summary=summary, plots=plots, pairs=pairs, people=people,
             admin_box=admin_box, k=k, team=team_box, export_link=export_link, export_note=export_note)

    outputs = [seen, summary, *(plots[p] for p in PLOTS), pairs, people, updated]

    def dashboard(user: str, name: str, last, force: bool):
        team.require_watcher(user)
        if not name:
            return tuple([None] + [gr.skip()] * (len(outputs) - 1))
        store = team.store()
        signature = db_signature(store, _project_name(name))
        stamp = f'<div class="mel-team-note">updated {time.strftime("%H:%M:%S")} · every {REFRESH_SECONDS} s ' \
                f'while this tab is open</div>'
        if not force and last is not None and list(signature) == list(last):
            return tuple([gr.skip()] * (len(outputs) - 1) + [stamp])
        data = dashboard_data(store, name)
        figs = figures(data)
        for key, size in FIGURE_INCHES.items():  # drawn for a half-width panel, its text at a readable size
            figs[key].set_size_inches(*size)
        return (list(signature), summary_html(data), *(figs[p] for p in PLOTS), pair_rows(data.agreement),
                annotator_rows(data), stamp)

    @guarded
    def on_refresh(name, request: gr.Request, profile: gr.OAuthProfile | None = None):
        return dashboard(team.user(request, profile), name, None, True)

    @guarded
    def on_tick(name, last, request: gr.Request, profile: gr.OAuthProfile | None = None):
        return dashboard(team.user(request, profile), name, last, False)

    common = dict(api_visibility="private", concurrency_limit=2, concurrency_id="dashboard")
    project.change(on_refresh, [project], outputs, **common)
    refresh.click(on_refresh, [project], outputs, **common)
    timer.tick(on_tick, [project, seen], outputs, show_progress="hidden", **common)
    # opened: what changed since it was drawn (at page load, or when last open) is drawn now, not at the next tick
    tab.select(on_tick, [project, seen], outputs, show_progress="hidden", **common)

    @guarded
    def on_settings(name, request: gr.Request, profile: gr.OAuthProfile | None = None):
        user = team.user(request, profile)
        if not team.is_admin(user) or not name:
            return gr.skip(), gr.skip(), gr.skip()
        p = get_project(team.store(), _project_name(name))
        return p.settings.annotations_per_task, ", ".join(p.settings.annotators), settings_text(team, p)

    @guarded
    def on_save_settings(name, k_value, team_text, request: gr.Request, profile: gr.OAuthProfile | None = None):
        team.require_admin(team.user(request, profile))
        p = set_settings(team, name, k_value, team_text)
        return (p.settings.annotations_per_task, ", ".join(p.settings.annotators),
                '<div class="mel-team-ok" id="mel-settings-ok">saved</div>' + settings_text(team, p))

    project.change(on_settings, [project], [k, team_box, settings_note], api_visibility="private")
    save_settings.click(on_save_settings, [project, k, team_box], [k, team_box, settings_note],
                        api_visibility="private", concurrency_limit=1, concurrency_id="settings")

    @guarded
    def on_export(name, fmt_value, min_value, reviewed, request: gr.Request, profile: gr.OAuthProfile | None = None):
        user = team.require_admin(team.user(request, profile))  # a role refusal stays an error
        try:
            path, summary_text = export_project(team, user, name, fmt_value, min_value, reviewed)
        except NotAllowedError:
            raise
        except MELError as exc:  # a bad --min-agreement, no project...: said once, in the export's note
            return "", refusal_html(f"{exc}; nothing was exported", "mel-export-refused")
        link = team.vault.link_html(path, user, css="mel-team-note", element_id="mel-export-ready")
        return link, f'<div class="mel-team-note">{_esc(summary_text)}</div>'

    export_btn.click(on_export, [project, fmt, min_agreement, reviewed_only], [export_link, export_note],
                     api_visibility="private", concurrency_limit=1, concurrency_id="export")
    return c


def settings_text(team: Team, project) -> str:
    s = project.settings
    from annotations.projects import assigned_share, progress
    total = progress(team.store(), project).total
    if s.annotators:
        shares = ", ".join(f"{a} {assigned_share(project, total, a)}" for a in s.annotators)
        who = f"team of {len(s.annotators)}; tasks each: {shares}"
    else:
        who = "no fixed team: each task goes to the first k annotators who ask"
    return (f'<div class="mel-team-note">{_esc(project.name)}: {total} tasks, each decided by k = '
            f'{s.annotations_per_task} annotator{"s" if s.annotations_per_task != 1 else ""}; {_esc(who)}</div>')


def set_settings(team: Team, name, k_value, team_text) -> Any:
    """Change a project's k and team (admins; checked by the caller). ProjectSettings validates."""
    project = get_project(team.store(), _project_name(name))
    if isinstance(k_value, bool) or not isinstance(k_value, (int, float)) or k_value != int(k_value):
        raise InputError(f"annotations per task must be a whole number of at least 1, got {k_value!r}")
    if isinstance(team_text, (list, tuple)):
        names = list(team_text)
    elif isinstance(team_text, str) or team_text is None:
        names = [x.strip() for x in (team_text or "").split(",") if x.strip()]
    else:
        raise InputError("the team is a comma-separated list of logins")
    if len(names) > MAX_TEAM or not all(isinstance(n, str) and n.strip() and len(n) <= 200 for n in names):
        raise InputError(f"the team is at most {MAX_TEAM} logins of at most 200 characters each")
    for n in names:
        check_typed_text(n, "annotator name")
    settings = dataclasses.replace(project.settings, annotations_per_task=int(k_value),
                                   annotators=[n.strip() for n in names])  # validated in __post_init__
    return update_settings(team.store(), project, settings)


def export_project(team: Team, user: str, name, fmt, min_agreement, reviewed_only) -> tuple[Path, str]:
    """Export a project's final labels to DATA_DIR/exports/ and zip it into a private vault folder;
    returns (zip path, summary). Admins only (checked by the caller)."""
    team.require_admin(user)
    name = _project_name(name)
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise InputError(f"unknown export format {str(fmt)[:40]!r}; choose one of {', '.join(FORMATS)}")
    if min_agreement in ("", None):
        min_agreement = None
    elif isinstance(min_agreement, bool) or not isinstance(min_agreement, (int, float)):
        raise InputError("--min-agreement is a share of the task's annotators, from 0 to 1 (or empty)")
    store = team.store()
    project = get_project(store, name)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", project.name).strip("-.")[:60] or "project"
    out = store.data_dir / "exports" / f"{stamp}-{slug}-{fmt}-{secrets.token_hex(3)}"
    report = export_corrections(store, out, fmt, kb=team.kb(), project=project.name, min_agreement=min_agreement,
                                reviewed_only=bool(reviewed_only))
    folder = team.vault.folder()
    try:
        archive = shutil.make_archive(str(folder / f"mel-{slug}-{stamp}-{fmt}"), "zip", root_dir=out)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    log.info("%s exported %s", user, report.summary())
    return Path(archive), report.summary()


# -- both tabs, roles at page load, the API ----------------------------------------------------------
def build_team_tabs(team: Team, tabs: gr.Tabs | None = None) -> dict:
    """Add the Review and Dashboard tabs (inside a `with gr.Tabs() as tabs:` block); add the team API
    with add_team_api(team) after that block (outside the Tabs).
    `tabs`: the enclosing gr.Tabs, so that the dashboard refreshes only while its tab is selected
    (without it, it refreshes from the first time the tab is opened)."""
    review = build_review_tab(team)
    dash = build_dashboard_tab(team)

    @guarded
    def on_load(request: gr.Request, profile: gr.OAuthProfile | None = None):
        user = team.user(request, profile)
        reviewer, watcher, admin = team.is_reviewer(user), team.can_watch(user), team.is_admin(user)
        names = team.projects() if watcher else []
        first = names[0] if names else None
        return (gr.update(visible=reviewer), gr.update(choices=names, value=first) if reviewer else gr.skip(),
                gr.update(visible=watcher), gr.update(choices=names, value=first) if watcher else gr.skip(),
                gr.update(visible=admin))

    root = _root()
    root.load(on_load, None, [review["tab"], review["project"], dash["tab"], dash["project"], dash["admin_box"]],
              api_visibility="private")

    # A project created since the page loaded (Projects tab) is offered when the tab is opened: the
    # pickers were filled at page load only, so a new project needed a reload of the page.
    def project_choices(allowed: bool, shown):
        if not allowed:
            return gr.skip()
        names = team.projects()
        return gr.update(choices=names, value=shown if shown in names else (names[0] if names else None))

    @guarded
    def on_review_selected(shown, request: gr.Request, profile: gr.OAuthProfile | None = None):
        return project_choices(team.is_reviewer(team.user(request, profile)), shown)

    @guarded
    def on_dash_selected(shown, request: gr.Request, profile: gr.OAuthProfile | None = None):
        watcher = team.can_watch(team.user(request, profile))
        return gr.Timer(active=watcher), project_choices(watcher, shown)

    review["tab"].select(on_review_selected, [review["project"]], [review["project"]], api_visibility="private",
                        queue=False)
    dash["tab"].select(on_dash_selected, [dash["project"]], [dash["timer"], dash["project"]], api_visibility="private",
                      queue=False)
    if tabs is not None:
        def on_tab(evt: gr.SelectData):
            if evt.value == DASHBOARD_TAB:
                return gr.skip()
            return gr.Timer(active=False)
        tabs.select(on_tab, None, [dash["timer"]], api_visibility="private", queue=False)
    return {"review": review, "dashboard": dash}


def _root() -> gr.Blocks:
    from gradio.context import Context
    root = Context.root_block
    if root is None:
        raise RuntimeError("build the team tabs inside a gr.Blocks")
    return root


def add_team_api(team: Team) -> None:
    """The team endpoints for gradio_client (see the module docstring). Each checks the logged-in
    user's role; none takes a user name from the client."""

    @guarded
    def review_items(project: str, include_reviewed: bool = False, request: gr.Request = None,
                     profile: gr.OAuthProfile | None = None) -> list:
        """Tasks to review (disagreements and flagged tasks; with include_reviewed, reviewed ones too),
        each with every annotator's decision and the models' answers. Reviewers only."""
        user = team.require_reviewer(team.user(request, profile))
        return [item_dict(it, project) for it in team.review(user, project).items(
            include_reviewed=bool(include_reviewed), limit=MAX_LIST)]

    @guarded
    def review_task(project: str, task_id: str, request: gr.Request = None,
                    profile: gr.OAuthProfile | None = None) -> dict:
        """One task of the project as the review screen shows it. Reviewers only."""
        user = team.require_reviewer(team.user(request, profile))
        if not isinstance(task_id, str) or len(task_id) > 200:
            raise InputError("task_id must be a task id")
        return item_dict(team.review(user, project).item(task_id), project)

    def _ack(ack, project) -> dict:
        r = ack.review
        return {"message": ack.describe(), "review_id": r.id, "task_id": r.task_id, "reviewer": r.reviewer,
                "action": r.action, "final_label": ack.label.final_label, "status": ack.label.status,
                "returned_decisions": ack.returned_decisions, "resolved_flags": ack.resolved_flags,
                "replayed": ack.replayed, "project": project}

    @guarded
    def review_finalize(project: str, task_id: str, entity_id: str, token: str,
                        seen_decision_ids: list[int] | None = None, seen_review_id: int | None = None,
                        comment: str = "", request: gr.Request = None, profile: gr.OAuthProfile | None = None) -> dict:
        """Set the task's final label (a KB id, or NIL), in the logged-in reviewer's name. `token`: one
        per click (a repeat saves once); seen_decision_ids / seen_review_id (from review_task): a change
        since is refused. Reviewers only."""
        user = team.require_reviewer(team.user(request, profile))
        ack = team.review(user, project).finalize(
            task_id, entity_id, token=_token(token), comment=comment or "", seen_decision_ids=_ids(seen_decision_ids),
            seen_review_id=_review_id(seen_review_id))
        return _ack(ack, project)

    @guarded
    def review_send_back(project: str, task_id: str, comment: str, token: str,
                         seen_decision_ids: list[int] | None = None, seen_review_id: int | None = None,
                         request: gr.Request = None, profile: gr.OAuthProfile | None = None) -> dict:
        """Send the task back to its annotators with a comment. Reviewers only."""
        user = team.require_reviewer(team.user(request, profile))
        ack = team.review(user, project).send_back(task_id, comment=comment, token=_token(token),
                                                   seen_decision_ids=_ids(seen_decision_ids),
                                                   seen_review_id=_review_id(seen_review_id))
        return _ack(ack, project)

    @guarded
    def team_dashboard(project: str, request: gr.Request = None, profile: gr.OAuthProfile | None = None) -> dict:
        """The dashboard's numbers (progress, speed, acceptance, agreement). Admins and reviewers."""
        team.require_watcher(team.user(request, profile))
        return json.loads(to_json(dashboard_data(team.store(), _project_name(project))))

    @guarded
    def project_settings(project: str, request: gr.Request = None, profile: gr.OAuthProfile | None = None) -> dict:
        """A project's settings. Admins only."""
        team.require_admin(team.user(request, profile))
        return json.loads(get_project(team.store(), _project_name(project)).settings.to_json())

    @guarded
    def set_project_settings(project: str, annotations_per_task: int, annotators: list[str],
                             request: gr.Request = None, profile: gr.OAuthProfile | None = None) -> dict:
        """Set k (annotations per task) and the team ([] = whoever asks first). Admins only."""
        team.require_admin(team.user(request, profile))
        return json.loads(set_settings(team, project, annotations_per_task, annotators).settings.to_json())

    @guarded
    def team_export(project: str, format: str = "jsonl", min_agreement: float | None = None,
                    reviewed_only: bool = False, request: gr.Request = None,
                    profile: gr.OAuthProfile | None = None) -> dict:
        """Export the project's final labels (jsonl, wikimel, gemel, parquet) as a zip behind a one-time
        link for the calling admin (GET it with the admin's login cookie). Admins only."""
        user = team.require_admin(team.user(request, profile))
        path, summary = export_project(team, user, project, format, min_agreement, reviewed_only)
        token = team.vault.offer(path, user)
        return {"summary": summary, "download": f"mel/download/{token}", "file": path.name}

    reads = dict(concurrency_limit=2, concurrency_id="dashboard")
    writes = dict(concurrency_limit=4, concurrency_id="review")
    gr.api(review_items, api_name="review_items", **reads)
    gr.api(review_task, api_name="review_task", **reads)
    gr.api(review_finalize, api_name="review_finalize", **writes)
    gr.api(review_send_back, api_name="review_send_back", **writes)
    gr.api(team_dashboard, api_name="team_dashboard", **reads)
    gr.api(project_settings, api_name="project_settings", **reads)
    gr.api(set_project_settings, api_name="set_project_settings", concurrency_limit=1, concurrency_id="settings")
    gr.api(team_export, api_name="team_export", concurrency_limit=1, concurrency_id="export")


# -- a small app of these tabs only (tests; later folded into build_demo) ----------------------------
def build_team_app(data_dir: str | Path, users: dict[str, str] | None = None, admins=(), reviewers=(), *,
                   kb_path: str | Path | None = None) -> gr.Blocks:
    """A gr.Blocks with only the team tabs over DATA_DIR/annotations.sqlite (and the KB at `kb_path`,
    for the review's search). `users` None: no login (everyone is "local", admin and reviewer)."""
    store = AnnotationStore(data_dir)
    kb = None
    if kb_path is not None:
        from mel.kb import KnowledgeBase
        kb = KnowledgeBase(kb_path)
    access = Access("password", admins=frozenset(admins)) if users else Access("open")
    with gr.Blocks(title="MEL: annotation team") as demo:
        demo.mel_access, demo.mel_vault, demo.mel_store = access, _download_vault(), store
        team = Team(lambda: store, access, lambda: kb, reviewers=frozenset(reviewers), vault=demo.mel_vault)
        gr.HTML("<h2 style='margin:0'>Annotation team: review and dashboard</h2>")
        with gr.Tabs() as tabs:
            with gr.Tab("About", id="mel-tab-about"):
                gr.HTML('<div class="mel-team-note" id="mel-team-about">Reviewers see the Review tab; admins and '
                        'reviewers the Dashboard.</div>')
            demo.mel_team = build_team_tabs(team, tabs)
        add_team_api(team)
    return demo


@dataclass
class RunningTeamApp:
    demo: gr.Blocks
    url: str
    data_dir: Path

    @property
    def store(self) -> AnnotationStore:
        return self.demo.mel_store

    def close(self) -> None:
        self.demo.close()
        self.demo.mel_vault.close()
        self.demo.mel_store.close()


def launch_team_app(data_dir: str | Path, *, users: dict[str, str] | None = None, admins=(), reviewers=(),
                    kb_path: str | Path | None = None) -> RunningTeamApp:
    """build_team_app served from a thread on 127.0.0.1 and a free port, secured as `python app.py`
    serves the app (demo.ui.serve_options: login rate limit, the admins' one-time download links)."""
    from .launch import HOST, free_port
    from .ui import serve_options
    demo = build_team_app(data_dir, users, admins, reviewers, kb_path=kb_path)
    demo.queue(default_concurrency_limit=4, max_size=32)
    port = free_port()
    demo.launch(server_name=HOST, server_port=port, prevent_thread_lock=True, quiet=True,
                **serve_options(demo, users))
    return RunningTeamApp(demo, f"http://{HOST}:{port}/", Path(data_dir))


__all__ = ["Team", "parse_reviewers", "build_review_tab", "build_dashboard_tab", "build_team_tabs", "add_team_api",
           "build_team_app", "launch_team_app", "RunningTeamApp", "item_dict", "choices_of", "task_html",
           "export_project", "set_settings", "REVIEW_TAB", "DASHBOARD_TAB", "REFRESH_SECONDS"]
