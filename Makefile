# One entry point per task; each creates the virtual environment on first use.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Which interpreters `make test` runs the suite on: empty for every one noxfile.py names
# (3.11 to 3.13) that this machine has; e.g. `make test PYTHONS=3.12` for one.
PYTHONS ?=

.PHONY: test lint check demo bench clean FORCE

# A venv made by another Python (after `pyenv global`, PYTHON=..., an upgrade that removed
# the old one) is rebuilt rather than reused: its scripts would run the wrong interpreter, or
# none. The two agree when both name the same installation and version (sys.base_prefix is
# the same inside a venv as in the Python that made it).
PYTHON_ID := import sys; print("Python %d.%d.%d" % sys.version_info[:3], "in", sys.base_prefix)
ifneq ($(wildcard $(VENV)/pyvenv.cfg),)
WANTED := $(shell $(PYTHON) -c '$(PYTHON_ID)' 2>/dev/null)
BUILT  := $(shell $(BIN)/python -c '$(PYTHON_ID)' 2>/dev/null)
ifneq ($(WANTED),$(BUILT))
STALE  := FORCE
endif
endif

$(STAMP): pyproject.toml $(STALE)
	@if [ -n "$(STALE)" ]; then \
	  echo "$(VENV) was made by $(or $(BUILT),a Python that no longer runs); rebuilding it with $(PYTHON): $(or $(WANTED),which does not run)"; \
	fi
	$(PYTHON) -m venv $(if $(STALE),--clear) $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

FORCE:

## test: run the whole test suite on every supported Python this machine has (noxfile.py)
test: $(STAMP)
	$(BIN)/nox -s tests $(if $(strip $(PYTHONS)),--python $(PYTHONS))

## lint: ruff and mypy, as CI runs them
lint: $(STAMP)
	$(BIN)/ruff check keyagent tests bench fuzz noxfile.py
	$(BIN)/ruff format --check keyagent tests bench fuzz noxfile.py
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
	rm -rf $(VENV) .nox .pytest_cache .mypy_cache .ruff_cache .hypothesis
