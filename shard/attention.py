"""Paged attention on the torch SDPA path.

The KV cache of a layer is one tensor [2, num_slots, num_kv_heads, head_dim] (num_slots = num_blocks *
block_size); a token's K/V live at its slot, slot = block_table[pos // block_size] * block_size +
pos % block_size. Decode, and a prefill chunk that continues a sequence whose prefix is cached, gathers the
sequence's context block by block and masks the positions past its length (and the future ones). Block
tables are the router's (router/kv_blocks.py); a cached block may be shared by several sequences, and only
positions a step computes are written.
Everything that depends only on the batch (block lists, masks) is built once per step in AttentionMetadata
and shared by all layers. Decode reads the cache in place through a paged kernel where one runs (decode_kernel:
the C kernel on CPU float32, the opt-in Triton kernel on CUDA); the gather + SDPA path is the reference both
are tested against, and the fallback.

Masking is by selection, never by multiplication: a gathered block may hold another sequence's leftovers
past this one's length (a freed block keeps what its last owner wrote, NaN included when that owner's adapter
diverged), and a masked score times a NaN value is still NaN. So the gather zeroes every row past a sequence's
context before attention reads it, and the paged kernels never load those rows.

Sliding window (transformers' Mistral semantics): query at position q sees keys at positions k with
q - window < k <= q, i.e. itself and the window - 1 tokens before it.

Grouped-query attention with an explicit mask (decode, windowed prefill) folds each KV head's query group
into the query-length dimension, so K/V keep their own head count: SDPA's enable_gqa together with a mask
rules out CUDA's flash and memory-efficient kernels and falls to the math kernel (fp32 upcast, K/V copied per
query head). Only causal prefill, which has no mask, uses enable_gqa (flash supports it).

Attention logit soft-capping (Gemma 2: scores -> cap * tanh(scores / cap) before the mask) and attention sinks
(gpt-oss: a learned logit per head that joins every softmax and is then dropped) are not something SDPA can do,
so layers with either compute their scores explicitly, in transformers' eager op order. The paged decode kernels
know soft-capping but not sinks: a family with sinks decodes on the torch path (CausalLM.paged_decode_kernel).
"""

from __future__ import annotations

import inspect
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F


# The Triton paged-attention decode kernel (shard/kernels/paged_attention.py) instead of gather + SDPA:
# CUDA only, opt-in until checked on a GPU.
TRITON_DECODE = os.environ.get("LOOM_TRITON_ATTENTION") == "1"


