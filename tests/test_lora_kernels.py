"""The Triton SGMV kernels (the CUDA LoRA path) equal the torch LoRA math, run on CPU through Triton's
interpreter: random segments, ranks, page tables (with zero-page padding), sliced outputs, and the padded
layout of a CUDA-graph decode step (empty segments, a grid past every segment's rows, table entries past an
adapter's pages that must not be read). The checks live in tests/kernel_checks.py, which the GPU kit runs
natively on CUDA.

The Triton side runs in a spawned process with the interpreter on (conftest's `interpreted`)."""

from __future__ import annotations

import pytest

from tests.kernel_checks import check_sgmv, check_triton_lora_batch

pytest.importorskip("triton")


@pytest.mark.parametrize("seed", range(4))
def test_sgmv_matches_torch(interpreted, seed):
    interpreted(check_sgmv, seed)


@pytest.mark.parametrize("seed", range(3))
def test_sgmv_reads_only_the_padded_layouts_real_part(interpreted, seed):
    interpreted(check_sgmv, 10 + seed, "cpu", __import__("torch").float32, True)


@pytest.mark.parametrize("seed", range(3))
def test_triton_lora_batch_matches_torch_lora_batch(interpreted, seed):
    interpreted(check_triton_lora_batch, seed)
