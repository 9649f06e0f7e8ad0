"""The decoder every family shares, on flattened tokens with a paged KV cache, over the parallel layers.

A family (one file in this package) subclasses CausalLM and names what it changes: its norm, attention,
decoder layer or MLP classes, how checkpoint modules fuse into our parallel layers (`packed_modules`, which
also names its PEFT targets), its embedding scale or logit cap. Module names mirror the Hugging Face
checkpoint (model.layers.N.self_attn...), except the fused qkv_proj and gate_up_proj, so that
shard/weights.py maps names mechanically. Rotary embeddings are built per layer type when the config's
rope_parameters are keyed by it (Gemma 3), and sliding windows come from `layer_types`.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple, Protocol

import torch
from torch import nn
from transformers.activations import ACT2FN

from shard.attention import AttentionMetadata, PagedAttention
from shard.kernels import cpu
from shard.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from shard.lora import ProjShape
from shard.rope import RotaryEmbedding, apply_rotary

# Checkpoint (and PEFT) module -> (our fused parallel layer, the parts of it that module is). Families whose
# checkpoints already fuse them (Phi-3) declare {}: then qkv_proj / gate_up_proj are checkpoint names too.
SPLIT_PROJECTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "q_proj": ("qkv_proj", ("q",)), "k_proj": ("qkv_proj", ("k",)), "v_proj": ("qkv_proj", ("v",)),
    "gate_proj": ("gate_up_proj", ("gate",)), "up_proj": ("gate_up_proj", ("up",)),
}


class Placement(NamedTuple):
    """Where a module's parameters live; unpacks into the parallel layers' trailing arguments."""

    dtype: torch.dtype
    device: torch.device | str
    tp_rank: int
    tp_size: int


class LoraHook(Protocol):
    """Adds adapter deltas, in place, into a projection's output. `proj` is the PEFT module name (q_proj,
    qkv_proj, down_proj, ...); `x` is the projection's input (this rank's slice), `y` its base output, or the
    columns of it that `proj` covers (for the row-parallel o_proj/down_proj: this rank's partial sum, before
    the all-reduce). Returns y."""

    def apply(self, layer_idx: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class VocabHook(Protocol):
    """Adapters on the vocabulary (shard/vocab_adapter.py VocabBatch): their rows' embeddings and logits."""

    def base_ids(self, ids: torch.Tensor) -> torch.Tensor: ...

    def embeddings(self, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor: ...


def apply_renames(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    """A checkpoint or adapter tensor name as current transformers names it (a family's `checkpoint_renames`)."""
    for old, new in renames:
        name = name.replace(old, new)
    return name


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_types_of(config, sliding: bool = True) -> list[str]:
    """Each layer's attention kind as transformers decides it: `layer_types` when the config has them, else
    every layer sliding when there is a sliding_window (Mistral, Phi-3) and the family has sliding layers."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return list(layer_types)
    windowed = sliding and getattr(config, "sliding_window", None) is not None
    return ["sliding_attention" if windowed else "full_attention"] * config.num_hidden_layers


class LoraSite(NamedTuple):
    """A PEFT target over columns [start, start + size) of a column-parallel layer's local output."""

    name: str
    start: int
    size: int
    shape: ProjShape


def column_sites(layer: ColumnParallelLinear, layer_name: str, parent: str,
                 packed: dict[str, tuple[str, tuple[str, ...]]]) -> list[LoraSite]:
    """The PEFT targets over `layer`: the checkpoint modules fused into it, or the layer itself when the
    checkpoint fuses them too."""
    targets = [(name, parts) for name, (fused, parts) in packed.items() if fused == layer_name]
    sites = []
    for name, parts in targets or [(layer_name, layer.parts)]:
        start, size = layer.local_columns(parts)
        runs = layer.source_rows(parts)
        out_features = sum(layer.full_sizes[p] for p in parts)
        shape = ProjShape(layer.in_features, out_features, 0, layer.in_features, runs[0][0], size, parent,
                          tuple(runs) if len(runs) > 1 else ())
        sites.append(LoraSite(name, start, size, shape))
    return sites


def row_shape(layer: RowParallelLinear, parent: str) -> ProjShape:
    return ProjShape(layer.in_features, layer.out_features, layer.input_start, layer.local_in, 0,
                     layer.out_features, parent)


def add_lora(lora: LoraHook, layer_idx: int, sites: list[LoraSite], x: torch.Tensor, y: torch.Tensor) -> None:
    for site in sites:
        lora.apply(layer_idx, site.name, x, y[:, site.start:site.start + site.size])


def row_parallel(layer: RowParallelLinear, name: str, layer_idx: int, x: torch.Tensor,
                 lora: LoraHook | None) -> torch.Tensor:
    """`layer(x)` plus its LoRA delta. Under tensor parallelism x holds this rank's slice: the delta joins the
    partial sum before the all-reduce."""
    if lora is None:
        return layer(x)
    return layer.reduce(lora.apply(layer_idx, name, x, layer.partial(x)))


class Attention(nn.Module):
    """q/k/v projection, per-head q/k norms (when `qk_norm` names a norm class), rotary, paged attention, o."""

    qk_norm: ClassVar[type[nn.Module] | None] = None

    def __init__(self, family: type[CausalLM], config, layer_idx: int, p: Placement):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = hd = head_dim_of(config)
        qkv_bias, o_bias = self.biases(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, hd, config.num_attention_heads,
                                          config.num_key_value_heads, qkv_bias, *p)
        self.o_proj = RowParallelLinear(config.num_attention_heads * hd, config.hidden_size, o_bias, *p)
        if self.qk_norm is not None:
            self.q_norm = self.qk_norm(hd, config.rms_norm_eps, p.dtype, p.device)
            self.k_norm = self.qk_norm(hd, config.rms_norm_eps, p.dtype, p.device)
        heads, kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.split = (heads * hd, kv_heads * hd, kv_heads * hd)
        kind = layer_types_of(config, family.sliding_layers)[layer_idx]
        window = config.sliding_window if kind == "sliding_attention" else None
        self.attn = PagedAttention(heads, kv_heads, hd, window, self.scale(config), self.softcap(config))
        self.lora_sites = column_sites(self.qkv_proj, "qkv_proj", "self_attn", family.packed_modules)
        self.kv_cache = torch.empty(0)  # set by CausalLM.set_kv_cache

    def biases(self, config) -> tuple[bool, bool]:
        """(q/k/v bias, o bias)."""
        bias = getattr(config, "attention_bias", False)
        return bias, bias

    def scale(self, config) -> float:
        return self.head_dim ** -0.5

    def softcap(self, config) -> float | None:
        return None

    def lora_shapes(self) -> dict[str, ProjShape]:
        return {s.name: s.shape for s in self.lora_sites} | {"o_proj": row_shape(self.o_proj, "self_attn")}

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                lora: LoraHook | None) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if lora is not None:
            add_lora(lora, self.layer_idx, self.lora_sites, x, qkv)
        t, hd = x.shape[0], self.head_dim
        q, k, v = (part.reshape(t, -1, hd) for part in qkv.split(self.split, dim=-1))
        if self.qk_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        o = self.attn(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, meta, self.kv_cache)
        return row_parallel(self.o_proj, "o_proj", self.layer_idx, o, lora)


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up fused into one column-parallel layer."""

    def __init__(self, family: type[CausalLM], config, layer_idx: int, p: Placement, size: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        bias = getattr(config, "mlp_bias", False)
        size = size or config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, {"gate": size, "up": size}, bias, *p)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias, *p)
        act = getattr(config, family.activation_field)
        if act not in ACT2FN:
            raise ValueError(f"{family.activation_field} {act!r} is not an activation transformers knows")
        self.act = ACT2FN[act]
        self.silu = act in ("silu", "swish")  # transformers' names of one function
        self.lora_sites = column_sites(self.gate_up_proj, "gate_up_proj", "mlp", family.packed_modules)

    def lora_shapes(self) -> dict[str, ProjShape]:
        return {s.name: s.shape for s in self.lora_sites} | {"down_proj": row_shape(self.down_proj, "mlp")}

    def forward(self, x: torch.Tensor, lora: LoraHook | None) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if lora is not None:
            add_lora(lora, self.layer_idx, self.lora_sites, x, gate_up)
        return row_parallel(self.down_proj, "down_proj", self.layer_idx, self.activate(gate_up), lora)

    def activate(self, gate_up: torch.Tensor) -> torch.Tensor:
        return gated_activation(gate_up, self.act, self.silu)


def gated_activation(gate_up: torch.Tensor, act, silu: bool) -> torch.Tensor:
    """act(gate) * up of [N, 2 * n] gate-then-up rows; SiLU on CPU float32 in one pass (shard/kernels/fused_cpu.c),
    matching torch to a few ulp."""
    if silu and cpu.runs_on(gate_up) and gate_up.stride(1) == 1:
        return cpu.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up


class DecoderLayer(nn.Module):
    """Pre-norm residual block: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, family: type[CausalLM], config, layer_idx: int, p: Placement):
        super().__init__()
        self.input_layernorm = family.make_norm(config, p)
        self.self_attn = family.attention(family, config, layer_idx, p)
        self.post_attention_layernorm = family.make_norm(config, p)
        self.mlp = family.make_mlp(config, layer_idx, p)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                lora: LoraHook | None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, meta, lora)
        return h + self.mlp(self.post_attention_layernorm(h), lora)


