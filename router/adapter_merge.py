"""Merging LoRA adapters into one, as LoRAX's `merged_adapters` does: the tensors and the files.

LoRAX's rule: lora_A and lora_B are each combined tensor by tensor (not their products), every tensor over the
adapters that have it, with those adapters' weights:
- linear: the weighted sum;
- ties: each tensor pruned to its `density` share of largest magnitudes, the sign elected per element over the
  pruned tensors (`total`: the sign of their sum; `frequency`: the more frequent sign, ties positive), then the
  weighted tensors that agree with it averaged (divided by how many agree, at least one);
- dare_linear: each tensor's elements kept at random with probability `density` and the kept ones divided by it,
  then the weighted sum;
- dare_ties: that random pruning, then ties' sign election and disjoint mean.
DARE's draws come from one generator seeded with the recipe's `seed`, tensors taken in the order of their names,
and for each tensor the adapters in the recipe's order: a recipe always merges to the same adapter. Ranks must be
equal; the merged adapter takes the first adapter's lora_alpha and use_rslora (as LoRAX copies its config), and
targets the union of their modules.

The sources are files of adapters the shards already accepted; they are read again here, so bounds hold again:
each file must be a regular file inside the adapter's directory within MAX_SOURCE_BYTES (all of a recipe's weights
within MAX_RECIPE_BYTES, checked before any is read), the config a small JSON object, every tensor a lora_A /
lora_B matrix of the same shape in every adapter that has it. The merged adapter is written as a PEFT adapter
directory, which the shards then read and check like any other.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")
CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
MAX_CONFIG_BYTES = 1 << 20
MAX_SOURCE_BYTES = 1 << 30  # one adapter's weights file
MAX_RECIPE_BYTES = 2 << 30  # the weights files of one recipe together (held in memory while it merges)
# Config fields whose adapters hold more than lora_A / lora_B pairs of one rank: LoRAX's rule does not say how
# to merge them.
_UNMERGEABLE = ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "target_parameters",
                "trainable_token_indices", "lora_bias")


class MergeError(ValueError):
    """A recipe that cannot be merged; the message names the adapter (by the id the request used), `field` the
    recipe's field at fault."""

    def __init__(self, message: str, field: str = "ids"):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class Recipe:
    """What to merge and how (validated by the caller): `sources` are (id, directory) in the request's order."""

    sources: tuple[tuple[str, Path], ...]
    weights: tuple[float, ...]
    strategy: str
    density: float
    majority_sign_method: str
    seed: int
    scale: float = 1.0  # the merged update times this (lora_B scaled): a per-request adapter scale


def _regular_file(directory: Path, name: str, limit: int) -> Path | None:
    """`directory/name` when it is a regular file that really lies in `directory` (no link out) within `limit`
    bytes; None when absent."""
    path = directory / name
    if not os.path.lexists(path):
        return None
    real = Path(os.path.realpath(path))
    if real.parent != directory.resolve() or not real.is_file():
        raise MergeError(f"its {name} is not a regular file of its directory")
    if real.stat().st_size > limit:
        raise MergeError(f"its {name} is larger than {limit} bytes")
    return real


def _config(directory: Path) -> dict:
    path = _regular_file(directory, CONFIG_FILE, MAX_CONFIG_BYTES)
    try:
        config = json.loads(path.read_bytes()) if path else None
    except (OSError, ValueError, RecursionError):
        config = None
    if not isinstance(config, dict):
        raise MergeError(f"its {CONFIG_FILE} is not a JSON object")
    for key in _UNMERGEABLE:
        if config.get(key):
            raise MergeError(f"it sets {key}, which merging does not support")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise MergeError(f"its {CONFIG_FILE} has no positive integer r")
    return config


def _weights_file(directory: Path) -> Path:
    path = _regular_file(directory, SAFETENSORS_FILE, MAX_SOURCE_BYTES) or \
        _regular_file(directory, BIN_FILE, MAX_SOURCE_BYTES)
    if path is None:
        raise MergeError("it has no weights file")
    return path


