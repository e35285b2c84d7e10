"""The Gradio app: tabs for annotating projects, linking one caption, and the team and admin pages.

    demo = build_demo(kb_path=None, pool=None, preset="offline", data_dir="data/app")
    demo.queue(default_concurrency_limit=4).launch(**serve_options(demo, users), **launch_options())

Tabs: "Annotate" (the queue of a project, keyboard first: demo/queue_ui.py), first when the
database has projects; "Link" (one caption, typed or selected: the demo, this module); the team's
review and dashboard (demo/team_ui.py, through the `team_tabs` hook); "Projects" (admins: import
and pre-annotation). Where things live: access rules and the error wrapper in demo/access.py,
renderers in demo/render.py, CSS and JS in demo/assets/, the work in demo/service.py.

API (gradio_client): /link (the Link button), and /correct, /undo, /search, /counts.

Serving (`serve_options`, for Blocks.launch): a LoginGuard checks passwords in constant time and
refuses, at once and with HTTP 429, an account or a client address after too many failed logins
(the refusal lasts longer each time). Exports and backups are never handed to Gradio (whose file
route serves its cache to every logged-in user): DownloadVault keeps them in a private temporary
folder behind a one-time link that only the admin who made them can open; the file is deleted
once downloaded, when the link expires, and at shutdown.

Fairness: linking runs one at a time (concurrency id "link"); corrections, undo and queue decisions
have their own slots ("correct") and never wait behind links or searches ("search"), and every
input is bounded (demo/service.py), so no request can hold the others up for long.
"""
from __future__ import annotations

import atexit
import contextlib
import contextvars
import functools
import hmac
import json
import logging
import math
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from annotations import FORMATS
from mel.errors import InputError as MELInputError
from mel.errors import MELError
from mel.paths import cache_dir
from mel.spans import follow_edit, span_holds
from mel.types import MAX_CAPTION_CHARS

from .access import Access, esc_message, guarded, user_error
from .bundled import examples_for
from .queue_ui import (
    Preannotations,
    QueueScreens,
    build_annotate_tab,
    build_projects_tab,
    default_team_tabs,
    queue_on_load,
)
from .render import (
    _clip,
    _esc,
    candidate_choices,
    candidate_rows,
    candidate_table,
    counter_html,
    gallery_items,
    refusal_html,
    render_cue,
    render_generator,
    render_ranker_note,
    status_html,
)
from .service import (
    IMAGE_FORMATS,
    MAX_QUERY_CHARS,
    LinkService,
    LinkView,
    ServiceConfig,
    check_upload,
    follow_caption_edit,
    locate_mention,
    retarget_offsets,
)
from .spans import highlight_html, resolve_span, span_from_selection

__all__ = ["Access", "LoginGuard", "DownloadVault", "AppGuard", "build_demo", "serve_options", "launch_options",
           "guarded", "esc_message", "user_error", "candidate_rows", "counter_html", "gallery_items", "render_cue",
           "render_generator", "render_ranker_note", "status_html", "LinkView"]

log = logging.getLogger(__name__)

ACTION_LABELS = {"accept_gemel": "accepted GEMEL's entity", "accept_dim": "accepted a DIM candidate",
                 "search": "picked from the KB search", "nil": "marked NIL (not in the KB)", "skip": "skipped"}
SEARCH_SLOTS = 2     # searches (and counts) run at most this many at once; corrections have their own slots
MAX_OFFSET = 10**9  # start / end offsets beyond any caption
MAX_UPLOAD = "20mb"  # Gradio refuses larger uploads before they reach the app; mel.imageio caps pixels


# -- login: constant-time check, per-account and per-address rate limits -----------------------------
CLIENT_ADDRESS: contextvars.ContextVar[str | None] = contextvars.ContextVar("mel_client_address", default=None)


class LoginGuard:
    """Gradio's `auth=` callable: checks a password in constant time and rate-limits failures.

    After `account_failures` failed logins to one account, or `address_failures` from one client
    address, within `window` seconds, further attempts there are refused at once (HTTP 429, not
    a sleep in a shared worker) for `first_block` seconds, twice as long at each repeat, at most
    `max_block`. While refused, even the right password is refused (so guessing gains nothing).
    A successful login clears its account's record; an address's failures only expire.
    """

    def __init__(self, accounts, *, account_failures: int = 5, address_failures: int = 20, window: float = 300.0,
                 first_block: float = 30.0, max_block: float = 3600.0, max_tracked: int = 10_000,
                 clock=time.monotonic):
        self._accounts = dict(accounts)
        self.limits = {"account": account_failures, "address": address_failures}
        self.window, self.first_block, self.max_block = window, first_block, max_block
        self.max_tracked = max_tracked
        self.clock = clock
        self._records: dict[tuple[str, str], dict] = {}
        self._lock = threading.Lock()

    def __call__(self, username: str, password: str) -> bool:
        return self.check(username, password, CLIENT_ADDRESS.get())

    def reset(self) -> None:
        with self._lock:
            self._records.clear()

    def blocked_for(self, kind: str, key: str) -> float:
        """Seconds `kind` ("account" | "address") `key` is still refused (0: not refused)."""
        with self._lock:
            rec = self._records.get((kind, key))
            return max(0.0, rec["until"] - self.clock()) if rec else 0.0

    def check(self, username: str, password: str, address: str | None = None) -> bool:
        """True for the right password; False for a wrong one; raises HTTPException 429 while refused."""
        from fastapi import HTTPException
        now = self.clock()
        known = isinstance(username, str) and username in self._accounts
        keys = ([("address", address)] if address else []) + ([("account", username)] if known else [])
        with self._lock:
            for kind, key in keys:
                rec = self._records.get((kind, key))
                wait = rec["until"] - now if rec else 0.0
                if wait > 0:
                    who = "this account" if kind == "account" else "your address"
                    raise HTTPException(status_code=429, headers={"Retry-After": str(math.ceil(wait))},
                                        detail=f"Too many failed logins for {who}: wait {math.ceil(wait)} s and try "
                                               f"again (ask the admin if the password is lost).")
        expected = self._accounts.get(username, "\x00 no such account") if known else "\x00 no such account"
        ok = hmac.compare_digest(_utf8(password), _utf8(expected)) and known
        with self._lock:
            if ok:
                self._records.pop(("account", username), None)
                return True
            for kind, key in keys:
                self._fail(kind, key, now)
            if len(self._records) > self.max_tracked:
                self._prune(now)
        return False

    def _fail(self, kind: str, key: str, now: float) -> None:
        rec = self._records.setdefault((kind, key), {"fails": deque(), "level": 0, "until": 0.0, "last": now})
        if now - rec["last"] > self.max_block:
            rec["level"] = 0  # quiet for long: start over at the shortest refusal
        rec["last"] = now
        fails = rec["fails"]
        while fails and now - fails[0] > self.window:
            fails.popleft()
        fails.append(now)
        if len(fails) >= self.limits[kind]:
            rec["level"] += 1
            rec["until"] = now + min(self.max_block, self.first_block * 2 ** (rec["level"] - 1))
            fails.clear()
            log.warning("login refused for %s %s for %.0f s after repeated failures", kind, key, rec["until"] - now)

    def _prune(self, now: float) -> None:
        """Forget the oldest quiet records, so that random names or addresses cannot fill memory."""
        quiet = sorted((rec["last"], k) for k, rec in self._records.items()
                       if rec["until"] <= now and now - rec["last"] > self.window)
        for _, k in quiet:
            del self._records[k]
        excess = len(self._records) - self.max_tracked
        if excess > 0:
            for _, k in sorted((rec["last"], k) for k, rec in self._records.items())[:excess]:
                del self._records[k]


