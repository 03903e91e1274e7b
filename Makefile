# Two commands do everything on a fresh Debian 12 machine: `make run`, `make test`.
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup run test check lint typecheck bpfproxy bench bench-ports bench-rss bench-fleet build-in-container test-container clean

setup:
	@bash scripts/setup.sh

run: setup
	$(BIN)/python -m tcpproxy.demo --config config.json

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the edit loop: unit tests and the quick integration tests (all but those marked slow)
check: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup typecheck
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypyc compiles the modules tcpproxy/build_info.py lists and needs them type-correct
typecheck: setup
	$(BIN)/mypy setup.py tcpproxy/build_info.py $$($(BIN)/python -c \
		'from tcpproxy.build_info import COMPILED_MODULES, source_path; \
		print(*(source_path(name, ".") for name in COMPILED_MODULES))')

# compile and load the sk_lookup program without attaching it (needs root)
bpfproxy: setup
	$(BIN)/bpfproxy --check

# direct vs HAProxy vs tcpproxy vs bpfproxy (needs root); writes docs/benchmarks.md
bench: setup
	@bash scripts/setup.sh --bench
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

# time 20,000-port map updates in a throwaway network namespace (needs root)
bench-ports: setup
	$(BIN)/python scripts/bench_ports.py

# RSS of a serving bpfproxy with 1,000 steered ports, at most 64 MB; no bcc/LLVM mapped (root)
bench-rss: setup
	$(BIN)/python scripts/bench_rss.py

# 5 bpfproxy nodes following 1,000 apps x 20 ports in a real etcd, each in its own
# network namespace: cold start, propagation p50/p99, RSS, etcd requests per change (root)
bench-fleet: setup
	$(BIN)/python scripts/bench_fleet.py $(BENCH_ARGS)

# needs a Docker engine and the host's kernel headers (make setup): build the tcpproxy and
# bpfproxy images, run bpfproxy --check and a tcpproxy smoke test in containers
DOCKER ?= docker
DOCKER_BUILD_FLAGS ?=
CA_CERTS_FILE ?=
build-in-container:
	@DOCKER="$(DOCKER)" DOCKER_BUILD_FLAGS="$(DOCKER_BUILD_FLAGS)" CA_CERTS_FILE="$(CA_CERTS_FILE)" \
		bash scripts/build-in-container.sh

# as root, on a machine without Docker: the above on a dockerd and base image of its own
test-container:
	@bash scripts/test-container.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache build *.egg-info tcpproxy/compiled.json
	find tcpproxy -name '*.so' -delete
