# PIEscope: `make demo` runs the main job, `make test` passes the tests.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# The CPU build of torch; an unpinned torch pulls gigabytes of CUDA packages.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: venv test test-fast demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,demo]"
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

demo: venv
	$(BIN)/piescope demo

bench: venv
	$(BIN)/python bench/clt_quality.py

clean:
	rm -rf $(VENV) .pytest_cache artifacts
