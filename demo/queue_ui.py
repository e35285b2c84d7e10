"""The annotator's queue screen (tab "Annotate") and the admins' project panel (tab "Projects").

    screens = QueueScreens(service)
    html = screens.handle("alice", {"project": "p", "action": "next"})           # the next task
    html = screens.handle("alice", {"project": "p", "action": "accept_dim", "task_id": ...,
                                    "entity_id": "Q42", "prediction_id": 7, "shown": [6, 7], "token": uuid})

One path for every key press and click: the page's script (demo/assets/queue.js) reads what is on
screen (the task id, the ids of the predictions shown, the entities), adds a fresh token
(crypto.randomUUID) and sends one JSON command through a hidden button; `QueueScreens.handle`
saves it with annotations.queue.AnnotationQueue and answers with the next task, rendered, in the
same response (demo/render.py `render_task`). So a decision and the next task cost one round trip.
The library refuses a save for a task that is not on the annotator's screen (StaleTaskError) and
replays a repeated token; the script also ignores keys while an answer is pending. A refusal is
shown in the answer's message line, with the task that is now on screen; nothing is saved.

After each answer the following tasks are prepared in the background (their predictions linked
if the pre-annotation has not reached them, their images shrunk), so the next one is ready.

The "Projects" tab (admins only, Access.is_admin, checked again by every handler): create a
project from an uploaded CSV/JSONL and a zip of images (unpacked by `safe_extract_zip`: absolute
paths, `..`, links, too many files and too many bytes are refused), then annotations.import_tasks;
and pre-annotation in a background thread with a stop flag, its progress refreshed by a gr.Timer.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import gradio as gr

from annotations import NotAllowedError
from annotations.preannotate import ensure_predictions, preannotate, preannotation_status
from annotations.projects import (
    ProjectSettings,
    discard_empty_project,
    get_project,
    import_tasks,
    list_projects,
    list_tasks,
    open_or_create_project,
)
from annotations.queue import MAX_COMMENT_CHARS, AnnotationQueue, StaleTaskError
from mel.errors import InputError, MELError

from .access import Access, guarded
from .render import (
    image_data_uri,
    refusal_html,
    render_import_report,
    render_preannotation,
    render_search_results,
    render_task,
)
from .service import MAX_ID_CHARS, MAX_QUERY_CHARS, LinkService

log = logging.getLogger(__name__)

DECISIONS = ("accept_gemel", "accept_dim", "search", "nil", "skip")
MOVES = ("next", "back", "forward", "undo", "flag")
MAX_COMMAND_CHARS = 4000 + MAX_COMMENT_CHARS
PREFETCH = 3                    # tasks prepared ahead of the one on screen
ZIP_MAX_BYTES = 1 << 30         # unpacked images: at most 1 GiB in all
ZIP_MAX_FILES = 20_000
ZIP_MAX_RATIO = 100             # a member that unpacks to more than 100x its packed size is refused (zip bomb)
PREANNOTATE_BATCH = 4           # tasks per transaction and per hold of the link lock (the Link tab waits less)

KEYMAP_MD = """### Keys (never while typing in a text box; `Esc` leaves the box)
| key | does |  | key | does |
|---|---|---|---|---|
| `Enter` or `g` | accept GEMEL's entity and save |  | `u` | undo your last decision |
| `1`–`9`, `0` | pick DIM's candidate 1–10 and save |  | `←`/`b`, `→`/`f` | back / forward through your decisions |
| `n` | NIL: the entity is not in the KB |  | `/` | search the KB (Tab or ↓ to a result, Enter picks it) |
| `s` | skip: the task comes back at the end |  | `x` | flag for review (type a comment, Enter) |
| `h` or `?` | this help and the project's guidelines |  | | |

