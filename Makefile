# The two commands: `make run` (the DVC pipeline on the embedded digits) and `make test`
# (lint + pytest). Each creates the virtual environment when it is missing and installs
# everything. Others: `make ui` (MLflow UI), `make prefect` (Prefect server + deployment),
# `make run-paper` (the longer profile as a DVC experiment), `make sample`, `make demo`,
# `make run-curved` (a guided class-conditional teacher on a curved path, params.curved.yaml).
# VENV may point outside the clone (CI keeps one per dependency hash, see .ci/run).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_HASH := $(shell cat pyproject.toml | sha256sum | cut -c1-16)
STAMP := $(VENV)/.deps-$(DEPS_HASH)
RUN_ARGS ?=
UI_PORT ?= 5000
# the venv first on PATH: dvc.yaml's stages call `python -m tasks.<step>`
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install run run-paper run-curved demo ui prefect sample test test-fast lint bench clean

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.deps-* && touch $(STAMP)

# Re-link the package to this checkout every time (cheap), so a shared VENV never
# imports boss_core from another clone.
install: $(STAMP)
	@$(PY) -m pip install -q --no-deps --no-build-isolation -e .

# dvc.yaml's data stage writes the embedded digits (recorded in dvc.lock), so a fresh clone
# needs no DVC remote; dvc.yaml is regenerated first (it follows params.yaml's
# model.import_path and the method registry), then DVC runs what is out of date.
run: install
	$(PY) -m tasks.cli.dvcyaml
	dvc repro $(RUN_ARGS)
	$(PY) -m tasks.export
	@cat results/metrics.md
	@echo "Results: results/ (dvc metrics show, dvc plots show; every method's steps in results/schedules.json and .csv); MLflow: make ui"

run-paper: install
	dvc exp run $$($(PY) -m tasks.cli.profile params.paper.yaml --dvc-args) $(RUN_ARGS)

run-curved: install
	dvc exp run $$($(PY) -m tasks.cli.profile params.curved.yaml --dvc-args) $(RUN_ARGS)

demo: install
	$(PY) -m boss_core.demo $(RUN_ARGS)

ui: install
	$(PY) -m tasks.cli.ui --port $(UI_PORT)

prefect: install
	$(PY) -m flows.local_server --serve

sample: install
	$(PY) -m tasks.cli.sample --method boss --nfe 2 --n 64 --seed 0 --out samples

lint: install
	$(VENV)/bin/ruff check .

# two pytest-xdist workers, whole test files each (module fixtures stay in one process); the
# tiny `dvc repro` runs of tests/conftest.py are shared by both workers
PYTEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

# the library and unit tests only (no e2e or slow ones): a few minutes on 2 cores
test-fast: lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not e2e and not slow"

bench: install
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
