# Everything a fresh machine needs is installed by these targets; nothing by hand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint bench system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed-base

## make demo: set up and run the main job end to end on the embedded DuckDB store.
demo: $(VENV)/.installed-base
	$(BIN)/distillguard demo

## make test: set up (Python packages, Redis, Java) and run lint + the whole test suite.
test: $(VENV)/.installed-dev system-deps
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks

## make bench: every benchmark in benchmarks/, figures printed with the machine.
bench: $(VENV)/.installed-dev
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

system-deps:
	bash scripts/system-deps.sh

clean:
	rm -rf $(VENV) distillguard.duckdb out