Every save names the task on screen; the line at the top says what was saved, for which task.
Going back shows a decision you made: any decision key changes it."""


# -- the queue, server side ----------------------------------------------------------------------
class QueueScreens:
    """Every annotator's queue screen: one AnnotationQueue per project, the project's linkers (for
    tasks not pre-annotated yet) and KB, and a background worker preparing the next tasks."""

    def __init__(self, service: LinkService):
        self.service = service
        self._queues: dict[str, AnnotationQueue] = {}
        self._lock = threading.Lock()
        self._prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mel-prefetch")
        self._prefetching: set[str] = set()

    @property
    def store(self):
        return self.service.store

    def project_names(self) -> list[str]:
        return [p.name for p in list_projects(self.store)]

    def queue(self, name: str) -> AnnotationQueue:
        if not isinstance(name, str) or not name:
            raise InputError("choose a project first")
        with self._lock:
            q = self._queues.get(name)
        if q is None:
            if name not in self.project_names():   # (get_project's message names the server's path and every project)
                raise InputError(f"no project {name[:MAX_ID_CHARS]!r} here: pick one of the projects listed above")
            project = get_project(self.store, name)
            q = AnnotationQueue(self.store, project, kb=self.service.project_kb(project),
                                linkers=self.service.project_linkers(project), k=self.service.config.k)
            with self._lock:
                q = self._queues.setdefault(name, q)
        return q

    def forget(self, name: str) -> None:
        """Drop a cached queue (its project's settings or KB changed)."""
        with self._lock:
            self._queues.pop(name, None)

    def guidelines(self, name: str | None) -> str:
        if not name:
            return ""
        text = get_project(self.store, name).settings.guidelines.strip()
        return f"### Guidelines of {name}\n\n{text}" if text else f"*{name} has no guidelines yet.*"

    def describe(self, q: AnnotationQueue):
        kb = q.kb
        cache: dict[str, str] = {}

        def description(entity_id) -> str:
            if kb is None or not entity_id or entity_id == "NIL":
                return ""
            if entity_id not in cache:
                try:
                    cache[entity_id] = kb.get(entity_id).description
                except MELError:
                    cache[entity_id] = ""
            return cache[entity_id]
        return description

    # -- one command ------------------------------------------------------------------------
    def handle(self, annotator: str | None, cmd: dict) -> str:
        """Do `cmd` for `annotator` and return the screen to show (the next task, or the same one
        with the reason a command was refused)."""
        project = cmd.get("project") if isinstance(cmd, dict) else None
        nonce = cmd.get("token", "") if isinstance(cmd, dict) else ""
        nonce = nonce if isinstance(nonce, str) and len(nonce) <= MAX_ID_CHARS else ""
        if not annotator:
            return render_task(None, project=project or "", nonce=nonce, ok=False,
                               message="log in to annotate: every decision records who made it")
        try:
            q = self.queue(project)
        except MELError as exc:
            return render_task(None, project=project or "", nonce=nonce, ok=False, message=str(exc))
        team = get_project(self.store, q.project.name).settings.annotators
        if team and annotator not in team:
            # Checked before anything else: a task left on the screen (or in the cursor) from before the
            # team was set must be neither shown nor decided by someone off the team.
            return render_task(None, project=q.project.name, nonce=nonce, ok=False, empty="not on the team",
                               message=f"{annotator} is not on the team of project {q.project.name!r}, so no task "
                                       f"is assigned to you and nothing was saved; an admin adds you in the "
                                       f"Dashboard tab (project settings)")
        message, ok, undo_id, view = "", True, None, None
        try:
            view, message, undo_id = self._do(q, annotator, cmd)
        except (MELError, NotAllowedError) as exc:
            ok, message = False, str(exc)
            if isinstance(exc, StaleTaskError):
                message = "not saved: " + message
            try:
                view = q.current(annotator, by=annotator) or q.next_task(annotator, by=annotator)
            except (MELError, NotAllowedError):
                view = None  # the refusal itself is the message; nothing to show
        if view is not None:
            self._prepare_after(q, view.task.position)
        return render_task(view, project=q.project.name, message=message, ok=ok, nonce=nonce, undo_id=undo_id,
                           describe=self.describe(q), calibrations=self.service.calibrations())

    def _do(self, q: AnnotationQueue, annotator: str, cmd: dict):
        action = cmd.get("action")
        if action in DECISIONS:
            if not cmd.get("task_id"):  # "Nothing left" on screen: a decision key has no task to decide
                raise InputError("there is no task on screen to decide: every task assigned to you is decided "
                                 "(← goes back through your decisions, u undoes the last); nothing was saved")
            entity_id = cmd.get("entity_id") or None
            if action == "accept_gemel" and not entity_id:
                raise InputError("GEMEL gave no entity for this task: pick a DIM candidate (1-0), search (/) or "
                                 "mark NIL (n); nothing was saved")
            if action in ("accept_dim", "search") and not entity_id:
                raise InputError("no such candidate on screen; nothing was saved")
            pid = cmd.get("prediction_id")
            pid = int(pid) if isinstance(pid, (int, str)) and str(pid).isdigit() else None
            shown = cmd.get("shown") or []
            if not isinstance(shown, list):
                raise InputError("shown must be the list of prediction ids on screen")
            ack = q.decide(annotator, _text(cmd.get("task_id"), "task_id"), action, entity_id,
                           token=_text(cmd.get("token"), "token"), shown_prediction_ids=shown,
                           prediction_id=pid if action in ("accept_gemel", "accept_dim") else None, by=annotator)
            if not ack.replayed:
                if ack.supersedes:
                    self.service.pool_remove(ack.supersedes)
                if action not in ("nil", "skip"):
                    self.service.pool_add(ack.correction_id, ack.mention_id, q.kb.get(ack.entity_id) if q.kb else None)
            return q.next_task(annotator, by=annotator), ack.describe(), ack.correction_id
        if action == "undo":
            raw = cmd.get("undo_id")
            decision = int(raw) if isinstance(raw, (int, str)) and str(raw).isdigit() else None
            undone = q.undo(annotator, decision, by=annotator)
            if undone is None:
                return q.current(annotator, by=annotator) or q.next_task(annotator, by=annotator), \
                    "nothing of yours to undo in this project", None
            self.service.pool_remove(undone.undone.id)
            d = undone.undone
            return undone.view, f"undone: task {d.task_id} ({d.action}{' ' + d.entity_id if d.entity_id else ''}); " \
                                f"it is on screen again", None
        if action == "back":
            view = q.back(annotator, by=annotator)
            return view or q.current(annotator, by=annotator), ("" if view else "no decisions to go back to"), None
        if action == "forward":
            return q.forward(annotator, by=annotator), "", None
        if action == "flag":
            flag = q.flag(annotator, _text(cmd.get("task_id"), "task_id"), cmd.get("comment") or "", by=annotator)
            return q.current(annotator, by=annotator) or q.next_task(annotator, by=annotator), \
                f"flagged task {flag.task_id} for review: {flag.comment[:80]}", None
        if action == "next":
            return q.next_task(annotator, by=annotator), "", None
        raise InputError(f"unknown command {str(action)[:40]!r}")

    # -- preparing the next tasks -----------------------------------------------------------
    def _prepare_after(self, q: AnnotationQueue, position: int) -> None:
        key = f"{q.project.name}\x00{position}"
        with self._lock:
            if key in self._prefetching:
                return
            self._prefetching.add(key)
        self._prefetch.submit(self._prepare, q, position, key)

    def _prepare(self, q: AnnotationQueue, position: int, key: str) -> None:
        try:
            for task in list_tasks(self.store, q.project, limit=PREFETCH, offset=position + 1):
                if q.linkers:
                    ensure_predictions(self.store, q.project, task, q.linkers, k=q.k)
                if task.mention.image:
                    image_data_uri(task.mention.image)
        except Exception:  # preparing is an optimisation: the task is linked on demand when shown
            log.warning("preparing the tasks after position %s failed", position, exc_info=True)
        finally:
            with self._lock:
                self._prefetching.discard(key)

    def close(self) -> None:
        self._prefetch.shutdown(wait=False, cancel_futures=True)


def _text(value, field: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise InputError(f"{field} is missing or too long; reload the page")
    return value


def parse_command(text) -> dict:
    if not isinstance(text, str) or len(text) > MAX_COMMAND_CHARS:
        raise InputError("the command is missing or too long; reload the page")
    try:
        cmd = json.loads(text or "{}")
    except json.JSONDecodeError:
        raise InputError("the command is not JSON; reload the page") from None
    if not isinstance(cmd, dict):
        raise InputError("the command must be a JSON object; reload the page")
    return cmd


# -- safe unzip ----------------------------------------------------------------------------------
def safe_extract_zip(archive: str | Path, dest: str | Path, *, max_bytes: int = ZIP_MAX_BYTES,
                     max_files: int = ZIP_MAX_FILES, max_ratio: int = ZIP_MAX_RATIO) -> Path:
    """Unpack `archive` into `dest` (a new, empty folder) and return the image folder (dest, or its
    one top folder). Refused, before anything is written, with InputError naming the member: an
    absolute path, a `..` part, a symbolic link or other special file, more than `max_files`
    members, more than `max_bytes` in all or a member that unpacks to more than `max_ratio` times
    its packed size. While unpacking, the bytes actually written are counted too (a header can lie)."""
    dest = Path(dest)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"the images file is not a zip archive ({exc})") from None
    with zf:
        members = zf.infolist()
        if len(members) > max_files:
            raise InputError(f"the zip holds {len(members):,} files, more than the limit of {max_files:,}")
        total = 0
        for info in members:
            name = info.filename
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts:
                raise InputError(f"the zip member {name!r} points outside the archive's folder; refused")
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix type recorded (a plain file)
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise InputError(f"the zip member {name!r} is a link or a special file; only files and folders "
                                 f"are unpacked")
            total += info.file_size
            if total > max_bytes:
                raise InputError(f"the zip unpacks to more than {max_bytes / 2**20:,.0f} MiB; refused")
            if info.file_size > max_ratio * max(info.compress_size, 1) and info.file_size > 1 << 20:
                raise InputError(f"the zip member {name!r} unpacks to {info.file_size / max(info.compress_size, 1):,.0f}"
                                 f" times its size (a zip bomb?); refused")
        written = 0
        root = dest.resolve()
        for info in members:
            target = (root / info.filename.replace("\\", "/")).resolve()
            if root != target and root not in target.parents:
                raise InputError(f"the zip member {info.filename!r} points outside the archive's folder; refused")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 16):
                    written += len(chunk)
                    if written > max_bytes:
                        raise InputError(f"the zip unpacks to more than {max_bytes / 2**20:,.0f} MiB; refused")
                    out.write(chunk)
    entries = [p for p in dest.iterdir() if p.name != "__MACOSX"]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else dest


