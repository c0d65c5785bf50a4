# spectral-plasticity: every target sets up the project virtual environment on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: test test-slow lint bench clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

## make test: the default test suite (slow tests excluded); sets up .venv on first use.
test: $(STAMP)
	$(PY) -m pytest

## make test-slow: only the tests marked slow.
test-slow: $(STAMP)
	$(PY) -m pytest -m slow

## make lint: ruff over the whole project.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

## make bench: speed comparisons, printed as ratios measured in one run.
bench: $(BENCH_STAMP)
	$(PY) benchmarks/curvature.py

clean-venv:
	rm -rf $(VENV)
