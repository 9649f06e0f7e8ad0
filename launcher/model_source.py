"""Turns `--model-id` into a local model directory: the embedded demo model, a local dir, a GGUF file
(converted once into the user cache) or a hub snapshot."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common.cache import cache_root
from common.hub import HubError, snapshot, split_revision
from launcher import gguf

DEMO_MODEL_ID = "demo"
# Bump the suffix whenever DEMO_CONFIG changes so that caches built by older versions are not reused.
DEMO_DIR_NAME = "demo-llama-v1"
# A little bigger than the test models, still built in a few seconds.
DEMO_CONFIG = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=4096,
)
# `--model-id demo-moe`: a Qwen3-MoE of about the demo model's active size, 8 experts of which a token takes 2.
DEMO_MOE_MODEL_ID = "demo-moe"
DEMO_MOE_DIR_NAME = "demo-qwen3-moe-v1"
DEMO_MOE_CONFIG = dict(DEMO_CONFIG, intermediate_size=688, moe_intermediate_size=344, num_experts=8,
                       num_experts_per_tok=2, head_dim=32, mlp_only_layers=[])
# (model_type, quant_method) of quantized checkpoints the shards dequantize exactly on load.
DEQUANTIZED_ON_LOAD = {("gpt_oss", "mxfp4")}
# Everything the router and shards read; skips pickled *.bin / *.pt weights and other large extras.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


class ModelSourceError(Exception):
    """The model cannot be resolved; the message is the one line the user sees."""


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    path: Path  # local directory with config.json, the tokenizer and safetensors weights
    name: str  # the id the base model is served under


def resolve_model(model_id: str | None) -> ResolvedModel:
    """The base model is served under `model_id` as given (a hub id without its @revision)."""
    if model_id is None:
        return ResolvedModel(ensure_demo_model(), DEMO_MODEL_ID)
    path = Path(model_id).expanduser()
    if path.is_file():
        if not gguf.is_gguf(path):
            raise ModelSourceError(f"model {model_id!r} is a file, but not a .gguf; give its directory instead")
        return ResolvedModel(convert_gguf(path.resolve()), model_id)
    if path.is_dir():
        lone = lone_gguf(path)
        model_dir = convert_gguf(lone.resolve()) if lone else check_model_dir(path.resolve(), model_id)
        return ResolvedModel(model_dir, model_id)
    if model_id == DEMO_MOE_MODEL_ID:
        return ResolvedModel(ensure_demo_model(moe=True), DEMO_MOE_MODEL_ID)
    if gguf.is_gguf(path):
        raise ModelSourceError(f"model file {model_id!r} does not exist")
    if model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1:
        raise ModelSourceError(f"model directory {model_id!r} does not exist")
    repo_id, revision = split_revision(model_id)
    return ResolvedModel(check_model_dir(download(repo_id, revision), model_id), repo_id)


def check_model_dir(path: Path, model_id: str) -> Path:
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"model {model_id!r}: {path} has no config.json (nor a single .gguf file)")
    if not any(path.glob("*.safetensors")):
        raise ModelSourceError(f"model {model_id!r}: {path} has no *.safetensors weights "
                               "(Loom loads safetensors, or a .gguf file)")
    config = json.loads((path / "config.json").read_text())
    check_served(config.get("model_type"), model_id)
    quantization = config.get("quantization_config")
    method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
    if quantization is not None and (config.get("model_type"), method) not in DEQUANTIZED_ON_LOAD:
        # Quantized tensors loaded as dense weights would compute garbage; refuse instead of guessing.
        raise ModelSourceError(f"model {model_id!r}: config.json has quantization_config (quant_method {method!r}); "
                               "Loom serves unquantized safetensors, gpt-oss' MXFP4 experts or GGUF files (the "
                               "last two dequantized on load)")
    return path


def check_served(model_type: object, model_id: str) -> None:
    """A model of a type no family serves fails here, in one line, before any shard starts."""
    from shard.models import check_model_type

    try:
        check_model_type(str(model_type))
    except ValueError as e:
        raise ModelSourceError(f"model {model_id!r}: {e}") from None


def lone_gguf(path: Path) -> Path | None:
    """The .gguf file a directory holds in place of a model (no config.json, no safetensors), if just one."""
    if (path / "config.json").exists() or any(path.glob("*.safetensors")):
        return None
    files = sorted(p for p in path.iterdir() if p.is_file() and gguf.is_gguf(p))
    if len(files) > 1:
        raise ModelSourceError(f"model directory {str(path)!r} holds {len(files)} .gguf files "
                               f"({', '.join(p.name for p in files)}); give one of them as --model-id")
    return files[0] if files else None


def max_position_embeddings(model_dir: Path) -> int | None:
    """The model's context length from config.json, under the names the common families use."""
    config = json.loads((model_dir / "config.json").read_text())
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


# ---- hub ---------------------------------------------------------------------------------------------


def download(repo_id: str, revision: str | None) -> Path:
    """A hub snapshot via huggingface_hub (HF_HOME, HF_TOKEN, HF_HUB_OFFLINE; its own progress bars)."""
    try:
        return snapshot(repo_id, revision, HUB_ALLOW_PATTERNS)
    except HubError as e:
        raise ModelSourceError(str(e)) from None


# ---- the user cache -----------------------------------------------------------------------------------


def cached_model_dir(target: Path, build: Callable[[Path], None], what: str) -> Path:
    """`target`, built once by `build(staging_dir)` and reused. A file lock keeps concurrent launches from
    building it twice, and the build happens in a temp dir renamed into place, so a crash never leaves half
    a model. A model dir is complete once its config.json is there."""
    from filelock import FileLock

    if (target / "config.json").is_file():
        return target
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(parent / f"{target.name}.lock")):
            if not (target / "config.json").is_file():
                for stale in parent.glob(f".{target.name}-*"):  # left behind by a build that was killed
                    shutil.rmtree(stale, ignore_errors=True)
                staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=parent))
                try:
                    build(staging)
                except BaseException:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
                staging.chmod(0o755)  # mkdtemp makes it private; the cache is the user's own, readable as usual
                os.rename(staging, target)
    except OSError as e:
        raise ModelSourceError(f"cannot build {what} in {parent}: {e}") from None
    return target


# ---- GGUF --------------------------------------------------------------------------------------------


def convert_gguf(gguf_file: Path) -> Path:
    """The safetensors model dir converted from `gguf_file`, made on first use under `<cache>/gguf/`."""
    target = cache_root() / "gguf" / gguf.cache_name(gguf_file)
    try:
        converted = cached_model_dir(target, lambda staging: gguf.convert(gguf_file, staging),
                                     f"the model converted from {gguf_file.name}")
    except gguf.GGUFError as e:
        raise ModelSourceError(str(e)) from None
    gguf.prune_superseded(converted)
    return converted


# ---- demo model --------------------------------------------------------------------------------------


def ensure_demo_model(moe: bool = False) -> Path:
    """The demo model (`moe`: its mixture-of-experts twin), built once into the user cache."""
    from launcher.tiny_model import build_tiny_model

    name, family, config = (DEMO_MOE_DIR_NAME, "qwen3_moe", DEMO_MOE_CONFIG) if moe else \
        (DEMO_DIR_NAME, "llama", DEMO_CONFIG)
    return cached_model_dir(cache_root() / name,
                            lambda staging: build_tiny_model(staging, family=family, seed=0, **config),
                            "the demo model")
