"""Triton SGMV kernels: LoRA shrink and expand for a batch of per-adapter token segments, reading the
adapter weights straight out of the paged adapter pool (no gathered copies).

Layout (shard/lora.py's PageLayout): pool[p] is one page; for a (layer, projection), A's `page_rank` rows
of length `in_size` start at `a_offset` and B^T's `page_rank` rows of length `out_size` at `b_offset`.
Segment s covers slots seg_starts[s] .. + seg_lens[s] of `seg_tokens` (token rows of x and y) and reads its
first seg_pages[s] pages page_table[s, :] (the rest pads the table with page 0, the all-zero page, and is skipped).
Every size a launch depends on is read from device memory, and programs past a segment's rows do nothing: a
CUDA graph (shard/decode_graphs.py) replays one launch for any layout that fits its grid.

    shrink: v[slot, w*R + r] = sum_k x[tok, k] * A_{page_table[s, w]}[r, k]
    expand: y[tok, n]      += sum_{w, r} v[slot, w*R + r] * Bt_{page_table[s, w]}[r, n]

Products use broadcast-and-sum rather than tl.dot: LoRA pages are 8 ranks wide, under tl.dot's minimum
tile, and the work is memory-bound anyway. The torch path in shard/lora.py is the reference the tests
compare these kernels to (on CPU through Triton's interpreter, TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 16
BLOCK_K = 32
BLOCK_N = 32


@triton.jit
def _segment_block(seg, block, tokens_ptr, starts_ptr, lens_ptr, BM: tl.constexpr):
    """Block `block` of segment `seg`: its first slot, BM row numbers, which of them are in the segment, and
    their token rows."""
    start = tl.load(starts_ptr + seg)
    rows = block * BM + tl.arange(0, BM)
    row_ok = rows < tl.load(lens_ptr + seg)
    tokens = tl.load(tokens_ptr + start + rows, mask=row_ok, other=0)
    return start, rows, row_ok, tokens


@triton.jit
def _shrink_kernel(x_ptr, x_stride, pool_ptr, page_numel, a_offset, in_size, table_ptr, width,
                   tokens_ptr, starts_ptr, lens_ptr, pages_ptr, v_ptr, v_stride,
                   PAGE_RANK: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    seg, block = tl.program_id(0), tl.program_id(1)
    if block * BM < tl.load(lens_ptr + seg):
        start, rows, row_ok, tokens = _segment_block(seg, block, tokens_ptr, starts_ptr, lens_ptr, BM)
        ranks = tl.arange(0, PAGE_RANK)
        for w in range(0, tl.load(pages_ptr + seg)):
            page = tl.load(table_ptr + seg * width + w).to(tl.int64)
            a_base = pool_ptr + page * page_numel + a_offset
            acc = tl.zeros((BM, PAGE_RANK), dtype=tl.float32)
            for k0 in range(0, in_size, BK):
                ks = k0 + tl.arange(0, BK)
                k_ok = ks < in_size
                x = tl.load(x_ptr + tokens[:, None].to(tl.int64) * x_stride + ks[None, :],
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                a = tl.load(a_base + ranks[None, :] * in_size + ks[:, None], mask=k_ok[:, None],
                            other=0.0).to(tl.float32)
                acc += tl.sum(x[:, :, None] * a[None, :, :], axis=1)
            out = v_ptr + (start + rows)[:, None].to(tl.int64) * v_stride + w * PAGE_RANK + ranks[None, :]
            tl.store(out, acc, mask=row_ok[:, None])


@triton.jit
def _expand_kernel(v_ptr, v_stride, pool_ptr, page_numel, b_offset, out_size, table_ptr, width,
                   tokens_ptr, starts_ptr, lens_ptr, pages_ptr, y_ptr, y_stride,
                   PAGE_RANK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    seg, block, nblock = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if block * BM < tl.load(lens_ptr + seg):
        start, rows, row_ok, tokens = _segment_block(seg, block, tokens_ptr, starts_ptr, lens_ptr, BM)
        cols = nblock * BN + tl.arange(0, BN)
        col_ok = cols < out_size
        ranks = tl.arange(0, PAGE_RANK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for w in range(0, tl.load(pages_ptr + seg)):
            page = tl.load(table_ptr + seg * width + w).to(tl.int64)
            b_base = pool_ptr + page * page_numel + b_offset
            v = tl.load(v_ptr + (start + rows)[:, None].to(tl.int64) * v_stride + w * PAGE_RANK + ranks[None, :],
                        mask=row_ok[:, None], other=0.0)
            b = tl.load(b_base + ranks[:, None] * out_size + cols[None, :], mask=col_ok[None, :], other=0.0)
            acc += tl.sum(v[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
        out = y_ptr + tokens[:, None].to(tl.int64) * y_stride + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        y = tl.load(out, mask=mask, other=0.0)
        tl.store(out, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


def sgmv_lora(x: torch.Tensor, y: torch.Tensor, pool: torch.Tensor, a_offset: int, b_offset: int,
              page_rank: int, page_table: torch.Tensor, seg_tokens: torch.Tensor, seg_starts: torch.Tensor,
              seg_lens: torch.Tensor, seg_pages: torch.Tensor, longest: int) -> torch.Tensor:
    """y[tok] += LoRA(x[tok]) for every token of every segment, in place; returns y.

    x [T, in] and y [T, out] may be column slices (unit column stride); pool [pages, page_numel] contiguous;
    page_table [S, W] int32/int64; seg_tokens, seg_starts, seg_lens, seg_pages int32/int64; `longest` >=
    max(seg_lens) (the grid; programs past a segment's rows return at once)."""
    num_segments, width = page_table.shape
    in_size, out_size = x.shape[1], y.shape[1]
    assert x.stride(1) == 1 and y.stride(1) == 1 and pool.is_contiguous() and page_table.is_contiguous()
    v = torch.empty(seg_tokens.numel(), width * page_rank, dtype=torch.float32, device=x.device)
    blocks = triton.cdiv(longest, BLOCK_M)
    _shrink_kernel[(num_segments, blocks)](
        x, x.stride(0), pool, pool.shape[1], a_offset, in_size, page_table, width,
        seg_tokens, seg_starts, seg_lens, seg_pages, v, v.stride(0), PAGE_RANK=page_rank, BM=BLOCK_M, BK=BLOCK_K)
    _expand_kernel[(num_segments, blocks, triton.cdiv(out_size, BLOCK_N))](
        v, v.stride(0), pool, pool.shape[1], b_offset, out_size, page_table, width,
        seg_tokens, seg_starts, seg_lens, seg_pages, y, y.stride(0), PAGE_RANK=page_rank, BM=BLOCK_M, BN=BLOCK_N)
    return y
