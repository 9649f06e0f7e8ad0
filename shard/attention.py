"""Paged attention on the torch SDPA path.

The KV cache of a layer is one tensor [2, num_slots, num_kv_heads, head_dim] (num_slots = num_blocks *
block_size); a token's K/V live at its slot, slot = block_table[pos // block_size] * block_size +
pos % block_size. Decode gathers each sequence's context block by block (whole blocks are contiguous, so
this copies a few large rows instead of one small row per token) and masks the positions past its length.
Everything that depends only on the batch (block lists, masks) is built once per step in AttentionMetadata
and shared by all layers.

Sliding window (transformers' Mistral semantics): query at position q sees keys at positions k with
q - window < k <= q, i.e. itself and the window - 1 tokens before it.

Grouped-query attention with an explicit mask (decode, windowed prefill) folds each KV head's query group
into the query-length dimension, so K/V keep their own head count: SDPA's enable_gqa together with a mask
rules out CUDA's flash and memory-efficient kernels and falls to the math kernel (fp32 upcast, K/V copied per
query head). Only causal prefill, which has no mask, uses enable_gqa (flash supports it).

Attention logit soft-capping (Gemma 2: scores -> cap * tanh(scores / cap) before the mask) is not something
SDPA can do, so layers with a cap compute their scores explicitly, in transformers' eager op order.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F


# The Triton paged-attention decode kernel (shard/kernels/paged_attention.py) instead of gather + SDPA:
# CUDA only, opt-in until checked on a GPU.
TRITON_DECODE = os.environ.get("LOOM_TRITON_ATTENTION") == "1"
# One variable-length flash call per layer for the whole prefill batch (torch.nn.attention.varlen) instead of
# one SDPA call per prompt: CUDA with half precision only, opt-in until checked on a GPU.
VARLEN_PREFILL = os.environ.get("LOOM_VARLEN_PREFILL") == "1"


@dataclass(slots=True)
class AttentionMetadata:
    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] cache slot each input token's K/V is written to
    # Prefill: the flattened batch is split back into prompts; a mask only where a window cuts a prompt.
    seq_lens: list[int]
    prefill_window_masks: list[torch.Tensor | None]
    # Decode: every sequence's blocks [B, max_blocks] (padded with any valid block); True = attend.
    # Masks are [B, 1, 1, max_blocks * block_size].
    context_blocks: torch.Tensor | None = None
    context_mask: torch.Tensor | None = None
    window_mask: torch.Tensor | None = None
    block_size: int = 0
    context_lens: torch.Tensor | None = None  # [B], counting the new token
    cu_seq_lens: torch.Tensor | None = None  # prefill with VARLEN_PREFILL on CUDA: [0, n0, n0 + n1, ...] int32

    def token_lengths(self) -> torch.Tensor:
        """[T]: each input token's sequence length as of this step (prefill: its prompt's; decode: its context)."""
        if not self.is_prefill:
            return self.context_lens
        lens = torch.tensor(self.seq_lens, device=self.slot_mapping.device)
        return torch.repeat_interleave(lens, lens)


def _window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    pos = torch.arange(length, device=device)
    delta = pos[:, None] - pos[None, :]
    return (delta >= 0) & (delta < window)


def prefill_metadata(seq_lens: list[int], slot_mapping: torch.Tensor, sliding_window: int | None) -> AttentionMetadata:
    device = slot_mapping.device
    masks = [
        _window_mask(n, sliding_window, device) if sliding_window is not None and n > sliding_window else None
        for n in seq_lens
    ]
    cu = None
    if VARLEN_PREFILL and device.type == "cuda":
        cu = torch.tensor([0, *itertools.accumulate(seq_lens)], dtype=torch.int32, device=device)
    return AttentionMetadata(True, slot_mapping, seq_lens, masks, cu_seq_lens=cu)


def decode_metadata(block_tables: torch.Tensor, context_lens: torch.Tensor, slot_mapping: torch.Tensor,
                    block_size: int, sliding_window: int | None) -> AttentionMetadata:
    """block_tables: [B, max_blocks] (padded with any valid block); context_lens: [B], counting the new token."""
    pos = torch.arange(block_tables.shape[1] * block_size, device=block_tables.device)
    valid = pos[None, :] < context_lens[:, None]
    window = None
    if sliding_window is not None:
        window = (valid & (pos[None, :] >= context_lens[:, None] - sliding_window))[:, None, None, :]
    return AttentionMetadata(False, slot_mapping, [], [], block_tables, valid[:, None, None, :], window, block_size,
                             context_lens)


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                         softcap: float) -> torch.Tensor:
    """q [B, heads, Q, D], k/v [B, kv_heads, K, D], mask [B or 1, 1, Q, K] (True = attend) -> [B, heads, Q, D].
    Each kv head serves `heads / kv_heads` consecutive query heads (transformers' repeat_kv)."""
    b, heads, n, d = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(b, kv_heads, heads // kv_heads * n, d)
    scores = (q @ k.transpose(-1, -2) * scale).view(b, heads, n, -1)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
    return (probs.view(b, kv_heads, -1, probs.shape[-1]) @ v).view(b, heads, n, d)


class PagedAttention:
    """Writes this step's K/V into the layer's cache and attends over the cached context. `scale` multiplies
    the scores (default head_dim ** -0.5); `softcap` caps them (None: no cap)."""

    __slots__ = ("num_heads", "num_kv_heads", "head_dim", "scale", "sliding_window", "softcap")

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None,
                 scale: float | None = None, softcap: float | None = None):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.sliding_window = sliding_window
        self.softcap = softcap

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q: [N, heads, Lq, D]; k, v: [N, kv_heads, Lk, D]; mask: [N or 1, 1, Lq, Lk] (True = attend) or None
        for causal -> [N, heads, Lq, D]. Every torch attention path goes through here (one place for the
        score function)."""
        if self.softcap is not None:
            if mask is None:
                n = q.shape[2]
                mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            return softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
        n, heads, lq, d = q.shape
        group = heads // self.num_kv_heads
        # Query heads j*group .. (j+1)*group-1 share KV head j (transformers' repeat_kv): row g*Lq + i of the
        # folded queries is head j*group + g at position i, and reads mask row i.
        folded = q.reshape(n, self.num_kv_heads, group * lq, d)
        if lq > 1 and group > 1:
            mask = mask.repeat(1, 1, group, 1)
        o = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=self.scale)
        return o.view(n, heads, lq, d)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                 kv_cache: torch.Tensor) -> torch.Tensor:
        """q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim] -> [T, heads * head_dim]."""
        kv_cache[0, meta.slot_mapping] = k
        kv_cache[1, meta.slot_mapping] = v
        out = self._prefill(q, k, v, meta) if meta.is_prefill else self._decode(q, meta, kv_cache)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # No prefix caching: a prompt's K/V are exactly this step's k/v, so attend without reading the cache.
        if meta.cu_seq_lens is not None and self.softcap is None and q.dtype in (torch.float16, torch.bfloat16) \
                and len(meta.seq_lens) > 1:
            return self._prefill_varlen(q, k, v, meta)
        outs = []
        start = 0
        for n, window_mask in zip(meta.seq_lens, meta.prefill_window_masks):
            qs, ks, vs = (t[start:start + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            mask = window_mask if self.sliding_window is not None else None
            outs.append(self._attend(qs, ks, vs, None if mask is None else mask[None, None])[0].transpose(0, 1))
            start += n
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _prefill_varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        meta: AttentionMetadata) -> torch.Tensor:
        from torch.nn.attention.varlen import varlen_attn

        longest = max(meta.seq_lens)
        # (left, right) keys around each query: causal, the window counting the query itself.
        window = (-1, 0) if self.sliding_window is None else (self.sliding_window - 1, 0)
        cu = meta.cu_seq_lens
        return varlen_attn(q, k, v, cu, cu, longest, longest, scale=self.scale, window_size=window, enable_gqa=True)

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        if TRITON_DECODE and q.is_cuda:
            from shard.kernels.paged_attention import paged_decode_attention

            return paged_decode_attention(q, kv_cache, meta.context_blocks, meta.context_lens, meta.block_size,
                                          self.scale, self.sliding_window, self.softcap)
        b, ctx = meta.context_blocks.shape[0], meta.context_mask.shape[-1]
        blocks = meta.context_blocks.reshape(-1)
        num_blocks = kv_cache.shape[1] // meta.block_size
        k, v = (kv_cache[i].view(num_blocks, -1).index_select(0, blocks)
                .view(b, ctx, self.num_kv_heads, self.head_dim).transpose(1, 2) for i in (0, 1))
        mask = meta.window_mask if self.sliding_window is not None else meta.context_mask
        return self._attend(q.unsqueeze(2), k, v, mask).squeeze(2)
