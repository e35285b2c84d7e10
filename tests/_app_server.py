"""Launch the real app (offline preset, bundled demo KB) on 127.0.0.1 and a free port, for tests.

The code lives in demo/serving.py, shared with the benchmarks (bench/bench_app.py, bench/bench_load.py).
"""
from __future__ import annotations

from pathlib import Path

from demo.serving import RunningApp, launch_in_process

USERS = {"alice": "alice-pw-1", "bob": "bob-pw-2"}  # test-only accounts; the app reads real ones from MEL_AUTH
ADMINS = frozenset({"alice"})


def launch_app(data_dir: Path, *, auth: bool = True) -> RunningApp:
    return launch_in_process(data_dir, users=USERS if auth else None, admins=ADMINS if auth else frozenset())
