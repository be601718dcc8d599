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

.PHONY: venv compile deploy-tools test lint fmt typecheck unit demo bench readme clean distclean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --editable '.[test]'
	touch $@

# the data path compiled with mypyc, in place (setup.py, shared/compiled.py): the editable
# install compiles it; this rebuilds it after one of its sources changed (until then those
# modules are imported from source, all of them)
compile: venv
	@$(BIN)/python -c 'import sys, shared.compiled as c; sys.exit(not c.up_to_date())' || \
		$(BIN)/python setup.py --quiet build_ext --inplace

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
SYSTEM_DEPS := chromium:chromium redis-server:redis-server redis-sentinel:redis-sentinel redis-cli:redis-tools
SYSTEM_DEPS += pg_ctlcluster:postgresql
SYSTEM_DEPS += promtool:prometheus systemd-analyze:systemd haproxy:haproxy

# the deploy artefacts' checkers (tests/deploy): the `deploy` extra in .venv (its requirements
# only: reinstalling the project would compile it again), and checkov in a
# venv of its own (its pinned dependencies would otherwise clash with the project's)
DEPLOY_STAMP := $(VENV)/.deploy-tools.stamp
CHECKOV_VENV := $(VENV)/checkov
CHECKOV_VERSION := 3.3.30

deploy-tools: $(DEPLOY_STAMP)

$(DEPLOY_STAMP): $(STAMP) Makefile
	$(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["deploy"], sep="\n")' \
		| $(BIN)/python -m pip install --quiet --requirement /dev/stdin
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet 'checkov==$(CHECKOV_VERSION)'
	touch $@

test: compile deploy-tools
	scripts/system_deps.sh $(SYSTEM_DEPS)
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q

readme: venv
	$(BIN)/python scripts/readme_tables.py

demo: compile
	$(BIN)/python -m demo

# what only `make bench` needs: load tools and the reference relays (nginx from Debian, pproxy
# into the venv); `make test` needs none of them
BENCH_DEPS := wrk:wrk curl:curl nginx:nginx
PPROXY_VERSION := 2.7.9

bench: compile
	scripts/system_deps.sh $(BENCH_DEPS)
	$(BIN)/python -c 'import pproxy' 2>/dev/null || \
		$(BIN)/python -m pip install --quiet 'pproxy==$(PPROXY_VERSION)'
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/accesslog.py
	$(BIN)/python bench/sessions.py $(SESSIONS_ARGS)

clean:
	rm -f shared/compiled.json
	find shared csc tenant_agent -name '*.so' -delete
	rm -rf build .mypy_cache .ruff_cache .pytest_cache .hypothesis bench/out *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
