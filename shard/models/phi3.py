"""Phi-3 and Phi-4-mini: Llama's decoder, but the checkpoint stores q/k/v as one qkv_proj and gate/up as one
gate_up_proj, which are also the names its PEFT adapters target (a fused LoRA target: B's rows split per
part across ranks, shard/lora.py). Partial rotary (partial_rotary_factor) and longrope are shard/rope.py's;
what is Phi-3's own is when a sequence's earlier positions switch to the long factors."""

from shard.models.base import CausalLM


class Phi3ForCausalLM(CausalLM):
    model_type = "phi3"
    packed_modules = {}  # qkv_proj / gate_up_proj are checkpoint names: nothing to fuse on load
    partial_rotary = True

    def recompute_length(self, config) -> int | None:
        # transformers' Phi-3 generate drops its cache once a sequence first holds original_max_position_embeddings
        # + 1 tokens and runs it whole: with longrope every earlier position then gets the long factors too.
        return config.original_max_position_embeddings + 1 if self.needs_lengths else None