# -- pre-annotation in the background -----------------------------------------------------------
class Preannotations:
    """At most one background pre-annotation per project, each with a stop flag."""

    def __init__(self, service: LinkService):
        self.service = service
        self._runs: dict[str, dict] = {}
        self._lock = threading.Lock()

    def running(self, name: str) -> bool:
        with self._lock:
            run = self._runs.get(name)
            return bool(run and run["thread"].is_alive())

    def start(self, name: str) -> str:
        project = get_project(self.service.store, name)
        linkers = self.service.project_linkers(project)
        with self._lock:
            run = self._runs.get(project.name)
            if run and run["thread"].is_alive():
                return f"pre-annotation of {project.name} is already running"
            stop = threading.Event()
            run = {"stop": stop, "report": None, "error": None}
            run["thread"] = threading.Thread(target=self._run, args=(project, linkers, run), daemon=True,
                                             name=f"mel-preannotate-{project.id}")
            self._runs[project.name] = run
        run["thread"].start()
        return f"pre-annotation of {project.name} started"

    def _run(self, project, linkers, run) -> None:
        try:
            run["report"] = preannotate(self.service.store, project, linkers, batch_size=PREANNOTATE_BATCH,
                                        k=self.service.config.k, should_stop=run["stop"].is_set)
        except Exception as exc:
            log.exception("pre-annotation of %s failed", project.name)
            run["error"] = f"{type(exc).__name__}: {exc}"

    def stop(self, name: str) -> str:
        with self._lock:
            run = self._runs.get(name)
        if not run or not run["thread"].is_alive():
            return f"no pre-annotation of {name} is running"
        run["stop"].set()
        return f"stopping the pre-annotation of {name} after the batch in flight"

    def state(self, name: str) -> str:
        with self._lock:
            run = self._runs.get(name)
        if run is None:
            return "not started from this app"
        if run["thread"].is_alive():
            return "stopping..." if run["stop"].is_set() else "running"
        if run["error"]:
            return f"failed: {run['error']}"
        report = run["report"]
        return ("stopped: start again to continue" if report and report.stopped else "finished") + \
            (f" ({report.seconds:.0f} s)" if report else "")

    def status_html(self, name: str | None) -> str:
        if not name:
            return ""
        project = get_project(self.service.store, name)
        if not project.kb_stamp:
            return render_preannotation({}, "this project has no KB")
        return render_preannotation(preannotation_status(self.service.store, project), self.state(name))

    def stop_all(self) -> None:
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            run["stop"].set()


