# modelserve: `make up` runs the whole suite locally, `make test` runs every test.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
STAMP := $(VENV)/.installed
# buf breaking compares the protos with this git ref.
BREAKING_AGAINST ?= .git\#branch=main,subdir=protos

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "modelserve needs Python 3.11+ as '$(PYTHON)' (set PYTHON=...)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || \
	  { echo "cannot create a virtualenv: install python3-venv (apt-get install python3-venv)"; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

.PHONY: venv
venv: $(STAMP) ## Create .venv and install modelserve with its dev tools

.PHONY: redis
redis: ## Make sure redis-server is installed (apt-get when root)
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) || \
	      { echo "apt-get could not install redis-server"; exit 1; }; \
	  else echo "redis-server is missing: install it (Debian: sudo apt-get install redis-server)"; exit 1; fi; }

$(BUF):
	@command -v npm >/dev/null || { echo "buf comes from npm: install Node.js and npm first"; exit 1; }
	@mkdir -p .tools
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

.PHONY: client-node
client-node: $(STAMP) $(BUF) ## Generate the Node.js client from the protos into clients/node/gen
	@command -v npm >/dev/null || { echo "the Node.js client needs Node.js and npm"; exit 1; }
	npm ci --silent --no-audit --no-fund --prefix clients/node
	@rm -rf clients/node/gen clients/node/.rpc && mkdir -p clients/node/.rpc/google/rpc
	@rpc=$$($(PY) -c 'import google.rpc.status_pb2 as m, os; print(os.path.dirname(m.__file__))') && \
	  cp "$$rpc/status.proto" "$$rpc/error_details.proto" clients/node/.rpc/google/rpc/
	cd clients/node && ../../$(BUF) generate

.PHONY: protos
protos: $(STAMP) $(BUF) ## Lint the protos and regenerate libs/proto (commit the result)
	$(BUF) lint
	$(PY) scripts/gen_protos.py

.PHONY: check-protos
check-protos: $(STAMP) $(BUF) ## buf lint, buf breaking, and fail when generated code is stale
	$(BUF) lint
	@if git rev-parse --verify -q main >/dev/null; then $(BUF) breaking protos --against '$(BREAKING_AGAINST)'; \
	  else echo "no main branch: buf breaking has nothing to compare with"; fi
	@rm -rf .run/gen && $(PY) scripts/gen_protos.py .run/gen >/dev/null
	@diff -r -x __pycache__ .run/gen/modelserve libs/proto/src/modelserve >/dev/null || \
	  { echo "libs/proto is stale: run 'make protos' and commit"; diff -r -x __pycache__ .run/gen/modelserve libs/proto/src/modelserve | head -20; exit 1; }
	@echo "generated code is up to date"

.PHONY: lint
lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

.PHONY: test
test: $(STAMP) redis check-protos lint ## Run every test (real Redis, real Triton)
	$(PY) -m pytest

.PHONY: test-gpu
test-gpu: $(STAMP) ## Run the GPU tests (needs an NVIDIA GPU; puts onnxruntime-gpu in .venv)
	@command -v nvidia-smi >/dev/null || { echo "make test-gpu needs an NVIDIA GPU and its driver (nvidia-smi)"; exit 1; }
	@$(PY) -c 'import onnxruntime, sys; sys.exit("CUDAExecutionProvider" not in onnxruntime.get_available_providers())' || \
	  { $(PY) -m pip uninstall --quiet -y onnxruntime onnxruntime-gpu && \
	    $(PY) -m pip install --quiet 'onnxruntime-gpu[cuda,cudnn]==1.31.1'; }
	MODELSERVE_GPU_TESTS=1 $(PY) -m pytest tests/gpu

.PHONY: up
up: $(STAMP) redis ## Run Redis, Triton and every service, deploy the demo model, predict once
	$(VENV)/bin/modelserve up

.PHONY: bench
bench: $(STAMP) redis ## Benchmark Predict against the direct Triton and Redis paths
	$(PY) loadtests/bench.py

.PHONY: clean
clean: ## Remove run state (.run)
	rm -rf .run
