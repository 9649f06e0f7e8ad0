"""Checkpoints of both eras: rewrites a model or adapter dir saved by the installed transformers/peft into
the form older releases wrote, and the current-era variants users meet.

The legacy form is what transformers 4.44 / tokenizers 0.19 / peft 0.10 saved:

- config.json: top-level `rope_theta` and `rope_scaling` (the oldest types keyed `type`, newer `rope_type`;
  longrope's `original_max_position_embeddings` beside it, as Phi-3 wrote it), `torch_dtype`, no
  `layer_types`, no `head_dim` where it is hidden_size / num_attention_heads, and Qwen2's unused
  `sliding_window` value kept next to `use_sliding_window: false`;
- tokenizer_config.json naming a fast tokenizer class, with `added_tokens_decoder` and the chat template
  inside it (no chat_template.jinja), plus special_tokens_map.json;
- tokenizer.json with merges as "a b" strings, no `ignore_merges`, a ByteLevel post-processor;
- adapter_config.json with only the fields peft 0.10 knew.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

LEGACY_TRANSFORMERS_VERSION = "4.44.0"
# Rope types that releases before the `rope_type` key wrote as {"type": ...}.
OLDEST_ROPE_TYPES = ("linear", "dynamic")
# Every LoraConfig field peft 0.10 wrote; newer fields (lora_bias, eva_config, ...) did not exist.
PEFT_0_10_ADAPTER_KEYS = frozenset({
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config",
    "lora_alpha", "lora_dropout", "megatron_config", "megatron_core", "modules_to_save", "peft_type", "r",
    "rank_pattern", "revision", "target_modules", "task_type", "use_dora", "use_rslora",
})
LEGACY_QWEN2_UNUSED_WINDOW = 4096


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- model config -----------------------------------------------------------------------------------


def legacy_config(config: dict) -> dict:
    """config.json of the current era -> the same model as transformers 4.44 wrote it."""
    config = dict(config)
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type", "default")
    if rope_type == "default":
        config["rope_scaling"] = None
    else:
        if rope_type == "longrope":
            config["original_max_position_embeddings"] = rope.pop("original_max_position_embeddings")
        key = "type" if rope_type in OLDEST_ROPE_TYPES else "rope_type"
        config["rope_scaling"] = {key: rope_type, **rope}
    config["torch_dtype"] = config.pop("dtype", "float32")
    config.pop("layer_types", None)
    if config.get("head_dim") == config["hidden_size"] // config["num_attention_heads"]:
        del config["head_dim"]
    if config["model_type"] == "qwen2" and not config.get("use_sliding_window"):
        config["sliding_window"] = LEGACY_QWEN2_UNUSED_WINDOW  # written, and ignored, by old releases
    config["transformers_version"] = LEGACY_TRANSFORMERS_VERSION
    return config


# ---- tokenizer --------------------------------------------------------------------------------------


def legacy_tokenizer_json(tokenizer: dict) -> dict:
    model = dict(tokenizer["model"])
    model["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    model.pop("ignore_merges", None)
    post = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    return {**tokenizer, "model": model, "post_processor": post}


def legacy_tokenizer_config(model_dir: Path, tokenizer_class: str) -> dict:
    current = _read(model_dir / "tokenizer_config.json")
    added = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in _read(model_dir / "tokenizer.json")["added_tokens"]
    }
    config = {
        "added_tokens_decoder": added,
        "bos_token": None,
        "clean_up_tokenization_spaces": current.get("clean_up_tokenization_spaces", False),
        "eos_token": current["eos_token"],
        "model_max_length": current["model_max_length"],
        "pad_token": current.get("pad_token"),
        "tokenizer_class": tokenizer_class,
    }
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        config["chat_template"] = jinja.read_text(encoding="utf-8")
    if tokenizer_class.startswith("Llama"):  # what LlamaTokenizerFast added to its config
        config.update(add_bos_token=False, add_eos_token=False, legacy=False, use_default_system_prompt=False)
    return config


def to_legacy_tokenizer(model_dir: Path, tokenizer_class: str = "PreTrainedTokenizerFast") -> Path:
    """Rewrites the tokenizer files in `model_dir` (a model or an adapter dir) in the legacy form."""
    config = legacy_tokenizer_config(model_dir, tokenizer_class)
    _write(model_dir / "tokenizer.json", legacy_tokenizer_json(_read(model_dir / "tokenizer.json")))
    _write(model_dir / "tokenizer_config.json", config)
    special = {name: {"content": config[name], "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False} for name in ("eos_token", "pad_token") if config.get(name)}
    _write(model_dir / "special_tokens_map.json", special)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    return model_dir


def set_tokenizer_class(model_dir: Path, tokenizer_class: str) -> Path:
    """A current-era tokenizer_config.json that names `tokenizer_class` (e.g. a model-specific one)."""
    path = model_dir / "tokenizer_config.json"
    _write(path, {**_read(path), "tokenizer_class": tokenizer_class})
    return model_dir


# ---- whole model dirs -------------------------------------------------------------------------------


def to_legacy_model(model_dir: Path, tokenizer_class: str = "PreTrainedTokenizerFast") -> Path:
    """Rewrites a model dir saved by the installed transformers into the legacy form, in place."""
    _write(model_dir / "config.json", legacy_config(_read(model_dir / "config.json")))
    generation = _read(model_dir / "generation_config.json")
    _write(model_dir / "generation_config.json",
           {"_from_model_config": True, **generation, "transformers_version": LEGACY_TRANSFORMERS_VERSION})
    return to_legacy_tokenizer(model_dir, tokenizer_class)


def set_generation_eos(model_dir: Path, eos_token_ids: list[int]) -> Path:
    """generation_config.json with several eos ids (a list), as instruct checkpoints ship it."""
    path = model_dir / "generation_config.json"
    _write(path, {**_read(path), "eos_token_id": list(eos_token_ids)})
    return model_dir


# ---- adapters ---------------------------------------------------------------------------------------


def to_legacy_adapter(adapter_dir: Path) -> Path:
    """Strips adapter_config.json to the fields peft 0.10 wrote, in place."""
    path = adapter_dir / "adapter_config.json"
    config = _read(path)
    _write(path, {k: v for k, v in config.items() if k in PEFT_0_10_ADAPTER_KEYS})
    return adapter_dir
