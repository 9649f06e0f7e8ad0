"""Gemma 3 (text): Gemma 2's decoder with a (1 + w) RMSNorm over each head of q and k, no attention soft-cap
(transformers never applies one), and rotary per layer type: sliding and full layers have their own rope
base and type (rope_parameters keyed by layer type, built in shard/models/base.py)."""

from shard.models.gemma2 import Gemma2Attention, Gemma2ForCausalLM, GemmaRMSNorm


class Gemma3Attention(Gemma2Attention):
    qk_norm = GemmaRMSNorm

    def softcap(self, config) -> float | None:
        return None


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    model_type = "gemma3_text"
    attention = Gemma3Attention