class Backbone(nn.Module):
    def __init__(self, family: type[CausalLM], config, p: Placement):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, *p)
        self.layers = nn.ModuleList(family.layer(family, config, i, p) for i in range(config.num_hidden_layers))
        self.norm = family.make_norm(config, p)


class CausalLM(nn.Module):
    """A decoder-only LM of one family; the class attributes are what a family changes."""

    model_type: ClassVar[str] = ""  # config.model_type served by this class ("" = not a servable family)
    norm: ClassVar[type[nn.Module]] = RMSNorm
    attention: ClassVar[type[Attention]] = Attention
    mlp: ClassVar[type[MLP]] = MLP
    layer: ClassVar[type[DecoderLayer]] = DecoderLayer
    packed_modules: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = SPLIT_PROJECTIONS
    # (old, new) substrings of checkpoint tensor names that older transformers releases wrote differently.
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    activation_field: ClassVar[str] = "hidden_act"  # the config field naming the MLP activation
    sliding_layers: ClassVar[bool] = True  # False: a sliding_window in the config is ignored, as transformers does
    partial_rotary: ClassVar[bool] = False  # rotates only partial_rotary_factor of each head (else refused)
    paged_decode_kernel: ClassVar[bool] = True  # False: its attention is one the paged decode kernels cannot compute
    padded_decode: ClassVar[bool] = True  # False: its decode steps cannot run padded to fixed shapes (CUDA graphs)

    def __init__(self, config, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.check_config(config)
        self.config, self.dtype = config, dtype
        p = Placement(dtype, device, tp_rank, tp_size)
        self.model = Backbone(type(self), config, p)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, *p)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._init_rotary(config, device)
        # A sequence holding this many tokens decodes by running whole again (Engine._recompute); None: never.
        self.recompute_at: int | None = self.recompute_length(config)
        windows = {layer.self_attn.attn.sliding_window for layer in self.model.layers} - {None}
        # All sliding layers share the config's one window, so one set of window masks serves them all.
        self.sliding_window: int | None = windows.pop() if windows else None

    def _init_rotary(self, config, device) -> None:
        """One RotaryEmbedding per layer type when rope_parameters are keyed by layer type, else one for all."""
        kinds = layer_types_of(config, self.sliding_layers)
        params = getattr(config, "rope_parameters", None) or {}
        keyed = all(kind in params for kind in kinds)
        self.rope_keys = kinds if keyed else ["all"] * len(kinds)
        head_dim = head_dim_of(config)
        self.rotary = nn.ModuleDict({key: RotaryEmbedding(config, head_dim, device, key if keyed else None,
                                                          partial_rotary=self.partial_rotary)
                                     for key in dict.fromkeys(self.rope_keys)})
        self.needs_lengths = any(r.long_after is not None for r in self.rotary.values())

    @classmethod
    def check_config(cls, config) -> None:
        """Raises naming the config field this family cannot compute exactly."""

    def recompute_length(self, config) -> int | None:
        return None

    @classmethod
    def make_mlp(cls, config, layer_idx: int, p: Placement) -> nn.Module:
        return cls.mlp(cls, config, layer_idx, p)

    @classmethod
    def make_norm(cls, config, p: Placement) -> nn.Module:
        return cls.norm(config.hidden_size, config.rms_norm_eps, p.dtype, p.device)

    @property
    def local_kv_heads(self) -> int:
        return self.model.layers[0].self_attn.attn.num_kv_heads

    def lora_shapes(self) -> dict[str, ProjShape]:
        """Every PEFT target of a layer and this rank's slice of it (all layers are alike)."""
        layer = self.model.layers[0]
        return layer.self_attn.lora_shapes() | layer.mlp.lora_shapes()

    def set_kv_cache(self, caches: list[torch.Tensor]) -> None:
        for layer, cache in zip(self.model.layers, caches, strict=True):
            layer.self_attn.kv_cache = cache

    def token_embeddings(self, input_ids: torch.Tensor, vocab: VocabHook | None = None) -> torch.Tensor:
        """embed_tokens(input_ids), each row under its request's vocabulary adapter."""
        if vocab is None:
            return self.model.embed_tokens(input_ids)
        return vocab.embeddings(input_ids, self.model.embed_tokens(vocab.base_ids(input_ids)))

    def embed(self, input_ids: torch.Tensor, vocab: VocabHook | None = None) -> torch.Tensor:
        return self.token_embeddings(input_ids, vocab)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata,
                lora: LoraHook | None = None, vocab: VocabHook | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden] (after the final norm)."""
        h = self.embed(input_ids, vocab)
        lengths = attn_metadata.token_lengths() if self.needs_lengths else None
        ropes = {key: rotary(positions, lengths, h.dtype) for key, rotary in self.rotary.items()}
        for layer, key in zip(self.model.layers, self.rope_keys):
            h = layer(h, ropes[key], attn_metadata, lora)
        return self.model.norm(h)

    def head(self, hidden: torch.Tensor, vocab: VocabHook | None = None) -> torch.Tensor:
        """lm_head(hidden), each row under its request's vocabulary adapter (then as wide as the widest)."""
        logits = self.lm_head(hidden)
        return logits if vocab is None else vocab.logits(hidden, logits)

    def compute_logits(self, hidden: torch.Tensor, vocab: VocabHook | None = None) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32 logits."""
        return self.head(hidden, vocab).float()
