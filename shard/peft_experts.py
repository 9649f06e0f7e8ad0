"""Reading the expert tensors of a PEFT LoRA adapter into expert pages (their layout: shard/expert_lora.py).

PEFT writes LoRA on experts in two forms:
- `target_parameters` on the fused tensors (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`; peft's own form
  for transformers 5): one lora_A [r * E, in] (expert-major rows) and lora_B [out, r * E] (rank-major columns:
  expert e's column j is j * E + e) per tensor. Both tensors of one module wrap it in turn, so their keys say
  neither: `experts.lora_A` is the last targeted one in the module's parameter order (gate_up_proj, down_proj),
  `experts.base_layer.lora_A` the one before, and so on.
- one module per expert (`mlp.experts.N.gate_proj`, Mixtral's w1/w3/w2), what adapters of transformers 4 models
  hold. peft converts them on load into the first form, gate and up stacked along the rank with a block-diagonal
  B; that is what they are laid out as here (gate rows first).
The caller (shard/peft_adapter.py) owns the config, the patterns and the checks every adapter tensor gets; this
module plans and lays out the expert ones with what it is given.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shard.expert_lora import ExpertLayout
from shard.lora import AdapterError

PARAM_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.mlp\.experts\.((?:base_layer\.)*)lora_([AB])\.weight")
MODULE_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.lora_([AB])\.weight")
TARGET_PARAMETERS = ("gate_up_proj", "down_proj")  # the experts module's tensors, in its parameter order

# (field, module path, default) -> the rank_pattern / alpha_pattern value for that path.
Lookup = Callable[[str, str, object], object]
# (where, scale, lora_A rows [r, in], lora_B rows [out, r]) -> (A, scale * B^T) as the pool stores them.
Fold = Callable[[str, float, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(slots=True)
class _Part:
    """One A/B pair feeding a (layer, target): of every expert (`expert` None, target_parameters) or of one."""

    a_key: str
    b_key: str
    rank: int
    scale: float
    expert: int | None = None
    piece: str = ""  # a per-expert module's part of gate_up ("gate" or "up"); "" = the whole target
    rank_offset: int = 0  # where its rows start among the target's ranks


@dataclass(slots=True)
class ExpertTarget:
    layer: int
    target: str  # gate_up_proj or down_proj
    parts: list[_Part] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return max(p.rank_offset + p.rank for p in self.parts)


def is_expert_key(key: str) -> bool:
    return PARAM_KEY.fullmatch(key) is not None or MODULE_KEY.fullmatch(key) is not None


def targeted(layer: int, target_parameters: list[str]) -> list[str]:
    """The experts' tensors of `layer` that `target_parameters` names, in wrapping order (PEFT's suffix match)."""
    return [p for p in TARGET_PARAMETERS
            if any(f"model.layers.{layer}.mlp.experts.{p}" == t or f"model.layers.{layer}.mlp.experts.{p}".endswith(
                "." + t) for t in target_parameters)]


def plan(name: str, file: str, shapes: dict[str, list[int]], layout: ExpertLayout, config: dict,
         lookup: Lookup) -> list[ExpertTarget]:
    """Every expert target's tensors, ranks and scales from the tensors' names and shapes alone."""
    found: dict[tuple[int, str], ExpertTarget] = {}
    pairs: dict[tuple[int, str, int | None, str], dict[str, str]] = {}
    for key in shapes:
        if m := PARAM_KEY.fullmatch(key):
            layer, depth, ab = int(m[1]), m[2].count("base_layer."), m[3]
            wrapped = targeted(layer, config.get("target_parameters") or [])
            if depth >= len(wrapped):
                raise AdapterError(f"adapter {name}: {file}: layers.{layer}.mlp.experts has a LoRA tensor that "
                                   "target_parameters does not name")
            pairs.setdefault((layer, wrapped[len(wrapped) - 1 - depth], None, ""), {})[ab] = key
        elif m := MODULE_KEY.fullmatch(key):
            layer, expert, module, ab = int(m[1]), int(m[2]), m[3], m[4]
            if module not in layout.modules or expert >= layout.num_experts:
                raise AdapterError(f"adapter {name}: {file}: layers.{layer}.mlp.experts.{expert}.{module} is not an "
                                   f"expert projection of the base model ({layout.num_experts} experts of "
                                   f"{', '.join(layout.modules)})")
            target, piece = layout.modules[module]
            pairs.setdefault((layer, target, expert, module), {})[ab] = key
    for (layer, target, expert, module), keys in sorted(pairs.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                        kv[0][2] or 0, kv[0][3])):
        if layer not in layout.layers:
            raise AdapterError(f"adapter {name}: {file}: layer {layer} has no experts in the base model")
        where = f"layers.{layer}.mlp.experts." + (target if expert is None else f"{expert}.{module}")
        if set(keys) != {"A", "B"}:
            raise AdapterError(f"adapter {name}: {where} has lora_{'B' if 'A' in keys else 'A'} missing")
        part = _check_part(name, where, shapes, keys, layout, target, expert, module, config, lookup)
        found.setdefault((layer, target), ExpertTarget(layer, target)).parts.append(part)
    for t in found.values():  # gate rows before up rows, per expert
        for p in t.parts:
            if p.piece == "up":
                p.rank_offset = max((q.rank for q in t.parts if q.expert == p.expert and q.piece == "gate"), default=0)
    return list(found.values())


def _check_part(name: str, where: str, shapes: dict[str, list[int]], keys: dict[str, str], layout: ExpertLayout,
                target: str, expert: int | None, module: str, config: dict, lookup: Lookup) -> _Part:
    s, experts = layout.shapes[target], layout.num_experts
    piece = "" if expert is None else layout.modules[module][1]
    out = s.out_features // 2 if piece in ("gate", "up") else s.out_features
    path = f"model.{where}"
    r = lookup("rank_pattern", path, config["r"])
    a_rows, b_cols = (r, r) if expert is not None else (r * experts, r * experts)
    if shapes[keys["A"]] != [a_rows, s.in_features] or shapes[keys["B"]] != [out, b_cols]:
        raise AdapterError(f"adapter {name}: {where} has lora_A {shapes[keys['A']]} and lora_B {shapes[keys['B']]}, "
                           f"the base model and rank {r} need [{a_rows}, {s.in_features}] and [{out}, {b_cols}]")
    alpha = lookup("alpha_pattern", path, config.get("lora_alpha", 8))
    scale = alpha / (r ** 0.5 if config.get("use_rslora") else r)
    return _Part(keys["A"], keys["B"], r, scale, expert, piece)


def pages_for(layout: ExpertLayout, targets: list[ExpertTarget]) -> int:
    return layout.pages_for(max(t.rank for t in targets)) if targets else 0


def lay_out(name: str, layout: ExpertLayout, targets: list[ExpertTarget], page_numel: int,
            read: Callable[[str], object], fold: Fold, dtype: torch.dtype) -> torch.Tensor:
    """The adapter's expert pages [pages_for(...), page_numel]."""
    pages = torch.zeros(pages_for(layout, targets), page_numel, dtype=dtype)
    for t in targets:
        s = layout.shapes[t.target]
        a = torch.zeros(layout.num_experts, t.rank, s.in_size, dtype=dtype)
        bt = torch.zeros(layout.num_experts, t.rank, s.out_size, dtype=dtype)
        for part in t.parts:
            _fill(layout, t, part, read, fold, a, bt)
        layout.write(pages, t.layer, t.target, a, bt)
    return pages