# -- the tabs ------------------------------------------------------------------------------------
class AnnotateTab:
    """The components build_demo wires to page load and to the Projects tab."""

    def __init__(self, tab, project, view, guide, screens):
        self.tab, self.project, self.view, self.guide, self.screens = tab, project, view, guide, screens


def build_annotate_tab(service: LinkService, access: Access, screens: QueueScreens, *, visible: bool) -> AnnotateTab:
    """The Annotate tab (call inside gr.Tabs). Its keys live in demo/assets/queue.js."""
    with gr.Tab("Annotate", id="annotate", visible=visible, elem_id="mel-q-tab") as tab:
        view = gr.HTML('<div id="mel-q-view" data-state="loading" class="mel-q">loading your next task…</div>',
                       elem_id="mel-q-task", padding=False)
        with gr.Row(elem_id="mel-q-tools", equal_height=False):
            project = gr.Dropdown(choices=[], label="Project", scale=2, elem_id="mel-q-project", interactive=True)
            search = gr.Textbox(label="Search the KB  [/]  (Enter searches, Esc goes back)", scale=3,
                                elem_id="mel-q-search", max_length=MAX_QUERY_CHARS)
            comment = gr.Textbox(label="Flag for review  [x]  (a comment, Enter flags the task)", scale=3,
                                 elem_id="mel-q-comment", max_length=MAX_COMMENT_CHARS)
        found = gr.HTML(elem_id="mel-q-found-box")
        with gr.Column(elem_id="mel-q-help", elem_classes=["mel-q-help"]):
            gr.HTML('<button type="button" class="mel-q-btn" data-action="help" id="mel-q-help-close">'
                    '<kbd>h</kbd> / <kbd>Esc</kbd> close</button>')
            gr.Markdown(KEYMAP_MD, elem_id="mel-q-keys")
            guide = gr.Markdown(elem_id="mel-q-guide")
        cmd = gr.Textbox(visible="hidden", elem_id="mel-q-cmd")
        go = gr.Button("send", visible="hidden", elem_id="mel-q-go")
        _ = comment  # read by the page's script (queue.js), which sends the flag as a command

        def on_command(text, request: gr.Request, profile: gr.OAuthProfile | None = None):
            annotator = access.annotator(request, profile)
            try:
                cmd_ = parse_command(text)
            except MELError as exc:
                return render_task(None, project="", message=str(exc), ok=False)
            try:
                return screens.handle(annotator, cmd_)
            except Exception as exc:  # the page waits for an answer with its token: always give one
                log.exception("queue command failed")
                return render_task(None, project=str(cmd_.get("project", "")), nonce=str(cmd_.get("token", ""))[:200],
                                   ok=False, message=f"the server failed ({type(exc).__name__}); it is logged there; "
                                                     f"nothing was saved unless a line above said so. Reload the page")

        go.click(on_command, [cmd], [view], js="(c) => [window.melQueue ? window.melQueue.take() : c]",
                 api_visibility="private", concurrency_limit=8, concurrency_id="correct", show_progress="hidden",
                 trigger_mode="multiple")

        @guarded
        def on_project(name, request: gr.Request, profile: gr.OAuthProfile | None = None):
            annotator = access.annotator(request, profile)
            return screens.handle(annotator, {"project": name, "action": "next"}), screens.guidelines(name)

        project.input(on_project, [project], [view, guide], api_visibility="private", show_progress="hidden")

        @guarded
        def on_search(query):
            return render_search_results(service.search(query, k=10))

        search.submit(on_search, [search], [found], api_visibility="private", concurrency_limit=2,
                      concurrency_id="search", show_progress="hidden")
    return AnnotateTab(tab, project, view, guide, screens)


