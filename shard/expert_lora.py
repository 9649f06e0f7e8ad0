"""LoRA on the experts of a mixture of experts: where the rows live in the adapter pool, and the batched compute.

PEFT adapts an expert tensor (`experts.gate_up_proj`, `experts.down_proj`) with one low-rank pair per expert. Those
rows do not go in the pool's ordinary page layout (shard/lora.py), which every adapter pays for whatever it targets:
an adapter that targets experts gets expert pages on top of its ordinary ones, and one that does not gets none, so
attention-only adapters on a 128-expert model cost what they cost on a dense one. Expert pages are pool pages like
any other (same size, same residency, eviction and spill); ExpertLayout packs, for each `page_rank` ranks of an
adapter (a chunk), every MoE layer's experts into `pages_per_chunk` pages: a block holds consecutive experts' rows
of one (layer, target), A rows [count, page_rank, in] then scaled B^T rows [count, page_rank, out], and never
straddles a page, so each block is a view of the pool, read in place.

Compute (ExpertLora): the experts' pairs arrive sorted by expert (shard/models/moe.py); per adapter that targets
the projection, its pairs keep that order, so each chunk's block runs as two grouped matmuls over the adapter's
rows (shrink through the block's A, expand through its B^T), and the deltas join the projection's output rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shard.lora import ProjShape
from shard.models.moe import MoeCausalLM, Routing, grouped_linear


@dataclass(frozen=True, slots=True)
class ExpertBlock:
    """Experts [first, first + count) of one (layer, target) in page `page` of a chunk: A rows at a_offset, B^T
    rows right after them."""

    page: int
    a_offset: int
    b_offset: int
    first: int
    count: int


@dataclass(slots=True)
class ExpertLayout:
    """Where every MoE layer's expert rows live in an adapter's expert pages. `shapes`: one expert's targets and
    this rank's slice of each; `interleaved`: gate_up's outputs alternate gate and up in PEFT's tensors (gpt-oss)
    where this rank keeps its gate outputs, then its up outputs. Targets are named experts.gate_up_proj and
    experts.down_proj in an adapter's `targets`."""

    page_rank: int
    num_experts: int
    layers: tuple[int, ...]
    shapes: dict[str, ProjShape]
    interleaved: bool
    # A per-expert PEFT module (older adapters' experts.N.gate_proj) -> (the target it is part of, which part).
    modules: dict[str, tuple[str, str]]
    renames: tuple[tuple[str, str], ...]  # the family's checkpoint_renames: adapters of older models use them too
    blocks: dict[tuple[int, str], tuple[ExpertBlock, ...]]
    pages_per_chunk: int

    @classmethod
    def build(cls, page_numel: int, page_rank: int, num_experts: int, layers: tuple[int, ...],
              shapes: dict[str, ProjShape], interleaved: bool, modules: dict[str, tuple[str, str]],
              renames: tuple[tuple[str, str], ...] = ()) -> ExpertLayout:
        """Packs the blocks greedily into pages of `page_numel`; raises when one expert's rows of one target do
        not fit a page."""
        blocks: dict[tuple[int, str], tuple[ExpertBlock, ...]] = {}
        page, pos = 0, 0
        for layer in layers:
            for target, s in shapes.items():
                per_expert = page_rank * (s.in_size + s.out_size)
                if per_expert > page_numel:
                    raise ValueError(f"one expert's LoRA rows of {target} ({per_expert} elements) do not fit an "
                                     f"adapter pool page ({page_numel})")
                run, first = [], 0
                while first < num_experts:
                    fit = min((page_numel - pos) // per_expert, num_experts - first)
                    if fit == 0:
                        page, pos = page + 1, 0
                        continue
                    run.append(ExpertBlock(page, pos, pos + fit * page_rank * s.in_size, first, fit))
                    pos += fit * per_expert
                    first += fit
                blocks[layer, target] = tuple(run)
        return cls(page_rank, num_experts, tuple(layers), shapes, interleaved, modules, renames, blocks,
                   page + 1 if blocks else 0)

    def pages_for(self, rank: int) -> int:
        """Expert pages of an adapter whose widest expert target has `rank`."""
        return -(-rank // self.page_rank) * self.pages_per_chunk

    def chunk_views(self, pool: torch.Tensor, pages: list[int], layer: int, target: str):
        """For each chunk of an adapter's expert `pages` of `pool` (chunk-major) and each block of (layer, target):
        (chunk, first expert, count, A [count, page_rank, in], B^T [count, page_rank, out]), views of the pool."""
        s, pr = self.shapes[target], self.page_rank
        for chunk in range(len(pages) // self.pages_per_chunk):
            for b in self.blocks[layer, target]:
                page = pool[pages[chunk * self.pages_per_chunk + b.page]]
                yield (chunk, b.first, b.count, page[b.a_offset:b.b_offset].view(b.count, pr, s.in_size),
                       page[b.b_offset:b.b_offset + b.count * pr * s.out_size].view(b.count, pr, s.out_size))

    def write(self, pages: torch.Tensor, layer: int, target: str, a: torch.Tensor, bt: torch.Tensor) -> None:
        """Lays every expert's rows of (layer, target), a [E, R, in] and scaled bt [E, R, out], into an adapter's
        expert `pages` [n, page_numel] (host pages: chunk c is pages c * pages_per_chunk ...); rows past R stay
        zero."""
        pr = self.page_rank
        for chunk, first, count, va, vb in self.chunk_views(pages, list(range(pages.shape[0])), layer, target):
            rows = slice(chunk * pr, min((chunk + 1) * pr, a.shape[1]))
            if rows.start < rows.stop:
                va[:, :rows.stop - rows.start].copy_(a[first:first + count, rows])
                vb[:, :rows.stop - rows.start].copy_(bt[first:first + count, rows])


def expert_layout(model, page_numel: int, page_rank: int) -> ExpertLayout | None:
    """The expert pages' layout of `model` (None for a model without experts), pages `page_numel` long."""
    sparse = model.sparse_layers() if isinstance(model, MoeCausalLM) else {}
    if not sparse:
        return None
    experts = next(iter(sparse.values()))
    return ExpertLayout.build(page_numel, page_rank, experts.num_experts, tuple(sparse), experts.lora_shapes(),
                              experts.transposed, dict(type(model).expert_modules), type(model).checkpoint_renames)


class ExpertLora:
    """One step's expert LoRA: for each adapter of the step with expert pages, its tokens and pool pages."""

    def __init__(self, layout: ExpertLayout, pool: torch.Tensor, adapters: list[tuple[list[int], list[int],
                 frozenset[str]]], num_tokens: int, device: torch.device):
        """`adapters`: (token rows, expert pool pages, targets) of each adapter that targets experts."""
        self.layout, self.pool = layout, pool
        self.adapters = [(pages, targets) for _, pages, targets in adapters]
        slot = torch.full((num_tokens,), -1, dtype=torch.long)
        for i, (tokens, _, _) in enumerate(adapters):
            slot[tokens] = i
        self.token_slot = slot.to(device)

    def apply_experts(self, layer_idx: int, target: str, x: torch.Tensor, y: torch.Tensor,
                      routing: Routing) -> torch.Tensor:
        """Adds the deltas of `target` (gate_up_proj or down_proj) into y: x [S, in] and y [S, out] are the layer's
        (token, expert) pairs in routing's expert-sorted order."""
        pair_slot = self.token_slot.index_select(0, routing.tokens)
        for slot, (pages, targets) in enumerate(self.adapters):
            if f"experts.{target}" not in targets:
                continue
            rows = (pair_slot == slot).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            counts = torch.bincount(routing.experts.index_select(0, rows), minlength=self.layout.num_experts)
            ends = counts.cumsum(0)
            xa = x.index_select(0, rows)
            delta = torch.zeros(rows.numel(), y.shape[1], dtype=y.dtype, device=y.device)
            bounds = [0, *ends.tolist()]  # one host sync per adapter and projection
            for _, first, count, a, bt in self.layout.chunk_views(self.pool, pages, layer_idx, target):
                lo, hi = bounds[first], bounds[first + count]
                if hi == lo:
                    continue
                offsets = (ends[first:first + count] - lo).to(torch.int32)
                shrunk = grouped_linear(xa[lo:hi], a.transpose(1, 2), offsets)
                delta[lo:hi] += grouped_linear(shrunk, bt, offsets)
            y.index_add_(0, rows, delta)
        return y


class MoeLora:
    """The LoRA hook of a step where some adapter targets experts: projections go to the step's ordinary hook
    (shard/lora_batch.py), expert tensors to ExpertLora."""

    def __init__(self, inner, experts: ExpertLora):
        self.inner, self.experts = inner, experts

    def apply(self, layer_idx: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y if self.inner is None else self.inner.apply(layer_idx, proj, x, y)

    def apply_experts(self, layer_idx: int, target: str, x: torch.Tensor, y: torch.Tensor,
                      routing: Routing) -> torch.Tensor:
        return self.experts.apply_experts(layer_idx, target, x, y, routing)