def _tensors(path: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    try:
        if path.name == SAFETENSORS_FILE:
            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or truncated file, named without its content
        raise MergeError(f"its weights cannot be read ({type(e).__name__})") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise MergeError("its weights file does not hold a dict of tensors")
    for key, tensor in tensors.items():
        if not key.endswith((".lora_A.weight", ".lora_B.weight")) or tensor.dim() != 2:
            raise MergeError("it holds tensors other than lora_A / lora_B matrices, which merging does not support")
    return tensors


# ---- LoRAX's strategies, one tensor at a time --------------------------------------------------------------


def _magnitude_prune(t, density: float):
    import torch

    if density >= 1:
        return t
    flat = t.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[flat.abs().topk(int(density * flat.numel())).indices] = 1
    return t * keep.view(t.shape)


def _random_prune(t, density: float, generator):
    import torch

    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density


def _disjoint_mean(stacked, weights, method: str):
    """TIES' sign election over the (pruned, unweighted) stack, then the mean of the weighted values that agree."""
    import torch

    sign = stacked.sign()
    votes = stacked.sum(0) if method == "total" else sign.sum(0)
    agree = sign == torch.where(votes >= 0, 1.0, -1.0)
    weighted = stacked * weights.view(-1, *[1] * (stacked.dim() - 1))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def merge_tensor(tensors: list, weights: list[float], strategy: str, density: float, method: str, generator):
    """One tensor of the merged adapter from the same tensor of the adapters that have it (float32)."""
    import torch

    w = torch.tensor(weights, dtype=torch.float32)
    if strategy in ("ties", "dare_ties"):
        prune = (lambda t: _magnitude_prune(t, density)) if strategy == "ties" else \
            (lambda t: _random_prune(t, density, generator))
        return _disjoint_mean(torch.stack([prune(t) for t in tensors]), w, method)
    if strategy == "dare_linear":
        tensors = [_random_prune(t, density, generator) for t in tensors]
    return sum(wi * t for wi, t in zip(weights, tensors))


# ---- whole adapters ------------------------------------------------------------------------------------------


def merge_adapters(recipe: Recipe, out_dir: Path) -> None:
    """Writes the merged adapter of `recipe` into `out_dir` (created) as a PEFT adapter directory. Raises MergeError
    naming the adapter at fault."""
    import torch
    from safetensors.torch import save_file

    configs, files, sources = [], [], []
    for adapter_id, directory in recipe.sources:
        try:
            configs.append(_config(directory))
            files.append(_weights_file(directory))
        except MergeError as e:
            raise MergeError(f"adapter '{adapter_id}' cannot be merged: {e}") from None
    if sum(f.stat().st_size for f in files) > MAX_RECIPE_BYTES:
        raise MergeError(f"the adapters' weights files together are larger than {MAX_RECIPE_BYTES} bytes")
    for (adapter_id, _), file in zip(recipe.sources, files):
        try:
            sources.append({k: t.float() for k, t in _tensors(file).items()})
        except MergeError as e:
            raise MergeError(f"adapter '{adapter_id}' cannot be merged: {e}") from None
    ranks = {c["r"] for c in configs}
    if len(ranks) > 1:
        shown = ", ".join(f"'{a}' has rank {c['r']}" for (a, _), c in zip(recipe.sources, configs))
        raise MergeError(f"merging needs adapters of one rank: {shown}")
    generator = torch.Generator().manual_seed(recipe.seed)
    merged = {}
    for key in sorted(set().union(*sources)):
        having = [i for i, s in enumerate(sources) if key in s]
        tensors = [sources[i][key] for i in having]
        odd = next((i for i in having if sources[i][key].shape != tensors[0].shape), None)
        if odd is not None:
            raise MergeError(f"adapters '{recipe.sources[having[0]][0]}' and '{recipe.sources[odd][0]}' differ in "
                             "tensor shapes: they are not adapters of one base model")
        tensor = merge_tensor(tensors, [recipe.weights[i] for i in having], recipe.strategy, recipe.density,
                              recipe.majority_sign_method, generator)
        merged[key] = (tensor * recipe.scale if key.endswith(".lora_B.weight") else tensor).contiguous()
    if not all(bool(torch.isfinite(t).all()) for t in merged.values()):
        raise MergeError("the merged weights are not finite", "weights")
    first = configs[0]
    alpha = first.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise MergeError(f"adapter '{recipe.sources[0][0]}' has a lora_alpha that is not a finite number")
    modules = sorted({k.rsplit(".", 3)[-3] for k in merged})
    config = {"peft_type": "LORA", "r": first["r"], "lora_alpha": alpha,
              "use_rslora": first.get("use_rslora") is True, "target_modules": modules, "bias": "none",
              "lora_dropout": 0.0, "task_type": "CAUSAL_LM", "fan_in_fan_out": False}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out_dir / SAFETENSORS_FILE))
    (out_dir / CONFIG_FILE).write_text(json.dumps(config))
