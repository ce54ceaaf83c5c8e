# PIEscope: `make demo` runs the main job, `make test` passes the tests.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# The CPU build of torch; an unpinned torch pulls gigabytes of CUDA packages.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: venv test test-fast demo demo-modadd bench clean

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

# The modular-addition model and its CLT (each built once: ~2 minutes and ~10 s on two quiet
# cores, ~12 + ~10 minutes on two busy ones), then HAGD on it.
MODADD := models_cache/modadd-113
demo-modadd: venv
	test -f $(MODADD)/model/config.json || $(BIN)/piescope train-toy modadd --p 113
	test -f $(MODADD)/clt/training_report.json || $(BIN)/piescope train-clt --model modadd-113 \
		--corpus $(MODADD)/corpus.jsonl --features-per-layer 512 --k 16 --tokens 40000 \
		--heldout-tokens 2048 --batch-size 512 --out $(MODADD)/clt
	$(BIN)/piescope hagd --model modadd-113 --transcoder modadd-113/clt --task modadd -n 32 --out $(MODADD)/hagd.json

bench: venv
	$(BIN)/python bench/clt_quality.py

clean:
	rm -rf $(VENV) .pytest_cache artifacts
