"""Decode steps on fixed shapes, replayed as CUDA graphs.

A decode step is ~1,400 small kernel launches: on a GPU the device waits on Python and on the launches. A
CUDA graph records one step's launches once and replays them with one call, but it replays fixed shapes and
fixed pointers. So every input a decode step reads lives in a buffer allocated once (token ids, positions, KV
slots, block tables, context lengths, the LoRA segment layout), and a step is padded up to a bucket of batch
size (BATCH_BUCKETS) and adapter count (0, then powers of two):

- rows past the batch decode token 0 at position 0 into a scratch KV block that no sequence owns (the engine's
  KV cache has one block more than the router is told of), with no adapter; their outputs are never read;
- segments past the step's adapters have no rows and no pages;
- block tables are as wide as the longest sequence the model allows; each LoRA page table as wide as
  MAX_LORA_RANK. The kernels read only up to each row's context and each adapter's own pages.

The padded step reads everything through kernels that take their sizes from device memory, whatever
LOOM_TRITON_* say: the paged decode attention kernel (the engine's own where it has one, else Triton's) and
the SGMV LoRA kernels. On CUDA each bucket is captured once after the warmup, largest first into one shared
memory pool (the warmup measures that memory first and keeps it out of the KV cache), and replayed for every
decode-only step that fits; a step that fits none (more rows or adapters than the limits the warmup ran, a
wider adapter) runs unpadded. With --enforce-eager, or off CUDA, the same padded step runs eagerly: the CPU
tests prove it token-exact against the unpadded one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from shard.adapter_cache import AdapterCache
from shard.attention import AttentionMetadata, DecodeKernel
from shard.lora_batch import TritonLoraBatch

# Batch sizes a decode step is padded up to: at most 1.5x apart past 2, so at most a third of a padded batch is
# padding.
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# The widest adapter a padded step serves, in LoRA ranks (vLLM's --max-lora-rank defaults to 16); a step
# with a wider one runs unpadded.
MAX_LORA_RANK = 64


def graphs_requested(device: torch.device, world_size: int, enforce_eager: bool) -> bool:
    """LOOM_CUDA_GRAPHS=1 asks for them (opt-in until the GPU kit has verified them): on CUDA, with one rank
    (an NCCL all-reduce inside a graph is not verified yet), and not with --enforce-eager."""
    return (device.type == "cuda" and world_size == 1 and not enforce_eager
            and os.environ.get("LOOM_CUDA_GRAPHS") == "1")


def bucket_keys(max_batch: int, max_adapters: int) -> list[tuple[int, int]]:
    """(batch, adapters) of every bucket up to the limits, largest first: adapter counts 0 and powers of two
    up to the first one >= max_adapters, never more segments than a power of two >= the batch holds."""
    batches = [b for b in BATCH_BUCKETS if b < max_batch] + [_round_up(max_batch, BATCH_BUCKETS)]
    counts = [0] + [1 << i for i in range((max(1, max_adapters) - 1).bit_length() + 1)]
    return sorted(((b, a) for b in batches for a in counts if a <= 1 << (b - 1).bit_length()), reverse=True)


def smallest_bucket(keys: list[tuple[int, int]], batch: int, adapters: int) -> tuple[int, int] | None:
    """The smallest of `keys` that holds a step of `batch` rows and `adapters` adapters (a base-model step:
    the one of no segments); None when none does."""
    fits = ((b, a) for b, a in reversed(keys) if b >= batch and a >= adapters and (a > 0) == (adapters > 0))
    return next(fits, None)


def _round_up(n: int, sizes) -> int:
    return next((s for s in sizes if s >= n), sizes[-1])


@dataclass(slots=True)
class DecodeBuffers:
    """Every input of a padded decode step, for the largest bucket; a bucket's step reads the leading rows of
    each (its rows of `rows` and `tables`, its segments of `segments` and `pages`)."""

    rows: torch.Tensor  # [6, batch]: token ids, positions, KV slots, rope lengths, context lengths, segment rows
    tables: torch.Tensor  # [batch, max_blocks] block tables
    segments: torch.Tensor  # [3, adapters]: each segment's pages, first row in rows[5], rows
    pages: torch.Tensor  # [adapters, lora pages] each segment's pool pages

    @classmethod
    def allocate(cls, batch: int, max_blocks: int, adapters: int, lora_pages: int, device: torch.device):
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.int64, device=device)  # noqa: E731
        return cls(zeros(6, batch), zeros(batch, max_blocks), zeros(3, adapters), zeros(adapters, lora_pages))


class DecodeRunner:
    """The padded decode path of one engine (module doc): `prepare` after each warmup, `reset` whenever the
    KV cache or the adapter pool is replaced (the graphs hold their pointers), `run` per decode-only step.
    `enabled` off sends every step down the unpadded path (the GPU kit measures both on one engine)."""

    def __init__(self, model, adapters: AdapterCache, block_size: int, device: torch.device,
                 kernel: DecodeKernel | None, capture: bool):
        if kernel is None:
            from shard.kernels.paged_attention import paged_decode_attention as kernel
        self.model, self.adapters, self.block_size, self.device = model, adapters, block_size, device
        self.kernel, self.capture = kernel, capture
        self.lora_pages = adapters.layout.pages_for(MAX_LORA_RANK)
        self.enabled = True
        self.padded_steps = 0  # steps run padded (replayed or eager), for the tests and the GPU kit
        self.buffers: DecodeBuffers | None = None
        self.keys: list[tuple[int, int]] = []
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.scratch_block = 0

    def reset(self) -> None:
        """Drops the buffers and graphs: `run` answers None until the next `prepare`."""
        self.buffers, self.keys, self.graphs = None, [], {}

    def prepare(self, max_batch: int, max_adapters: int, max_blocks: int, scratch_block: int) -> None:
        """Buffers for steps of up to max_batch rows, max_adapters adapters and max_blocks blocks a sequence,
        padding into `scratch_block`; on CUDA with `capture`, every bucket captured (largest first, one pool).
        The KV cache and the adapter pool must be in place."""
        self.reset()
        self.keys = bucket_keys(max_batch, max_adapters)
        batch, adapters = self.keys[0][0], max(a for _, a in self.keys) or 1
        self.buffers = DecodeBuffers.allocate(batch, max_blocks, adapters, self.lora_pages, self.device)
        self.scratch_block = scratch_block
        if self.capture:
            self._capture_all()

    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for batch, adapters in self.keys:
            self._fill([], [], [], [], [], {}, batch, adapters)  # all padding: every launch, no row of work
            self._forward(batch, adapters)  # kernels compiled and tuned outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(batch, adapters)
            self.graphs[batch, adapters] = (graph, out)

    def run(self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            lengths: list[int], adapter_ids: list[str]) -> torch.Tensor | None:
        """The final hidden states [len(ids), hidden] of a decode-only step (one token per sequence: its id,
        position, KV slot, block table, rope length and adapter), padded to its bucket and replayed where
        captured; None when it fits no bucket (the caller runs it unpadded)."""
        buffers = self.buffers
        if not self.enabled or buffers is None or len(ids) > buffers.rows.shape[1] \
                or max(map(len, tables)) > buffers.tables.shape[1]:
            return None
        segments = self.adapters.segments(adapter_ids, [1] * len(ids)) if any(adapter_ids) else {}
        key = smallest_bucket(self.keys, len(ids), len(segments))
        entries = [self.adapters.entries[a] for a in segments]
        # DoRA's per-row rescale (shard/dora.py) is not part of the captured step: such steps run unpadded.
        if key is None or any(len(e.pages) > self.lora_pages or e.dora is not None for e in entries):
            return None
        self._fill(ids, positions, slots, tables, lengths, segments, *key)
        self.padded_steps += 1
        if key in self.graphs:
            graph, out = self.graphs[key]
            graph.replay()
            return out[:len(ids)]
        return self._forward(*key)[:len(ids)]

    def _fill(self, ids, positions, slots, tables, lengths, segments: dict[str, list[int]], batch: int,
              adapters: int) -> None:
        """Writes a step's inputs, padded to (batch, adapters), into the buffers."""
        pad, scratch = batch - len(ids), self.scratch_block
        rows = [t for s in segments.values() for t in s]
        host = torch.tensor([ids + [0] * pad, positions + [0] * pad, slots + [scratch * self.block_size] * pad,
                             lengths + [1] * pad, [p + 1 for p in positions] + [1] * pad,
                             rows + [0] * (batch - len(rows))])
        self.buffers.rows[:, :batch].copy_(host)
        width = max(map(len, tables), default=1)
        self.buffers.tables[:batch, :width].copy_(torch.tensor([t + [scratch] * (width - len(t)) for t in tables]
                                                               + [[scratch] * width] * pad))
        if adapters:
            pages = [self.adapters.entries[a].pages for a in segments]
            lens = [len(s) for s in segments.values()] + [0] * (adapters - len(segments))
            starts = [sum(lens[:i]) for i in range(adapters)]
            counts = [len(p) for p in pages] + [0] * (adapters - len(pages))
            self.buffers.segments[:, :adapters].copy_(torch.tensor([counts, starts, lens]))
            self.buffers.pages[:adapters].copy_(torch.tensor([p + [0] * (self.lora_pages - len(p)) for p in pages]
                                                             + [[0] * self.lora_pages] * (adapters - len(pages))))

    def _forward(self, batch: int, adapters: int) -> torch.Tensor:
        """The model over the buffers' first `batch` rows and `adapters` segments: the step a graph records."""
        b = self.buffers
        ids, positions, slots, lengths, context, seg_rows = b.rows[:, :batch]
        meta = AttentionMetadata(batch, slots, lengths, [], [], [], b.tables[:batch], [], self.block_size, context,
                                 decode_kernel=self.kernel)
        lora = None
        if adapters:
            layout = self.adapters.layout
            seg_pages, seg_starts, seg_lens = b.segments[:, :adapters]
            lora = TritonLoraBatch(self.adapters.pool, layout, set(layout.shapes), b.pages[:adapters], seg_pages,
                                   seg_rows, seg_starts, seg_lens, batch)
        return self.model(ids, positions, meta, lora)
