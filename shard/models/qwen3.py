"""Qwen3: Llama's decoder with an RMSNorm over each head of q and k before rotary, an explicit head_dim
(q/k/v wider than hidden), biases from attention_bias; small sizes tie their embeddings."""

from shard.layers import RMSNorm
from shard.models.base import Attention, CausalLM


class Qwen3Attention(Attention):
    qk_norm = RMSNorm


class Qwen3ForCausalLM(CausalLM):
    model_type = "qwen3"
    attention = Qwen3Attention
