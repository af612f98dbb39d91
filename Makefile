# ecsnap: the two set-up commands are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?= $(CURDIR)/var/data
LISTEN ?= 127.0.0.1:8080
PYTEST_ARGS ?=

.PHONY: test run deps venv lint bench clean

deps:
	bash scripts/system-deps.sh

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache --no-logo  # the layer contracts: [tool.importlinter]

test: deps venv lint
	$(BIN)/pytest -q $(PYTEST_ARGS)

run: deps venv
	$(BIN)/ecsnap init --data-dir $(DATA)
	$(BIN)/ecsnap image build-demo --data-dir $(DATA)
	$(BIN)/ecsnap serve --data-dir $(DATA) --listen $(LISTEN)

bench: deps venv
	$(BIN)/python -m bench.run --out docs/benchmarks.md

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
