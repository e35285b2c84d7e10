"""Start the real app on 127.0.0.1 for tests and benchmarks, in this process or as `python app.py`.

    app = launch_in_process(data_dir, users={"alice": "pw", "rita": "pw2"}, admins={"alice"},
                            reviewers={"rita"})            # gradio_client tests
    make_demo_project(app.service, "demo-20", n=20)       # a project of the demo KB's mentions, pre-annotated
    app.url, app.service, app.login_guard, app.vault, app.close()

    proc = AppProcess.start(data_dir, users={"ann1": "pw", "rita": "pw2"}, reviewers={"rita"},
                            args=["--threads", "1"])      # a separate process (MEL_REVIEWERS=rita)
    proc.url, proc.db_path, proc.kill()      # SIGKILL: no clean shutdown (fault tests)
    proc.stop()                              # SIGTERM, then SIGKILL after a grace period

Both bind to the loopback interface and a free port only (demo.launch). Passwords reach the child
process in MEL_AUTH, its environment, exactly as `python app.py` reads them in production; they are
never written to a file. Both serve the app as `python app.py` does (demo.ui.serve_options): the
login rate limit and the admins' one-time download links included.

A harness, not part of the app: the tests import it as `bench.app_server` (pyproject's pytest
`pythonpath`), the bench scripts as `.app_server` or, run as `python bench/x.py`, `app_server`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from demo.launch import HOST, free_port

REPO = Path(__file__).resolve().parents[1]


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 300.0) -> float:
    """Poll `url` until it answers HTTP 200; returns the perf_counter() time it did.

    Raises RuntimeError when `proc` exits first and TimeoutError after `timeout` seconds.
    """
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the app exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter()
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the app did not answer at {url} within {timeout:.0f} s")


def auth_env(users: dict[str, str] | None, admins=(), reviewers=()) -> dict[str, str]:
    """MEL_AUTH / MEL_ADMINS / MEL_REVIEWERS for `users` ({} or None: no login, everyone is 'local')."""
    env = {"MEL_AUTH": ",".join(f"{u}:{p}" for u, p in (users or {}).items()),
           "MEL_ADMINS": ",".join(sorted(admins)), "MEL_REVIEWERS": ",".join(sorted(reviewers))}
    return {k: v for k, v in env.items() if v}


# -- in this process -------------------------------------------------------------------------------
@dataclass
class RunningApp:
    demo: object
    service: object
    url: str
    data_dir: Path

    @property
    def login_guard(self):
        """The LoginGuard checking passwords (None without login)."""
        return getattr(self.demo, "mel_login_guard", None)

    @property
    def vault(self):
        """The DownloadVault holding the admins' exports and backups until downloaded."""
        return self.demo.mel_vault

    def close(self) -> None:
        self.demo.close()
        self.demo.mel_preannotations.stop_all()
        self.demo.mel_queue.close()
        self.vault.close()
        self.service.store.close()


def launch_in_process(data_dir: str | Path, *, users: dict[str, str] | None = None, admins=frozenset(),
                      reviewers=frozenset(), preset: str = "offline", concurrency: int = 4,
                      max_queue: int = 32) -> RunningApp:
    """The app of `python app.py` (offline preset, bundled demo KB), served from a thread here.

    `users`: password login with these accounts; None: no login (everyone is 'local').
    `reviewers`: who sees the Review tab (as MEL_REVIEWERS; this process's MEL_REVIEWERS is not read).
    """
    from demo.service import LinkService, ServiceConfig
    from demo.ui import Access, build_demo, launch_options, serve_options

    service = LinkService(ServiceConfig(preset=preset, data_dir=str(data_dir)))
    access = Access("password", admins=frozenset(admins)) if users else Access("open")
    demo = build_demo(service=service, access=access, team_tabs=_team_tabs(frozenset(reviewers)))
    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    port = free_port()
    demo.launch(server_name=HOST, server_port=port, prevent_thread_lock=True, quiet=True,
                **serve_options(demo, users), **launch_options())
    return RunningApp(demo, service, f"http://{HOST}:{port}/", Path(data_dir))


def _team_tabs(reviewers: frozenset[str]):
    """build_demo's team_tabs hook with these reviewers (demo/queue_ui.py default_team_tabs reads
    MEL_REVIEWERS from the environment, which a test must not change for the whole process)."""
    from demo.queue_ui import default_team_tabs

    def team_tabs(**kw):
        return default_team_tabs(reviewers=reviewers, **kw)
    return team_tabs


