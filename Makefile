# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install dev clean

# Stamp files make installation happen once, and again only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/python -m deepmoe.demo $(ARGS)

# Tests run in TEST_WORKERS processes (pytest-xdist), a test file per worker at a time so module fixtures
# (compiled programs, trained runs) are built once, the heaviest files first (tests/conftest.py HEAVY_FILES);
# compilation is single-threaded, so 2 workers on 2 cores nearly halve the wall time. TEST_WORKERS=0 runs
# everything in this process. A worker that crashes (XLA aborts the process, e.g. when collectives deadlock) fails
# the run at once: by default xdist re-runs the crashed file on up to 8 fresh workers, which once kept CI busy
# past its time limit.
TEST_WORKERS ?= 2

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --max-worker-restart=0 $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