def _utf8(text) -> bytes:
    return ("" if text is None else str(text)).encode("utf-8", "surrogatepass")


# -- admin downloads: one-time links, never Gradio's shared cache ------------------------------------
DOWNLOAD_PATH = re.compile(r"(?:^|/)mel/download/([A-Za-z0-9_-]{20,100})/?$")
UPLOAD_PATH = re.compile(r"(?:^|/)upload/?$")   # Gradio's file uploads: it caps each file at MAX_UPLOAD
# Bodies are read (and parsed) before Gradio checks the login: without a cap anyone could make the
# server hold gigabytes. An event's JSON is small (a caption is at most MAX_CAPTION_CHARS, files go to
# /upload); before a password login, only the login form is expected.
MAX_REQUEST_BODY = 4 * 1024 * 1024
MAX_ANONYMOUS_BODY = 64 * 1024
# Gradio keeps every uploaded file until the app stops: without a budget one account could fill the
# disk with 20 MB files. An annotator's photos and an admin's task zips stay far below it.
UPLOAD_BUDGET_BYTES = 500 * 1024 * 1024
UPLOAD_BUDGET_WINDOW = 3600.0


class UploadBudget:
    """Bytes each user (else client address) may upload within a sliding `window` of seconds."""

    def __init__(self, budget: int = UPLOAD_BUDGET_BYTES, window: float = UPLOAD_BUDGET_WINDOW,
                 max_tracked: int = 10_000, clock=time.monotonic):
        self.budget, self.window, self.max_tracked, self.clock = budget, window, max_tracked, clock
        self._spent: dict[str, deque] = {}
        self._lock = threading.Lock()

    def charge(self, who: str, n: int) -> float:
        """Charge `n` bytes to `who`: 0 when within the budget, else the seconds until it would be."""
        now = self.clock()
        with self._lock:
            spent = self._spent.setdefault(who, deque())
            while spent and now - spent[0][0] >= self.window:
                spent.popleft()
            used = sum(b for _, b in spent)
            if used + n > self.budget:
                if not spent:
                    return self.window
                freed, wait = used + n - self.budget, 0.0
                for t, b in spent:   # the oldest uploads leave the window first
                    freed, wait = freed - b, t + self.window - now
                    if freed <= 0:
                        break
                return max(wait, 1.0)
            spent.append((now, n))
            if len(self._spent) > self.max_tracked:   # bounded memory: forget whoever's uploads left the window
                for key in [k for k, v in self._spent.items() if not v or now - v[-1][0] >= self.window]:
                    del self._spent[key]
            return 0.0


class DownloadVault:
    """Exports and backups waiting for their admin, each behind a one-time link.

    Each file lives alone in a private (0700) folder under one temporary root; it is deleted when
    it is downloaded, when its link expires (`ttl` seconds) and when the app shuts down.
    """

    def __init__(self, ttl: float = 900.0, clock=time.monotonic):
        self.ttl, self.clock = ttl, clock
        self._root: Path | None = None
        self._items: dict[str, tuple[Path, str, float]] = {}
        self._lock = threading.Lock()
        atexit.register(self.close)

    def folder(self) -> Path:
        """A new private folder to write one download into."""
        with self._lock:
            if self._root is None or not self._root.exists():
                self._root = Path(tempfile.mkdtemp(prefix="mel-downloads-"))
            return Path(tempfile.mkdtemp(dir=self._root))

    def offer(self, path: str | Path, owner: str) -> str:
        """A one-time token for `path` (in a folder from folder()), for `owner` only."""
        self.sweep()
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._items[token] = (Path(path), owner, self.clock() + self.ttl)
        return token

    def link_html(self, path: str | Path, owner: str, *, css: str = "mel-note", element_id: str = "",
                  after: str = "") -> str:
        """Offer `path` to `owner` and return its one-time download link as HTML (`after`: more words, HTML)."""
        token = self.offer(path, owner)
        name, minutes = _esc(Path(path).name), max(1, round(self.ttl / 60))
        ident = f' id="{element_id}"' if element_id else ""
        return (f'<div class="{css}"{ident}><a href="mel/download/{token}" download="{name}">Download {name}</a>: '
                f'the link works once, for you only, for {minutes} minutes{after}</div>')

    def take(self, token: str, owner: str | None) -> Path | None:
        """The file behind `token` if `owner` made it and it has not expired; the link is used up."""
        self.sweep()
        with self._lock:
            item = self._items.get(token)
            if item is None or item[1] != owner:
                return None
            del self._items[token]
        return item[0]

    def pending(self) -> list[Path]:
        with self._lock:
            return [item[0] for item in self._items.values()]

    def discard(self, path: Path) -> None:
        """Delete a download and its folder."""
        folder = Path(path).parent
        if self._root is not None and folder.parent == self._root:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            Path(path).unlink(missing_ok=True)

    def sweep(self) -> None:
        now = self.clock()
        with self._lock:
            expired = [t for t, item in self._items.items() if item[2] <= now]
            paths = [self._items.pop(t)[0] for t in expired]
        for path in paths:
            self.discard(path)

    def close(self) -> None:
        """Delete every waiting download (at shutdown)."""
        with self._lock:
            self._items.clear()
            root, self._root = self._root, None
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


def _too_large(size: int, limit: int, hint: str):
    from starlette.responses import PlainTextResponse
    return PlainTextResponse(f"Request body too large: {size:,} bytes or more, the most is {limit:,}; {hint}.",
                             status_code=413, headers={"Connection": "close"})


