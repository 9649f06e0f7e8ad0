PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test proto bench

# Idempotent: re-installs only when pyproject.toml changes. torch is pinned in pyproject.toml
# (torch==2.13.0); an unpinned torch would pull a multi-GB CUDA build onto CPU machines.
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

serve: install
	$(BIN)/loom

test: install
	$(BIN)/python -m pytest -q tests

# Regenerates proto/generate_pb2*.py from proto/generate.proto.
proto: install
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. proto/generate.proto

# The standard benchmark set (README, "Benchmarks"); the bench extra brings matplotlib.
bench: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench
