# Two commands set everything up on a fresh machine:
#   make demo   - create .venv if missing, install, run the demo on the built-in data
#   make test   - create .venv if missing, install with dev extras, run the tests
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev

.PHONY: demo test test-fast test-slow bench install install-dev browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -m pip install -q -e .
	touch $@

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(STAMP)

# Headless Chromium for the report test (Debian package); skipped quietly where it cannot be had.
browser:
	@command -v chromium >/dev/null 2>&1 || ( [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) ) || \
	  echo "note: chromium not available; the report browser test will be skipped"

demo: $(VENV)/.installed
	$(VENV)/bin/sppnet demo --out runs/demo --resume

test: $(STAMP) browser
	$(PY) -m ruff check src tests benchmarks experiments
	$(PY) -m ruff format --check src tests benchmarks experiments
	$(PY) -m pytest -q -m "not slow"
	$(PY) -m pytest -q -m slow

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_ops.py
	$(PY) benchmarks/bench_detection.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
