"""The mixture-of-experts block the MoE families share (Qwen2-MoE, Qwen3-MoE, Mixtral, gpt-oss), computed as the
installed transformers computes it by default (its grouped_mm experts path).

A sparse block routes each token to its top-k experts (the family's router), then runs every expert once over the
tokens routed to it: the step's (token, expert) pairs are sorted by expert and each of an expert's projections runs
as one grouped matmul over its rows (torch's grouped_mm where it runs, else one matmul per active expert); nothing
loops over tokens. Each pair's output is scaled by its routing weight and a token's k outputs are summed in top-k
order, as transformers does.

Tensor parallelism splits every expert by intermediate size, as the dense MLP is split: a rank holds its slice of
each expert's gate and up rows and of its down columns and computes every routed pair on that slice; the block's
partial sums (the shared expert's too) are all-reduced once per layer. The router is replicated.

Checkpoints hold the experts either fused (3-D `experts.gate_up_proj` / `experts.down_proj`, what transformers 5
keeps in memory; gpt-oss's transposed, gate and up interleaved) or one module per expert
(`experts.N.gate_proj.weight`, what transformers writes and older releases used; Mixtral's w1/w3/w2): `Experts`
loads both, shard/weights.py asking it for the per-expert names (`checkpoint_pieces`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from shard.layers import all_reduce
from shard.models.base import MLP, CausalLM, LoraHook, Placement, gated_activation, row_shape
from shard.lora import ProjShape

# Per-expert checkpoint module -> (our fused parameter, the part of it that module is; "" = all of it).
EXPERT_MODULES = {"gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
                  "down_proj": ("down_proj", "")}


@dataclass(slots=True)
class Routing:
    """One step's (token, expert) pairs, sorted by expert: pair i of the sorted order is pair `order[i]` of the
    token-major [T, top_k] routing, token `tokens[i]`, expert `experts[i]`, weighted `weights[i]`; expert e's pairs
    end at row offsets[e] (grouped_mm's offs)."""

    top_k: int
    order: torch.Tensor
    tokens: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def of(cls, weights: torch.Tensor, ids: torch.Tensor, num_experts: int) -> Routing:
        """`weights`, `ids`: [T, top_k], each token's experts in top-k order."""
        flat = ids.reshape(-1)
        experts, order = torch.sort(flat, stable=True)
        offsets = torch.bincount(flat, minlength=num_experts).cumsum(0).to(torch.int32)
        return cls(ids.shape[1], order, order // ids.shape[1], experts, weights.reshape(-1)[order], offsets)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [S, in] sorted by expert, weight [E, in, out] -> [S, out]: rows up to offsets[0] through expert 0, then up
    to offsets[1] through expert 1, ... One grouped matmul on CPU (torch's grouped_mm, what transformers runs),
    elsewhere one matmul per expert that has rows: CUDA's grouped_mm wants bfloat16 and aligned strides that the
    adapter pool's views do not promise, and is not verified on a GPU here yet."""
    if x.device.type == "cpu" and hasattr(F, "grouped_mm"):
        return F.grouped_mm(x, weight, offs=offsets)
    out = x.new_empty(x.shape[0], weight.shape[2])
    start = 0
    for expert, end in enumerate(offsets.tolist()):  # one host sync, then only the active experts
        if end > start:
            torch.mm(x[start:end], weight[expert], out=out[start:end])
        start = end
    return out


class ReplicatedLinear(nn.Module):
    """y = x W^T (+ b) with the whole weight on every rank: routers and Qwen2-MoE's shared-expert gate."""

    def __init__(self, in_features: int, out_features: int, bias: bool, p: Placement):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=p.dtype, device=p.device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=p.dtype, device=p.device),
                                 requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load(self, param_name: str, src, parts: tuple[str, ...] | None = None) -> None:
        dst = getattr(self, param_name).data
        check_shape(dst.shape, src, param_name)
        dst.copy_(src[:])


def check_shape(expected, src, name: str) -> None:
    shape = tuple(src.get_shape()) if hasattr(src, "get_shape") else tuple(src.shape)
    if shape != tuple(expected):
        raise ValueError(f"tensor {name}: checkpoint has shape {shape}, expected {tuple(expected)}")


class Experts(nn.Module):
    """Every expert's projections as 3-D parameters, each expert cut to this rank's slice of the intermediate size
    I (I_r = I / tp_size), in the checkpoint's orientation: gate_up_proj [E, 2 * I_r, H] (this rank's gate rows,
    then its up rows) and down_proj [E, H, I_r]; `transposed` families (gpt-oss) [E, H, 2 * I_r] (gate columns,
    then up columns: the checkpoint interleaves them) and [E, I_r, H]. Optional biases [E, 2 * I_r] and [E, H],
    the latter added on rank 0 only (the block sums the ranks)."""

    transposed: ClassVar[bool] = False

    def __init__(self, num_experts: int, hidden: int, intermediate: int, bias: bool, p: Placement,
                 checkpoint_modules: dict[str, tuple[str, str]]):
        super().__init__()
        if intermediate % p.tp_size:
            raise ValueError(f"expert intermediate size {intermediate} is not divisible by tp_size {p.tp_size}")
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.local = n = intermediate // p.tp_size
        self.start = p.tp_rank * n  # this rank's slice of the intermediate size
        self.rank0 = p.tp_rank == 0
        self.checkpoint_modules = checkpoint_modules

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, dtype=p.dtype, device=p.device), requires_grad=False)

        self.gate_up_proj = param(num_experts, *self._oriented(2 * n, hidden))
        self.down_proj = param(num_experts, *self._oriented(hidden, n))
        self.gate_up_proj_bias = param(num_experts, 2 * n) if bias else None
        self.down_proj_bias = param(num_experts, hidden) if bias else None

    def _oriented(self, out_features: int, in_features: int) -> tuple[int, int]:
        return (in_features, out_features) if self.transposed else (out_features, in_features)

    def _in_out(self, weight: torch.Tensor) -> torch.Tensor:
        """[E, in, out], the view grouped_linear takes."""
        return weight if self.transposed else weight.transpose(1, 2)

    # ---- loading -------------------------------------------------------------------------------------------

    def checkpoint_pieces(self, path: str) -> dict[str, tuple[str, tuple]]:
        """Checkpoint tensors that each fill part of a parameter -> (that parameter, which part: `load_piece`'s
        key). Here one module per expert: (its module name, its expert)."""
        return {f"{path}.{e}.{module}.weight": (param, (module, e))
                for module, (param, _) in self.checkpoint_modules.items() for e in range(self.num_experts)}

    def load(self, param_name: str, src, parts: tuple[str, ...] | None = None) -> None:
        """A fused checkpoint tensor: weights [E, out, in] ([E, in, out] when `transposed`), biases [E, out]."""
        dst = getattr(self, param_name).data
        i, h, lo, n = self.intermediate, self.hidden, self.start, self.local
        if param_name == "down_proj_bias":
            check_shape((self.num_experts, h), src, param_name)
            dst.copy_(src[:])
        elif param_name == "down_proj":
            check_shape((self.num_experts, *self._oriented(h, i)), src, param_name)
            dst.copy_(src[:, lo:lo + n, :] if self.transposed else src[:, :, lo:lo + n])
        elif param_name == "gate_up_proj_bias":
            check_shape((self.num_experts, 2 * i), src, param_name)
            dst.copy_(self._gate_up_rows(src, weight=False))
        else:
            check_shape((self.num_experts, *self._oriented(2 * i, h)), src, param_name)
            dst.copy_(self._gate_up_rows(src, weight=True))

    def _gate_up_rows(self, src, weight: bool) -> torch.Tensor:
        """This rank's gate outputs, then its up outputs, of a fused gate_up weight or bias."""
        lo, n, i = self.start, self.local, self.intermediate
        if self.transposed:  # outputs last and interleaved: gate j at 2j, up j at 2j + 1
            both = src[:, :, 2 * lo:2 * (lo + n)] if weight else src[:, 2 * lo:2 * (lo + n)]
            return torch.cat([both[..., 0::2], both[..., 1::2]], dim=-1)
        if weight:
            return torch.cat([src[:, lo:lo + n, :], src[:, i + lo:i + lo + n, :]], dim=1)
        return torch.cat([src[:, lo:lo + n], src[:, i + lo:i + lo + n]], dim=1)

    def load_piece(self, param_name: str, piece: tuple, src) -> None:
        """One expert's [out, in] weight from a per-expert checkpoint module (never `transposed` families)."""
        module, expert = piece
        part = self.checkpoint_modules[module][1]
        dst = getattr(self, param_name).data[expert]
        lo, n = self.start, self.local
        if param_name == "down_proj":
            check_shape((self.hidden, self.intermediate), src, module)
            dst.copy_(src[:, lo:lo + n])
        else:
            check_shape((self.intermediate, self.hidden), src, module)
            offset = 0 if part == "gate" else n
            dst[offset:offset + n].copy_(src[lo:lo + n, :])

    def lora_shapes(self) -> dict[str, ProjShape]:
        """One expert's PEFT targets (`target_parameters`) and this rank's slice of each: gate_up's outputs are its
        gate then its up rows (interleaved in a `transposed` family's PEFT tensors: one run), down's inputs split."""
        i, h, lo, n = self.intermediate, self.hidden, self.start, self.local
        runs = ((2 * lo, 2 * n),) if self.transposed else ((lo, n), (i + lo, n))
        gate_up = ProjShape(h, 2 * i, 0, h, runs[0][0], 2 * n, "mlp.experts", runs if len(runs) > 1 else ())
        return {"gate_up_proj": gate_up, "down_proj": ProjShape(i, h, lo, n, 0, h, "mlp.experts")}

    # ---- compute -------------------------------------------------------------------------------------------

    def activate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[S, 2 * I_r] gate then up outputs -> [S, I_r]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, routing: Routing, layer_idx: int, lora: LoraHook | None) -> torch.Tensor:
        """This rank's partial sum of the block's routed output: [T, H]."""
        xs = x.index_select(0, routing.tokens)
        gate_up = grouped_linear(xs, self._in_out(self.gate_up_proj), routing.offsets)
        if self.gate_up_proj_bias is not None:
            gate_up.add_(self.gate_up_proj_bias.index_select(0, routing.experts))
        experts_lora = getattr(lora, "apply_experts", None)
        if experts_lora is not None:
            experts_lora(layer_idx, "gate_up_proj", xs, gate_up, routing)
        h = self.activate(gate_up)
        out = grouped_linear(h, self._in_out(self.down_proj), routing.offsets)
        if self.down_proj_bias is not None and self.rank0:
            out.add_(self.down_proj_bias.index_select(0, routing.experts))
        if experts_lora is not None:
            experts_lora(layer_idx, "down_proj", h, out, routing)
        weighted = out * routing.weights[:, None]
        pairs = torch.empty_like(weighted).index_copy_(0, routing.order, weighted)  # back to token-major
        return pairs.view(-1, routing.top_k, pairs.shape[-1]).sum(dim=1).to(x.dtype)