def _fill(layout: ExpertLayout, t: ExpertTarget, part: _Part, read: Callable[[str], object], fold: Fold,
          a: torch.Tensor, bt: torch.Tensor) -> None:
    """Folds one part's rows of every expert it covers into a [E, R, in] and bt [E, R, out]."""
    s, n_experts = layout.shapes[t.target], layout.num_experts
    a_all, b_all = read(part.a_key)[:], read(part.b_key)[:]
    if part.expert is None:
        experts = range(n_experts)
        a_rows = a_all.reshape(n_experts, part.rank, -1)
        b_rows = b_all.reshape(b_all.shape[0], part.rank, n_experts).permute(2, 0, 1)  # [E, out, r]
    else:
        experts = [part.expert]
        a_rows, b_rows = a_all[None], b_all[None]
    a_rows = a_rows[:, :, s.in_start:s.in_start + s.in_size]
    b_rows, cols = _local_outputs(layout, t.target, part.piece, b_rows)
    rows = slice(part.rank_offset, part.rank_offset + part.rank)
    for i, e in enumerate(experts):
        where = f"layers.{t.layer}.mlp.experts.{t.target}" + ("" if part.expert is None else f" (expert {e})")
        folded_a, folded_bt = fold(where, part.scale, a_rows[i], b_rows[i])
        a[e, rows] = folded_a
        bt[e, rows, cols] = folded_bt


def _local_outputs(layout: ExpertLayout, target: str, piece: str, b: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """This rank's rows of lora_B [E, out, r] as the base layer orders its outputs (gate, then up), and the columns
    of the target's outputs they fill."""
    s = layout.shapes[target]
    if piece:  # one half of gate_up: this rank's slice of it, into its half of the local outputs
        half = s.out_size // 2
        start = s.out_rows()[0][0]
        return b[:, start:start + half], slice(0, half) if piece == "gate" else slice(half, 2 * half)
    runs = [b[:, start:start + size] for start, size in s.out_rows()]
    local = runs[0] if len(runs) == 1 else torch.cat(runs, dim=1)
    if layout.interleaved and target == "gate_up_proj":
        local = torch.cat([local[:, 0::2], local[:, 1::2]], dim=1)
    return local, slice(0, s.out_size)
