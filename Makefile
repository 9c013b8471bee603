# The quick start is two commands: `make serve` and `make test`; both bootstrap .venv when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DATA    ?= $(abspath ../shared/datasets/cifar10)
# The shared copy when it exists (and GRADDIAG_DATA_DIR is not set); elsewhere graddiag finds or downloads
# its own CIFAR-10 under ~/.cache/graddiag/datasets/cifar10.
DATA_ENV = $(if $(wildcard $(DATA)),GRADDIAG_DATA_DIR=$${GRADDIAG_DATA_DIR:-$(DATA)})

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
	$(DATA_ENV) $(BIN)/python -m bench.run_all

demo: $(STAMP)
	$(DATA_ENV) $(BIN)/graddiag probe --activation sigmoid --depth 20 --steps 50

serve: $(STAMP)
	$(DATA_ENV) $(BIN)/graddiag serve

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