# -- as a separate process -------------------------------------------------------------------------
@dataclass
class AppProcess:
    """`python app.py` running in a child process (its own interpreter, as in production)."""

    proc: subprocess.Popen
    url: str
    data_dir: Path
    log_path: Path
    ready_s: float

    @property
    def db_path(self) -> Path:
        return self.data_dir / "annotations.sqlite"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @classmethod
    def start(cls, data_dir: str | Path, *, users: dict[str, str] | None = None, admins=(), reviewers=(),
              preset: str = "offline",
              args: list[str] | tuple[str, ...] = (), timeout: float = 300.0,
              log_path: str | Path | None = None) -> "AppProcess":
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        log_path = Path(log_path) if log_path else data_dir / "app.log"
        env = {k: v for k, v in os.environ.items() if k not in ("MEL_AUTH", "MEL_ADMINS", "MEL_REVIEWERS",
                                                               "SPACE_ID")}
        env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
                   **auth_env(users, admins, reviewers))
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "app.py", "--preset", preset, "--host", HOST, "--port", str(port),
                                     "--data-dir", str(data_dir), *args], cwd=REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://{HOST}:{port}/"
        try:
            ready = wait_ready(url, proc, timeout) - t0
        except BaseException:
            _end(proc, signal.SIGKILL)
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise RuntimeError(f"the app did not start; the end of its log {log_path}:\n{tail}") from None
        return cls(proc, url, data_dir, log_path, ready)

    def kill(self) -> None:
        """SIGKILL, as an out-of-memory killer or a pulled plug would: no shutdown code runs."""
        _end(self.proc, signal.SIGKILL)

    def stop(self, grace: float = 20.0) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _end(self.proc, signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _end(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
        pass


# -- a project to annotate, for tests and benchmarks ---------------------------------------------------
def write_demo_tasks(folder: str | Path, n: int = 20) -> tuple[Path, Path]:
    """A tasks JSONL of `n` mentions of the demo KB (the bundled examples, with their photos, then
    the demo pool's captions, repeated with a task number when more are asked for) and its image
    folder; returns (tasks file, image folder)."""
    import json
    import shutil

    from demo.bundled import POOL_FILE, bundled_examples
    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for ex in bundled_examples():
        name = None
        if ex.image:
            name = Path(ex.image).name
            shutil.copyfile(ex.image, images / name)
        rows.append({"caption": ex.caption, "start": ex.start, "end": ex.end, "image": name})
    for line in POOL_FILE.read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        m = item["mention"]
        rows.append({"caption": m["caption"], "start": m["start"], "end": m["end"], "gold_id": item["gold_id"]})
    out, i = [], 0
    while len(out) < n:
        row = dict(rows[i % len(rows)])
        if i >= len(rows):  # another task with the same mention: a different caption (content hash)
            row["caption"] = f"{row['caption']} ({i // len(rows) + 1})"
        out.append({k: v for k, v in row.items() if v is not None})
        i += 1
    tasks = folder / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    return tasks, images


def make_demo_project(service, name: str = "demo", n: int = 20, *, preannotate: bool = True, linkers=None,
                      guidelines: str = "# Demo guidelines\n\nLink the **person**, not the role. NIL when the KB "
                                        "has no entry.", folder: str | Path | None = None):
    """Create project `name` on the app's KB with `n` demo tasks (write_demo_tasks), imported with
    annotations.import_tasks and, with `preannotate`, pre-annotated by `linkers` (a function of the
    project giving {name: linker}; default: the app's own, LinkService.project_linkers).
    Returns (project, ImportReport, PreannotateReport or None)."""
    import tempfile

    from annotations.preannotate import preannotate as run_preannotate
    from annotations.projects import ProjectSettings, create_project, import_tasks
    work = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="mel-demo-tasks-"))
    tasks, images = write_demo_tasks(work, n)
    store = service.store
    project = create_project(store, name, kb=service.kb.path, settings=ProjectSettings(guidelines=guidelines))
    report = import_tasks(store, project, "tasks-jsonl", tasks, images=images)
    pre = None
    if preannotate:
        chosen = linkers(project) if linkers is not None else service.project_linkers(project)
        pre = run_preannotate(store, project, chosen, batch_size=n, k=service.config.k)
    return project, report, pre


__all__ = ["REPO", "HOST", "free_port", "wait_ready", "auth_env", "RunningApp", "launch_in_process", "AppProcess",
           "write_demo_tasks", "make_demo_project"]
