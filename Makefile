# ssmstream — the two contract commands are `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0
# where torch comes from: pip's configured index by default; from public PyPI, which serves
# the CUDA build on Linux, use TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH_INDEX ?=

.PHONY: install services test lint fmt demo bench protos clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first (the local CPU wheel), so nothing later pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)" $(TORCH_INDEX)
	$(BIN)/pip install -q -e ".[dev,train,export,serve,plots]"
	touch $(STAMP)

install: $(STAMP)

# Debian's redis-server and nginx, for the scale-out tests (tests/runtime/scaleout), which
# skip, saying why, where they cannot be installed (not root, no apt-get, no registry)
SERVICES := redis-server nginx
services:
	@missing=""; for b in $(SERVICES); do command -v $$b >/dev/null || [ -x /usr/sbin/$$b ] \
	  || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing (apt-get)"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q --no-install-recommends $(SERVICES) >/dev/null 2>&1 \
	      || { apt-get update -q >/dev/null 2>&1 && \
	           apt-get install -y -q --no-install-recommends $(SERVICES) >/dev/null 2>&1; } \
	      || echo "note: could not install$$missing; the scale-out tests will skip"; \
	  else echo "note:$$missing not installed; the scale-out tests will skip"; fi; \
	fi

test: $(STAMP) services
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check model export runtime tests benchmarks examples

fmt: $(STAMP)
	$(BIN)/ruff format model export runtime tests benchmarks examples
	$(BIN)/ruff check --fix .

# every benchmark (long: about an hour on 2 CPUs), then benchmarks/results/REPORT.md;
# BENCH_ARGS=--quick for a smoke run, BENCH_ARGS=--report-only to rebuild the report only
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

# regenerate the committed gRPC/protobuf stubs from protos/inference.proto
protos: $(STAMP)
	$(BIN)/python -m ssmstream.protos.generate

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .demo

# export the shipped checkpoint, serve it on 127.0.0.1, stream a generation, snapshot/fork, stop
demo: $(STAMP)
	$(BIN)/python examples/quickstart.py
