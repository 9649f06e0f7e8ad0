"""Triton paged-attention decode kernel: one query token per sequence attends over its context straight
from the paged KV cache, block by block, with an online softmax (no gathered copy of the context).

Layout (shard/attention.py): a layer's cache is [2, num_slots, num_kv_heads, head_dim]; the context of
sequence b is blocks block_tables[b, :ceil(context_lens[b] / block_size)], slot = block * block_size + i.
Query head h reads KV head h // (num_heads // num_kv_heads) (GQA). A sliding window keeps the keys at
positions >= context_len - window. A soft-cap (Gemma 2) maps each score to cap * tanh(score / cap) before
the masks, as transformers does. The torch path (PagedAttention._decode) is the reference the tests compare
this kernel to, on CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, tables_stride, lens_ptr, scale, window, softcap,
                   slot_stride, kv_head_stride, group,
                   BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BD: tl.constexpr):
    seq, head = tl.program_id(0), tl.program_id(1)
    num_heads = tl.num_programs(1)
    context = tl.load(lens_ptr + seq)
    dims = tl.arange(0, BD)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + (seq * num_heads + head) * HEAD_DIM + dims, mask=dim_ok, other=0.0).to(tl.float32)
    kv_head = head // group
    # The first block with a key in the window: every block visited then has at least one key to attend.
    first = context * 0
    if window > 0:
        first = tl.maximum(context - window, 0) // BLOCK_SIZE
    last = tl.cdiv(context, BLOCK_SIZE)
    m = tl.full((), float("-inf"), tl.float32)
    denom = tl.zeros((), tl.float32)
    acc = tl.zeros((BD,), tl.float32)
    offsets = tl.arange(0, BLOCK_SIZE)
    for j in range(first, last):
        block = tl.load(tables_ptr + seq * tables_stride + j).to(tl.int64)
        pos = j * BLOCK_SIZE + offsets
        ok = pos < context
        if window > 0:
            ok = ok & (pos >= context - window)
        rows = (block * BLOCK_SIZE + offsets)[:, None] * slot_stride + kv_head * kv_head_stride + dims[None, :]
        both = ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + rows, mask=both, other=0.0).to(tl.float32)
        scores = tl.sum(k * q[None, :], axis=1) * scale
        if softcap > 0:
            # tanh(s / cap) = 1 - 2 / (exp(2 s / cap) + 1), which saturates cleanly (exp -> inf gives 1, -> 0 gives -1).
            scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))
        scores = tl.where(ok, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        p = tl.exp(scores - m_new)
        correction = tl.exp(m - m_new)
        v = tl.load(v_ptr + rows, mask=both, other=0.0).to(tl.float32)
        acc = acc * correction + tl.sum(p[:, None] * v, axis=0)
        denom = denom * correction + tl.sum(p, axis=0)
        m = m_new
    out = acc / denom
    tl.store(out_ptr + (seq * num_heads + head) * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, block_size: int, scale: float,
                           sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q [B, heads, head_dim] (one new token per sequence, its K/V already in the cache) -> [B, heads, head_dim].

    kv_cache [2, num_slots, kv_heads, head_dim] contiguous; block_tables [B, max_blocks]; context_lens [B],
    counting the new token."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[2]
    assert kv_cache.is_contiguous() and block_tables.is_contiguous()
    q = q.contiguous()
    out = torch.empty_like(q)
    _decode_kernel[(batch, num_heads)](
        q, kv_cache[0], kv_cache[1], out, block_tables, block_tables.stride(0), context_lens, scale,
        sliding_window or 0, softcap or 0.0, kv_cache.stride(1), kv_cache.stride(2), num_heads // num_kv_heads,
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BD=triton.next_power_of_2(head_dim))
    return out
