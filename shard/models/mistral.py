"""Mistral: Llama's decoder with a sliding window on every layer when the config has one."""

from shard.models.base import CausalLM


class MistralForCausalLM(CausalLM):
    model_type = "mistral"