def varlen_supported() -> bool:
    """Whether this torch has torch.nn.attention.varlen with the window_size and enable_gqa arguments
    _prefill_varlen passes (torch 2.13 does; older releases may lack the module or those arguments)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    return {"window_size", "enable_gqa"} <= inspect.signature(varlen_attn).parameters.keys()


# One variable-length flash call per layer for the whole prefill batch (torch.nn.attention.varlen) instead of
# one SDPA call per prompt: CUDA with half precision only, opt-in until checked on a GPU; where this torch
# lacks the call, the prefill stays on SDPA.
VARLEN_PREFILL = os.environ.get("LOOM_VARLEN_PREFILL") == "1" and varlen_supported()


# (q, kv_cache, block_tables, context_lens, block_size, scale, sliding_window, softcap) -> attention output.
DecodeKernel = Callable[..., torch.Tensor]


def decode_kernel(device: torch.device, dtype: torch.dtype) -> DecodeKernel | None:
    """The paged decode kernel this device and dtype run, or None for the torch path."""
    if device.type == "cuda" and TRITON_DECODE:
        from shard.kernels.paged_attention import paged_decode_attention

        return paged_decode_attention
    if device.type == "cpu" and dtype == torch.float32:
        from shard.kernels import cpu  # its CPU twin: on where a C compiler can build it (LOOM_CPU_KERNELS)

        return cpu.paged_decode_attention_cpu if cpu.load() else None
    return None


@dataclass(slots=True)
class PrefixContext:
    """A prefill chunk that continues a sequence whose first `start` positions are already in the cache (a
    prefix-cache hit, an earlier chunk, a resumed sequence): its queries attend over the gathered context."""

    blocks: torch.Tensor  # [n] the sequence's blocks covering its context
    length: int  # start + the chunk's tokens
    causal: torch.Tensor  # [1, 1, q, length] True = attend
    window: torch.Tensor | None  # the same, cut to the sliding window (None without one)


@dataclass(slots=True)
class DecodeGroup:
    """Decode rows whose tables are within 2x of each other's width: gathering a batch padded to its longest
    context would copy and attend over that length for every sequence (one 2,000-token context beside short
    ones made a decode step 15x slower)."""

    rows: torch.Tensor | None  # the rows of the batch it holds; None: all of them, in order
    blocks: torch.Tensor  # [b, max_blocks] its sequences' blocks, padded with any valid block
    mask: torch.Tensor  # [b, 1, 1, max_blocks * block_size] True = attend
    window: torch.Tensor | None  # the same, cut to the sliding window
    stale: torch.Tensor | None  # [b, max_blocks * block_size, 1, 1] True past a row's context; None: no such row


@dataclass(slots=True)
class AttentionMetadata:
    """One step's batch: `num_decode` single-token decodes first, then the prefill chunks of `seq_lens`."""

    num_decode: int
    slot_mapping: torch.Tensor  # [T] cache slot each input token's K/V is written to
    # [T] each token's sequence length (the tokens its sequence holds): length-dependent rope reads it.
    lengths: torch.Tensor
    # Prefill: the flattened batch is split back into chunks; a mask only where a window cuts a chunk that starts
    # a sequence; a context where the chunk continues one.
    seq_lens: list[int]
    prefill_window_masks: list[torch.Tensor | None]
    prefill_contexts: list[PrefixContext | None] = field(default_factory=list)
    # Decode: every sequence's blocks [B, max_blocks] (padded with any valid block; the Triton kernel's input),
    # and the same rows grouped by width for the torch path.
    context_blocks: torch.Tensor | None = None
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    block_size: int = 0
    context_lens: torch.Tensor | None = None  # [B], counting the new token
    # A paged decode kernel reading the cache in place (decode_kernel); None: gather + SDPA per width group.
    decode_kernel: DecodeKernel | None = None
    cu_seq_lens: torch.Tensor | None = None  # prefill with VARLEN_PREFILL on CUDA: [0, n0, n0 + n1, ...] int32

    def token_lengths(self) -> torch.Tensor:
        return self.lengths


def _window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    pos = torch.arange(length, device=device)
    delta = pos[:, None] - pos[None, :]
    return (delta >= 0) & (delta < window)


def _prefix_context(table: list[int], start: int, n: int, block_size: int, sliding_window: int | None,
                    device: torch.device) -> PrefixContext:
    length = start + n
    blocks = torch.tensor(table[:-(-length // block_size)], device=device)
    delta = torch.arange(start, length, device=device)[:, None] - torch.arange(length, device=device)[None, :]
    causal = delta >= 0
    window = None if sliding_window is None else (causal & (delta < sliding_window))[None, None]
    return PrefixContext(blocks, length, causal[None, None], window)


def prefill_metadata(seq_lens: list[int], slot_mapping: torch.Tensor, sliding_window: int | None,
                     lengths: list[int] | None = None, starts: list[int] | None = None,
                     tables: list[list[int]] | None = None, block_size: int = 0) -> AttentionMetadata:
    """seq_lens: each chunk's tokens; lengths: each chunk's sequence length (default: seq_lens); starts: the
    positions already cached before each chunk (default: none), with its block table in `tables`."""
    device = slot_mapping.device
    starts = starts or [0] * len(seq_lens)
    masks = [
        _window_mask(n, sliding_window, device) if sliding_window is not None and n > sliding_window and not s
        else None
        for n, s in zip(seq_lens, starts)
    ]
    contexts = [None if not s else _prefix_context(tables[i], s, n, block_size, sliding_window, device)
                for i, (n, s) in enumerate(zip(seq_lens, starts))]
    cu = None
    if VARLEN_PREFILL and device.type == "cuda" and not any(starts):
        cu = torch.tensor([0, *itertools.accumulate(seq_lens)], dtype=torch.int32, device=device)
    full = torch.tensor(lengths or seq_lens, device=device)
    token_lengths = torch.repeat_interleave(full, torch.tensor(seq_lens, device=device))
    return AttentionMetadata(0, slot_mapping, token_lengths, seq_lens, masks, contexts, block_size=block_size,
                             cu_seq_lens=cu)


def _width_groups(widths: list[int]) -> list[list[int]]:
    """Row indices grouped so that no row's width is more than twice the narrowest of its group."""
    order = sorted(range(len(widths)), key=widths.__getitem__)
    groups: list[list[int]] = []
    for i in order:
        if not groups or widths[i] > 2 * max(1, widths[groups[-1][0]]):
            groups.append([])
        groups[-1].append(i)
    return groups


def _decode_group(tables: list[list[int]], context_lens: list[int], rows: list[int] | None, block_size: int,
                  sliding_window: int | None, device: torch.device) -> DecodeGroup:
    picked = range(len(tables)) if rows is None else rows
    width = max(len(tables[i]) for i in picked)
    blocks = torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i in picked], device=device)
    lens = torch.tensor([context_lens[i] for i in picked], device=device)[:, None]
    pos = torch.arange(width * block_size, device=device)[None, :]
    valid = pos < lens
    window = None if sliding_window is None else (valid & (pos >= lens - sliding_window))[:, None, None, :]
    # Known from the host lists: testing the device mask would sync a GPU.
    padded = any(context_lens[i] < width * block_size for i in picked)
    stale = (~valid)[:, :, None, None] if padded else None
    return DecodeGroup(None if rows is None else torch.tensor(rows, device=device), blocks, valid[:, None, None, :],
                       window, stale)


def decode_metadata(tables: list[list[int]], context_lens: list[int], slot_mapping: torch.Tensor, block_size: int,
                    sliding_window: int | None, lengths: list[int] | None = None,
                    kernel: DecodeKernel | None = None) -> AttentionMetadata:
    """tables: each sequence's blocks; context_lens: counting the new token; lengths: each sequence's length for
    rope (default: context_lens); kernel: the paged decode kernel, which needs no width groups."""
    device = slot_mapping.device
    groups = [] if kernel is not None else _width_groups([len(t) for t in tables])
    if len(groups) == 1:  # the whole batch in order: its blocks are the padded table
        decode_groups = [_decode_group(tables, context_lens, None, block_size, sliding_window, device)]
        padded = decode_groups[0].blocks
    else:
        decode_groups = [_decode_group(tables, context_lens, g, block_size, sliding_window, device) for g in groups]
        width = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)
    context = torch.tensor(context_lens, device=device)
    rope = context if lengths is None else torch.tensor(lengths, device=device)
    return AttentionMetadata(len(tables), slot_mapping, rope, [], [], [], padded, decode_groups, block_size,
                             context, decode_kernel=kernel)


