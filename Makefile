# samcp developer entry points. Every target creates .venv on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.samcp-installed
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: demo test test-all bench lint clean venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m samcp.cli.main demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python tests/benchmarks/run_all.py

lint: $(STAMP)
	$(BIN)/ruff check pipeline models cli tests

clean:
	rm -rf $(DEMO_OUT) bench_out .pytest_cache