class SiluExperts(Experts):
    """act(gate) * up, the family's hidden_act (Qwen, Mixtral)."""

    def __init__(self, *args, act: str, **kwargs):
        super().__init__(*args, **kwargs)
        if act not in ACT2FN:
            raise ValueError(f"hidden_act {act!r} is not an activation transformers knows")
        self.act, self.silu = ACT2FN[act], act in ("silu", "swish")

    def activate(self, gate_up: torch.Tensor) -> torch.Tensor:
        return gated_activation(gate_up, self.act, self.silu)


class SparseMoeBlock(nn.Module):
    """Softmax over all experts, the top k kept (renormalised when `norm_topk_prob`), the routed experts, one
    all-reduce. Module names mirror the checkpoint: `gate` (the router) and `experts`. The routing weights are cast
    back to the activations' dtype unless `float32_weights`."""

    float32_weights: ClassVar[bool] = False

    def __init__(self, family: type[MoeCausalLM], config, layer_idx: int, p: Placement):
        super().__init__()
        self.layer_idx, self.tp_size = layer_idx, p.tp_size
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.build(family, config, p)

    def build(self, family: type[MoeCausalLM], config, p: Placement) -> None:
        """The router and the experts."""
        self.norm_topk_prob = family.norm_topk_prob(config)
        self.gate = ReplicatedLinear(config.hidden_size, config.num_experts, False, p)
        self.experts = SiluExperts(config.num_experts, config.hidden_size, family.expert_size(config), False, p,
                                   family.expert_modules, act=config.hidden_act)
        # PEFT adapts the router through target_parameters ("gate.weight"), as a replicated projection.
        self.gate_shape = ProjShape(config.hidden_size, config.num_experts, 0, config.hidden_size, 0,
                                    config.num_experts, "mlp")

    def route(self, x: torch.Tensor, lora: LoraHook | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, experts) [T, top_k] of each token, in top-k order."""
        logits = self.gate(x)
        if lora is not None:
            lora.apply(self.layer_idx, "gate", x, logits)
        top, ids = torch.softmax(logits, dim=-1, dtype=torch.float32).topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        return (top if self.float32_weights else top.to(logits.dtype)), ids

    def lora_shapes(self) -> dict[str, ProjShape]:
        return {"gate": self.gate_shape}

    def partial(self, x: torch.Tensor, lora: LoraHook | None) -> torch.Tensor:
        weights, ids = self.route(x, lora)
        return self.experts(x, Routing.of(weights, ids, self.num_experts), self.layer_idx, lora)

    def forward(self, x: torch.Tensor, lora: LoraHook | None) -> torch.Tensor:
        return all_reduce(self.partial(x, lora), self.tp_size)


class SharedExpert(MLP):
    """A dense MLP every token runs beside the routed experts (Qwen2-MoE), of shared_expert_intermediate_size; its
    PEFT targets are mlp.shared_expert.*. Returns this rank's partial sum: its block reduces once."""

    def __init__(self, family: type[CausalLM], config, layer_idx: int, p: Placement):
        super().__init__(family, config, layer_idx, p, size=config.shared_expert_intermediate_size)
        self.lora_sites = [site._replace(name=f"shared_expert.{site.name}") for site in self.lora_sites]

    def lora_shapes(self) -> dict[str, ProjShape]:
        down = row_shape(self.down_proj, "mlp")
        return {s.name: s.shape for s in self.lora_sites} | {"shared_expert.down_proj": down}

    def forward(self, x: torch.Tensor, lora: LoraHook | None) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if lora is not None:
            for site in self.lora_sites:
                lora.apply(self.layer_idx, site.name, x, gate_up[:, site.start:site.start + site.size])
        h = self.activate(gate_up)
        y = self.down_proj.partial(h)
        return y if lora is None else lora.apply(self.layer_idx, "shared_expert.down_proj", h, y)


