# The single entry point for developers, pre-commit and CI.  `make` lists the targets.
PYTHON ?= python3
PYTEST_ARGS ?=
STAMP := .make/installed

.DEFAULT_GOAL := help
.PHONY: help install services demo test test-fast api-fuzz test-fault fmt lint type check up down run-router run-worker clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -q -e '.[dev]'
	@mkdir -p $(@D) && touch $@

install: $(STAMP)  ## install fabric and its dev tools (editable)

services:  ## make sure the local RabbitMQ and Redis answer (starts them if installed here)
	@./scripts/services.sh

demo: $(STAMP) services  ## run a demo workflow through a router and two workers on the local broker
	$(PYTHON) -m fabric.cli demo

test: $(STAMP) services  ## run the whole test suite against the real RabbitMQ, Redis and SQLite
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)  ## unit and store contract tests only
	$(PYTHON) -m pytest tests/unit tests/contract $(PYTEST_ARGS)

api-fuzz: $(STAMP) services  ## schemathesis against the router's OpenAPI document, 300 examples per operation
	API_FUZZ_EXAMPLES=300 $(PYTHON) -m pytest tests/integration/test_http_api.py -k schemathesis $(PYTEST_ARGS)

test-fault: $(STAMP) services  ## only the long fault scenarios (kill -9, cut connections)
	$(PYTHON) -m pytest -m fault $(PYTEST_ARGS)

fmt: $(STAMP)  ## format the code
	$(PYTHON) -m ruff format fabric workers tests bench
	$(PYTHON) -m ruff check --fix fabric workers tests bench

lint: $(STAMP)  ## ruff, format check and the import-linter contracts
	$(PYTHON) -m ruff check fabric workers tests bench
	$(PYTHON) -m ruff format --check fabric workers tests bench
	lint-imports

type: $(STAMP)  ## mypy --strict on the package and the example workers
	$(PYTHON) -m mypy fabric workers bench

check: lint type test  ## everything CI runs

up:  ## start RabbitMQ, Redis, Jaeger, the router and a worker with Docker Compose
	docker compose up -d --build

down:  ## stop the compose stack
	docker compose down

run-router: $(STAMP)  ## run a router against the local broker
	$(PYTHON) -m fabric.cli router

run-worker: $(STAMP)  ## run a demo worker against the local broker
	$(PYTHON) -m fabric.cli worker workers.demo:agent

clean:  ## remove caches and local state
	rm -rf .make .pytest_cache .mypy_cache .ruff_cache .hypothesis fabric.db fabric.db-*

.PHONY: bench bench-quick bench-memory
BENCH_ARGS ?=
bench: $(STAMP) services  ## benchmark fabric against the raw aio-pika baseline at the issue's sizes (3 rounds, ~10 min); writes bench/RESULTS.md
	$(PYTHON) -m bench.run --full $(BENCH_ARGS)

bench-memory: $(STAMP) services  ## S5: RSS while 500,000 tasks complete and 100,000 wait queued (long); writes bench/RESULTS.md
	$(PYTHON) -m bench.run --scenario s5

bench-quick: $(STAMP) services  ## tiny benchmark rounds (S1-S4, then S5): a smoke run that checks correctness only
	$(PYTHON) -m bench.run --quick
	$(PYTHON) -m bench.run --quick --scenario s5