class AppGuard:
    """ASGI middleware: tells LoginGuard the client's address, serves DownloadVault's links, bounds
    request bodies before Gradio reads them, and charges uploads to the sender's UploadBudget."""

    def __init__(self, app, vault: DownloadVault, access: Access, uploads: UploadBudget):
        self.app, self.vault, self.access, self.uploads = app, vault, access, uploads

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        client = scope.get("client")
        mark = CLIENT_ADDRESS.set(client[0] if client else None)
        try:
            match = DOWNLOAD_PATH.search(scope.get("path", ""))
            if match and scope.get("method") in ("GET", "HEAD"):
                return await self._download(match.group(1), scope, receive, send)
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                return await self._bounded(scope, receive, send)
            return await self.app(scope, receive, send)
        finally:
            CLIENT_ADDRESS.reset(mark)

    async def _bounded(self, scope, receive, send):
        """Pass the request on with its body read whole, or answer 413 once it is over the limit; an
        upload goes on as it is, its declared length (the server reads no more) charged to a budget."""
        user = self.access.annotator_of_scope(scope)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if self.access.mode == "password" and user is None:
            limit, hint = MAX_ANONYMOUS_BODY, "log in first"   # before the login: only the login form
        elif UPLOAD_PATH.search(scope.get("path", "")):
            refusal = self._upload_refusal(scope, declared, user)
            return await (refusal or self.app)(scope, receive, send)
        else:
            limit, hint = MAX_REQUEST_BODY, "send files through /gradio_api/upload"
        if declared.isdigit() and int(declared) > limit:
            return await _too_large(int(declared), limit, hint)(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":      # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await _too_large(size, limit, hint)(scope, receive, send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()       # after the body: the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await self.app(scope, replay, send)

    def _upload_refusal(self, scope, declared: bytes, user: str | None):
        """None when the upload may go on, else the response that refuses it."""
        from starlette.responses import PlainTextResponse
        if not declared.isdigit():
            return PlainTextResponse("An upload must say its length (Content-Length); send the file as a browser "
                                     "or gradio_client does.", status_code=411)
        client = scope.get("client")
        wait = self.uploads.charge(user or f"address {client[0] if client else '?'}", int(declared))
        if wait:
            return PlainTextResponse(
                f"Upload budget used: at most {self.uploads.budget // (1024 * 1024):,} MB an hour per account; "
                f"try again in {math.ceil(wait / 60):,} minutes.", status_code=429,
                headers={"Retry-After": str(math.ceil(wait)), "Connection": "close"})
        return None

    async def _download(self, token: str, scope, receive, send):
        from starlette.background import BackgroundTask
        from starlette.responses import FileResponse, PlainTextResponse
        user = self.access.annotator_of_scope(scope)
        if not self.access.is_admin(user):
            response = PlainTextResponse("Exports and backups are for admins: log in with an admin account "
                                         "(MEL_ADMINS) and export again.", status_code=403)
        else:
            path = self.vault.take(token, user)
            if path is None or not path.exists():
                response = PlainTextResponse("This download link was used already or has expired: export (or "
                                             "back up) again.", status_code=404)
            else:
                response = FileResponse(path, filename=path.name, headers={"Cache-Control": "no-store"},
                                        background=BackgroundTask(self.vault.discard, path))
        await response(scope, receive, send)


def serve_options(demo: gr.Blocks, users: dict[str, str] | list[tuple[str, str]] | None = None,
                  guard: LoginGuard | None = None) -> dict:
    """Keyword arguments for Blocks.launch() that secure the app built by build_demo:
    `auth` (a LoginGuard over `users`, or None: no password login) and `app_kwargs` (AppGuard,
    and a lifespan that deletes waiting downloads at shutdown). demo.mel_login_guard is the guard,
    demo.mel_upload_budget the uploads' UploadBudget."""
    if guard is None and users:
        guard = LoginGuard(users)
    vault, access = demo.mel_vault, demo.mel_access
    demo.mel_login_guard = guard

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            vault.close()

    demo.mel_upload_budget = uploads = UploadBudget()
    from starlette.middleware import Middleware
    return {"auth": guard, "app_kwargs": {"middleware": [Middleware(AppGuard, vault=vault, access=access,
                                                                    uploads=uploads)],
                                          "lifespan": lifespan}}


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
            raise gr.Error(esc_message(f"the image could not be read ({type(exc).__name__}: {exc}); upload a "
                                       f"JPEG or PNG file")) from None

    image.preprocess = preprocess
    return image


def checked_offset(number: gr.Number, name: str) -> gr.Number:
    """Make `number` (a start / end offset) refuse what gr.Number cannot round (Infinity, NaN, 1e400)
    with a clear error, instead of Gradio's OverflowError. (An instance attribute, as above.)"""
    rounded = number.preprocess

    def preprocess(payload):
        try:
            check_offsets(payload, None)
        except MELError as exc:
            raise user_error(MELInputError(str(exc).replace("start", name, 1))) from None
        return rounded(payload)

    number.preprocess = preprocess
    return number


SELECTION_JS = """
(caption, start, end, mention, last) => {
  const t = document.querySelector('#mel-caption textarea');
  if (!t || t.selectionStart === t.selectionEnd) return [caption, null, null, '', last];
  const picked = t.value.substring(t.selectionStart, t.selectionEnd);
  // A repeat of the selection already shown, or one replayed after the caption lost the focus (the
  // annotator has gone on to type the mention): nothing to do, and an answer landing late must not
  // put the old mention back over what was typed since.
  if (document.activeElement !== t || (start === t.selectionStart && end === t.selectionEnd && mention === picked))
    return [caption, null, null, '', last];
  return [t.value, t.selectionStart, t.selectionEnd, picked, last];
}
"""


ASSETS = Path(__file__).resolve().parent / "assets"
STYLE_FILES = ("app.css", "queue.css")
SCRIPT_FILES = ("app.js", "queue.js")


def page_css() -> str:
    """The app's CSS (demo/assets/*.css)."""
    return "\n".join((ASSETS / name).read_text(encoding="utf-8") for name in STYLE_FILES)


def page_head() -> str:
    """<script> tags for the page's head: the Link tab's shortcuts and the Annotate tab's keys (and the
    image formats the Link tab's upload check names)."""
    formats = f"<script>window.__melImageFormats = {json.dumps(IMAGE_FORMATS)};</script>"
    return "\n".join([formats, *(f"<script>\n{(ASSETS / name).read_text(encoding='utf-8')}\n</script>"
                                  for name in SCRIPT_FILES)])


def launch_options() -> dict:
    """Keyword arguments for Blocks.launch() that the UI needs (Gradio 6 takes css/head there).

    allowed_paths: the bundled example photos live in the cache (written there at first start).
    max_file_size: uploads over MAX_UPLOAD are refused by Gradio itself.
    """
    return {"css": page_css(), "head": page_head(), "allowed_paths": [str(cache_dir("demo", "images"))],
            "max_file_size": MAX_UPLOAD}


def check_offsets(start, end) -> None:
    """start / end from the UI or the API: empty, or finite numbers of a sane size (else InputError)."""
    for name, value in (("start", start), ("end", end)):
        if value is None or value == "":
            continue
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            number = math.nan
        if isinstance(value, bool) or not math.isfinite(number) or abs(number) > MAX_OFFSET:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
            raise MELInputError(f"{name} must be a character offset in the caption (a whole number), got {shown}; "
                                f"select the mention or leave start and end empty")


# -- the app -----------------------------------------------------------------------------------------
def build_demo(kb_path: str | None = None, pool: str | None = None, preset: str = "auto", data_dir: str | None = None,
               *, service: LinkService | None = None, access: Access | None = None, load: bool = True,
               config: ServiceConfig | None = None, team_tabs=default_team_tabs) -> gr.Blocks:
    """The app as a gr.Blocks. `load=True` loads models now (so the app is ready when it answers).

    `team_tabs(service=, access=, screens=, tabs=, vault=)` is called inside the tabs, after "Link",
    to add the team's tabs, and may return a function to call after the tabs (an API); default:
    demo/team_ui.py's Review and Dashboard when that module is there; None: no team tabs."""
    if service is None:
        config = config or ServiceConfig()
        config.kb, config.pool, config.preset = kb_path or config.kb, pool or config.pool, preset or config.preset
        config.data_dir = data_dir or config.data_dir
        service = LinkService(config)
    access = access or Access()
    if load:
        service.load()
    screens, runs = QueueScreens(service), Preannotations(service)
    has_projects = service.loaded and bool(screens.project_names())

    with gr.Blocks(title="MEL: multimodal entity linking and annotation") as demo:
        demo.mel_service = service  # for tests and benchmarks
        demo.mel_access = access
        demo.mel_queue = screens
        demo.mel_preannotations = runs
        demo.mel_vault = vault = DownloadVault()  # exports and backups, behind one-time links (serve_options)
        with gr.Row(elem_id="mel-header", equal_height=False):
            gr.HTML("<h2>Multimodal entity linking: GEMEL + DIM</h2>", elem_id="mel-title", padding=False)
            who = gr.HTML(elem_id="mel-who", padding=False)
            if access.mode == "oauth":
                gr.LoginButton()
        with gr.Tabs(selected="annotate" if has_projects else "link", elem_id="mel-tabs") as tabs:
            annotate = build_annotate_tab(service, access, screens, visible=has_projects)
            with gr.Tab("Link", id="link", elem_id="mel-link-tab"):
                _build_link_tab(demo, service, access, vault, who)
            after_tabs = None
            if team_tabs is not None:  # the team's tabs (demo/team_ui.py): Review, Dashboard
                after_tabs = team_tabs(service=service, access=access, screens=screens, tabs=tabs, vault=vault)
            _, projects_load, projects_outputs = build_projects_tab(service, access, annotate, runs)
        if after_tabs is not None:
            after_tabs()
        queue_on_load(demo, access, annotate, tabs, selected_at_build=has_projects)
        _wire_counter_refresh(service, access, who, annotate.view)
        demo.load(projects_load, None, projects_outputs, api_visibility="private", show_progress="hidden")
    return demo


@dataclass
class LinkPanel:
    """The Link tab's input column (image, caption, mention, offsets, the Link button) and its results."""
    info: gr.HTML
    image: gr.Image
    caption: gr.Textbox
    mention: gr.Textbox
    start: gr.Number
    end: gr.Number
    link_btn: gr.Button
    status: gr.HTML          # what the Link button (or an upload) refused and what to do: one place
    highlighted: gr.HTML
    gemel_html: gr.HTML
    cue_html: gr.HTML
    ranker_note: gr.HTML
    dim_table: gr.Dataframe
    demos: gr.Gallery
    timings: gr.JSON
    models: gr.JSON
    raw: gr.JSON
    examples: gr.Examples | None = None   # None: no KB loaded, or none of the bundled examples is in it


@dataclass
class CorrectionPanel:
    """The Link tab's correction buttons, the DIM choice, the KB search and the acknowledgement."""
    accept_gemel: gr.Button
    accept_dim: gr.Button
    nil_btn: gr.Button
    skip_btn: gr.Button
    undo_btn: gr.Button
    dim_choice: gr.Radio
    search_box: gr.Textbox
    search_btn: gr.Button
    search_results: gr.Radio
    pick_btn: gr.Button
    live_pool: gr.Checkbox
    ack: gr.HTML


@dataclass
class AdminPanel:
    """The Link tab's admin box (hidden unless the user is an admin): export and backup."""
    box: gr.Accordion
    export_format: gr.Dropdown
    export_btn: gr.Button
    export_file: gr.HTML
    export_note: gr.HTML
    backup_btn: gr.Button
    backup_file: gr.HTML


def _build_link_tab(demo: gr.Blocks, service: LinkService, access: Access, vault: DownloadVault, who) -> None:
    """The Link tab: one caption, typed or selected, linked by both linkers, corrected by hand."""
    current = gr.State(None)     # the last link of this browser session (mention id, predictions)
    link = _link_panel(service)
    fix = _correction_panel(service)
    admin = _admin_panel()
    _wire_page_load(demo, service, access, who, link.info, admin.box)
    # the mention a selection in the caption put in the box (None: typed). Its text, not a flag: the
    # select's answer can land after a caption edit already ran with the new state and the old box.
    picked = gr.State(None)
    # the server's last word on the span: {"caption", "start", "end"} as a selection, a typed mention or
    # a caption edit left them. The boxes may still show older offsets while an answer is on its way.
    seen = gr.State(None)
    _wire_linking(service, access, current, link, fix, picked, seen)
    _wire_corrections(service, access, who, current, fix)
    _wire_search(service, fix)
    _wire_admin(service, access, vault, admin)
    _add_link_api(service, access)


def _link_panel(service: LinkService) -> LinkPanel:
    """The status line, then the inputs (left) and both linkers' results (right)."""
    examples = examples_for(service) if service.loaded else []
    info = gr.HTML(status_html(service.describe()) if service.loaded else "", elem_id="mel-info")
    with gr.Row(equal_height=False):
        with gr.Column(scale=4):
            image = hand_over_unopened(gr.Image(type="filepath", label="Image (optional)", height=260,
                                                sources=["upload", "clipboard"], elem_id="mel-image"))
            caption = gr.Textbox(label="Caption", lines=3, elem_id="mel-caption",
                                 info="Select the mention with the mouse (or type it below)")
            with gr.Row():
                mention = gr.Textbox(label="Mention", scale=3, elem_id="mel-mention")
                start = checked_offset(gr.Number(label="start", precision=0, minimum=0, scale=1,
                                                 elem_id="mel-start"), "start")
                end = checked_offset(gr.Number(label="end", precision=0, minimum=0, scale=1, elem_id="mel-end"),
                                     "end")
            link_btn = gr.Button("Link  (Ctrl+Enter)", variant="primary", elem_id="mel-link")
            status = gr.HTML(elem_id="mel-link-status", padding=False)
            loader = None
            if examples:  # from the KB that is loaded (demo/bundled.py examples_for)
                loader = gr.Examples([[e.image, e.caption, e.mention, e.start, e.end] for e in examples],
                            inputs=[image, caption, mention, start, end], label="Examples: ambiguous names, each with a photo",
                            example_labels=[f"{e.mention}: {e.why}" for e in examples])
            highlighted = gr.HTML(label="highlighted mention", elem_id="mel-highlight")
        with gr.Column(scale=6):
            with gr.Row(elem_id="mel-panels"):
                gemel_html = gr.HTML(label="GEMEL", elem_id="mel-gemel")
                cue_html = gr.HTML(label="expert cue", elem_id="mel-cue")
            ranker_note = gr.HTML(label="ranking notes", elem_id="mel-ranker-note")
            # p: the calibrated probability, or an uncalibrated relative confidence; the header says which
            # in short ("p (uncal.)", render.P_HEADERS), the legend above the table and the header's tooltip
            # in full. Column widths in pixels (702 in all: within the column at 1366 px; "key" at 52 px stays
            # on one line, at 40 it wrapped to "ke / y"; "p (uncal.)" wrapped at 100): on a phone the table
            # keeps readable columns and scrolls sideways instead of squeezing them to 60 px
            dim_table = gr.Dataframe(headers=["key", "name", "id", "description", "score", "p"],
                                     datatype=["str", "str", "str", "str", "number", "number"], interactive=False,
                                     wrap=True, max_height=320,
                                     column_widths=["52px", "140px", "112px", "202px", "76px", "120px"],
                                     label="DIM: ranked candidates (click a row, or press its key, to choose it)",
                                     elem_id="mel-dim")
            demos = gr.Gallery(label="GEMEL: retrieved demonstrations (most similar first)", columns=4,
                               height=220, allow_preview=True, elem_id="mel-demos")
            with gr.Accordion("Timings, preset and models", open=False):
                timings = gr.JSON(label="per-stage timings (ms)", elem_id="mel-timings")
                models = gr.JSON(label="preset and models", elem_id="mel-models")
            with gr.Accordion("Raw result (JSON)", open=False):
                raw = gr.JSON(label="link result", elem_id="mel-raw")
    return LinkPanel(info, image, caption, mention, start, end, link_btn, status, highlighted, gemel_html, cue_html,
                     ranker_note, dim_table, demos, timings, models, raw, loader)


def _correction_panel(service: LinkService) -> CorrectionPanel:
    with gr.Group():
        with gr.Row():
            accept_gemel = gr.Button("Accept GEMEL  [g]", elem_id="mel-accept-gemel")
            accept_dim = gr.Button("Accept DIM choice  [d]", elem_id="mel-accept-dim")
            nil_btn = gr.Button("NIL: not in KB  [n]", elem_id="mel-nil")
            skip_btn = gr.Button("Not sure / skip  [s]", elem_id="mel-skip")
            undo_btn = gr.Button("Undo my last  [u]", elem_id="mel-undo")
        dim_choice = gr.Radio(label="DIM candidate to accept (keys 1-9, 0 for the 10th; then d)", choices=[],
                              value=None, elem_id="mel-dim-choice")
        with gr.Row():
            search_box = gr.Textbox(label="Search the KB  [/]", scale=4, elem_id="mel-search",
                                    max_length=MAX_QUERY_CHARS)
            search_btn = gr.Button("Search", scale=1, elem_id="mel-search-btn")
        search_results = gr.Radio(label="Search results", choices=[], elem_id="mel-search-results")
        pick_btn = gr.Button("Link to the selected search result", elem_id="mel-pick")
        live_pool = gr.Checkbox(value=service.config.live_pool, elem_id="mel-live-pool",
                                label="My corrections join GEMEL's demonstration pool at once")
        ack = gr.HTML(label="acknowledgement", elem_id="mel-ack")
    return CorrectionPanel(accept_gemel, accept_dim, nil_btn, skip_btn, undo_btn, dim_choice, search_box, search_btn,
                           search_results, pick_btn, live_pool, ack)


def _admin_panel() -> AdminPanel:
    with gr.Accordion("Admin: export corrections as training data", open=False, visible=False) as box:
        export_format = gr.Dropdown(list(FORMATS), value="jsonl", label="format", elem_id="mel-export-format")
        export_btn = gr.Button("Export", elem_id="mel-export")
        export_file = gr.HTML(elem_id="mel-export-file")   # a one-time download link (DownloadVault)
        export_note = gr.HTML()
        backup_btn = gr.Button("Download a backup of the annotation database", elem_id="mel-backup")
        backup_file = gr.HTML(elem_id="mel-backup-file")
    return AdminPanel(box, export_format, export_btn, export_file, export_note, backup_btn, backup_file)


# -- the Link tab's events ---------------------------------------------------------------------------
def _wire_counter_refresh(service: LinkService, access: Access, who: gr.HTML, queue_view: gr.HTML) -> None:
    """The header's counter follows the Annotate tab too: redrawn with each task the queue shows
    (a decision draws the next task), after it, so the next task is never kept waiting."""
    def on_task_shown(request: gr.Request, profile: gr.OAuthProfile | None = None):
        annotator = access.annotator(request, profile)
        if not annotator:
            return gr.skip()
        return counter_html(annotator, service.counts(annotator), access.is_admin(annotator))

    queue_view.change(on_task_shown, None, [who], queue=False, api_visibility="private", show_progress="hidden")


def _wire_page_load(demo: gr.Blocks, service: LinkService, access: Access, who: gr.HTML, info: gr.HTML,
                    admin_box: gr.Accordion) -> None:
    """On page load: who is logged in with their counts, the models' status, the admin box for admins."""
    @guarded
    def on_load(request: gr.Request, profile: gr.OAuthProfile | None = None):
        annotator = access.annotator(request, profile)
        admin = access.is_admin(annotator)
        counts = service.counts(annotator) if annotator else {}
        return (counter_html(annotator, counts, admin), status_html(service.describe()),
                gr.update(visible=admin))

    demo.load(on_load, None, [who, info, admin_box], api_visibility="undocumented")


def _wire_linking(service: LinkService, access: Access, current: gr.State, link: LinkPanel,
                  fix: CorrectionPanel, picked: gr.State, seen: gr.State) -> None:
    """A selection in the caption fills mention/start/end; Link (/link) links; a DIM row picks its entity."""
    def on_select(text: str, s16, e16, selected: str, last):
        # s16/e16: the browser's selection in UTF-16 units (see SELECTION_JS)
        nothing = (gr.skip(),) * 7
        if (not selected or s16 is None or e16 is None or not isinstance(text, str)
                or not isinstance(selected, str) or len(text) > MAX_CAPTION_CHARS):
            return nothing  # the Link button says what is wrong with the caption
        try:
            s, e = span_from_selection(text, int(s16), int(e16), selected)
        except MELError:
            return nothing  # a selection of spaces, or of nothing
        # another mention selected: the last link ends (the keys must not save for the one linked before)
        ends = (None, gr.update(value=None)) if _other_span(last, s, e) else (gr.skip(), gr.skip())
        return text[s:e], s, e, text[s:e], *ends, span_seen(text, s, e)

    # The selection is read from the textarea by JS when the handler runs, not from the event:
    # a keyboard or mouse selection fires one event per step, and Gradio's always_last mode
    # re-runs the last one without its event data. start/end/mention only carry the values in.
    selected = link.caption.select(on_select, [link.caption, link.start, link.end, link.mention, current],
                                   [link.mention, link.start, link.end, picked, current, fix.search_results, seen],
                                   js=SELECTION_JS,
                                   api_visibility="private", show_progress="hidden", trigger_mode="always_last")

    # The caption edited after a selection: the offsets follow the mention (as for a typed one), and
    # a selected mention the edit took out of the caption is cleared with them. `last_seen` is the
    # span the server worked out last, with its caption: an edit elsewhere moves a selected word by
    # the edit (a second "Collins" stays the second), never onto another copy of its text, and two
    # quick edits are followed from the span the first left, not from older offsets the boxes may
    # still show. Run again when a selection's answer lands, which can be after the caption changed
    # (all of it selected, then typed over: the old caption must not stay as the mention).
    def on_caption_edited(caption_text, mention_text, start_char, end_char, selection, last_seen):
        keep = (gr.skip(),) * 4
        from_selection = isinstance(selection, str) and bool(mention_text) and selection == mention_text
        if isinstance(last_seen, dict) and last_seen["caption"] == caption_text:
            return _worked_out(caption_text, mention_text, start_char, end_char, from_selection, last_seen)
        if not isinstance(mention_text, str) or not mention_text:
            # the box may be empty only because a selection's answer has not reached the page yet:
            # the server's span goes on following the edit, for that answer to be placed by. Offsets
            # the boxes show as the server's own (typed by hand, no mention) move with it.
            followed = span_followed(last_seen, caption_text)
            if _boxes_show_seen(last_seen, start_char, end_char) and followed is not None:
                return gr.skip(), followed["start"], followed["end"], gr.skip(), followed
            return (*keep, followed)
        span = follow_caption_edit(*_edited_from(last_seen, mention_text, start_char, end_char), caption_text,
                                   mention_text, from_selection)
        if span is None:   # a selected mention the edit went through or took out
            return "", None, None, None, span_seen(caption_text, None, None)
        if span == (start_char, end_char):   # nothing to change: an answer that lands late changes nothing
            return (*keep, span_seen(caption_text, *span))
        return gr.skip(), *span, gr.skip(), span_seen(caption_text, *span)

    edited = dict(fn=on_caption_edited, inputs=[link.caption, link.mention, link.start, link.end, picked, seen],
                  outputs=[link.mention, link.start, link.end, picked, seen], api_visibility="private",
                  show_progress="hidden", queue=False)
    selected.then(**edited)

    linked = _wire_link_button(service, access, current, link, fix)

    # What the correction keys act on is the last link on screen. A failed link, or a new caption,
    # photo or mention typed after it, ends it: the keys then ask for a link instead of saving a
    # label for the mention linked before (which would replace that mention's right label).
    def forget_last_link():
        return None, gr.update(value=None)  # and a search result chosen for it

    link.caption.input(trigger_mode="always_last", **edited)
    link.caption.change(forget_last_link, None, [current, fix.search_results], queue=False, api_visibility="private",
                        show_progress="hidden")
    linked.failure(forget_last_link, None, [current, fix.search_results], queue=False, api_visibility="private")
    link.image.change(forget_last_link, None, [current, fix.search_results], queue=False, api_visibility="private",
                      show_progress="hidden")

    # offsets typed by hand: another span ends the link, and they are the span from now on
    def on_offsets_typed(caption_text, last, start_char, end_char):
        ends = (None, gr.update(value=None)) if _other_span(last, start_char, end_char) else (gr.skip(), gr.skip())
        return *ends, span_seen(caption_text, start_char, end_char)

    for box in (link.start, link.end):
        box.input(on_offsets_typed, [link.caption, current, link.start, link.end], [current, fix.search_results, seen],
                  queue=False,
                  api_visibility="private", show_progress="hidden", trigger_mode="always_last")

    def on_row(state, evt: gr.SelectData):
        if not state or not isinstance(evt.index, (list, tuple)):
            return gr.skip()
        row = int(evt.index[0])
        return state["ranked"][row][0] if 0 <= row < len(state["ranked"]) else gr.skip()

    link.dim_table.select(on_row, [current], [fix.dim_choice], api_visibility="undocumented", queue=False)
    _wire_typed_inputs(link, current, picked, seen)
    _wire_examples(link, picked, seen)


def _wire_examples(link: LinkPanel, picked: gr.State, seen: gr.State) -> None:
    """An example fills the boxes without an .input event: its mention counts as selected, and its span
    is the server's from now on (an edit right after is followed from it, not from older offsets)."""
    def on_example_loaded(caption_text, mention_text, start_char, end_char):
        return mention_text or None, span_seen(caption_text, start_char, end_char)

    if link.examples is not None:
        link.examples.load_input_event.then(on_example_loaded, [link.caption, link.mention, link.start, link.end],
                                            [picked, seen], queue=False, api_visibility="private",
                                            show_progress="hidden")


def _worked_out(caption, mention, start, end, from_selection: bool, last_seen: dict) -> tuple:
    """on_caption_edited's outputs for a caption whose span the server worked out already: the boxes
    get that span where they show other offsets for its mention (a selection's answer that landed
    after it, with the offsets from before the edit); a selection's words no longer at its offsets
    are cleared; else nothing changes."""
    skip = gr.skip()
    before, *span = _edited_from(last_seen, mention, start, end)   # (the seen caption is this caption)
    if before is not None:
        return (skip,) * 5 if tuple(span) == (start, end) else (skip, *span, skip, skip)
    if from_selection and not span_holds(caption, mention, start, end):
        return "", None, None, None, span_seen(caption, None, None)
    return (skip,) * 5


def _edited_from(last_seen, mention, start, end) -> tuple:
    """(caption before the edit, start, end) to follow an edit from: the span the server saw last when it
    still holds the mention there, else the boxes' offsets (the caption before unknown: None)."""
    if isinstance(last_seen, dict) and span_holds(last_seen["caption"], mention, last_seen["start"], last_seen["end"]):
        return last_seen["caption"], last_seen["start"], last_seen["end"]
    return None, start, end


def span_seen(caption, start, end) -> dict | None:
    """The span as the server saw it last, with its caption (the `seen` state of the Link tab)."""
    return {"caption": caption, "start": start, "end": end} if isinstance(caption, str) else None


def span_followed(last_seen, caption) -> dict | None:
    """`last_seen` carried over to the edited `caption`: its span moved by the edit, or none when the
    edit went through it (or there was none)."""
    if not _has_span(last_seen) or not isinstance(caption, str):
        return span_seen(caption, None, None)
    moved = follow_edit(last_seen["caption"], caption, int(last_seen["start"]), int(last_seen["end"]))
    return span_seen(caption, *(moved or (None, None)))


def _has_span(last_seen) -> bool:
    """Whether the server's last word on the span (the `seen` state) names one."""
    return isinstance(last_seen, dict) and last_seen["start"] is not None and last_seen["end"] is not None


def _boxes_show_seen(last_seen, start, end) -> bool:
    """Whether the offset boxes show the server's last span (not older offsets a pending answer replaces)."""
    return _has_span(last_seen) and (start, end) == (last_seen["start"], last_seen["end"])


def _other_span(last, start, end) -> bool:
    """Whether offsets (start, end) name another mention than the last link's (None: no link)."""
    return isinstance(last, dict) and (last.get("start"), last.get("end")) != (start, end)


def _wire_typed_inputs(link: LinkPanel, current: gr.State, picked: gr.State, seen: gr.State) -> None:
    """A mention typed by hand moves the offsets with it; an upload is decoded as it arrives."""
    # A mention typed by hand: the offsets of an earlier highlight no longer apply. They follow the
    # typed text (kept where they still hold it, else its first occurrence), or are cleared.
    # (.input, not .change: .change also fires for the values a selection sets, and listening to it
    # let a selection's late answer come back over the mention. A paste, cut or Backspace is sent as
    # .input by demo/assets/app.js, as Gradio's Textbox sends .input for key presses only.)
    def on_mention_typed(caption_text, mention_text, start_char, end_char):
        s, e = retarget_offsets(caption_text, mention_text, start_char, end_char)
        return s, e, None, None, span_seen(caption_text, s, e)   # typed, not selected: a caption edit never clears it

    link.mention.input(on_mention_typed, [link.caption, link.mention, link.start, link.end],
                       [link.start, link.end, current, picked, seen], queue=False, api_visibility="private",
                       show_progress="hidden", trigger_mode="always_last")

    # An upload is decoded at once: a file that is not an image is refused there, with the formats
    # that work, and taken off; the caption, mention and offsets stay as typed.
    def on_upload(image_path):
        try:
            check_upload(image_path)
        except MELError as exc:
            return None, refusal_html(str(exc), "mel-upload-refused")
        except Exception:
            log.exception("checking an upload failed")
            return None, refusal_html(f"the file could not be read as an image; upload a photo in "
                                      f"{IMAGE_FORMATS} format (your caption and mention are kept)",
                                      "mel-upload-refused")
        return gr.skip(), ""

    link.image.upload(on_upload, [link.image], [link.image, link.status], api_visibility="private",
                      concurrency_limit=SEARCH_SLOTS, concurrency_id="upload", show_progress="minimal")


def _wire_link_button(service: LinkService, access: Access, current: gr.State, link: LinkPanel,
                      fix: CorrectionPanel):
    """The Link button (and /link); returns the link event, for what follows a failure."""
    # The Link button: a quick check first (no queue), which writes what is wrong and what to do
    # in the status line under the button and ends the last link; a silent gate then stops the
    # chain, so that no result panel is marked as failed. Only a checked link is queued (/link:
    # API callers call it directly and get its errors as errors).
    def on_check(caption_text, mention_text, start_char, end_char):
        try:
            check_offsets(start_char, end_char)
            locate_mention(caption_text, mention_text, start_char, end_char)
        except MELError as exc:
            return refusal_html(str(exc), "mel-link-refused"), "refused", None, gr.update(value=None)
        # a search result clicked for the mention before is never saved for this one
        return "", "checked", gr.skip(), gr.update(value=None)

    def on_gate(attempt):
        if attempt == "refused":  # said in the status line already: nothing to show again
            raise gr.Error("refused", visible=False, print_exception=False)

    tracker = gr.Progress()  # Gradio finds the progress tracker by on_link's default: one per app

    def on_link(image_path, caption_text, mention_text, start_char, end_char, attempt, request: gr.Request,
                profile: gr.OAuthProfile | None = None, progress=tracker):
        try:
            return guarded(link_outputs)(image_path, caption_text, mention_text, start_char, end_char, request,
                                         profile, progress)
        except gr.Error as err:
            if attempt != "checked":  # an API call: the error is the answer
                raise
            # after the check (an unreadable photo, a failure): said once in the status line
            return (*[gr.skip()] * 10, None, gr.skip(), gr.skip(), gr.skip(), gr.skip(),
                    refusal_html(str(err.message), "mel-link-refused", escaped=True))

    def link_outputs(image_path, caption_text, mention_text, start_char, end_char, request, profile, progress):
        annotator = access.annotator(request, profile) or ""
        text = caption_text
        check_offsets(start_char, end_char)
        s, e = resolve_span(text, mention_text, start_char, end_char)
        view = service.link(text, s, e, image_path, annotator=annotator, progress=lambda f, d: progress(f, desc=d))
        state = {"mention_id": view.mention_id, "text": view.mention.text, "start": s, "end": e,
                 "generator": view.generated, "ranked": [(c["id"], c["name"]) for c in view.ranked],
                 # the predictions on screen: a correction names the one it accepts
                 "prediction_ids": {"accept_gemel": view.generator.prediction_id if view.generator else None,
                                    "accept_dim": view.ranker.prediction_id}}
        result = view.to_dict()
        # nothing chosen for the annotator: the DIM choice waits for a click or a key
        return (highlight_html(text, s, e), render_generator(view), render_cue(view), render_ranker_note(view),
                candidate_table(view), gr.update(choices=candidate_choices(view), value=None),
                gallery_items(view), view.timings, view.preset, result, state, view.mention.text, s, e, "", "")

    attempt = gr.State(None)  # "checked" / "refused": what on_check found for this click
    link_event = dict(fn=on_link, inputs=[link.image, link.caption, link.mention, link.start, link.end, attempt],
                      outputs=[link.highlighted, link.gemel_html, link.cue_html, link.ranker_note, link.dim_table,
                               fix.dim_choice, link.demos, link.timings, link.models, link.raw, current,
                               link.mention, link.start, link.end, fix.ack, link.status],
                      concurrency_limit=1, concurrency_id="link")
    checked = link.link_btn.click(on_check, [link.caption, link.mention, link.start, link.end],
                                  [link.status, attempt, current, fix.search_results], queue=False,
                                  api_visibility="private",
                                  show_progress="hidden")
    gate = checked.then(on_gate, [attempt], None, queue=False, api_visibility="private", show_progress="hidden")
    return gate.success(api_name="link", **link_event)


def _wire_corrections(service: LinkService, access: Access, who: gr.HTML, current: gr.State,
                      fix: CorrectionPanel) -> None:
    """The correction buttons (and undo): each saves for the mention linked last, then acknowledges it.

    A refusal (nothing linked, nothing chosen, not logged in) is said in the acknowledgement line,
    which is where the annotator looks for "saved", and nothing is saved; the counter is left as is.
    """
    def inline(fn):
        """Run `fn` guarded; a refusal becomes the acknowledgement line's message (not an error on
        every output)."""
        run = guarded(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return run(*args, **kwargs)
            except gr.Error as err:
                return refusal_html(str(err.message), "mel-ack-refused", escaped=True), gr.skip()
        return wrapper

    def save(action: str, state, entity_id, live, request, profile):
        annotator = access.annotator(request, profile)
        if not state:
            raise gr.Error("link a mention first, then correct it (a link still running, or ended by another "
                           "mention, caption or photo, has nothing to correct yet)")
        shown = state.get("prediction_ids") or {}
        ack_ = service.correct(annotator, state["mention_id"], action, entity_id, live_pool=bool(live),
                               prediction_id=shown.get(action))
        what = (f"→ <b>{_esc(ack_.entity_name)}</b> <code>{_esc(ack_.entity_id)}</code>"
                if action not in ("nil", "skip") else "")
        message = (f'<div id="mel-ack-ok">Saved #{ack_.correction_id}: “{_esc(state["text"])}” {what} '
                   f'({_esc(ACTION_LABELS[action])}) at {_esc(ack_.created)}</div>')
        return message, counter_html(annotator, service.counts(annotator), access.is_admin(annotator))

    @inline
    def on_accept_gemel(state, live, request: gr.Request, profile: gr.OAuthProfile | None = None):
        gen = (state or {}).get("generator")
        if state and (not gen or gen["id"] in (None, "NIL")):
            raise gr.Error("GEMEL gave no entity for this mention: pick a DIM candidate, search, or mark NIL")
        return save("accept_gemel", state, gen["id"] if gen else None, live, request, profile)

    @inline
    def on_accept_dim(state, choice, live, request: gr.Request, profile: gr.OAuthProfile | None = None):
        if state and not choice:  # nothing is pre-selected: the annotator chooses
            raise gr.Error("choose a candidate first: click a row of DIM's table or press its key (1-9, 0 for "
                           "the 10th), then d; nothing was saved")
        return save("accept_dim", state, choice, live, request, profile)

    @inline
    def on_pick(state, choice, live, request: gr.Request, profile: gr.OAuthProfile | None = None):
        if state and not choice:
            raise gr.Error("choose a candidate first: search the KB and click a result; nothing was saved")
        return save("search", state, choice, live, request, profile)

    @inline
    def on_nil(state, live, request: gr.Request, profile: gr.OAuthProfile | None = None):
        return save("nil", state, None, live, request, profile)

    @inline
    def on_skip(state, live, request: gr.Request, profile: gr.OAuthProfile | None = None):
        return save("skip", state, None, live, request, profile)

    @inline
    def on_undo(request: gr.Request, profile: gr.OAuthProfile | None = None):
        annotator = access.annotator(request, profile)
        undone = service.undo(annotator)
        return _undo_message(undone), counter_html(annotator, service.counts(annotator), access.is_admin(annotator))

    # Corrections have slots of their own: they never wait behind links ("link") or searches ("search").
    saved = [fix.ack, who]
    common = dict(api_visibility="undocumented", concurrency_limit=8, concurrency_id="correct")
    fix.accept_gemel.click(on_accept_gemel, [current, fix.live_pool], saved, **common)
    fix.accept_dim.click(on_accept_dim, [current, fix.dim_choice, fix.live_pool], saved, **common)
    fix.pick_btn.click(on_pick, [current, fix.search_results, fix.live_pool], saved, **common)
    fix.nil_btn.click(on_nil, [current, fix.live_pool], saved, **common)
    fix.skip_btn.click(on_skip, [current, fix.live_pool], saved, **common)
    fix.undo_btn.click(on_undo, None, saved, **common)


def _undo_message(undone: dict | None) -> str:
    """What the Link tab's undo did, and which of the annotator's labels stands for that mention now."""
    if undone is None:
        return "Nothing of yours to undo here (a project task's decision is undone in the Annotate tab)."
    now = undone.get("now_standing")
    return (f'<div id="mel-undo-ok">Undone #{undone["id"]}: {_describe_correction(undone)}. '
            + (f'Your label for this mention is again #{now["id"]}: {_describe_correction(now)}.'
               if now else "You have no label for this mention now.") + "</div>")


def _describe_correction(row: dict) -> str:
    """'accepted DIM → Phil Collins', 'NIL'...: a correction as the undo line names it (HTML-escaped)."""
    return _esc(ACTION_LABELS[row["action"]]) + (f' → {_esc(row["entity_name"])}' if row.get("entity_name") else "")


def _wire_search(service: LinkService, fix: CorrectionPanel) -> None:
    """The KB search box (button or Enter) fills the search results to link to."""
    @guarded
    def on_search(query):
        found = service.search(query, k=10)
        choices = [(f"{e.name} ({e.id}): {_clip(e.description, 90)}", e.id) for e in found]
        return gr.update(choices=choices, value=None,  # nothing chosen until the annotator clicks one
                         label=f"Search results ({len(choices)})" if choices else "Search results: none found")

    for trigger in (fix.search_btn.click, fix.search_box.submit):
        trigger(on_search, [fix.search_box], [fix.search_results], api_visibility="undocumented",
                concurrency_limit=SEARCH_SLOTS, concurrency_id="search")


def _wire_admin(service: LinkService, access: Access, vault: DownloadVault, admin: AdminPanel) -> None:
    """Export and backup (admins; checked again by the service), handed over as one-time download links."""
    def download_link(path, annotator: str) -> str:
        return vault.link_html(path, annotator,
                               after=" (the file is then deleted from the server's temporary folder)")

    @guarded
    def on_export(fmt, request: gr.Request, profile: gr.OAuthProfile | None = None):
        annotator = access.annotator(request, profile)
        admin_ = access.is_admin(annotator)
        folder = vault.folder() if admin_ else None
        try:
            path, summary = service.export(annotator, fmt, is_admin=admin_, out_dir=folder)
        except BaseException:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return download_link(path, annotator), f'<div class="mel-note">{_esc(summary)}</div>'

    admin.export_btn.click(on_export, [admin.export_format], [admin.export_file, admin.export_note],
                           api_visibility="private", concurrency_limit=1)

    @guarded
    def on_backup(request: gr.Request, profile: gr.OAuthProfile | None = None):
        annotator = access.annotator(request, profile)
        admin_ = access.is_admin(annotator)
        folder = vault.folder() if admin_ else None
        try:
            path = service.backup(annotator, is_admin=admin_, out_dir=folder)
        except BaseException:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return download_link(path, annotator)

    admin.backup_btn.click(on_backup, None, [admin.backup_file], api_visibility="private", concurrency_limit=1)


def _add_link_api(service: LinkService, access: Access) -> None:
    """A small, typed API for scripts (gradio_client): /correct, /undo, /search, /counts."""
    @guarded
    def correct(mention_id: str, action: str, entity_id: str = "", request: gr.Request = None,
                profile: gr.OAuthProfile | None = None) -> dict:
        """Save a correction for a linked mention; action: accept_gemel | accept_dim | search | nil | skip."""
        annotator = access.annotator(request, profile)
        return service.correct(annotator, mention_id, action, entity_id or None).to_dict()

    @guarded
    def undo(request: gr.Request = None, profile: gr.OAuthProfile | None = None) -> dict:
        """Undo your own most recent correction of a linked mention (a project task's decision is undone
        in the Annotate tab's queue); returns it (empty when there was none)."""
        return service.undo(access.annotator(request, profile)) or {}

    @guarded
    def search(query: str, k: int = 10) -> list:
        """Search the KB by name, alias or description (exact matches first, then BM25); at most
        200 characters, k from 1 to 50."""
        return [e.to_dict() for e in service.search(query, k=k)]

    @guarded
    def counts(request: gr.Request = None, profile: gr.OAuthProfile | None = None) -> dict:
        """Your correction counts in this database."""
        annotator = access.annotator(request, profile)
        return {"annotator": annotator, **(service.counts(annotator) if annotator else {})}

    gr.api(correct, api_name="correct", concurrency_limit=8, concurrency_id="correct")
    gr.api(undo, api_name="undo", concurrency_limit=8, concurrency_id="correct")
    gr.api(search, api_name="search", concurrency_limit=SEARCH_SLOTS, concurrency_id="search")
    gr.api(counts, api_name="counts", concurrency_limit=SEARCH_SLOTS, concurrency_id="search")
