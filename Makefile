# Every target sets itself up: a fresh clone needs only python3 (3.10+) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test lint clean

setup: $(STAMP)

# torch first, on its own line, so its pinned build is what transformers finds.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch torchvision
	$(BIN)/pip install --quiet -c constraints.txt -e ".[server,dev]"
	touch $(STAMP)

## Start a server on the offline tiny model, extract a bundled image through the client, stop.
demo: setup
	$(BIN)/python examples/demo.py

## The test suite (real server on 127.0.0.1, real SDK, tiny random-weight Qwen2.5-VL).
test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) out client/qwen25vl_embed/v1/*_pb2*.py client/qwen25vl_embed/v1/*_pb2*.pyi
