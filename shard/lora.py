"""LoRA adapters: the PEFT on-disk format and the page layout they are stored in (batched compute:
shard/lora_batch.py).

A page holds `page_rank` rank-rows of every target projection of every layer: rows of lora_A ([rank, in])
and of lora_B transposed with the scaling folded in ([rank, out]), each cut to this rank's tensor-parallel
slice. An adapter of rank r fills ceil(r / page_rank) pages; rows past r and projections it does not target
stay zero, so they add nothing.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

# The projections PEFT targets on Llama-style families; each family declares its own (shard/models/).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Modules PEFT could target that Loom does not serve adapters on.
_UNSUPPORTED_PATHS = ("lm_head", "model.embed_tokens", "model.norm")
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")
CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterError(ValueError):
    pass


# ---- base model shapes and the page layout ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProjShape:
    """Full in/out features of a projection and this rank's slice of each (start, size)."""

    in_features: int
    out_features: int
    in_start: int
    in_size: int
    out_start: int
    out_size: int
    parent: str = ""  # the module holding it inside a layer: self_attn or mlp
    # A fused target (Phi-3's qkv_proj) keeps several runs of lora_B's rows on a rank, (start, size) each,
    # concatenated; empty: the one run (out_start, out_size).
    out_runs: tuple[tuple[int, int], ...] = ()

    def out_rows(self) -> tuple[tuple[int, int], ...]:
        return self.out_runs or ((self.out_start, self.out_size),)


def projection_shapes(model) -> dict[str, ProjShape]:
    """Every LoRA target of the model's family, read off its parallel layers so LoRA slices exactly like the
    base weights."""
    return model.lora_shapes()


