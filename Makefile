# The two commands: `make up` (the whole local stack) and `make test` (the whole suite).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: up test lint fmt install bench-ingest bench-ingest-sql bench-availability bench-reservations bench-gateway bench-footprint k8s-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,load]'
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/parking up

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy services gateway

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .data

# Benchmarks: each starts its own stack on 127.0.0.1, runs for a bounded time, prints a ratio.
bench-ingest: $(STAMP)
	$(BIN)/python -m loadtests.bench_ingest

bench-ingest-sql: $(STAMP)
	$(BIN)/python -m loadtests.bench_ingest_sql

bench-availability: $(STAMP)
	$(BIN)/python -m loadtests.bench_availability

bench-reservations: $(STAMP)
	$(BIN)/python -m loadtests.bench_reservations

bench-gateway: $(STAMP)
	$(BIN)/python -m loadtests.bench_gateway

k8s-check: $(STAMP)
	bash k8s/check.sh

bench-footprint: $(STAMP)
	$(BIN)/python -m loadtests.footprint
