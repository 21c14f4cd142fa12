# Spaces: every target bootstraps what it needs from a fresh clone.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/spaces/v1/*.proto)
GEN_DIR := services
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
NETNS := tests/in-netns

.PHONY: help install native-deps generate checkgenerate lint fmt test test-bench test-faults test-slow run cluster bench bench-quick redis coturn media-tools web-deps clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

native-deps: ## Install what the native data plane builds against: Debian's libsrtp2-dev and libssl-dev, if missing
	@{ dpkg -s libsrtp2-dev && dpkg -s libssl-dev; } >/dev/null 2>&1 || { \
		echo "libsrtp2-dev or libssl-dev not found: installing them (the native data plane links them)"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libsrtp2-dev libssl-dev; }

# pip's output goes to .venv/install.log (shown only if it fails); the terminal gets a summary.
# The native extension (media-node/native/) is built by the same `pip install -e`.
$(STAMP): pyproject.toml setup.py media-node/native/dataplane.c | native-deps
	@start=$$(date +%s); log=$(VENV)/install.log; \
	echo "==> setting up $(VENV): the project and its dependencies (first run: about 30 s)"; \
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || exit 1; \
	: > $$log; \
	step() { echo "    $$1"; shift; "$$@" >> $$log 2>&1 || { \
		echo "failed: $$*"; tail -n 40 $$log; echo "(full log: $$log)"; exit 1; }; }; \
	step "upgrading pip" $(BIN)/python -m pip install -q --upgrade pip; \
	step "installing spaces and its dependencies" $(BIN)/python -m pip install -q -e '.[dev]'; \
	echo "==> $(VENV) ready in $$(( $$(date +%s) - start )) s ($$($(BIN)/python -m pip list \
		--format=freeze 2>/dev/null | wc -l) packages; log: $$log)"
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project (and build its native extension) with its test dependencies (idempotent)

generate: $(STAMP) ## Regenerate the protobuf and gRPC code into services/spaces/v1
	$(BIN)/python -m grpc_tools.protoc -Iprotos \
		--python_out=$(GEN_DIR) --mypy_out=$(GEN_DIR) \
		--grpc_python_out=$(GEN_DIR) --mypy_grpc_out=$(GEN_DIR) \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
		$(PROTOS)

checkgenerate: $(STAMP) ## Fail if the committed generated code differs from the protos
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	$(BIN)/python -m grpc_tools.protoc -Iprotos \
		--python_out=$$tmp --mypy_out=$$tmp --grpc_python_out=$$tmp --mypy_grpc_out=$$tmp \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
		$(PROTOS) && \
	diff -r -x __init__.py -x __pycache__ -x py.typed $$tmp/spaces/v1 $(GEN_DIR)/spaces/v1 \
		&& echo "generated code is up to date" \
		|| { echo "generated code drifted from protos/: run 'make generate' and commit"; exit 1; }

lint: checkgenerate ## ruff (lint + format check) and mypy
	$(BIN)/ruff check services media-node tests bench
	$(BIN)/ruff format --check services media-node tests bench
	$(BIN)/mypy services/spaces media-node/spaces bench

fmt: $(STAMP) ## Format and autofix
	$(BIN)/ruff format services media-node tests bench
	$(BIN)/ruff check --fix services media-node tests bench

redis: ## Install Debian's redis-server (and redis-cli, for the Redis Cluster tests) if missing
	@{ command -v redis-server && command -v redis-cli; } >/dev/null 2>&1 || { \
		echo "redis-server or redis-cli not found: installing Debian's redis-server and redis-tools"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server redis-tools; }

coturn: ## Install Debian's coturn if turnserver is missing (the TURN tests start their own)
	@command -v turnserver >/dev/null 2>&1 || [ -x /usr/bin/turnserver ] || { \
		echo "turnserver not found: installing Debian's coturn package"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends coturn; }

media-tools: ## Install Debian's nginx + libnginx-mod-rtmp and ffmpeg if missing (the broadcast tests' RTMP receiver)
	@{ [ -f /usr/lib/nginx/modules/ngx_rtmp_module.so ] && command -v ffprobe >/dev/null 2>&1; } || { \
		echo "nginx-rtmp or ffprobe not found: installing nginx, libnginx-mod-rtmp and ffmpeg"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			nginx-light libnginx-mod-rtmp ffmpeg; }

web-deps: $(STAMP) ## What the browser tests need: Debian's chromium and npm (if missing), and @mux/spaces-web in .cache/
	@[ -x "$${SPACES_CHROMIUM:-/usr/bin/chromium}" ] || { \
		echo "chromium not found: installing Debian's chromium package"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }
	@command -v npm >/dev/null 2>&1 || { \
		echo "npm not found: installing Debian's npm package (for @mux/spaces-web)"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm; }
	@# npm needs the registry, so this runs here, outside the tests' network namespace.
	@$(BIN)/python -c 'from tests.support.browser import mux_sdk; mux_sdk()'

test: $(STAMP) redis coturn media-tools web-deps checkgenerate ## Run the test suite in a private network namespace (starts its own servers; no setup needed)
	$(NETNS) $(BIN)/python -m pytest -q -m "not slow and not bench" --durations=30 $(PYTEST_ARGS)

test-bench: $(STAMP) redis media-tools web-deps ## Every benchmark in its smallest configuration, asserting it produces its figures (CI runs it after `make test`; ~4 min)
	$(NETNS) $(BIN)/python -m pytest -q -m bench --durations=10 $(PYTEST_ARGS)

test-faults: $(STAMP) redis media-tools ## Only the fault-tolerance tests (also part of `make test`)
	$(NETNS) $(BIN)/python -m pytest -q tests/test_faults.py tests/test_broadcast_faults.py $(PYTEST_ARGS)

test-slow: $(STAMP) redis ## The soaks: 30-min cluster churn (SPACES_SOAK_SECONDS) + session soak (SPACES_SESSION_SOAK_SECONDS)
	$(NETNS) $(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

run: $(STAMP) ## Start everything in one process on the embedded in-memory store
	$(BIN)/spaces serve

cluster: $(STAMP) redis ## Start Redis, 2 API processes (one API address for every service) and 2 media nodes
	$(BIN)/spaces cluster

# In the tests' network namespace too: browser-join's Chromium refuses to start anywhere else.
bench: $(STAMP) redis media-tools web-deps ## Run the full benchmark suite (minutes, in the tests' private network namespace); writes bench/results/*.json
	$(NETNS) $(BIN)/python -m bench all

bench-quick: $(STAMP) redis media-tools web-deps ## A tiny run of every benchmark (what the tests run)
	$(NETNS) $(BIN)/python -m bench all --quick

clean: ## Remove the venv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
