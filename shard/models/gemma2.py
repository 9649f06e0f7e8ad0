"""Gemma 2: (1 + w) RMSNorm, embeddings scaled by sqrt(hidden_size), a norm before and after both the attention
and the MLP, GELU-tanh (hidden_activation), scores scaled by query_pre_attn_scalar ** -0.5 and soft-capped
(attn_logit_softcapping, shard/attention.py), final logits soft-capped (final_logit_softcapping), sliding
and full layers alternating (layer_types)."""

from __future__ import annotations

import torch

from shard.attention import AttentionMetadata
from shard.layers import RMSNorm
from shard.models.base import Attention, CausalLM, DecoderLayer, LoraHook, Placement, VocabHook


class GemmaRMSNorm(RMSNorm):
    """x / rms(x) * (1 + w), scaled in float32 and cast back last (Llama casts before scaling)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


def tanh_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


class Gemma2Attention(Attention):
    def scale(self, config) -> float:
        return config.query_pre_attn_scalar ** -0.5

    def softcap(self, config) -> float | None:
        return config.attn_logit_softcapping


class Gemma2DecoderLayer(DecoderLayer):
    """Each sub-block's output is normalised (post_*) before it joins the residual."""

    def __init__(self, family: type[CausalLM], config, layer_idx: int, p: Placement):
        super().__init__(family, config, layer_idx, p)
        self.pre_feedforward_layernorm = family.make_norm(config, p)
        self.post_feedforward_layernorm = family.make_norm(config, p)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                lora: LoraHook | None) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), rope, meta, lora))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h), lora))


class Gemma2ForCausalLM(CausalLM):
    model_type = "gemma2"
    norm = GemmaRMSNorm
    attention = Gemma2Attention
    layer = Gemma2DecoderLayer
    activation_field = "hidden_activation"

    @classmethod
    def check_config(cls, config) -> None:
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention is not supported (Loom serves causal decoders)")

    def embed(self, input_ids: torch.Tensor, vocab: VocabHook | None = None) -> torch.Tensor:
        h = self.token_embeddings(input_ids, vocab)
        # transformers rounds the float32 scale to the weights' dtype (sqrt(3072) is 55.5 in bfloat16).
        return h * torch.tensor(self.config.hidden_size ** 0.5).to(h.dtype)

    def compute_logits(self, hidden: torch.Tensor, vocab: VocabHook | None = None) -> torch.Tensor:
        return tanh_cap(self.head(hidden, vocab), self.config.final_logit_softcapping).float()
