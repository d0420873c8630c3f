# Everything a fresh machine needs is installed by these targets; nothing by hand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# LiteLLM's proxy (~740 MB, strict pins of its own) lives in its own venv, used only by the
# test that runs distillguard's guardrail inside a real LiteLLM proxy.
LITELLM_VENV ?= .venv-litellm
# Editing these reinstalls the project (setup.py compiles the Cython skeleton scanner in place).
BUILD_INPUTS := pyproject.toml setup.py src/distillguard/signals/_skeleton.pyx

.PHONY: demo test lint bench system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-base: $(BUILD_INPUTS) | $(BIN)/python
	PYTHON=$(PYTHON) bash scripts/system-deps.sh build
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(BUILD_INPUTS) | $(BIN)/python
	PYTHON=$(PYTHON) bash scripts/system-deps.sh build
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed-base

$(LITELLM_VENV)/.installed: $(BUILD_INPUTS)
	PYTHON=$(PYTHON) bash scripts/system-deps.sh build
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install -q --upgrade pip
	$(LITELLM_VENV)/bin/pip install -q -e '.[litellm]' 'litellm[proxy]==1.106.2'
	touch $@

## make demo: set up and run the main job end to end on the embedded DuckDB store.
demo: $(VENV)/.installed-base
	$(BIN)/distillguard demo

## make test: set up (Python packages, Redis, Java) and run lint + the whole test suite.
test: $(VENV)/.installed-dev $(LITELLM_VENV)/.installed system-deps
	$(BIN)/ruff check src tests benchmarks
	DISTILLGUARD_LITELLM_PYTHON=$(abspath $(LITELLM_VENV))/bin/python $(BIN)/pytest -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks

## make bench: every benchmark in benchmarks/, figures printed with the machine.
bench: $(VENV)/.installed-dev
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

system-deps:
	PYTHON=$(PYTHON) bash scripts/system-deps.sh

clean:
	rm -rf $(VENV) $(LITELLM_VENV) distillguard.duckdb out
