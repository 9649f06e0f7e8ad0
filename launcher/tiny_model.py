"""Builds small random checkpoints of every family Loom serves in the real Hugging Face on-disk format.

Used for the embedded demo model (`loom` with no --model-id), by the tests and by bench/. A model dir
holds config.json, generation_config.json, model.safetensors (or a sharded index), tokenizer.json
(a byte-level BPE trained with `tokenizers`) and tokenizer_config.json carrying a ChatML template.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Text the tokenizer is trained on: plain English plus a few multi-byte scripts so that byte-level
# merges split characters across tokens (the incremental detokenizer must handle that).
CORPUS = [
    "The quick brown fox jumps over the lazy dog. A friendly chatbot answers like a pirate.",
    "How many helicopters can a human eat in one sitting? None, said the captain, arr!",
    "Write a detailed analogy between mathematics and a lighthouse. Output: numbers guide ships.",
    "Loom serves one base model and thousands of LoRA adapters from the same GPUs.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # {\"json\": [1, 2.5, true, null]}",
    "Größe, naïve café, déjà vu — señor, 東京は日本の首都です。 Привет, мир! 🙂🚀 שלום",
    "Once upon a time there was a little model that wanted to speak every language.",
    "system user assistant tool function arguments name content role message",
]

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")
# The mixtures of experts: 4 experts of which each token takes 2.
MOE_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss")
# Sliding window of the tiny Gemma models: shorter than the longer test prompts.
GEMMA_WINDOW = 24
# Sliding window of the tiny Mixtral and gpt-oss models.
MOE_WINDOW = 20


def train_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer with the ChatML special tokens, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def model_config(family: str, vocab_size: int, **overrides):
    """A tiny config of `family`; `overrides` set any config field (hidden_size, num_hidden_layers, ...)."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GptOssConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        # Wider than the usual 0.02 so that random logits have clear winners: greedy parity tests
        # compare argmaxes, and near-ties would make them depend on float rounding.
        initializer_range=0.25,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if family == "llama":
        common.update(tie_word_embeddings=False)
        cls = LlamaConfig
    elif family == "mistral":
        common.update(sliding_window=48, tie_word_embeddings=False)
        cls = MistralConfig
    elif family == "qwen2":
        common.update(tie_word_embeddings=True, use_sliding_window=False)
        cls = Qwen2Config
    elif family == "qwen3":
        # head_dim wider than hidden_size / heads, as in the real Qwen3 sizes.
        common.update(head_dim=32, tie_word_embeddings=True, use_sliding_window=False)
        cls = Qwen3Config
    elif family == "phi3":
        # Phi-4-mini's shape: partial rotary, longrope switching to its long factors past 32 tokens, tied.
        rotary_half = int(64 // 4 * 0.75) // 2
        common.pop("rope_theta")
        common.update(tie_word_embeddings=True, original_max_position_embeddings=32, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0 + 0.1 * i for i in range(rotary_half)],
            "long_factor": [1.5 + 0.5 * i for i in range(rotary_half)],
        })
        cls = Phi3Config
    elif family == "gemma2":
        # Caps small enough to change the attention weights and the logprobs of random weights. Untied: with
        # tied random embeddings scaled by sqrt(hidden) a Gemma repeats its input token whatever the context.
        common.update(head_dim=16, query_pre_attn_scalar=24, sliding_window=GEMMA_WINDOW, tie_word_embeddings=False,
                      attn_logit_softcapping=5.0, final_logit_softcapping=5.0)
        cls = Gemma2Config
    elif family == "gemma3_text":
        # Both layer kinds, each with its own rope base and type.
        common.pop("rope_theta")
        common.update(num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=16, sliding_window=GEMMA_WINDOW,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                      tie_word_embeddings=False, rope_parameters={
                          "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                          "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
                      })
        cls = Gemma3TextConfig
    elif family == "qwen3_moe":
        # Layer 1 dense (mlp_only_layers), layers 0 and 2 sparse; the top 2 renormalised.
        common.update(num_hidden_layers=3, head_dim=32, tie_word_embeddings=False, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1])
        cls = Qwen3MoeConfig
    elif family == "qwen2_moe":
        # Layer 0 dense, layer 1 sparse (decoder_sparse_step 2); the top 2 not renormalised.
        common.update(tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, norm_topk_prob=False, decoder_sparse_step=2)
        cls = Qwen2MoeConfig
    elif family == "mixtral":
        common.update(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=MOE_WINDOW,
                      tie_word_embeddings=False)
        cls = MixtralConfig
    elif family == "gpt_oss":
        # A sliding layer, then a full one (layer_types' default); yarn rope (its default rope type).
        common.pop("rope_theta")
        common.update(head_dim=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                      sliding_window=MOE_WINDOW, tie_word_embeddings=False, rope_parameters={
                          "rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0, "beta_fast": 32.0,
                          "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64})
        cls = GptOssConfig
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES + MOE_FAMILIES}")
    common.update(overrides)
    return cls(**common)


def build_tiny_model(
    path: str | Path,
    family: str = "llama",
    seed: int = 0,
    max_shard_size: str | None = None,
    chat_template: bool = True,
    **config_overrides,
) -> Path:
    """Writes a random `family` model with its tokenizer to `path` and returns the path.

    `max_shard_size` (e.g. "100KB") writes sharded safetensors with an index; `chat_template=False`
    leaves the template out.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = model_config(family, len(tokenizer), **config_overrides)
    config.eos_token_id = eos_id
    config.pad_token_id = pad_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    tokenizer.save_pretrained(path)
    return path


def read_config(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def build_tiny_adapter(
    path: str | Path,
    base_model_dir: str | Path,
    rank: int = 8,
    alpha: float = 16,
    target_modules: list[str] | str = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    seed: int = 0,
    init_scale: float = 0.1,
    target_parameters: list[str] = (),
    use_dora: bool = False,
) -> Path:
    """Writes a PEFT LoRA adapter of the model at `base_model_dir` to `path` (peft's own save_pretrained:
    adapter_config.json + adapter_model.safetensors) and returns the path. lora_B is drawn at random
    (peft initialises it to zero) so that the adapter changes the model's outputs. `target_parameters`: tensors
    peft adapts directly (a mixture of experts' fused experts.gate_up_proj / experts.down_proj). `use_dora`: a
    DoRA adapter, its magnitude vectors moved off the base weights' norms (where peft starts them)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=use_rslora,
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_parameters=list(target_parameters) or None, use_dora=use_dora)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, init_scale)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + init_scale * torch.randn_like(param))
    model.save_pretrained(path)
    return path


LORA_TARGETS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_lora_adapter(path: str | Path, config: dict, rank: int, targets: list[str], seed: int, alpha: float = 8.0,
                       hidden_size: int | None = None, dtype=None) -> Path:
    """A PEFT LoRA dir of a Llama-style model (`config`: its config.json) written with safetensors directly,
    much faster than through peft, random weights in `dtype` (default float32); `hidden_size` overrides the
    model's, to break it."""
    import torch
    from safetensors.torch import save_file

    path, dtype = Path(path), dtype or torch.float32
    hidden = hidden_size or config["hidden_size"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    inter = config["intermediate_size"]
    dims = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for proj in targets:
            fan_in, fan_out = dims[proj]
            key = f"base_model.model.model.layers.{layer}.{LORA_TARGETS[proj]}.{proj}"
            a = (torch.rand(rank, fan_in, generator=g) * 2 - 1) / fan_in ** 0.5
            tensors[f"{key}.lora_A.weight"] = a.to(dtype)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=g) * 0.1).to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
    }))
    return path