@dataclass(slots=True)
class PageLayout:
    """Where each (layer, projection) lives inside a page: A rows at a_offset, B^T rows at b_offset."""

    num_layers: int
    page_rank: int
    shapes: dict[str, ProjShape]
    offsets: dict[tuple[int, str], tuple[int, int]]
    page_numel: int

    @classmethod
    def build(cls, num_layers: int, page_rank: int, shapes: dict[str, ProjShape]) -> PageLayout:
        offsets, pos = {}, 0
        for layer in range(num_layers):
            for proj, s in shapes.items():
                offsets[layer, proj] = (pos, pos + page_rank * s.in_size)
                pos += page_rank * (s.in_size + s.out_size)
        return cls(num_layers, page_rank, shapes, offsets, pos)

    def pages_for(self, rank: int) -> int:
        return math.ceil(rank / self.page_rank)

    def rows_numel(self, width_pages: int, targets) -> int:
        """Elements one adapter's rows take densely (A and B^T of every layer) for `targets`, padded to
        `width_pages` pages of rank: the unit AdapterStacks budgets in."""
        per_layer = sum(self.shapes[p].in_size + self.shapes[p].out_size for p in targets)
        return width_pages * self.page_rank * per_layer * self.num_layers

    def views(self, pages: torch.Tensor) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Per layer and projection, ([n, page_rank, in], [n, page_rank, out]) views of `pages` [n, page_numel]."""
        n, pr = pages.shape[0], self.page_rank
        out = []
        for layer in range(self.num_layers):
            per_proj = {}
            for proj, s in self.shapes.items():
                a, b = self.offsets[layer, proj]
                per_proj[proj] = (pages[:, a:a + pr * s.in_size].view(n, pr, s.in_size),
                                  pages[:, b:b + pr * s.out_size].view(n, pr, s.out_size))
            out.append(per_proj)
        return out


# ---- the PEFT format ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class HostAdapter:
    """An adapter laid out as pages in host memory, ready to copy into the device pool."""

    rank: int
    targets: frozenset[str]
    pages: torch.Tensor  # [ceil(rank / page_rank), page_numel]


def _pattern_value(patterns: dict, module_path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path's dotted suffix."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return value
    return default


def _check_targets(name: str, target_modules, layout: PageLayout) -> None:
    supported = ", ".join(layout.shapes)
    paths = [f"model.layers.{i}.{s.parent}.{p}" for i in range(layout.num_layers) for p, s in layout.shapes.items()]
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return
        hit = [p for p in _UNSUPPORTED_PATHS if re.fullmatch(target_modules, p)]
        if hit:
            raise AdapterError(f"adapter {name}: unsupported target module {hit[0]!r} "
                               f"(supported: {supported})")
        if not any(re.fullmatch(target_modules, p) for p in paths):
            raise AdapterError(f"adapter {name}: target_modules {target_modules!r} matches no supported target "
                               f"({supported})")
        return
    for target in target_modules or []:
        if target.rpartition(".")[2] not in layout.shapes:
            raise AdapterError(f"adapter {name}: unsupported target module {target!r} "
                               f"(supported: {supported})")
    if not target_modules:
        raise AdapterError(f"adapter {name}: target_modules is empty")


def _read_config(name: str, path: Path, layout: PageLayout) -> dict:
    if not path.is_dir():
        raise AdapterError(f"adapter {name}: {path} is not a directory")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"adapter {name}: {config_path} is missing")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {name}: {config_path} is not valid JSON: {e}") from e
    checks = [
        (config.get("peft_type", "LORA") == "LORA", f"peft_type {config.get('peft_type')!r} is not LORA"),
        (not config.get("fan_in_fan_out", False), "fan_in_fan_out adapters are not supported"),
        (config.get("bias", "none") == "none", f"bias {config.get('bias')!r} is not supported (only 'none')"),
        (not config.get("use_dora", False), "DoRA adapters are not supported"),
        (not config.get("modules_to_save"), "modules_to_save is not supported"),
        (not config.get("lora_bias", False), "lora_bias is not supported"),
        (not config.get("target_parameters"), "target_parameters is not supported"),
        (isinstance(config.get("r"), int) and config["r"] > 0, f"r must be a positive integer, got {config.get('r')!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise AdapterError(f"adapter {name}: {config_path.name}: {message}")
    _check_targets(name, config.get("target_modules"), layout)
    return config


def _read_tensors(name: str, path: Path, layout: PageLayout) -> dict[tuple[int, str, str], torch.Tensor]:
    """(layer, proj, "A"|"B") -> this rank's slice, checking every tensor's full shape against the model."""
    files = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
    if not files:
        raise AdapterError(f"adapter {name}: no weights in {path} (expected {' or '.join(WEIGHT_FILES)})")
    file = files[0]
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as f:
                sources = {key: f.get_slice(key) for key in f.keys()}
                return _slice_all(name, file, sources, layout)
        state = torch.load(file, map_location="cpu", weights_only=True)
        return _slice_all(name, file, state, layout)
    except AdapterError:
        raise
    except Exception as e:  # a corrupt or truncated file: report it as this adapter's error
        raise AdapterError(f"adapter {name}: cannot read {file}: {e}") from e


def _slice_all(name: str, file: Path, sources: dict, layout: PageLayout) -> dict:
    tensors = {}
    for key, src in sources.items():
        m = _KEY.fullmatch(key)
        if m is None or m[3] not in layout.shapes or layout.shapes[m[3]].parent != m[2]:
            raise AdapterError(f"adapter {name}: {file.name}: tensor {key!r} is on an unsupported target module "
                               f"(supported: {', '.join(layout.shapes)})")
        layer, proj, ab = int(m[1]), m[3], m[4]
        if layer >= layout.num_layers:
            raise AdapterError(f"adapter {name}: {file.name}: tensor {key!r} names layer {layer}, the base model "
                               f"has {layout.num_layers}")
        s = layout.shapes[proj]
        shape = list(src.get_shape() if hasattr(src, "get_shape") else src.shape)
        if len(shape) != 2 or shape[1 if ab == "A" else 0] != (s.in_features if ab == "A" else s.out_features):
            needed = ["r", s.in_features] if ab == "A" else [s.out_features, "r"]
            raise AdapterError(f"adapter {name}: lora_{ab} of layers.{layer}.{s.parent}.{proj} has shape "
                               f"{shape}, the base model needs [{', '.join(map(str, needed))}]")
        if ab == "A":  # row-parallel targets split A's input features
            tensors[layer, proj, ab] = src[:, s.in_start:s.in_start + s.in_size]
        else:  # column-parallel targets split B's output features (a fused target: each of its parts)
            runs = [src[start:start + size, :] for start, size in s.out_rows()]
            tensors[layer, proj, ab] = runs[0] if len(runs) == 1 else torch.cat(runs)
    return tensors


def load_adapter(name: str, path: str | Path, layout: PageLayout, dtype: torch.dtype,
                 pin_memory: bool = False) -> HostAdapter:
    """Reads and checks a PEFT LoRA adapter dir and lays it out as pages; raises AdapterError naming the
    file or tensor that is wrong."""
    path = Path(path)
    config = _read_config(name, path, layout)
    tensors = _read_tensors(name, path, layout)
    modules = sorted({(layer, proj) for layer, proj, _ in tensors})
    if not modules:
        raise AdapterError(f"adapter {name}: no LoRA tensors on a supported target module in {path}")
    ranks = {}
    for layer, proj in modules:
        a, b = tensors.get((layer, proj, "A")), tensors.get((layer, proj, "B"))
        where = f"layers.{layer}.{layout.shapes[proj].parent}.{proj}"
        if a is None or b is None:
            raise AdapterError(f"adapter {name}: {where} has lora_{'A' if a is None else 'B'} missing")
        r = _pattern_value(config.get("rank_pattern") or {}, f"model.{where}", config["r"])
        if a.shape[0] != r or b.shape[1] != r:
            raise AdapterError(f"adapter {name}: {where} has rank {a.shape[0]} (lora_A) / {b.shape[1]} (lora_B), "
                               f"adapter_config.json says {r}")
        ranks[layer, proj] = r
    rank = max(ranks.values())
    pages = torch.zeros(layout.pages_for(rank), layout.page_numel, dtype=dtype)
    num_rows = pages.shape[0] * layout.page_rank
    views = layout.views(pages)
    for (layer, proj), r in ranks.items():
        where = f"model.layers.{layer}.{layout.shapes[proj].parent}.{proj}"
        alpha = _pattern_value(config.get("alpha_pattern") or {}, where, config.get("lora_alpha", 8))
        scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        for view, rows in zip(views[layer][proj], (tensors[layer, proj, "A"].float(),
                                                   tensors[layer, proj, "B"].float().t() * scale)):
            padded = rows.new_zeros(num_rows, rows.shape[1])
            padded[:r] = rows
            view.copy_(padded.view(view.shape))
    targets = frozenset(proj for _, proj in modules)
    return HostAdapter(rank, targets, pages.pin_memory() if pin_memory else pages)
