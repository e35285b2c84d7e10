"""Load test of the annotation app: many annotators saving corrections at once, then a count.

    python bench/bench_load.py --clients 20 --seconds 60 --json results/bench_load.json
    python bench/bench_load.py --clients 20 --seconds 8 --kill-after 4     # SIGKILL the server mid-write
    python bench/bench_load.py --clients 20 --seconds 60 --servers 2       # two app processes, one database

Starts the real app (`python app.py --preset offline` in its own process, a fresh data dir, on
127.0.0.1 only) with password login for --accounts annotator accounts; their passwords are made
up for the run and reach the app in MEL_AUTH, as in production. One client links --mentions
bundled examples through /link. Then --clients clients (threads here, each with its own
gradio_client.Client and login; client i logs in as account i mod --accounts) save corrections
for --seconds without pause through /correct: the app's API for the correction buttons, which
runs the same LinkService.correct in the same "store" queue as the buttons. They cycle through
accept_dim (DIM's top candidate), search (another candidate), nil and skip; every --undo-every-th
request is an /undo of the annotator's last correction instead. Each client records every
request it made and every acknowledgement it got (correction id, mention, action, entity).

Afterwards the database is opened the way the app opens it (AnnotationStore, PRAGMA
integrity_check) and compared with what the clients saw:
  lost              an acknowledged correction that is missing, or stored differently
  duplicated        a stored correction that no request explains, or one id acknowledged twice
  out_of_order      a client's later acknowledgement with a smaller id than an earlier one
  undo_violations   a correction undone that no undo of its own annotator explains
  unacked_stored    requests that failed client-side but were committed (allowed: the client
                    never saw an answer, e.g. when the server was killed after the commit)
A run passes when the first four are all zero (exit status 0; 1 otherwise).

Figures: acknowledged corrections per second over the load window, and p50/p95/max latency of
/correct (request sent -> acknowledgement received, per client). With --kill-after the server is
SIGKILLed that many seconds into the load: the check is then that every correction acknowledged
before the kill is in the database, which opens cleanly.

Bounded in time: every request has --request-timeout, the load stops at --seconds, and a
watchdog kills the app and exits with status 3 after --hard-timeout seconds in all.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mel.bench import save_json
from mel.cli_kit import load_average, script_command

if __package__:  # python -m bench.bench_load, or imported as bench.bench_load
    from .app_server import AppProcess
else:  # python bench/bench_load.py: bench/ itself is sys.path[0]
    from app_server import AppProcess

ACTION_CYCLE = ("accept_dim", "search", "nil", "skip")
_STARTED: list[AppProcess] = []  # apps this process started, for the watchdog


@dataclass
class Request:
    client: int
    seq: int
    kind: str                     # "correct" | "undo"
    annotator: str
    mention_id: str = ""
    action: str = ""
    entity_id: str | None = None
    sent: float = 0.0             # perf_counter() seconds
    done: float = 0.0
    ack: dict | None = None       # the acknowledgement (undo: the undone correction, {} for nothing)
    error: str | None = None

    @property
    def latency_s(self) -> float:
        return self.done - self.sent

    @property
    def key(self) -> tuple:
        return (self.annotator, self.mention_id, self.action, self.entity_id)


@dataclass
class Target:
    """A linked mention the clients correct, with the entity each action sends."""

    mention_id: str
    entities: dict[str, str | None] = field(default_factory=dict)  # action -> entity id


def make_accounts(n: int) -> dict[str, str]:
    """Annotator accounts for this run only; the passwords exist in memory and MEL_AUTH only."""
    return {f"annotator{i + 1:02d}": secrets.token_urlsafe(12) for i in range(n)}


def connect(url: str, user: str, password: str):
    """A logged-in gradio_client.Client. The URL is plain http on 127.0.0.1, so there is no TLS to
    verify; ssl_verify=False only stops httpx from loading the CA bundle on every request (~40 ms
    of client CPU each, which made the clients, not the server, the bottleneck)."""
    from gradio_client import Client
    return Client(url, auth=(user, password), verbose=False, analytics_enabled=False, download_files=False,
                  ssl_verify=False)


def process_cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system) a process has used so far, from /proc (None where unavailable)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def close_all(clients) -> None:
    """Client.close() waits up to 1 s for its heartbeat thread: close them side by side, not one by one."""
    def close(c):
        try:
            c.close()
        except Exception:
            pass
    threads = [threading.Thread(target=close, args=(c,), daemon=True) for c in clients if c is not None]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=5)


def link_targets(client, n: int) -> list[Target]:
    """Link `n` bundled examples (image, caption, mention) through /link, as an annotator would."""
    from gradio_client import handle_file

    from demo.bundled import bundled_examples
    targets = []
    examples = bundled_examples()
    for ex in (examples * (n // len(examples) + 1))[:n]:
        outputs = client.predict(handle_file(ex.image) if ex.image else None, ex.caption, ex.mention, ex.start, ex.end,
                                 api_name="/link")
        raw = next(o for o in outputs if isinstance(o, dict) and "mention_id" in o)
        ids = [c["id"] for c in raw["candidates"]]
        if not ids:
            raise RuntimeError(f"/link gave no DIM candidates for {ex.mention!r}; cannot run the load")
        targets.append(Target(raw["mention_id"], {"accept_dim": ids[0], "search": ids[min(1, len(ids) - 1)],
                                                  "nil": "", "skip": ""}))
    return targets


def client_loop(index: int, client, annotator: str, targets: list[Target], start: threading.Event, stop_at: list,
                undo_every: int, request_timeout: float, server_dead: threading.Event, out: list[Request]) -> None:
    start.wait()
    seq = 0
    while time.perf_counter() < stop_at[0] and not server_dead.is_set():
        seq += 1
        if undo_every and seq % undo_every == 0:
            req = Request(index, seq, "undo", annotator)
            args: tuple = ()
            api = "/undo"
        else:
            target = targets[(index + seq) % len(targets)]
            action = ACTION_CYCLE[(index + seq) % len(ACTION_CYCLE)]
            entity = target.entities[action]
            req = Request(index, seq, "correct", annotator, target.mention_id, action,
                          {"nil": "NIL", "skip": None}.get(action, entity))
            args = (target.mention_id, action, entity or "")
            api = "/correct"
        req.sent = time.perf_counter()
        try:
            req.ack = client.submit(*args, api_name=api).result(timeout=request_timeout)
        except Exception as exc:  # recorded: an error is a request without acknowledgement
            req.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        req.done = time.perf_counter()
        out.append(req)
        if req.error and server_dead.is_set():
            break


def run_load(url: str | list[str], accounts: dict[str, str], *, clients: int = 20, seconds: float = 60.0,
             mentions: int = 4, undo_every: int = 10, request_timeout: float = 30.0, kill=None,
             kill_after: float | None = None, targets: list[Target] | None = None,
             server_pid: int | list[int] | None = None) -> dict:
    """Run the load against a running app; returns {"requests": [...], "window_s", "targets", ...}.

    `url`: the app, or several app processes on one database (client i uses url i mod their number).
    `kill`: a callable that SIGKILLs the server(s), called `kill_after` seconds into the load.
    `targets`: mentions linked by an earlier run (default: link `mentions` bundled examples now).
    `server_pid`: the app's process(es), whose CPU time over the load window is reported.
    """
    urls = [url] if isinstance(url, str) else list(url)
    pids = [server_pid] if isinstance(server_pid, int) or server_pid is None else list(server_pid)
    names = list(accounts)
    t = time.perf_counter()
    connected: list = [None] * clients
    errors: list[str] = []

    def login(i):
        try:
            user = names[i % len(names)]
            connected[i] = connect(urls[i % len(urls)], user, accounts[user])
        except Exception as exc:
            errors.append(f"client {i} could not connect: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=login, args=(i,), daemon=True) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=request_timeout * 2)
    if errors or any(c is None for c in connected):
        raise RuntimeError("; ".join(errors) or "some clients did not connect in time")
    connect_s = time.perf_counter() - t
    t = time.perf_counter()
    targets = targets or link_targets(connected[0], mentions)
    link_s = time.perf_counter() - t

    start, server_dead = threading.Event(), threading.Event()
    stop_at = [float("inf")]
    results: list[list[Request]] = [[] for _ in range(clients)]
    workers = [threading.Thread(target=client_loop, daemon=True,
                                args=(i, connected[i], names[i % len(names)], targets, start, stop_at, undo_every,
                                      request_timeout, server_dead, results[i]))
               for i in range(clients)]
    for w in workers:
        w.start()
    cpu0 = (_cpu_of(pids), time.process_time())
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.set()
    killed_at = None
    if kill is not None and kill_after is not None:
        time.sleep(max(0.0, min(kill_after, seconds)))
        server_dead.set()  # no new requests from here on; those in flight meet the kill
        kill()
        killed_at = time.perf_counter() - t0
    deadline = t0 + seconds + request_timeout + 10
    for w in workers:
        w.join(timeout=max(0.0, deadline - time.perf_counter()))
    stuck = sum(w.is_alive() for w in workers)
    window = time.perf_counter() - t0
    server_cpu = _cpu_of(pids) if killed_at is None else None
    cpu = {"app_cpu_s": round(server_cpu - cpu0[0], 1) if server_cpu is not None and cpu0[0] is not None else None,
           "clients_cpu_s": round(time.process_time() - cpu0[1], 1)}
    close_all(connected)
    requests = [r for rs in results for r in list(rs)]
    return {"requests": requests, "window_s": window, "targets": targets, "connect_s": connect_s,
            "link_s": link_s, "stuck_clients": stuck, "killed_at_s": killed_at, "accounts": names, **cpu}


def _cpu_of(pids: list[int | None]) -> float | None:
    """CPU seconds the app processes have used so far, all together (None if any is unknown)."""
    seconds = [process_cpu_s(pid) for pid in pids]
    return None if any(s is None for s in seconds) else sum(seconds)


def verify(data_dir: Path, requests: list[Request], accounts: list[str]) -> dict:
    """Compare what the clients were told with what the database holds (see the module doc)."""
    from annotations import AnnotationStore
    store = AnnotationStore(data_dir)  # opens (and would migrate) exactly as the app does
    try:
        conn = store.db.conn
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        marks = ",".join("?" * len(accounts))
        rows = {r[0]: r for r in conn.execute(
            f"SELECT id, annotator, mention_id, action, entity_id, undone_at FROM corrections "
            f"WHERE annotator IN ({marks})", accounts)}
    finally:
        store.close()

    lost, mismatched = [], []
    acked_ids = Counter()
    for r in requests:
        if r.kind != "correct" or r.ack is None:
            continue
        cid = r.ack.get("correction_id")
        acked_ids[cid] += 1
        row = rows.get(cid)
        if row is None:
            lost.append(cid)
        elif (row[1], row[2], row[3], row[4]) != r.key or r.ack.get("annotator") != r.annotator:
            mismatched.append(cid)
    acked_twice = [cid for cid, n in acked_ids.items() if n > 1]

    # stored rows nobody was told about: each must match one failed request (committed, answer lost)
    failed = Counter(r.key for r in requests if r.kind == "correct" and r.ack is None)
    unexplained = []
    unacked_stored = 0
    for cid, row in sorted(rows.items()):
        if cid in acked_ids:
            continue
        key = (row[1], row[2], row[3], row[4])
        if failed[key] > 0:
            failed[key] -= 1
            unacked_stored += 1
        else:
            unexplained.append(cid)

    out_of_order = 0
    by_client: dict[int, list[Request]] = {}
    for r in requests:
        by_client.setdefault(r.client, []).append(r)
    for reqs in by_client.values():
        ids = [r.ack["correction_id"] for r in sorted(reqs, key=lambda r: r.seq) if r.kind == "correct" and r.ack]
        out_of_order += sum(b <= a for a, b in zip(ids, ids[1:], strict=False))

    # undo: every undone row is explained by an acknowledged undo of its own annotator (or a failed one)
    undo_acked = {r.ack["id"]: r.annotator for r in requests if r.kind == "undo" and r.ack}
    failed_undos = Counter(r.annotator for r in requests if r.kind == "undo" and r.ack is None)
    undo_violations = []
    for cid, annotator in undo_acked.items():
        row = rows.get(cid)
        if row is None or row[5] is None or row[1] != annotator:
            undo_violations.append(cid)
    for cid, row in rows.items():
        if row[5] is not None and cid not in undo_acked:
            if failed_undos[row[1]] > 0:
                failed_undos[row[1]] -= 1
            else:
                undo_violations.append(cid)

    return {"integrity_check": integrity, "stored": len(rows),
            "acknowledged": sum(1 for r in requests if r.kind == "correct" and r.ack is not None),
            "lost": len(lost) + len(mismatched), "lost_ids": (lost + mismatched)[:20],
            "duplicated": len(unexplained) + len(acked_twice), "duplicated_ids": (unexplained + acked_twice)[:20],
            "out_of_order": out_of_order, "undo_violations": len(undo_violations),
            "undo_violation_ids": undo_violations[:20], "unacked_stored": unacked_stored}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(load: dict, checks: dict) -> dict:
    reqs: list[Request] = load["requests"]
    corrections = [r for r in reqs if r.kind == "correct"]
    acked = [r for r in corrections if r.ack is not None]
    undos = [r for r in reqs if r.kind == "undo"]
    lat = [r.latency_s * 1000 for r in acked]
    undo_lat = [r.latency_s * 1000 for r in undos if r.ack is not None]
    errors = Counter(r.error.split(":")[0] for r in reqs if r.error)
    window = load["window_s"] if load["killed_at_s"] is None else load["killed_at_s"]
    ok = (checks["integrity_check"] == "ok" and not checks["lost"] and not checks["duplicated"]
          and not checks["out_of_order"] and not checks["undo_violations"] and not load["stuck_clients"]
          and (load["killed_at_s"] is not None or not errors))
    return {
        "passed": ok,
        "corrections_acknowledged": len(acked),
        "corrections_per_s": round(len(acked) / window, 1) if window else None,
        "latency_ms": {"p50": _r(pct(lat, 0.5)), "p95": _r(pct(lat, 0.95)), "max": _r(max(lat) if lat else None),
                       "mean": _r(statistics.fmean(lat) if lat else None)},
        "undo": {"requests": len(undos), "acknowledged": len(undo_lat), "p95_ms": _r(pct(undo_lat, 0.95))},
        "errors": sum(errors.values()), "errors_by_type": dict(errors),
        "first_errors": [r.error for r in reqs if r.error][:5],
        "load_window_s": round(window, 2), "stuck_clients": load["stuck_clients"],
        "cpu_s_during_load": {"app": load.get("app_cpu_s"), "clients": load.get("clients_cpu_s")},
        "killed_at_s": None if load["killed_at_s"] is None else round(load["killed_at_s"], 2),
        "checks": checks,
    }


def _r(x):
    return None if x is None else round(x, 1)


def run(args, app_args: list[str] | None = None) -> dict:
    """Start the app, link, load, stop (or kill), verify. The report as a dict."""
    accounts = make_accounts(min(args.accounts, args.clients))
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="mel-bench-load-"))
    report: dict = {"command": script_command(__file__, args.argv), "machine": platform.platform(),
                    "cpus": os.cpu_count(), "load_avg_before": load_average(), "clients": args.clients,
                    "accounts": len(accounts), "seconds": args.seconds, "mentions": args.mentions,
                    "undo_every": args.undo_every, "kill_after": args.kill_after, "servers": args.servers,
                    "app_args": app_args or []}
    apps = []
    try:
        for _ in range(args.servers):  # one after the other: the first one creates the database and the demo KB
            apps.append(AppProcess.start(data_dir, users=accounts, args=app_args or [], timeout=args.start_timeout))
            _STARTED.append(apps[-1])
        report["app_ready_s"] = [round(app.ready_s, 2) for app in apps]

        def kill_all():
            for app in apps:
                app.kill()
        load = run_load([app.url for app in apps], accounts, clients=args.clients, seconds=args.seconds,
                        mentions=args.mentions, undo_every=args.undo_every, request_timeout=args.request_timeout,
                        kill=kill_all if args.kill_after is not None else None, kill_after=args.kill_after,
                        server_pid=[app.proc.pid for app in apps])
    finally:
        for app in apps:
            app.stop()
    report.update({"clients_connect_s": round(load["connect_s"], 2), "link_setup_s": round(load["link_s"], 2)})
    checks = verify(data_dir, load["requests"], load["accounts"])
    report["summary"] = summarize(load, checks)
    report["load_avg_after"] = load_average()
    report["data_dir_kept"] = str(data_dir) if args.keep else None
    if args.requests_json:
        Path(args.requests_json).write_text(json.dumps([asdict(r) for r in load["requests"]]))
    if not args.keep and not args.data_dir:
        import shutil
        shutil.rmtree(data_dir, ignore_errors=True)
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=20, help="concurrent gradio_client clients (default 20)")
    p.add_argument("--accounts", type=int, default=5, help="annotator accounts the clients share (default 5)")
    p.add_argument("--seconds", type=float, default=60.0, help="how long the clients save corrections (default 60)")
    p.add_argument("--mentions", type=int, default=4, help="bundled examples linked first and then corrected")
    p.add_argument("--undo-every", type=int, default=10, help="every N-th request is an undo (0: none)")
    p.add_argument("--kill-after", type=float, default=None, help="SIGKILL the server this many seconds into the load")
    p.add_argument("--servers", type=int, default=1,
                   help="app processes on the same database; clients are spread over them (default 1)")
    p.add_argument("--request-timeout", type=float, default=30.0, help="seconds one request may take")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds the app may take to start")
    p.add_argument("--hard-timeout", type=float, default=None,
                   help="kill everything after this many seconds (default: start timeout + seconds + 120)")
    p.add_argument("--data-dir", help="the app's data dir (default: a fresh temporary one, removed afterwards)")
    p.add_argument("--keep", action="store_true", help="keep the temporary data dir (its path is in the report)")
    p.add_argument("--json", help="write the report here (e.g. results/bench_load.json)")
    p.add_argument("--requests-json", help="also write every request with its outcome here")
    p.add_argument("--app-arg", action="append", default=[], help="extra argument for app.py (repeatable)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.clients < 1 or args.accounts < 1 or args.seconds <= 0 or args.mentions < 1 or args.servers < 1:
        p.error("--clients, --accounts, --mentions, --servers must be at least 1 and --seconds positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    hard = args.hard_timeout or args.start_timeout + args.seconds + 120

    def watchdog():
        print(f"[bench_load] hard timeout of {hard:.0f} s reached; giving up", file=sys.stderr, flush=True)
        for app in _STARTED:  # the app runs in its own session: nothing else would stop it
            app.kill()
        os._exit(3)
    timer = threading.Timer(hard, watchdog)
    timer.daemon = True
    timer.start()
    try:
        report = run(args, args.app_arg)
    finally:
        timer.cancel()
    s = report["summary"]
    print(json.dumps(s, indent=2))
    print(f"{s['corrections_acknowledged']} corrections acknowledged by {args.clients} clients in {s['load_window_s']} s: "
          f"{s['corrections_per_s']} corrections/s, latency p50 {s['latency_ms']['p50']} ms, "
          f"p95 {s['latency_ms']['p95']} ms, max {s['latency_ms']['max']} ms; errors {s['errors']}; "
          f"lost {s['checks']['lost']}, duplicated {s['checks']['duplicated']} -> "
          f"{'PASSED' if s['passed'] else 'FAILED'}")
    print(f"load average before {report['load_avg_before']}, after {report['load_avg_after']} on {report['cpus']} CPUs")
    if args.json:
        save_json(args.json, report)
    return 0 if s["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
