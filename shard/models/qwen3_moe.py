"""Qwen3-MoE: Qwen3's attention (an RMSNorm over each head of q and k) over sparse blocks (shard/models/moe.py):
softmax over all experts, the top num_experts_per_tok kept and renormalised when norm_topk_prob; dense MLPs in
mlp_only_layers and between every decoder_sparse_step-th layer; a sliding window on every layer when
use_sliding_window."""

from shard.models.moe import MoeCausalLM
from shard.models.qwen3 import Qwen3Attention


class Qwen3MoeForCausalLM(MoeCausalLM):
    model_type = "qwen3_moe"
    attention = Qwen3Attention
