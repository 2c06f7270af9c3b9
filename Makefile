# Every target sets itself up: a fresh clone needs only python3 (3.10+) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Two stamps, one per layer of the venv: the server extra (all `make demo` needs), then everything
# the tests, linters and benchmarks use on top. Either rebuilds when what it was installed from changes.
SERVER_STAMP := $(VENV)/.server-stamp
STAMP        := $(VENV)/.installed-stamp
INSTALLED_FROM := pyproject.toml constraints.txt protos/qwen25vl_embed/v1/embed.proto

.PHONY: setup setup-server demo test test-avx2 lint docs dist clean bench bench-gpu bench-vllm

setup: $(STAMP)

setup-server: $(SERVER_STAMP)

# torch first, on its own line, so its pinned build is what transformers finds.
$(SERVER_STAMP): $(INSTALLED_FROM)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch torchvision
	$(BIN)/pip install --quiet -c constraints.txt -e ".[server]"
	touch $(SERVER_STAMP)

# The dev tools, Ray, the search and examples extras, and colpali-engine (a test reference) beside it.
$(STAMP): $(SERVER_STAMP) $(INSTALLED_FROM)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[server,dev,ray,search,examples]"
	$(BIN)/pip install --quiet --no-deps -c constraints.txt colpali-engine
	touch $(STAMP)

## Start a server on the offline tiny model, extract a bundled image through the client, stop.
## Installs the server extra only (torch, transformers, gRPC): no dev tools, Ray or colpali-engine.
demo: setup-server
	$(BIN)/python examples/demo.py

## The test suite (real server on 127.0.0.1, real SDK, tiny random-weight Qwen2.5-VL).
# The Ray tests read every socket of Ray's processes with ss (iproute2), absent from slim images.
# The HTTP API's tests call it with curl (tests/http/test_clients.py), absent from slim images too.
test: setup
	@command -v ss >/dev/null || { apt-get update -qq && apt-get install -y -qq iproute2; }
	@command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl; }
	$(BIN)/pytest -q

## The tests that run the model, again as an AVX2-only CPU runs them (torch, oneDNN and MKL each
## capped to AVX2, after a check that each cap takes effect: tests/cpu_caps.py). CI runs it after
## `make test`, so an AVX-512 machine proves the AVX2 path too.
CPU_SENSITIVE := tests/core tests/rpc tests/http tests/cli tests/client --ignore=tests/cli/test_client_only.py
test-avx2: setup
	@command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl; }
	$(BIN)/python -m tests.cpu_caps -q $(CPU_SENSITIVE)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(MAKE) docs

## The docs site (mkdocs.yml, docs/) into out/site/; --strict fails on a broken link or anchor, and
## on a flag table that differs from the CLI's (docs/hooks/cli_reference.py regenerates them).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

## A wheel of the package in dist/ (the protobuf code generated into it): pip install dist/*.whl
## gives the client; add [server] for the server.
dist:
	$(PYTHON) -m pip wheel --no-deps --wheel-dir dist .

clean:
	rm -rf $(VENV) out dist client/qwen25vl_embed/v1/*_pb2*.py client/qwen25vl_embed/v1/*_pb2*.pyi

## The public contract with the buf CLI pinned in tools/buf (needs Node.js and npm); `make test`
## runs the same checks (tests/test_proto_contract.py).
BUF       := tools/buf/node_modules/.bin/buf
RELEASED  := tools/buf/released

.PHONY: contract contract-snapshot

# npm rewrites node_modules/.package-lock.json on every install: newer than the lockfile = current.
tools/buf/node_modules/.package-lock.json: tools/buf/package.json tools/buf/package-lock.json
	cd tools/buf && npm ci --ignore-scripts --no-audit --no-fund

## buf lint, and buf breaking against the newest released snapshot.
contract: tools/buf/node_modules/.package-lock.json
	$(BUF) lint
	$(BUF) breaking --against $$(ls $(RELEASED)/v*.json | sort -V | tail -n 1)

## At a release: snapshot the contract as released (make contract-snapshot VERSION=0.2.0).
## Pretty JSON without source info, so that a release's contract changes read as a diff.
contract-snapshot: tools/buf/node_modules/.package-lock.json
	@test -n "$(VERSION)" || { echo "usage: make contract-snapshot VERSION=x.y.z"; exit 2; }
	$(BUF) build --exclude-source-info -o -#format=json | $(PYTHON) -m json.tool --indent 1 > $(RELEASED)/v$(VERSION).json

## Throughput on the CPU: the original script's method vs the core vs the service (a few minutes).
bench: setup
	$(BIN)/python -m bench.throughput.vs_original

## The same on a GPU with the Qwen2.5-VL-7B architecture (random weights, bf16), plus LM TFLOP/s.
bench-gpu: setup
	$(BIN)/python -m bench.gpu.throughput_7b

## Side by side with vLLM's CPU build (its own venv under ~/.cache, built on first use; not in CI).
bench-vllm: setup
	$(BIN)/python -m bench.peers.vs_vllm --setup
	$(BIN)/python -m bench.peers.vs_vllm
