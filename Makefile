# One entry point per task; each creates the virtual environment on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test lint check demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

## test: run the whole test suite
test: $(STAMP)
	$(BIN)/pytest

## lint: ruff and mypy, as CI runs them
lint: $(STAMP)
	$(BIN)/ruff check keyagent tests bench fuzz
	$(BIN)/ruff format --check keyagent tests bench fuzz
	$(BIN)/mypy

## check: lint, then test
check: lint test

## demo: run a real agent and walk through the everyday commands
demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" sh contrib/demo.sh

## bench: benchmarks against ssh-agent on this machine
bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
