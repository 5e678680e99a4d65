# fedgate: `make run` and `make test` do all the set-up on a fresh machine.
PYTHON  ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TSTAMP  := $(VENV)/.installed-test
CONFIG  ?= conf/fedgate.toml

.PHONY: run test lint typecheck pytest protos interop-venv bench-wan bench-proxy bench-he bench-link bench-audit bench-rdma gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	$(BIN)/pip install -q -e .
	touch $@

$(TSTAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[test,bench]'
	bash scripts/install-test-deps.sh
	touch $@

run: $(STAMP)
	$(BIN)/fedgate run --config $(CONFIG)

protos: $(TSTAMP)
	bash scripts/gen-protos.sh $(BIN)/python

interop-venv: $(TSTAMP)
	bash scripts/make-interop-venvs.sh

lint: $(TSTAMP)
	$(BIN)/ruff check fedgate tests

typecheck: $(TSTAMP)
	$(BIN)/mypy

pytest: $(TSTAMP) interop-venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

bench-wan: $(TSTAMP)
	$(BIN)/fedgate bench wan $(ARGS)

bench-proxy: $(TSTAMP)
	$(BIN)/fedgate bench proxy $(ARGS)

bench-link: $(TSTAMP)
	$(BIN)/fedgate bench link $(ARGS)

bench-he: $(TSTAMP)
	$(BIN)/fedgate bench he $(ARGS)

bench-cc: $(TSTAMP)
	$(BIN)/fedgate bench cc $(ARGS)

bench-audit: $(TSTAMP)
	$(BIN)/fedgate bench audit $(ARGS)

bench-rdma: $(TSTAMP)
	$(BIN)/fedgate bench rdma $(ARGS)

gpu-check: $(STAMP)
	$(BIN)/pip install -q -e '.[gpu]'
	$(BIN)/python -m fedgate.compute.gpu_check

clean:
	rm -rf $(VENV) .test-venvs .mypy_cache .ruff_cache .pytest_cache var