def batch_metadata(decode: AttentionMetadata | None, prefill: AttentionMetadata | None) -> AttentionMetadata:
    """Decodes and prefill chunks as one batch, decodes first (either may be None)."""
    if decode is None or prefill is None:
        return decode or prefill
    return replace(prefill, num_decode=decode.num_decode,
                   slot_mapping=torch.cat([decode.slot_mapping, prefill.slot_mapping]),
                   lengths=torch.cat([decode.lengths, prefill.lengths]), context_blocks=decode.context_blocks,
                   decode_groups=decode.decode_groups, context_lens=decode.context_lens,
                   decode_kernel=decode.decode_kernel)


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                         softcap: float | None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, heads, Q, D], k/v [B, kv_heads, K, D], mask [B or 1, 1, Q, K] (True = attend) -> [B, heads, Q, D].
    Each kv head serves `heads / kv_heads` consecutive query heads (transformers' repeat_kv). `sinks` [heads]:
    each head's sink logit joins its softmax (after subtracting the row maximum, as gpt-oss does) and its
    probability is dropped."""
    b, heads, n, d = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(b, kv_heads, heads // kv_heads * n, d)
    scores = (q @ k.transpose(-1, -2) * scale).view(b, heads, n, -1)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
    else:
        scores = torch.cat([scores, sinks.view(1, heads, 1, 1).expand(b, heads, n, 1).to(scores.dtype)], dim=-1)
        probs = (scores - scores.amax(dim=-1, keepdim=True)).softmax(-1)[..., :-1].to(q.dtype)
    return (probs.reshape(b, kv_heads, -1, probs.shape[-1]) @ v).view(b, heads, n, d)


class PagedAttention:
    """Writes this step's K/V into the layer's cache and attends over the cached context. `scale` multiplies
    the scores (default head_dim ** -0.5); `softcap` caps them (None: no cap); `sinks` [num_heads] are this
    rank's heads' sink logits (None: none)."""

    __slots__ = ("num_heads", "num_kv_heads", "head_dim", "scale", "sliding_window", "softcap", "sinks")

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None,
                 scale: float | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.sliding_window = sliding_window
        self.softcap = softcap
        self.sinks = sinks

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q: [N, heads, Lq, D]; k, v: [N, kv_heads, Lk, D]; mask: [N or 1, 1, Lq, Lk] (True = attend) or None
        for causal -> [N, heads, Lq, D]. Every torch attention path goes through here (one place for the
        score function)."""
        if self.softcap is not None or self.sinks is not None:
            if mask is None:
                n = q.shape[2]
                mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            return softcapped_attention(q, k, v, mask, self.scale, self.softcap, self.sinks)
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
        # index_copy_ rather than an indexed assignment: on CPU the generic index_put_ path costs ~20x more.
        kv_cache[0].index_copy_(0, meta.slot_mapping, k)
        kv_cache[1].index_copy_(0, meta.slot_mapping, v)
        nd = meta.num_decode
        parts = []
        if nd:
            parts.append(self._decode(q[:nd], meta, kv_cache))
        if meta.seq_lens:
            parts.append(self._prefill(q[nd:], k[nd:], v[nd:], meta, kv_cache))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                 kv_cache: torch.Tensor) -> torch.Tensor:
        # A chunk that starts its sequence attends over this step's k/v alone; one that continues a cached
        # prefix reads its context back from the cache (where this step's k/v were just written).
        if meta.cu_seq_lens is not None and self.softcap is None and self.sinks is None \
                and q.dtype in (torch.float16, torch.bfloat16) and len(meta.seq_lens) > 1:
            return self._prefill_varlen(q, k, v, meta)
        outs = []
        start = 0
        for n, window_mask, context in zip(meta.seq_lens, meta.prefill_window_masks, meta.prefill_contexts):
            qs = q[start:start + n].transpose(0, 1).unsqueeze(0)
            if context is None:
                ks, vs = (t[start:start + n].transpose(0, 1).unsqueeze(0) for t in (k, v))
                mask = None if window_mask is None or self.sliding_window is None else window_mask[None, None]
            else:
                ks, vs = self._gather(kv_cache, context.blocks[None], meta.block_size, context.length)
                mask = context.window if self.sliding_window is not None else context.causal
            outs.append(self._attend(qs, ks, vs, mask)[0].transpose(0, 1))
            start += n
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _gather(self, kv_cache: torch.Tensor, blocks: torch.Tensor, block_size: int, length: int,
                stale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [B, kv_heads, length, D] of the sequences whose blocks are `blocks` [B, n]: whole blocks are
        contiguous rows, so this copies a few large rows instead of one small row per token. Rows where `stale`
        [B, length, 1, 1] is True are zeroed in the copy (masking by selection: see the module docstring)."""
        b = blocks.shape[0]
        num_blocks = kv_cache.shape[1] // block_size
        flat = blocks.reshape(-1)
        out = []
        for i in (0, 1):
            rows = kv_cache[i].view(num_blocks, -1).index_select(0, flat).view(b, -1, self.num_kv_heads,
                                                                              self.head_dim)[:, :length]
            if stale is not None:
                rows.masked_fill_(stale, 0)
            out.append(rows.transpose(1, 2))
        return out[0], out[1]

    def _prefill_varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        meta: AttentionMetadata) -> torch.Tensor:
        from torch.nn.attention.varlen import varlen_attn

        longest = max(meta.seq_lens)
        # (left, right) keys around each query: causal, the window counting the query itself.
        window = (-1, 0) if self.sliding_window is None else (self.sliding_window - 1, 0)
        cu = meta.cu_seq_lens
        return varlen_attn(q, k, v, cu, cu, longest, longest, scale=self.scale, window_size=window, enable_gqa=True)

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        if meta.decode_kernel is not None:
            return meta.decode_kernel(q, kv_cache, meta.context_blocks, meta.context_lens, meta.block_size,
                                      self.scale, self.sliding_window, self.softcap)
        if len(meta.decode_groups) == 1:
            return self._decode_group(q, meta.decode_groups[0], meta.block_size, kv_cache)
        out = torch.empty_like(q)
        for group in meta.decode_groups:
            out.index_copy_(0, group.rows, self._decode_group(q.index_select(0, group.rows), group, meta.block_size,
                                                             kv_cache))
        return out

    def _decode_group(self, q: torch.Tensor, group: DecodeGroup, block_size: int,
                      kv_cache: torch.Tensor) -> torch.Tensor:
        k, v = self._gather(kv_cache, group.blocks, block_size, group.mask.shape[-1], group.stale)
        mask = group.window if self.sliding_window is not None else group.mask
        return self._attend(q.unsqueeze(2), k, v, mask).squeeze(2)
