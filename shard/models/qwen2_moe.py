"""Qwen2-MoE: Qwen2's attention (q/k/v biases from qkv_bias, none on o) over Qwen3-MoE's sparse blocks plus a
shared expert every token runs, scaled by a sigmoid gate of its own (shared_expert_gate) and added to the routed
experts' sum before the block's one all-reduce."""

from __future__ import annotations

import torch

from shard.lora import ProjShape
from shard.models.base import Attention, LoraHook, Placement
from shard.models.moe import MoeCausalLM, ReplicatedLinear, SharedExpert, SparseMoeBlock


class Qwen2MoeAttention(Attention):
    def biases(self, config) -> tuple[bool, bool]:
        return config.qkv_bias, False


class Qwen2MoeSparseMoeBlock(SparseMoeBlock):
    def __init__(self, family: type[MoeCausalLM], config, layer_idx: int, p: Placement):
        super().__init__(family, config, layer_idx, p)
        self.shared_expert = SharedExpert(family, config, layer_idx, p)
        self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, False, p)
        self.shared_gate_shape = ProjShape(config.hidden_size, 1, 0, config.hidden_size, 0, 1, "mlp")

    def lora_shapes(self) -> dict[str, ProjShape]:
        return super().lora_shapes() | self.shared_expert.lora_shapes() | {"shared_expert_gate": self.shared_gate_shape}

    def partial(self, x: torch.Tensor, lora: LoraHook | None) -> torch.Tensor:
        routed = super().partial(x, lora)
        shared = self.shared_expert(x, lora)
        gate = self.shared_expert_gate(x)
        if lora is not None:
            lora.apply(self.layer_idx, "shared_expert_gate", x, gate)
        return routed + torch.sigmoid(gate) * shared


class Qwen2MoeForCausalLM(MoeCausalLM):
    model_type = "qwen2_moe"
    attention = Qwen2MoeAttention
    sparse_block = Qwen2MoeSparseMoeBlock
