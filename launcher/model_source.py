"""Turns `--model-id` into a local model directory: the embedded demo model, a local dir, or a hub snapshot."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from launcher.hub import HubError, snapshot, split_revision

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
# Everything the router and shards read; skips pickled *.bin / *.pt weights and other large extras.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


class ModelSourceError(Exception):
    """The model cannot be resolved; the message is the one line the user sees."""


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    path: Path  # local directory with config.json, the tokenizer and safetensors weights
    name: str  # the id the base model is served under


def resolve_model(model_id: str | None) -> ResolvedModel:
    if model_id is None:
        return ResolvedModel(ensure_demo_model(), DEMO_MODEL_ID)
    path = Path(model_id).expanduser()
    if path.is_dir():
        return ResolvedModel(check_model_dir(path.resolve(), model_id), model_id)
    if model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1:
        raise ModelSourceError(f"model directory {model_id!r} does not exist")
    repo_id, revision = split_revision(model_id)
    return ResolvedModel(check_model_dir(download(repo_id, revision), model_id), repo_id)


def check_model_dir(path: Path, model_id: str) -> Path:
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"model {model_id!r}: {path} has no config.json")
    if not any(path.glob("*.safetensors")):
        raise ModelSourceError(f"model {model_id!r}: {path} has no *.safetensors weights (Loom loads safetensors only)")
    return path


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


# ---- demo model --------------------------------------------------------------------------------------


def cache_root() -> Path:
    if os.environ.get("LOOM_CACHE"):
        return Path(os.environ["LOOM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "loom"


def ensure_demo_model() -> Path:
    """Builds the demo model once and reuses it. A file lock keeps concurrent launches from building it
    twice, and the build happens in a temp dir renamed into place, so a crash never leaves half a model."""
    from filelock import FileLock

    root = cache_root()
    target = root / DEMO_DIR_NAME
    if (target / "config.json").is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / f"{DEMO_DIR_NAME}.lock")):
            if not (target / "config.json").is_file():
                build_demo_model(root, target)
    except OSError as e:
        raise ModelSourceError(f"cannot build the demo model in {root}: {e}") from None
    return target


def build_demo_model(root: Path, target: Path) -> None:
    from launcher.tiny_model import build_tiny_model

    for stale in root.glob(f".{DEMO_DIR_NAME}-*"):  # left behind by a build that was killed
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_DIR_NAME}-", dir=root))
    build_tiny_model(staging, family="llama", seed=0, **DEMO_CONFIG)
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is the user's own, readable as usual
    os.rename(staging, target)
