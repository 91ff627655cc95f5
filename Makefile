# Two commands matter: `make run` and `make test`. Both build the virtualenv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck security unit integration bench schemas clean system-deps lock

LOCKS := requirements-dev.lock requirements-build.lock

# Every dependency, direct and indirect, from the hashed locks; wheels only (no sdist builds).
$(STAMP): pyproject.toml $(LOCKS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes --only-binary=:all: -r requirements-dev.lock -r requirements-build.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# After a change of pins in pyproject.toml: the locks again (a test checks they agree).
lock: $(STAMP)
	$(BIN)/uv pip compile --quiet --generate-hashes --python-version 3.11 -o requirements.lock pyproject.toml
	$(BIN)/uv pip compile --quiet --generate-hashes --extra dev --python-version 3.11 -o requirements-dev.lock pyproject.toml
	$(BIN)/uv pip compile --quiet --generate-hashes --python-version 3.11 -o requirements-build.lock requirements-build.in

# /metrics, /healthz and /readyz on 127.0.0.1:8080 unless HTTP_PORT says otherwise.
run: $(STAMP)
	HTTP_PORT=$${HTTP_PORT:-8080} $(BIN)/tradeengine run

lint: $(STAMP)
	$(BIN)/ruff check engine tests bench
	$(BIN)/ruff format --check engine tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict engine

system-deps:
	scripts/ensure-system-deps

# bandit: no medium or high finding without a reason next to it; pip-audit: a known
# vulnerability in the lock fails, no reachable advisory database is said and skipped.
security: $(STAMP)
	$(BIN)/bandit -q -c pyproject.toml -r engine -ll
	$(BIN)/python scripts/audit-lock requirements-dev.lock

test: lint typecheck security system-deps
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
