"""The paged-attention decode kernels equal the torch decode path (gather + SDPA per width group): the CPU
kernel (C, built at engine start) directly, the Triton one (the CUDA decode path, opt-in) on CPU through
Triton's interpreter. Random block tables and context lengths, GQA, sliding windows, a head_dim that is not a
power of two, Gemma 2's attention logit soft-cap. Every cache row no sequence owns holds NaN (a freed block keeps
what its last owner wrote, a diverged adapter's NaN included): every path masks by selection, so the output stays
finite. (Without a compiler: tests/test_cpu_kernels.py.)"""

from __future__ import annotations

import random

import pytest
import torch

BLOCK_SIZE = 16
CASES = [
    (0, 4, 4, 16, None, None),
    (1, 8, 2, 24, None, None),  # GQA, head_dim not a power of two
    (2, 4, 1, 16, 20, None),  # sliding window shorter than most contexts
    (3, 6, 3, 8, 40, None),
    (4, 8, 2, 16, None, 2.0),  # soft-capped scores (random q/k: many far past the cap)
    (5, 4, 2, 24, 20, 5.0),  # soft-cap with a sliding window
]


def check_decode(kernel_module: str, seed: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 window: int | None, softcap: float | None = None) -> None:
    import importlib

    from shard.attention import PagedAttention, decode_metadata

    module, name = kernel_module.rsplit(".", 1)
    kernel = getattr(importlib.import_module(module), name)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_blocks, batch = 24, rng.randint(1, 6)
    cache = torch.randn(2, num_blocks * BLOCK_SIZE, num_kv_heads, head_dim)
    lens = [rng.randint(1, 5 * BLOCK_SIZE) for _ in range(batch)]
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // BLOCK_SIZE))] for n in lens]
    owned = torch.zeros(num_blocks * BLOCK_SIZE, dtype=torch.bool)
    for table, n in zip(tables, lens):
        for pos in range(n):
            owned[table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE] = True
    cache[:, ~owned] = float("nan")
    q = torch.randn(batch, num_heads, head_dim)
    attention = PagedAttention(num_heads, num_kv_heads, head_dim, window, softcap=softcap)

    slots = torch.zeros(batch, dtype=torch.long)
    want = attention._decode(q, decode_metadata(tables, lens, slots, BLOCK_SIZE, window), cache)
    meta = decode_metadata(tables, lens, slots, BLOCK_SIZE, window, kernel=kernel)
    assert meta.decode_groups == []  # the kernel reads the cache in place: no gathered groups are built
    got = attention._decode(q, meta, cache)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed,heads,kv_heads,head_dim,window,softcap", CASES)
def test_cpu_decode_kernel_matches_torch(cpu_kernel, seed, heads, kv_heads, head_dim, window, softcap):
    check_decode("shard.kernels.cpu.paged_decode_attention_cpu", seed, heads, kv_heads, head_dim,
                 window, softcap)


@pytest.mark.parametrize("seed,heads,kv_heads,head_dim,window,softcap", CASES)
def test_triton_decode_kernel_matches_torch(interpreted, seed, heads, kv_heads, head_dim, window, softcap):
    interpreted(check_decode, "shard.kernels.paged_attention.paged_decode_attention", seed, heads, kv_heads,
                head_dim, window, softcap)


def test_cpu_decode_kernel_is_the_cpu_float32_default(cpu_kernel):
    from shard.attention import decode_kernel
    from shard.kernels.cpu import paged_decode_attention_cpu

    assert decode_kernel(torch.device("cpu"), torch.float32) is paged_decode_attention_cpu
    assert decode_kernel(torch.device("cpu"), torch.bfloat16) is None  # the kernel is float32 only
