"""LoRA adapters: the page layout they are stored in (reading the PEFT format: shard/peft_adapter.py; batched
compute: shard/lora_batch.py).

A page holds `page_rank` rank-rows of every target projection of every layer: rows of lora_A ([rank, in])
and of lora_B transposed with the scaling folded in ([rank, out]), each cut to this rank's tensor-parallel
slice. An adapter of rank r fills ceil(r / page_rank) pages; rows past r and projections it does not target
stay zero, so they add nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from shard.dora import DoraWeights
    from shard.expert_lora import ExpertLayout
    from shard.vocab_adapter import VocabShape, VocabWeights

# The projections PEFT targets on Llama-style families; each family declares its own (shard/models/).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AdapterError(ValueError):
    pass


# ---- base model shapes and the page layout ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProjShape:
    """Full in/out features of a projection and this rank's slice of each (start, size)."""

    in_features: int
    out_features: int
    in_start: int
    in_size: int
    out_start: int
    out_size: int
    parent: str = ""  # the module holding it inside a layer: self_attn or mlp
    # A fused target (Phi-3's qkv_proj) keeps several runs of lora_B's rows on a rank, (start, size) each,
    # concatenated; empty: the one run (out_start, out_size).
    out_runs: tuple[tuple[int, int], ...] = ()

    def out_rows(self) -> tuple[tuple[int, int], ...]:
        return self.out_runs or ((self.out_start, self.out_size),)


def projection_shapes(model) -> dict[str, ProjShape]:
    """Every LoRA target of the model's family, read off its parallel layers so LoRA slices exactly like the
    base weights."""
    return model.lora_shapes()


@dataclass(slots=True)
class PageLayout:
    """Where each (layer, projection) lives inside a page: A rows at a_offset, B^T rows at b_offset."""

    num_layers: int
    page_rank: int
    shapes: dict[str, ProjShape]
    offsets: dict[tuple[int, str], tuple[int, int]]
    page_numel: int
    experts: ExpertLayout | None = None  # models with experts: where expert targets live (shard/expert_lora.py)
    vocab: VocabShape | None = None  # the base vocabulary, for adapters on embed_tokens / lm_head

    @classmethod
    def build(cls, num_layers: int, page_rank: int, shapes: dict[str, ProjShape]) -> PageLayout:
        offsets, pos = {}, 0
        for layer in range(num_layers):
            for proj, s in shapes.items():
                offsets[layer, proj] = (pos, pos + page_rank * s.in_size)
                pos += page_rank * (s.in_size + s.out_size)
        return cls(num_layers, page_rank, shapes, offsets, pos)

    def pages_for(self, rank: int) -> int:
        return math.ceil(rank / self.page_rank)

    def rows_numel(self, width_pages: int, targets) -> int:
        """Elements one adapter's rows take densely (A and B^T of every layer) for `targets`, padded to
        `width_pages` pages of rank: the unit AdapterStacks budgets in."""
        per_layer = sum(self.shapes[p].in_size + self.shapes[p].out_size for p in targets)
        return width_pages * self.page_rank * per_layer * self.num_layers

    def views(self, pages: torch.Tensor) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Per layer and projection, ([n, page_rank, in], [n, page_rank, out]) views of `pages` [n, page_numel]."""
        n, pr = pages.shape[0], self.page_rank
        out = []
        for layer in range(self.num_layers):
            per_proj = {}
            for proj, s in self.shapes.items():
                a, b = self.offsets[layer, proj]
                per_proj[proj] = (pages[:, a:a + pr * s.in_size].view(n, pr, s.in_size),
                                  pages[:, b:b + pr * s.out_size].view(n, pr, s.out_size))
            out.append(per_proj)
        return out


@dataclass(slots=True)
class HostAdapter:
    """An adapter laid out as pages in host memory, ready to copy into the device pool."""

    rank: int
    targets: frozenset[str]
    pages: torch.Tensor  # [pages for its rank + expert_pages, page_numel]
    expert_pages: int = 0  # the trailing pages that hold expert rows (shard/expert_lora.py)
    dora: DoraWeights | None = None  # a DoRA adapter's factors (shard/dora.py)
    vocab: VocabWeights | None = None  # its embedding / lm_head tensors (shard/vocab_adapter.py)