class MoeCausalLM(CausalLM):
    """A family whose MLPs are sparse blocks, in every layer or where `is_sparse` says (the others dense)."""

    sparse_block: ClassVar[type[SparseMoeBlock]] = SparseMoeBlock
    expert_modules: ClassVar[dict[str, tuple[str, str]]] = EXPERT_MODULES
    # The experts' row counts come from each step's routing (read on the host), and expert LoRA is not part of
    # the padded decode step (shard/decode_graphs.py): decode runs unpadded, never as a CUDA graph.
    padded_decode = False

    @classmethod
    def is_sparse(cls, config, layer_idx: int) -> bool:
        """Qwen's rule: sparse unless in mlp_only_layers, every decoder_sparse_step-th layer."""
        return (layer_idx not in (config.mlp_only_layers or []) and config.num_experts > 0
                and (layer_idx + 1) % config.decoder_sparse_step == 0)

    @classmethod
    def expert_size(cls, config) -> int:
        return config.moe_intermediate_size

    @classmethod
    def norm_topk_prob(cls, config) -> bool:
        return config.norm_topk_prob

    @classmethod
    def make_mlp(cls, config, layer_idx: int, p: Placement) -> nn.Module:
        if cls.is_sparse(config, layer_idx):
            return cls.sparse_block(cls, config, layer_idx, p)
        return cls.mlp(cls, config, layer_idx, p)

    def lora_shapes(self) -> dict[str, ProjShape]:
        """Every PEFT target of any layer (dense and sparse layers differ), the experts' apart (`sparse_layers`)."""
        shapes: dict[str, ProjShape] = {}
        for layer in self.model.layers:
            shapes |= layer.self_attn.lora_shapes() | layer.mlp.lora_shapes()
        return shapes

    def sparse_layers(self) -> dict[int, Experts]:
        """The experts of every sparse layer, by layer index."""
        return {i: layer.mlp.experts for i, layer in enumerate(self.model.layers)
                if isinstance(layer.mlp, SparseMoeBlock)}
