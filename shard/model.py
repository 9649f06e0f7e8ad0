"""The Llama family (Llama, Mistral, Qwen2) on flattened tokens with a paged KV cache.

Differences between the families are config switches: q/k/v bias (Qwen2, or Llama's attention_bias),
sliding-window layers (Mistral's sliding_window, Qwen2's layer_types), tied embeddings.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from transformers.activations import ACT2FN

from shard.attention import AttentionMetadata, PagedAttention
from shard.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from shard.rope import RotaryEmbedding, apply_rotary

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class LoraHook(Protocol):
    """Adds adapter deltas to a projection's output. `proj` is the PEFT module name (q_proj, k_proj, v_proj,
    o_proj, gate_proj, up_proj, down_proj); `x` is the projection's input (this rank's slice), `y` its base
    output (for the row-parallel o_proj/down_proj: this rank's partial sum, before the all-reduce)."""

    def apply(self, layer_idx: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_windows(config) -> list[int | None]:
    """Sliding window of each layer, as transformers decides it (None = full attention)."""
    # transformers' Llama has no sliding window: one written in a llama config.json is ignored there too.
    window = None if config.model_type == "llama" else getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if kind == "sliding_attention" else None for kind in layer_types]
    return [window] * config.num_hidden_layers


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype, device, tp_rank: int, tp_size: int):
        super().__init__()
        self.layer_idx = layer_idx
        head_dim = head_dim_of(config)
        qkv_bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, qkv_bias, dtype, device, tp_rank, tp_size)
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size,
                                        getattr(config, "attention_bias", False), dtype, device, tp_rank, tp_size)
        heads, kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.split = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
        self.attn = PagedAttention(heads, kv_heads, head_dim, layer_windows(config)[layer_idx])
        self.kv_cache = torch.empty(0)  # set by Model.set_kv_cache

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                lora: LoraHook | None) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        if lora is not None:
            q = lora.apply(self.layer_idx, "q_proj", x, q)
            k = lora.apply(self.layer_idx, "k_proj", x, k)
            v = lora.apply(self.layer_idx, "v_proj", x, v)
        t, hd = x.shape[0], self.attn.head_dim
        q = apply_rotary(q.reshape(t, -1, hd), cos, sin)
        k = apply_rotary(k.reshape(t, -1, hd), cos, sin)
        o = self.attn(q, k, v.reshape(t, -1, hd), meta, self.kv_cache)
        if lora is None:
            return self.o_proj(o)
        # Under tensor parallelism o holds this rank's heads: the delta joins the partial sum before the all-reduce.
        return self.o_proj.reduce(lora.apply(self.layer_idx, "o_proj", o, self.o_proj.partial(o)))


class MLP(nn.Module):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype, device, tp_rank: int, tp_size: int):
        super().__init__()
        self.layer_idx = layer_idx
        bias = getattr(config, "mlp_bias", False)
        size = config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [size, size], bias, dtype, device, tp_rank, tp_size)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias, dtype, device, tp_rank, tp_size)
        if config.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act {config.hidden_act!r} is not an activation transformers knows")
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor, lora: LoraHook | None) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        if lora is not None:
            gate = lora.apply(self.layer_idx, "gate_proj", x, gate)
            up = lora.apply(self.layer_idx, "up_proj", x, up)
        h = self.act(gate) * up
        if lora is None:
            return self.down_proj(h)
        return self.down_proj.reduce(lora.apply(self.layer_idx, "down_proj", h, self.down_proj.partial(h)))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype, device, tp_rank: int, tp_size: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = Attention(config, layer_idx, dtype, device, tp_rank, tp_size)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp = MLP(config, layer_idx, dtype, device, tp_rank, tp_size)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                lora: LoraHook | None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, meta, lora)
        return h + self.mlp(self.post_attention_layernorm(h), lora)


class Backbone(nn.Module):
    def __init__(self, config, dtype: torch.dtype, device, tp_rank: int, tp_size: int):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype, device,
                                                   tp_rank, tp_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, dtype, device, tp_rank, tp_size) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)


class CausalLM(nn.Module):
    """Module names mirror the Hugging Face checkpoint (model.layers.N.self_attn...), except the fused
    qkv_proj and gate_up_proj, so that weights.py maps names mechanically."""

    def __init__(self, config, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {config.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
        self.config, self.dtype = config, dtype
        self.model = Backbone(config, dtype, device, tp_rank, tp_size)
        self.rotary = RotaryEmbedding(config, head_dim_of(config), device)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype, device, tp_rank, tp_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        windows = [w for w in layer_windows(config) if w is not None]
        # All sliding layers share the config's one window, so one set of window masks serves them all.
        self.sliding_window: int | None = windows[0] if windows else None

    @property
    def local_kv_heads(self) -> int:
        return self.model.layers[0].self_attn.attn.num_kv_heads

    def set_kv_cache(self, caches: list[torch.Tensor]) -> None:
        for layer, cache in zip(self.model.layers, caches, strict=True):
            layer.self_attn.kv_cache = cache

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata,
                lora: LoraHook | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden] (after the final norm)."""
        h = self.model.embed_tokens(input_ids)
        lengths = attn_metadata.token_lengths() if self.rotary.long_after is not None else None
        cos, sin = self.rotary(positions, lengths, h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin, attn_metadata, lora)
        return self.model.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32 logits."""
        return self.lm_head(hidden).float()
