"""gpt-oss: attention with a learned sink logit per head (it joins each softmax and is dropped: shard/attention.py;
the paged decode kernels do not compute it, so decode runs on the torch path), q/k/v/o biases, sliding and full
layers alternating (layer_types), yarn rope; a sparse block in every layer whose router has a bias and takes the
softmax over the top k logits only, and whose experts have biases and a clamped SwiGLU: gate clamped above at
swiglu_limit, up to +-swiglu_limit, (up + 1) * gate * sigmoid(swiglu_alpha * gate). The checkpoint keeps the
experts fused and transposed, gate and up outputs interleaved (shard/models/moe.py). RMSNorm weights stay float32
and scale before the cast back, as transformers keeps them.

Published gpt-oss checkpoints hold the experts in MXFP4 (quantization_config quant_method "mxfp4"): per expert
tensor `*_blocks` (two 4-bit e2m1 values a byte, 32 to a group) and `*_scales` (one e8m0 exponent a group). They
are dequantized on load exactly as transformers does when it runs without MXFP4 kernels: every e2m1 value times
its power of two is representable in float32 and bfloat16, so the dense weights are exact."""

from __future__ import annotations

import torch
from torch import nn

from shard.layers import RMSNorm
from shard.lora import ProjShape
from shard.models.base import Attention, CausalLM, LoraHook, Placement
from shard.models.moe import Experts, MoeCausalLM, ReplicatedLinear, SparseMoeBlock, check_shape


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
        check_shape((self.qkv_proj.full_sizes["q"] // self.head_dim,), src, param_name)
        self.sinks.data.copy_(src[self.head_start:self.head_start + self.sinks.shape[0]])


# The e2m1 values of a 4-bit code (its sign in the high bit).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_GROUP = 32


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks [..., G, 16] uint8 (low nibble first), scales [..., G] uint8 (2 ** (s - 127)) -> [..., G * 32]."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    values = torch.empty(*blocks.shape, 2, dtype=dtype)
    values[..., 0] = lut[(blocks & 0x0F).long()]
    values[..., 1] = lut[(blocks >> 4).long()]
    return torch.ldexp(values.flatten(-2), scales.to(torch.int32)[..., None] - 127).flatten(-2)


def mxfp4(config) -> bool:
    """Whether the checkpoint's experts are MXFP4; another quantization is refused naming it."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return False
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization,
                                                                                            "quant_method", None)
    if method != "mxfp4":
        raise ValueError(f"quantization_config quant_method {method!r} is not supported (gpt-oss: mxfp4, "
                         "dequantized on load)")
    return True


class GptOssExperts(Experts):
    transposed = True

    def __init__(self, config, p: Placement):
        super().__init__(config.num_experts, config.hidden_size, config.intermediate_size, True, p, {})
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        self.mxfp4 = mxfp4(config)
        self._halves: dict[str, dict[str, torch.Tensor]] = {}  # an MXFP4 tensor's blocks or scales, until both came

    def checkpoint_pieces(self, path: str) -> dict[str, tuple[str, tuple]]:
        if not self.mxfp4:
            return {}
        return {f"{path}.{param}_{half}": (param, (half,)) for param in ("gate_up_proj", "down_proj")
                for half in ("blocks", "scales")}

    def load_piece(self, param_name: str, piece: tuple, src) -> None:
        """An MXFP4 tensor's blocks [E, out, G, 16] or scales [E, out, G] (out-major, as the checkpoint holds them);
        once both came, this rank's part is dequantized into the parameter."""
        e, h, i, lo, n = self.num_experts, self.hidden, self.intermediate, self.start, self.local
        out, groups = (2 * i, h // MXFP4_GROUP) if param_name == "gate_up_proj" else (h, i // MXFP4_GROUP)
        half = piece[0]
        check_shape((e, out, groups, 16) if half == "blocks" else (e, out, groups), src, f"{param_name}_{half}")
        if param_name == "gate_up_proj":  # this rank's interleaved outputs, every input group
            part = src[:, 2 * lo:2 * (lo + n)]
        else:  # every output, the input groups that hold this rank's inputs
            part = src[:, :, lo // MXFP4_GROUP:-(-(lo + n) // MXFP4_GROUP)]
        halves = self._halves.setdefault(param_name, {})
        halves[half] = part
        if len(halves) < 2:
            return
        dense = dequantize_mxfp4(halves["blocks"], halves.pop("scales"), torch.float32)  # [E, out, in]
        del self._halves[param_name]
        if param_name == "gate_up_proj":
            dense = torch.cat([dense[:, 0::2], dense[:, 1::2]], dim=1)  # gate rows, then up rows
        else:
            first = lo - lo // MXFP4_GROUP * MXFP4_GROUP
            dense = dense[:, :, first:first + n]
        getattr(self, param_name).data.copy_(dense.transpose(1, 2))

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