def queue_on_load(demo: gr.Blocks, access: Access, annotate: AnnotateTab, tabs: gr.Tabs, *,
                  selected_at_build: bool = False) -> None:
    """On page load: the projects, the first one's next task and guidelines; the Annotate tab is
    shown and selected when there are projects (also ones created since the app started).
    `selected_at_build`: the page opens on the Annotate tab already (build_demo found projects); the
    load then leaves the selected tab alone, so a tab the user clicked meanwhile stays selected."""
    screens = annotate.screens

    @guarded
    def on_load(request: gr.Request, profile: gr.OAuthProfile | None = None):
        names = screens.project_names()
        annotator = access.annotator(request, profile)
        if not names:
            return gr.update(choices=[], value=None), "", "", gr.update(visible=False), gr.update()
        name = names[0]
        return (gr.update(choices=names, value=name), screens.handle(annotator, {"project": name, "action": "next"}),
                screens.guidelines(name), gr.update(visible=True),
                gr.update() if selected_at_build else gr.update(selected="annotate"))

    demo.load(on_load, None, [annotate.project, annotate.view, annotate.guide, annotate.tab, tabs],
              api_visibility="private", show_progress="hidden")


@dataclass
class ProjectsPanel:
    """The Projects tab's components: the import form and the pre-annotation controls."""
    tab: gr.Tab
    name: gr.Textbox
    per_task: gr.Number
    tasks_file: gr.File
    images_zip: gr.File
    guidelines: gr.Textbox
    import_btn: gr.Button
    report: gr.HTML
    pa_project: gr.Dropdown
    start: gr.Button
    stop: gr.Button
    pa_status: gr.HTML
    timer: gr.Timer


