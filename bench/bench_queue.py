"""Time from a key press to the next task fully displayed, in a real browser (Debian's chromium).

    python bench/bench_queue.py                     # 30 decisions, the app's own linkers pre-annotate
    python bench/bench_queue.py --decisions 60 --fast-preannotate --out results/bench_queue.json

Starts the app of `python app.py` (offline preset, bundled demo KB, password login) on 127.0.0.1,
creates a project of demo tasks (bench/app_server.py make_demo_project: imported with the library, then
pre-annotated), logs in with headless chromium and decides tasks with the keyboard only (g, 1, n,
Enter in turn). The page itself measures each decision (demo/assets/queue.js, window.melQueue.log):
from the keydown event's timestamp (performance.now() clock) to the DOM update that shows the next
task (its id in #mel-q-view, `dom_ms`), and to the next animation frame after it (`paint_ms`: the
frame that displays it). Prints p50 / p95 and writes them, with the machine and the command, as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHROMIUM = os.environ.get("MEL_CHROMIUM", "/usr/bin/chromium")
USERS = {"bench": "bench-password-1"}  # a throwaway account of this run's own app


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decisions", type=int, default=30, help="decisions timed")
    p.add_argument("--warmup", type=int, default=2, help="decisions before timing starts")
    p.add_argument("--fast-preannotate", action="store_true",
                   help="pre-annotate the GEMEL slot with BM25 (seconds instead of minutes on a CPU); the "
                        "timed path reads stored predictions either way")
    p.add_argument("--viewport", default="1366x768")
    p.add_argument("--out", default=str(REPO / "results" / "bench_queue.json"))
    args = p.parse_args(argv)
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is missing: apt-get install chromium (see the Makefile's browser target)")
    from playwright.sync_api import sync_playwright

    from mel.linkers import build_linker
    if __package__:  # python -m bench.bench_queue, or imported as bench.bench_queue
        from .app_server import launch_in_process, make_demo_project
    else:  # python bench/bench_queue.py: bench/ itself is sys.path[0]
        from app_server import launch_in_process, make_demo_project

    n_tasks = args.decisions + args.warmup + 2
    data = Path(tempfile.mkdtemp(prefix="mel-bench-queue-"))
    t0 = time.perf_counter()
    app = launch_in_process(data / "app", users=USERS)
    svc = app.service
    ready_s = time.perf_counter() - t0
    linkers = None
    if args.fast_preannotate:
        def linkers(project):
            return {"gemel": build_linker("bm25", svc.kb, svc.preset), "dim": svc.project_linkers(project)["dim"]}
    t0 = time.perf_counter()
    make_demo_project(svc, "bench", n=n_tasks, linkers=linkers, folder=data / "tasks")
    preannotate_s = time.perf_counter() - t0
    width, height = (int(x) for x in args.viewport.split("x"))
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(60_000)
            page.goto(app.url, wait_until="load")
            page.locator("input[type=text]").first.fill("bench")
            page.locator("input[type=password]").first.fill(USERS["bench"])
            page.keyboard.press("Enter")
            page.wait_for_selector("#mel-q-view[data-state=task]")
            page.locator("#mel-q-view .mel-q-bar").click()
            keys = ["g", "1", "n", "Enter"]
            for i in range(args.warmup + args.decisions):
                gemel = page.evaluate("document.getElementById('mel-q-view').dataset.gemelEntity")
                key = keys[i % len(keys)]
                if key in ("g", "Enter") and not gemel:
                    key = "1"
                n = page.evaluate("window.melQueue.log.length")
                page.keyboard.press(key)
                page.wait_for_function("n => window.melQueue.log.length > n", arg=n)
            log = page.evaluate("window.melQueue.log")
            browser.close()
    finally:
        app.close()
    timed = log[args.warmup:]
    bad = [e for e in timed if not e["ok"] or e["to"] == e["from"]]
    if bad:
        raise SystemExit(f"{len(bad)} decisions did not show a next task: {bad[:3]}")
    dom = [e["dom_ms"] for e in timed]
    paint = [e["paint_ms"] for e in timed]
    result = {
        "what": "key press -> next task fully displayed in headless chromium (keydown timestamp to the DOM update "
                "showing the next task id: dom_ms; to the next animation frame: paint_ms)",
        "command": "python bench/bench_queue.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "decisions": len(timed), "viewport": args.viewport,
        "dom_ms": {"p50": round(statistics.median(dom), 1), "p95": round(percentile(dom, 0.95), 1),
                   "max": round(max(dom), 1)},
        "paint_ms": {"p50": round(statistics.median(paint), 1), "p95": round(percentile(paint, 0.95), 1),
                     "max": round(max(paint), 1)},
        "app_ready_s": round(ready_s, 1), "preannotate_s": round(preannotate_s, 1),
        "preannotated_by": "bm25 (GEMEL slot) + the app's DIM" if args.fast_preannotate else "the app's GEMEL and DIM",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "MEL_THREADS": os.environ.get("MEL_THREADS", "")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{len(timed)} decisions: key press -> next task on screen p50 {result['paint_ms']['p50']} ms, "
          f"p95 {result['paint_ms']['p95']} ms (DOM update p50 {result['dom_ms']['p50']} ms, "
          f"p95 {result['dom_ms']['p95']} ms); written to {out}")
    return result


if __name__ == "__main__":
    main()
