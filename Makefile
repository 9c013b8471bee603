# The quick start is two commands: `make serve` and `make test`; both bootstrap .venv when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DATA    ?= $(abspath ../shared/datasets/cifar10)

.PHONY: install test lint bench serve demo clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy graddiag

bench: $(STAMP)
	GRADDIAG_DATA_DIR=$${GRADDIAG_DATA_DIR:-$(DATA)} $(BIN)/python -m bench.run_all

demo: $(STAMP)
	GRADDIAG_DATA_DIR=$${GRADDIAG_DATA_DIR:-$(DATA)} $(BIN)/graddiag probe --activation sigmoid --depth 20 --steps 50

serve: $(STAMP)
	GRADDIAG_DATA_DIR=$${GRADDIAG_DATA_DIR:-$(DATA)} $(BIN)/graddiag serve

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
