"""Mixtral: Mistral's decoder (a sliding window on every layer when the config has one) with a sparse block in
every layer: softmax over all experts, the top num_experts_per_tok always renormalised and kept in float32
(transformers does not cast them back), experts of intermediate_size. Checkpoints of older transformers name the
block `block_sparse_moe` and an expert's projections w1 (gate), w3 (up) and w2 (down)."""

from shard.models.moe import MoeCausalLM, SparseMoeBlock


class MixtralSparseMoeBlock(SparseMoeBlock):
    float32_weights = True


class MixtralForCausalLM(MoeCausalLM):
    model_type = "mixtral"
    sparse_block = MixtralSparseMoeBlock
    expert_modules = {"w1": ("gate_up_proj", "gate"), "w3": ("gate_up_proj", "up"), "w2": ("down_proj", "")}
    checkpoint_renames = ((".block_sparse_moe.", ".mlp."),)

    @classmethod
    def is_sparse(cls, config, layer_idx: int) -> bool:
        return True

    @classmethod
    def expert_size(cls, config) -> int:
        return config.intermediate_size

    @classmethod
    def norm_topk_prob(cls, config) -> bool:
        return True
