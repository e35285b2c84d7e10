"""The style gate (issue #17) inside the test suite: `make lint` runs the same two commands first,
so a red gate shows up here too, with the tools' own report as the failure message."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=900)


def test_ruff_finds_nothing():
    proc = _run("ruff", "check", "--output-format=concise", ".")
    if proc.returncode != 0:
        pytest.fail(f"`ruff check .` reports problems (settings: [tool.ruff] in pyproject.toml):\n"
                    f"{proc.stdout}{proc.stderr}", pytrace=False)


@pytest.mark.slow  # a first run (no .mypy_cache yet) reads torch's and numpy's stubs: a minute or more
def test_mypy_finds_nothing():
    proc = _run("mypy")
    if proc.returncode != 0:
        pytest.fail(f"`mypy` reports problems (files and settings: [tool.mypy] in pyproject.toml):\n"
                    f"{proc.stdout}{proc.stderr}", pytrace=False)
