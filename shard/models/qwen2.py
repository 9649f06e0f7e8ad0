"""Qwen2: Llama's decoder with biases on q/k/v (none on o); sliding layers from `layer_types`."""

from shard.models.base import Attention, CausalLM


class Qwen2Attention(Attention):
    def biases(self, config) -> tuple[bool, bool]:
        return True, False


class Qwen2ForCausalLM(CausalLM):
    model_type = "qwen2"
    attention = Qwen2Attention
