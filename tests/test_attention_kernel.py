"""The paged-attention decode kernels equal the torch decode path (gather + SDPA per width group): the CPU
kernel (C, built at engine start) directly, the Triton one (the CUDA decode path, opt-in) on CPU through
Triton's interpreter. Random block tables and context lengths, GQA, sliding windows, a head_dim that is not a
power of two, Gemma 2's attention logit soft-cap, over a cache whose unowned rows hold NaN. (Without a compiler:
tests/test_cpu_kernels.py.)"""

from __future__ import annotations

import pytest
import torch

from tests.kernel_checks import DECODE_CASES, check_decode


@pytest.mark.parametrize("seed,heads,kv_heads,head_dim,window,softcap", DECODE_CASES)
def test_cpu_decode_kernel_matches_torch(cpu_kernel, seed, heads, kv_heads, head_dim, window, softcap):
    check_decode("shard.kernels.cpu.paged_decode_attention_cpu", seed, heads, kv_heads, head_dim,
                 window, softcap)


def test_cpu_decode_kernel_is_the_cpu_float32_default(cpu_kernel):
    from shard.attention import decode_kernel
    from shard.kernels.cpu import paged_decode_attention_cpu

    assert decode_kernel(torch.device("cpu"), torch.float32) is paged_decode_attention_cpu
    assert decode_kernel(torch.device("cpu"), torch.bfloat16) is None  # the kernel is float32 only


@pytest.mark.parametrize("seed,heads,kv_heads,head_dim,window,softcap", DECODE_CASES)
def test_triton_decode_kernel_matches_torch(interpreted, seed, heads, kv_heads, head_dim, window, softcap):
    interpreted(check_decode, "shard.kernels.paged_attention.paged_decode_attention", seed, heads, kv_heads,
                head_dim, window, softcap)
