# Two commands do everything on a fresh Debian 12 machine: `make run`, `make test`.
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup run test lint clean

setup:
	@bash scripts/setup.sh

run: setup
	$(BIN)/python -m tcpproxy.demo --config config.json

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
