"""Benchmark of the app: time to ready, and link latency, on the offline preset.

    python bench/bench_app.py --starts 3 --warm-links 2 --json bench-app.json

For each of `--starts` fresh processes (`python app.py --preset offline` on a free port, a fresh
data dir, models already cached, as a user's second start):
  ready_s       process start -> the server answers HTTP 200 (models are loaded before it listens)
  first_link_s  the first /link call (a bundled example, through gradio_client), request to result
Then, on the last process, `--warm-links` rounds over all bundled examples:
  warm_link_s   p50/p95 of later links, plus the server-side per-stage timings of each linker

Targets (issue): ready < 30 s, first link p50 < 3 s on this CPU. The machine's load average is
recorded with the figures because other jobs on a shared CPU change them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

from mel.bench import save_json
from mel.cli_kit import add_preset_args, check_output_file, load_average, script_command

if __package__:  # python -m bench.bench_app, or imported as bench.bench_app
    from .app_server import AppProcess
else:  # python bench/bench_app.py: bench/ itself is sys.path[0]
    from app_server import AppProcess


def link_once(client, example) -> tuple[float, dict]:
    from gradio_client import handle_file
    t = time.perf_counter()
    outputs = client.predict(handle_file(example.image) if example.image else None, example.caption, example.mention,
                             example.start, example.end, api_name="/link")
    elapsed = time.perf_counter() - t
    raw = next(o for o in outputs if isinstance(o, dict) and "mention_id" in o)
    return elapsed, raw


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--starts", type=int, default=3, help="fresh app processes to time")
    p.add_argument("--warm-links", type=int, default=2, help="rounds over the bundled examples after the first link")
    add_preset_args(p, device=False)  # the app's --preset
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--app-arg", action="append", default=[], help="extra argument for app.py (repeatable)")
    args = p.parse_args(argv)
    if args.json:
        check_output_file(args.json)

    from gradio_client import Client

    from demo.bundled import bundled_examples
    examples = bundled_examples()
    report = {"command": script_command(__file__, argv), "preset": args.preset, "machine": platform.platform(),
              "cpus": os.cpu_count(), "load_avg_before": load_average(), "starts": []}
    client = proc = None
    try:
        for n in range(args.starts):
            data_dir = tempfile.mkdtemp(prefix="mel-bench-app-")
            proc = AppProcess.start(data_dir, preset=args.preset, args=args.app_arg, timeout=args.timeout)
            url, ready = proc.url, proc.ready_s
            t = time.perf_counter()
            client = Client(url, verbose=False)
            connect = time.perf_counter() - t
            example = examples[n % len(examples)]
            first, raw = link_once(client, example)
            run = {"ready_s": round(ready, 2), "client_connect_s": round(connect, 2), "first_link_s": round(first, 3),
                   "first_link_example": example.mention, "server_timings_ms": raw["timings"],
                   "generator": raw["generator"]["linker"] if raw["generator"] else None,
                   "ranker": raw["ranker"]["linker"]}
            print(json.dumps(run), flush=True)
            report["starts"].append(run)
            if n < args.starts - 1:
                client.close()
                proc.stop(grace=30)
        warm = []
        for _ in range(args.warm_links):
            for example in examples:
                elapsed, raw = link_once(client, example)
                warm.append({"example": example.mention, "s": round(elapsed, 3), "server_timings_ms": raw["timings"]})
        report["warm_links"] = warm
    finally:
        if client is not None:
            client.close()
        if proc is not None:
            proc.stop(grace=30)

    ready = [r["ready_s"] for r in report["starts"]]
    first = [r["first_link_s"] for r in report["starts"]]
    report["summary"] = {
        "ready_s_p50": statistics.median(ready), "ready_s_max": max(ready),
        "first_link_s_p50": statistics.median(first), "first_link_s_max": max(first),
        "warm_link_s_p50": statistics.median([w["s"] for w in warm]) if warm else None,
        "warm_link_s_p95": pct([w["s"] for w in warm], 0.95) if warm else None,
        "targets": {"ready_s": 30, "first_link_s_p50": 3},
    }
    report["load_avg_after"] = load_average()
    print(json.dumps(report["summary"], indent=2))
    print(f"load average before {report['load_avg_before']}, after {report['load_avg_after']} "
          f"on {report['cpus']} CPUs")
    if args.json:
        save_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
