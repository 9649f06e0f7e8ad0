"""gpt-oss: attention with a learned sink logit per head (it joins each softmax and is dropped: shard/attention.py;
the paged decode kernels do not compute it, so decode runs on the torch path), q/k/v/o biases, sliding and full
layers alternating (layer_types), yarn rope; a sparse block in every layer whose router has a bias and takes the
softmax over the top k logits only, and whose experts have biases and a clamped SwiGLU: gate clamped above at
swiglu_limit, up to +-swiglu_limit, (up + 1) * gate * sigmoid(swiglu_alpha * gate). The checkpoint keeps the
experts fused and transposed, gate and up outputs interleaved (shard/models/moe.py). RMSNorm weights stay float32
and scale before the cast back, as transformers keeps them."""

from __future__ import annotations

import torch
from torch import nn

from shard.layers import RMSNorm
from shard.models.base import Attention, CausalLM, LoraHook, Placement
from shard.models.moe import Experts, MoeCausalLM, ReplicatedLinear, SparseMoeBlock, _check_shape
from shard.lora import ProjShape


class GptOssRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the same as Llama's order in float32
            return super().forward(x)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(x.dtype)


class GptOssAttention(Attention):
    def __init__(self, family: type[CausalLM], config, layer_idx: int, p: Placement):
        super().__init__(family, config, layer_idx, p)
        heads = self.qkv_proj.num_heads
        self.head_start = p.tp_rank * heads
        self.sinks = nn.Parameter(torch.empty(heads, dtype=p.dtype, device=p.device), requires_grad=False)
        self.attn.sinks = self.sinks

    def load(self, param_name: str, src, parts: tuple[str, ...] | None = None) -> None:
        """The sinks of this rank's heads (the projections load themselves)."""
        if param_name != "sinks":
            raise ValueError(f"{param_name} is not a parameter of the attention block")
        _check_shape((self.qkv_proj.full_sizes["q"] // self.head_dim,), src, param_name)
        self.sinks.data.copy_(src[self.head_start:self.head_start + self.sinks.shape[0]])


class GptOssExperts(Experts):
    transposed = True

    def __init__(self, config, p: Placement):
        super().__init__(config.num_experts, config.hidden_size, config.intermediate_size, True, p, {})
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit

    def activate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


class GptOssMLP(SparseMoeBlock):
    """Module names mirror the checkpoint: `router` (weight and bias) and `experts`."""

    def build(self, family: type[MoeCausalLM], config, p: Placement) -> None:
        self.router = ReplicatedLinear(config.hidden_size, config.num_experts, True, p)
        self.experts = GptOssExperts(config, p)

    def route(self, x: torch.Tensor, lora: LoraHook | None) -> tuple[torch.Tensor, torch.Tensor]:
        top, ids = self.router(x).topk(self.top_k, dim=-1)
        return torch.softmax(top, dim=1, dtype=top.dtype), ids

    def lora_shapes(self) -> dict[str, ProjShape]:
        return {}


class GptOssForCausalLM(MoeCausalLM):
    model_type = "gpt_oss"
    norm = GptOssRMSNorm
    attention = GptOssAttention
    sparse_block = GptOssMLP
    expert_modules = {}  # its checkpoints only ever held the experts fused
    paged_decode_kernel = False

    @classmethod
    def is_sparse(cls, config, layer_idx: int) -> bool:
        return True

    @classmethod
    def make_norm(cls, config, p: Placement) -> nn.Module:
        return cls.norm(config.hidden_size, config.rms_norm_eps, torch.float32, p.device)
