# The two commands: `make run` (demo on the embedded digits) and `make test` (lint + pytest).
# Each creates the virtual environment when it is missing and installs everything.
# VENV may point outside the clone (CI keeps one per dependency hash, see .ci/run).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_HASH := $(shell cat pyproject.toml | sha256sum | cut -c1-16)
STAMP := $(VENV)/.deps-$(DEPS_HASH)
RUN_ARGS ?=

.PHONY: install run test lint bench clean

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.deps-* && touch $(STAMP)

# Re-link the package to this checkout every time (cheap), so a shared VENV never
# imports boss_core from another clone.
install: $(STAMP)
	@$(PY) -m pip install -q --no-deps --no-build-isolation -e .

run: install
	$(PY) -m boss_core.demo $(RUN_ARGS)

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

bench: install
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
