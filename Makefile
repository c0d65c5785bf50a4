# spectral-plasticity: every target sets up the project virtual environment on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

EXP ?= slippery_ant
SCALE ?= small
SEEDS ?=
METHODS ?=
WORKDIR ?= workdirs
OVERRIDES ?=
RESTART ?=
VERBOSITY ?=
CLI_ARGS = --exp=$(EXP) --scale=$(SCALE) --workdir=$(WORKDIR) $(if $(SEEDS),--seeds=$(SEEDS)) \
	$(if $(METHODS),--methods=$(METHODS)) $(foreach o,$(OVERRIDES),--override=$(o)) \
	$(if $(RESTART),--restart) $(if $(VERBOSITY),--verbosity=$(VERBOSITY))

# Runs a resumable command again while it exits with 75 (train/watchdog.py: a stalled XLA CPU
# computation was stopped; the rerun resumes from the last checkpoint), at most 5 more times.
# A command stopped by SIGTERM (143, after saving its chunk) stops make by the same signal, so
# a supervisor sees 143 rather than make's 2 (the shell stays a moment, so that make handles the
# signal while its child still runs: otherwise make sometimes stops with "wait: No child
# processes" and exits 2).
resuming = status=75; tries=0; while [ $$status -eq 75 ] && [ $$tries -lt 6 ]; do \
	$(1); status=$$?; tries=$$((tries + 1)); done; \
	if [ $$status -eq 143 ]; then kill -TERM $$PPID; sleep 1; fi; exit $$status

.PHONY: test test-slow lint bench sweep list plots reproduce clean-venv

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
	$(PY) benchmarks/supervised.py
	$(PY) benchmarks/ppo.py
	$(PY) benchmarks/methods.py

## make sweep EXP=name [SCALE=paper] [SEEDS=n] [METHODS=a,b] [WORKDIR=dir] [OVERRIDES="k=v ..."]
##   [RESTART=1] [VERBOSITY=0]: results in WORKDIR/EXP-SCALE/<method>/ (experiment.run_dir);
##   running it again resumes; RESTART=1 starts over a method whose checkpoints are unreadable;
##   VERBOSITY=0 shows the libraries' INFO logs.
sweep: $(STAMP)
	$(call resuming,$(PY) -m spectral_plasticity.cli sweep $(CLI_ARGS))

## make list: the experiments and their methods.
list: $(STAMP)
	$(PY) -m spectral_plasticity.cli list

## make plots EXP=name: PNG figures of a sweep's results.
plots: $(STAMP)
	$(PY) -m spectral_plasticity.cli plots $(CLI_ARGS)

## make reproduce [SCALE=paper] [PREFLIGHT=1]: the paper's claims with statistics (resumable) ->
## docs/REPRODUCTION_RESULTS.md and docs/figures/. SCALE=paper first runs every method of every
## study for one tiny chunk (the preflight); PREFLIGHT=1 runs only that.
reproduce: $(STAMP)
	$(call resuming,$(PY) -m spectral_plasticity.reproduce --workdir=$(WORKDIR)/reproduce \
		--scale=$(SCALE) $(if $(PREFLIGHT),--preflight=only))

clean-venv:
	rm -rf $(VENV)