def build_projects_tab(service: LinkService, access: Access, annotate: AnnotateTab, runs: Preannotations):
    """The admins' project panel (call inside gr.Tabs); returns the tab (made visible on load for admins),
    the page-load handler and its outputs."""
    panel = _projects_panel()

    def admin_of(request, profile) -> str:
        annotator = access.annotator(request, profile)
        if not access.is_admin(annotator):
            raise NotAllowedError("managing projects needs the admin role (MEL_ADMINS)")
        return annotator

    _wire_import(service, annotate, panel, admin_of)
    _wire_preannotation(runs, panel, admin_of)

    def on_load(request: gr.Request, profile: gr.OAuthProfile | None = None):
        admin = access.is_admin(access.annotator(request, profile))
        names = annotate.screens.project_names() if admin else []
        return gr.update(visible=admin), gr.update(choices=names, value=names[0] if names else None)

    return panel.tab, on_load, [panel.tab, panel.pa_project]


def _projects_panel() -> ProjectsPanel:
    with gr.Tab("Projects (admin)", id="projects", visible=False, elem_id="mel-adm-tab") as tab:
        gr.Markdown("**New project, or more tasks for one**: a CSV or JSONL of tasks (`caption`, `mention` or "
                    "`start`/`end`, `image` = a file name in the zip, optional `gold_id`, `gold_name`, `id`) and a "
                    "zip of the images. Re-importing the same file adds nothing twice. The project links against "
                    "the KB this app has loaded.")
        with gr.Row():
            name = gr.Textbox(label="Project name", elem_id="mel-adm-name", max_length=100)
            per_task = gr.Number(1, precision=0, minimum=1, maximum=20, label="annotators per task",
                                 elem_id="mel-adm-k")
        with gr.Row():
            tasks_file = gr.File(label="Tasks (.csv or .jsonl)", file_types=[".csv", ".jsonl"], elem_id="mel-adm-tasks")
            images_zip = gr.File(label="Images (.zip)", file_types=[".zip"], elem_id="mel-adm-images")
        guidelines = gr.Textbox(label="Guidelines (Markdown; shown to annotators on h)", lines=3,
                                elem_id="mel-adm-guidelines", max_length=50_000)
        import_btn = gr.Button("Create the project / add the tasks", variant="primary", elem_id="mel-adm-import")
        report = gr.HTML(elem_id="mel-adm-report")
        gr.Markdown("**Pre-annotation**: both linkers' predictions for every task, in the background (annotators can "
                    "start at once; a task not reached yet is linked when shown).")
        with gr.Row():
            pa_project = gr.Dropdown(choices=[], label="Project", elem_id="mel-adm-pa-project", scale=3)
            start = gr.Button("Start", elem_id="mel-adm-pa-start", scale=1)
            stop = gr.Button("Stop", elem_id="mel-adm-pa-stop", scale=1)
        pa_status = gr.HTML(elem_id="mel-adm-pa-status")
        timer = gr.Timer(2.0, active=False)
    return ProjectsPanel(tab, name, per_task, tasks_file, images_zip, guidelines, import_btn, report, pa_project,
                         start, stop, pa_status, timer)


