# Two commands do everything on a fresh Debian 12 machine: `make run`, `make test`.
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup run test lint bpfproxy bench bench-ports build-in-container clean

setup:
	@bash scripts/setup.sh

run: setup
	$(BIN)/python -m tcpproxy.demo --config config.json

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

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

# needs a Docker engine: build the image, then check bpfproxy can load its program in it
build-in-container:
	docker build -t tcpproxy .
	docker run --rm --user root --network host --cap-add BPF --cap-add NET_ADMIN \
		--cap-add SYS_RESOURCE -v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro \
		--entrypoint bpfproxy tcpproxy --check

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
