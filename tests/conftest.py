"""Shared fixtures. Real data is read from ../shared/data by path (never copied into the repo).

Also the launched app's test accounts and launch_app (tests import them: `from conftest import launch_app`).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never wait on the network


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"{SHARED_DATA} is missing: the tests need ../shared/data beside the repository")
    return SHARED_DATA


class HashingTextEncoder:
    """A deterministic bag-of-words encoder for tests that need embeddings but not a real model."""

    name = "test-hashing"
    dim = 64

    def encode(self, texts, batch_size=64, show_progress=False):
        out = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


@pytest.fixture
def hashing_encoder():
    return HashingTextEncoder()


def wait_for_child(pid: int, timeout_s: float = 300) -> int:
    """os.waitpid(pid)'s status, or a test failure when the forked child is still running after
    timeout_s: a child that waits forever on a lock it copied from another thread (a hung fork) must
    fail the test, not hang the whole run until CI kills it without a word."""
    import signal
    import time
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked child {pid} was still running after {timeout_s:.0f} s (hung on a lock copied at "
                f"fork?); run the forking tests in a pytest process of their own: pytest -m forks tests")


# -- the browser tests' chromium (Debian's; `playwright install` cannot download its own here) -----
CHROMIUM = os.environ.get("MEL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def need(what: str, ok: bool) -> None:
    """Fail in CI (which must run every browser test), skip with the fix elsewhere."""
    if ok:
        return
    message = f"{what} is missing: run `make test` (it installs it) or see the Makefile"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    need(CHROMIUM, Path(CHROMIUM).exists())
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need("the playwright Python package", False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield b
        b.close()


# -- the real app served from this process (bench/app_server.py), with test-only accounts -----------
APP_USERS = {"alice": "alice-pw-1", "bob": "bob-pw-2"}  # the app reads real accounts from MEL_AUTH
APP_ADMINS = frozenset({"alice"})


def launch_app(data_dir: Path, *, auth: bool = True):
    """The app of `python app.py` (offline preset, bundled demo KB) on 127.0.0.1 and a free port, with
    password login for APP_USERS (alice is the admin), or without login (auth=False)."""
    from bench.app_server import launch_in_process
    return launch_in_process(data_dir, users=APP_USERS if auth else None,
                             admins=APP_ADMINS if auth else frozenset())


def open_logged_in(browser, url: str, user: str, password: str | None = None, viewport=(1400, 1700),
                   wait=("#mel-caption textarea", "#mel-counter"), timeout_ms: int = 60_000,
                   console_errors: bool = False):
    """A new page of the launched app, logged in as `user` (password: APP_USERS') through Gradio's
    password form, once the `wait` selectors are drawn (by default the Link tab and the counter).
    Each wait (and later each action) gives up after `timeout_ms`. `console_errors`: the page's console
    errors and uncaught exceptions, from before the login on, are collected in `page.mel_console`."""
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    page.set_default_timeout(timeout_ms)
    if console_errors:
        page.mel_console = []
        page.on("console", lambda m: page.mel_console.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: page.mel_console.append(str(e)))
    page.goto(url, wait_until="load")
    page.locator("input[type=text]").first.fill(user)
    page.locator("input[type=password]").first.fill(password if password is not None else APP_USERS[user])
    page.keyboard.press("Enter")
    for selector in wait:
        page.wait_for_selector(selector)
    return page
