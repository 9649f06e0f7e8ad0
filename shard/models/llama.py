"""Llama 1-3.x: the shared decoder as it is. q/k/v/o biases follow attention_bias, MLP biases mlp_bias;
Llama 3.x rope scaling (rope_type llama3) is computed in shard/rope.py."""

from shard.models.base import CausalLM


class LlamaForCausalLM(CausalLM):
    model_type = "llama"
    sliding_layers = False  # transformers' Llama has no sliding window, whatever config.json says