def _import_upload(service: LinkService, screens: QueueScreens, project_name, k, tasks, images, guide):
    """Create project `project_name` (k annotators per task, when new) or reuse it, set its guidelines
    when given, and import the uploaded tasks file with the images of the uploaded zip (unpacked by
    safe_extract_zip into a temporary folder, deleted afterwards). Returns the import report, with the
    file named as uploaded, and the project."""
    if not tasks:
        raise InputError("upload the tasks file (.csv or .jsonl) first")
    tasks_path = Path(tasks if isinstance(tasks, str) else tasks.name)
    suffix = tasks_path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise InputError(f"the tasks file must be .csv or .jsonl, got {tasks_path.name!r}")
    work = Path(tempfile.mkdtemp(prefix="mel-import-"))
    try:
        folder = work / "images"
        folder.mkdir()
        if images:
            folder = safe_extract_zip(images if isinstance(images, str) else images.name, folder)
        store = service.store
        project, created = open_or_create_project(store, project_name or "", kb=service.kb.path)
        try:
            settings = None
            if created or guide:  # written with the tasks, in one transaction: a refused import changes nothing
                settings = project.settings
                if guide:
                    settings.guidelines = guide
                if created and k:
                    settings = ProjectSettings(**{**settings.__dict__, "annotations_per_task": int(k)})
            result = import_tasks(store, project, "csv" if suffix == ".csv" else "tasks-jsonl", tasks_path,
                                  images=folder, settings=settings)
            if settings is not None:
                project = get_project(store, project.id)
                screens.forget(project.name)
        except Exception as exc:
            if created:  # nothing imported (whatever failed): no empty project is left in the pickers
                discard_empty_project(store, project)
                screens.forget(project.name)
            if not isinstance(exc, MELError):
                raise
            raise InputError(_as_uploaded(str(exc), tasks_path, folder)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _named_as_uploaded(result, tasks_path, folder), project


def _wire_import(service: LinkService, annotate: AnnotateTab, panel: ProjectsPanel, admin_of) -> None:
    """The import button (admins): the report, and the new project in both project pickers."""
    @guarded
    def on_import(project_name, k, tasks, images, guide, annotating, request: gr.Request,
                  profile: gr.OAuthProfile | None = None):
        annotator = admin_of(request, profile)  # a role refusal stays an error
        try:
            result, project = _import_upload(service, annotate.screens, project_name, k, tasks, images, guide)
        except NotAllowedError:
            raise
        except MELError as exc:  # a refused file or name: said once, in the report line; nothing else marked
            return refusal_html(str(exc), "mel-adm-import-refused"), *[gr.skip()] * 5
        names = annotate.screens.project_names()
        report = (render_import_report(result), gr.update(choices=names, value=project.name))
        if annotating:  # the Annotate tab stays on the project the admin works in
            return (*report, gr.update(choices=names), gr.update(visible=True), gr.skip(), gr.skip())
        # no project there yet (the first one): the Annotate tab opens on this one, with its first task
        return (*report, gr.update(choices=names, value=project.name), gr.update(visible=True),
                annotate.screens.handle(annotator, {"project": project.name, "action": "next"}),
                annotate.screens.guidelines(project.name))

    form = [panel.name, panel.per_task, panel.tasks_file, panel.images_zip, panel.guidelines, annotate.project]
    panel.import_btn.click(on_import, form, [panel.report, panel.pa_project, annotate.project, annotate.tab,
                                             annotate.view, annotate.guide],
                           api_visibility="private", concurrency_limit=1, concurrency_id="admin")


def _wire_preannotation(runs: Preannotations, panel: ProjectsPanel, admin_of) -> None:
    """Start / Stop the pre-annotation of the chosen project (admins); its progress, refreshed by the
    timer while it runs."""
    @guarded
    def on_start(project_name, request: gr.Request, profile: gr.OAuthProfile | None = None):
        admin_of(request, profile)
        if not project_name:
            raise InputError("choose a project to pre-annotate")
        message = runs.start(project_name)
        return (runs.status_html(project_name) + f'<div class="mel-note">{_esc_text(message)}</div>',
                gr.Timer(active=True))

    @guarded
    def on_stop(project_name, request: gr.Request, profile: gr.OAuthProfile | None = None):
        admin_of(request, profile)
        message = runs.stop(project_name or "")
        return runs.status_html(project_name) + f'<div class="mel-note">{_esc_text(message)}</div>'

    @guarded
    def on_tick(project_name, request: gr.Request, profile: gr.OAuthProfile | None = None):
        admin_of(request, profile)
        return runs.status_html(project_name), gr.Timer(active=runs.running(project_name or ""))

    @guarded
    def on_pick(project_name, request: gr.Request, profile: gr.OAuthProfile | None = None):
        admin_of(request, profile)
        return runs.status_html(project_name), gr.Timer(active=runs.running(project_name or ""))

    common = dict(api_visibility="private", concurrency_limit=2, concurrency_id="admin")
    panel.start.click(on_start, [panel.pa_project], [panel.pa_status, panel.timer], **common)
    panel.stop.click(on_stop, [panel.pa_project], [panel.pa_status], **common)
    panel.pa_project.input(on_pick, [panel.pa_project], [panel.pa_status, panel.timer], **common)
    panel.timer.tick(on_tick, [panel.pa_project], [panel.pa_status, panel.timer], show_progress="hidden", **common)


def _as_uploaded(message: str, path: Path, folder: Path) -> str:
    """A message with the files as the admin named them, not the server's temporary paths (Gradio
    keeps uploads under /tmp/gradio/<hash>/; the zip is unpacked into a temporary folder)."""
    return (message.replace(str(path), path.name).replace(f"the image folder {folder}", "the uploaded images zip")
            .replace(f"{folder}{os.sep}", ""))


def _named_as_uploaded(report, path: Path, folder: Path):
    """The import report with the uploaded files named as the admin named them (_as_uploaded)."""
    import dataclasses
    full, name = str(path), path.name

    def renamed(m):
        if isinstance(m, str):
            return _as_uploaded(m, path, folder)
        if dataclasses.is_dataclass(m) and isinstance(getattr(m, "reason", None), str):
            return dataclasses.replace(m, file=name if m.file == full else m.file,
                                       reason=_as_uploaded(m.reason, path, folder))
        return m
    return dataclasses.replace(report, malformed=[renamed(m) for m in report.malformed], source=name) \
        if dataclasses.is_dataclass(report) else report


def _esc_text(text: str) -> str:
    import html
    return html.escape(text or "")


def default_team_tabs(*, service: LinkService, access: Access, screens: QueueScreens, tabs: gr.Tabs, vault,
                      reviewers=None):
    """The team's tabs (Review, Dashboard) from demo/team_ui.py, when that module is there. Called
    inside the gr.Tabs block; returns what to call after the block (the team's API), or None.
    `reviewers`: the reviewers' logins; None: MEL_REVIEWERS from the environment."""
    try:
        from . import team_ui
    except ImportError:
        return None
    import os
    if reviewers is None:
        reviewers = team_ui.parse_reviewers(os.environ)
    team = team_ui.Team(lambda: service.store, access, lambda: service.kb,
                        reviewers=frozenset(reviewers), vault=vault)
    team_ui.build_team_tabs(team, tabs)
    return lambda: team_ui.add_team_api(team)


__all__ = ["QueueScreens", "Preannotations", "safe_extract_zip", "build_annotate_tab", "build_projects_tab",
           "queue_on_load", "default_team_tabs", "parse_command", "KEYMAP_MD"]
