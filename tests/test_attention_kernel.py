"""The Triton paged-attention decode kernel (the CUDA decode path, opt-in) equals the torch decode path that
the engine runs, on CPU through Triton's interpreter: random block tables and context lengths, GQA, sliding
windows, a head_dim that is not a power of two, Gemma 2's attention logit soft-cap."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

BLOCK_SIZE = 16


def check_decode(seed: int, num_heads: int, num_kv_heads: int, head_dim: int, window: int | None,
                 softcap: float | None = None) -> None:
    from shard.attention import PagedAttention, decode_metadata
    from shard.kernels.paged_attention import paged_decode_attention

    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_blocks, batch = 24, rng.randint(1, 6)
    cache = torch.randn(2, num_blocks * BLOCK_SIZE, num_kv_heads, head_dim)
    lens = [rng.randint(1, 5 * BLOCK_SIZE) for _ in range(batch)]
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // BLOCK_SIZE))] for n in lens]
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    context_lens = torch.tensor(lens)
    q = torch.randn(batch, num_heads, head_dim)

    meta = decode_metadata(tables, lens, torch.zeros(batch, dtype=torch.long), BLOCK_SIZE, window)
    want = PagedAttention(num_heads, num_kv_heads, head_dim, window, softcap=softcap)._decode(q, meta, cache)
    got = paged_decode_attention(q, cache, block_tables, context_lens, BLOCK_SIZE, head_dim ** -0.5, window, softcap)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed,heads,kv_heads,head_dim,window,softcap", [
    (0, 4, 4, 16, None, None),
    (1, 8, 2, 24, None, None),  # GQA, head_dim not a power of two
    (2, 4, 1, 16, 20, None),  # sliding window shorter than most contexts
    (3, 6, 3, 8, 40, None),
    (4, 8, 2, 16, None, 2.0),  # soft-capped scores (random q/k: many far past the cap)
    (5, 4, 2, 24, 20, 5.0),  # soft-cap with a sliding window
])
def test_paged_decode_kernel_matches_torch(interpreted, seed, heads, kv_heads, head_dim, window, softcap):
    interpreted(check_decode, seed, heads, kv_heads, head_dim, window, softcap)
