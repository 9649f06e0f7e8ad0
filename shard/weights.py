"""Loads Hugging Face safetensors checkpoints into a family's CausalLM, each rank reading only its own slices.

Checkpoint names are the model's parameter names, except the projections a family fuses on load (its
`packed_modules`: Llama's q/k/v_proj -> qkv_proj), names older releases wrote (its `checkpoint_renames`) and
mixture-of-experts checkpoints that store one module per expert instead of the fused 3-D tensors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from shard.models import CausalLM, model_class
from shard.models.base import apply_renames
from shard.models.moe import Experts


class CheckpointError(ValueError):
    pass


# Tensors some checkpoints carry that the model recomputes.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model dir: the shards named by model.safetensors.index.json, or the
    single model.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    else:
        files = [model_dir / "model.safetensors"]
    for path in files:
        if not path.exists():
            raise CheckpointError(f"checkpoint file {path} is missing (model dir {model_dir})")
    return files


def _target(name: str, packed: dict[str, tuple[str, tuple[str, ...]]]
            ) -> tuple[str, str, tuple[str, ...] | None]:
    """HF tensor name -> (our module path, parameter name, the parts of a fused module it fills; None: all)."""
    module, _, param = name.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    if leaf in packed:
        fused, parts = packed[leaf]
        return f"{parent}.{fused}", param, parts
    return module, param, None


def expected_tensors(model: CausalLM) -> set[str]:
    """The HF tensor names that fill every parameter of `model`."""
    unfused: dict[str, list[str]] = {}
    for hf_leaf, (fused, _) in model.packed_modules.items():
        unfused.setdefault(fused, []).append(hf_leaf)
    names = set()
    for full, _ in model.named_parameters(remove_duplicate=False):
        module, _, param = full.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        names.update(f"{parent}.{hf_leaf}.{param}" for hf_leaf in unfused.get(leaf, []))
        if leaf not in unfused:
            names.add(full)
    if model.config.tie_word_embeddings:
        names.discard("lm_head.weight")
    return names


def _open_checkpoint(path: Path):
    """safe_open, failing with the file's name: a truncated download or a damaged header fails here."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as e:
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated: {e}") from None


class _ExpertPieces:
    """The checkpoint tensors that each fill part of an expert parameter (one module per expert:
    `experts.N.gate_proj.weight`; MXFP4's blocks and scales): a parameter is there once all its pieces are, and a
    piece comes once."""

    def __init__(self, model: CausalLM):
        self.pieces: dict[str, tuple[str, str, tuple]] = {}  # name -> (module, parameter, the module's piece key)
        self.left: dict[str, int] = {}  # parameter's name -> pieces it still lacks
        for path, module in model.named_modules():
            if isinstance(module, Experts):
                for name, (param, piece) in module.checkpoint_pieces(path).items():
                    self.pieces[name] = (path, param, piece)
                    self.left[f"{path}.{param}"] = self.left.get(f"{path}.{param}", 0) + 1

    def __contains__(self, name: str) -> bool:
        return name in self.pieces

    def load(self, model: CausalLM, name: str, src, missing: set[str]) -> bool:
        """Loads `name` if it is a piece (False otherwise); discards its fused parameter from `missing` once
        complete."""
        piece = self.pieces.pop(name, None)
        if piece is None:
            return False
        path, param, key = piece
        fused = f"{path}.{param}"
        if fused not in missing:
            raise ValueError("the checkpoint holds these experts fused too")
        model.get_submodule(path).load_piece(param, key, src)
        self.left[fused] -= 1
        if not self.left[fused]:
            missing.discard(fused)
        return True


def load_weights(model: CausalLM, model_dir: str | Path) -> None:
    """Copies every checkpoint tensor into `model` (converting dtype); raises naming the file and tensor
    when a tensor is unknown or has the wrong shape, and naming the tensors the checkpoint lacks."""
    missing = expected_tensors(model)
    pieces = _ExpertPieces(model)
    tied = model.config.tie_word_embeddings
    for path in checkpoint_files(model_dir):
        with _open_checkpoint(path) as f:
            for original in f.keys():
                name = apply_renames(original, model.checkpoint_renames)
                if _IGNORED.match(name) or (tied and name == "lm_head.weight"):
                    continue
                if name not in missing and name not in pieces:
                    raise CheckpointError(f"{path.name}: tensor {original!r} is unknown to {model.config.model_type} "
                                          "or appears twice")
                src = f.get_slice(original)
                try:
                    if not pieces.load(model, name, src, missing):
                        module, param, parts = _target(name, model.packed_modules)
                        model.get_submodule(module).load(param, src, parts)
                except ValueError as e:
                    raise CheckpointError(f"{path.name}: tensor {original!r}: {e}") from e
                missing.discard(name)
    if missing:
        raise CheckpointError(f"checkpoint {model_dir} lacks tensors: {', '.join(sorted(missing))}")


def load_model(config, model_dir: str | Path, dtype: torch.dtype, device: torch.device | str,
               tp_rank: int = 0, tp_size: int = 1) -> CausalLM:
    model = model_class(config)(config, dtype, device, tp_rank, tp_size)
    load_weights(model, model_dir)
    return model.eval()
