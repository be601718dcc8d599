# Developer and CI tasks. `make test` is exactly what CI runs (.ci/run).
# The virtualenv is (re)built only when pyproject.toml changes (stamp file), so re-runs are fast.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed.stamp

# pip must never prompt or chatter (CI has no stdin)
export PIP_NO_INPUT := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv test lint fmt typecheck unit demo bench readme clean distclean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --editable '.[test]'
	touch $@

lint: venv
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --check .

fmt: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -q tests/unit

# programs the tests drive for real, installed from Debian when missing
SYSTEM_DEPS := chromium:chromium haproxy:haproxy

test: venv
	scripts/system_deps.sh $(SYSTEM_DEPS)
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q

readme: venv
	$(BIN)/python scripts/readme_tables.py

demo: venv
	$(BIN)/python -m demo

bench: venv
	@command -v wrk >/dev/null && command -v curl >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq wrk curl; }
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf build .mypy_cache .ruff_cache .pytest_cache .hypothesis bench/out *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
