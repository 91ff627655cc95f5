# Two commands matter: `make run` and `make test`. Both build the virtualenv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit integration bench schemas clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/tradeengine run

lint: $(STAMP)
	$(BIN)/ruff check engine tests bench
	$(BIN)/ruff format --check engine tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict engine

system-deps:
	scripts/ensure-system-deps

test: lint typecheck system-deps
	$(BIN)/pytest -q

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

schemas: $(STAMP)
	$(BIN)/python -m engine.schemas_gen

bench: $(STAMP)
	$(BIN)/python -m bench.tpsl_scaling
	$(BIN)/python -m bench.worker_hotpath
	$(BIN)/python -m bench.worker_throughput
	$(BIN)/python -m bench.attribution_throughput
	$(BIN)/python -m bench.memory

clean:
	rm -rf $(VENV) .tradeengine .pytest_cache .mypy_cache .ruff_cache
