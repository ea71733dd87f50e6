# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch 2.13.0 (CPU build) is installed first, so nothing later can pull a CUDA torch.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.privdiff-installed

.PHONY: demo test lint format install browser postgres clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	@$(BIN)/python -c "import torch; v = torch.__version__; assert v.startswith('2.13.0'), 'torch was replaced: ' + v"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/privdiff demo

# The report-render test (tests/evaluation/test_report.py) opens the report in headless Chromium.
# Install Debian's chromium when it is missing and apt-get is usable as root; otherwise say that
# test will be skipped. This step never fails `make test` by itself.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium (apt-get) for the report-render test; log in $${TMPDIR:-/tmp}/privdiff-chromium-install.log"; \
	  ( apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium ) \
	    >$${TMPDIR:-/tmp}/privdiff-chromium-install.log 2>&1 \
	    || echo "chromium install failed (see $${TMPDIR:-/tmp}/privdiff-chromium-install.log): the report-render test will be skipped"; \
	else echo "no /usr/bin/chromium and no root apt-get: the report-render test will be skipped (apt-get install chromium)"; fi

# The budget-registry tests run against a real PostgreSQL server that the tests start on loopback
# (tests/privacy/conftest.py). Install Debian's postgresql when initdb is missing and apt-get is
# usable as root; otherwise say those cases will be skipped (the SQLite ones always run).
postgres:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing postgresql (apt-get) for the budget-registry tests; log in $${TMPDIR:-/tmp}/privdiff-postgresql-install.log"; \
	  ( apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql ) \
	    >$${TMPDIR:-/tmp}/privdiff-postgresql-install.log 2>&1 \
	    || echo "postgresql install failed (see $${TMPDIR:-/tmp}/privdiff-postgresql-install.log): the PostgreSQL registry tests will be skipped"; \
	else echo "no initdb and no root apt-get: the PostgreSQL registry tests will be skipped (apt-get install postgresql)"; fi

# The house style (pyproject's [tool.ruff]): Pyflakes-level lint (unused or undefined names) and `ruff format`
# at one line length; either failing fails `make test`. `make format` rewrites the tree in the house style.
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks

test: $(STAMP) lint browser postgres
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
