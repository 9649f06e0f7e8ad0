"""DoRA adapters (PEFT's `use_dora`): the per-output-feature factors read at load, and their part of a step.

PEFT's DoRA layer outputs, for a base linear W (bias b) and its LoRA pair (A, B, scale s), in eval mode:

    y = W x + b + (g - 1) * (W x) + g * s * B A x,    g = m / ||W + s * B A||   (norm of each output row)

with m the adapter's `lora_magnitude_vector` and the norm taken over the full input dimension, detached. That is
g * (W x + b + s * B A x) - (g - 1) * b: the ordinary LoRA delta (the pages, shard/lora.py) followed by a per-row
rescale of the target's output by g and a shift c = -(g - 1) * b. So a DoRA adapter is stored as a LoRA adapter
plus, per target, the vectors g and c of this rank's output slice, and DoraHook applies them to the adapter's rows
only, after the step's LoRA hook added every segment's delta: DoRA and plain LoRA requests share one step.

The norm needs all of a row of W + s * B A. A column-parallel target holds whole rows on each rank; a row-parallel
one (o_proj, down_proj) holds a slice of every row, so each rank reads the sum of squares over its own columns at
load and the ranks add them up the first time a step uses the adapter (`DoraWeights.finish`): steps run in the
same order on every rank, loads do not, so that collective happens inside a step. The row-parallel partial sums
of the output are rescaled before the all-reduce, which is exact since the rescale is linear and the bias of a
row-parallel layer is added after the reduction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from shard.layers import ColumnParallelLinear, RowParallelLinear
from shard.lora import AdapterError, PageLayout
from shard.lora_batch import _runs

_MAGNITUDE = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_magnitude_vector")
# A segment whose rows come in at most this many runs is rescaled through slices, else through one gather.
_MAX_SLICED_RUNS = 4
# Largest DoRA rescale g = magnitude / norm accepted (trained adapters stay near 1).
MAX_DORA_RESCALE = 1e4
# Rows of W + scale * B A formed at once for the norms (a bounded transient on the weights' device).
_NORM_ROWS = 256


def is_magnitude_key(key: str) -> bool:
    """Whether an adapter tensor is a DoRA magnitude vector (PEFT writes it without a `.weight` suffix)."""
    return key.endswith(".lora_magnitude_vector")


@dataclass(frozen=True, slots=True)
class BaseLinear:
    """A LoRA target's base weights on this rank: [out slice, in slice], and its bias when that is part of the
    local output (column-parallel layers; a row-parallel layer adds its bias after the all-reduce)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    row_parallel: bool


def base_linears(model) -> dict[tuple[int, str], BaseLinear]:
    """(layer, PEFT target) -> its base weights, for the dense attention and MLP targets of every decoder layer
    (views of the model's parameters: no copy). Targets not listed (experts, shared experts) take no DoRA."""
    found: dict[tuple[int, str], BaseLinear] = {}
    for i, layer in enumerate(model.model.layers):
        for module in (getattr(layer, "self_attn", None), getattr(layer, "mlp", None)):
            columns = [c for c in module.children() if isinstance(c, ColumnParallelLinear)] if module else []
            if not hasattr(module, "lora_sites") or len(columns) != 1:
                continue
            column = columns[0]
            for site in module.lora_sites:
                if "." not in site.name:
                    cut = slice(site.start, site.start + site.size)
                    bias = None if column.bias is None else column.bias[cut]
                    found[i, site.name] = BaseLinear(column.weight[cut], bias, False)
            for name, child in module.named_children():
                if isinstance(child, RowParallelLinear):
                    found[i, name] = BaseLinear(child.weight, None, True)
    return found


@dataclass(slots=True)
class DoraTarget:
    """One (layer, target) of a DoRA adapter, this rank's output slice: magnitude, the sum of squares of each
    row of W + s * B A over this rank's input columns, and the bias the rescale must not scale."""

    layer: int
    proj: str
    magnitude: torch.Tensor
    squares: torch.Tensor
    bias: torch.Tensor | None
    row_parallel: bool


Scales = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]]  # (layer, target) -> (g, c or None)


@dataclass(slots=True)
class DoraWeights:
    """An adapter's DoRA factors: the load-time parts (`targets`) until `finish` turns them into `scales` (host,
    float32, kept with the adapter's entry); `on` copies those to the device while the adapter is resident, and
    `release` (at eviction) lets the copy go, so that device memory holds the factors of resident adapters only:
    two vectors over each target's output features, per layer."""

    targets: list[DoraTarget]
    scales: Scales | None = None
    _device: Scales | None = field(default=None, repr=False)

    def finish(self, device: torch.device, tp_size: int = 1) -> None:
        """Adds up the row-parallel targets' partial sums of squares over the ranks (one all-reduce on `device`;
        every rank calls this in the same step) and makes g and c. Idempotent."""
        if self.scales is not None:
            return
        rows = [d for d in self.targets if d.row_parallel]
        if rows and tp_size > 1 and dist.is_available() and dist.is_initialized():
            flat = torch.cat([d.squares for d in rows]).to(device)
            dist.all_reduce(flat)
            for d, total in zip(rows, flat.cpu().split([d.squares.numel() for d in rows])):
                d.squares = total
        scales = {}
        for d in self.targets:
            g = d.magnitude / d.squares.sqrt()
            scales[d.layer, d.proj] = (g, None if d.bias is None else -(g - 1) * d.bias)
        self.scales, self.targets = scales, []

    def on(self, device: torch.device, dtype: torch.dtype) -> Scales:
        """The finished scales on `device` in `dtype` (copied once while resident)."""
        if self._device is None:
            self._device = {k: (g.to(device, dtype), None if c is None else c.to(device, dtype))
                            for k, (g, c) in self.scales.items()}
        return self._device

    def release(self) -> None:
        self._device = None


def read_dora(name: str, modules: list, magnitudes: dict[str, list[int]], read, layout: PageLayout,
              base: dict[tuple[int, str], BaseLinear] | None, slice_rows) -> DoraWeights:
    """The DoRA parts of an adapter whose LoRA `modules` (shard/peft_adapter.py's plan: layer, proj, keys, scale)
    were planned: every target needs its magnitude vector ([out_features]), none may be left over. `read(key)`
    gives a tensor, `slice_rows(module, ab, tensor)` this rank's part of lora_A / lora_B (and of a magnitude
    vector, cut like lora_B's rows)."""
    if base is None:
        raise AdapterError(f"adapter {name}: DoRA adapters are not served by this model")
    by_target = {}
    for key, shape in magnitudes.items():
        m = _MAGNITUDE.fullmatch(key)
        if m is None:
            raise AdapterError(f"adapter {name}: a DoRA magnitude vector is on an unsupported target module")
        by_target[int(m[1]), m[3]] = (key, shape)
    targets = []
    for module in modules:
        where = f"layers.{module.layer}.{layout.shapes[module.proj].parent}.{module.proj}"
        key, shape = by_target.pop((module.layer, module.proj), (None, None))
        linear = base.get((module.layer, module.proj))
        if linear is None:
            raise AdapterError(f"adapter {name}: DoRA on {where} is not supported")
        if key is None:
            raise AdapterError(f"adapter {name}: {where} has no lora_magnitude_vector (use_dora is set)")
        if shape != [layout.shapes[module.proj].out_features]:
            raise AdapterError(f"adapter {name}: lora_magnitude_vector of {where} has shape {shape}, the base "
                               f"model needs [{layout.shapes[module.proj].out_features}]")
        targets.append(_target(name, where, module, read(key)[:], read, linear, slice_rows))
    if by_target:
        layer, proj = next(iter(by_target))
        raise AdapterError(f"adapter {name}: layers.{layer}.{proj} has a lora_magnitude_vector but no LoRA pair")
    return DoraWeights(targets)


def _row_squares(weight: torch.Tensor, scale: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each row's sum of squares of W + scale * (B @ A) (PEFT's norm, before the root), in float32 on the host;
    formed _NORM_ROWS rows at a time on the weights' device."""
    a, b = a.to(weight.device), b.to(weight.device)
    parts = [(weight[i:i + _NORM_ROWS].float() + scale * (b[i:i + _NORM_ROWS] @ a)).square().sum(dim=1)
             for i in range(0, weight.shape[0], _NORM_ROWS)]
    return torch.cat(parts).cpu()


def _target(name: str, where: str, module, magnitude: torch.Tensor, read, linear: BaseLinear,
            slice_rows) -> DoraTarget:
    a = slice_rows(module, "A", read(module.a_key)).float()
    b = slice_rows(module, "B", read(module.b_key)).float()
    magnitude = slice_rows(module, "B", magnitude[:, None])[:, 0].float()
    squares = _row_squares(linear.weight.detach(), module.scale, a, b)
    bias = None if linear.bias is None else linear.bias.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(magnitude).all()) or not bool(torch.isfinite(squares).all()):
        raise AdapterError(f"adapter {name}: {where}: its lora_magnitude_vector or weight norm is not finite")
    # g = m / norm, or (a row split across ranks, whose norm is at least this rank's part) a bound of it: a zero
    # norm or an absurd magnitude is refused here, before it could put inf or NaN into a step.
    rescale = float((magnitude.abs() / squares.sqrt()).max()) if squares.numel() else 0.0
    if not rescale <= MAX_DORA_RESCALE:
        raise AdapterError(f"adapter {name}: {where}: its magnitude over its weight norm reaches {rescale:.3g}, past "
                           f"the bound of {MAX_DORA_RESCALE:g} (a zero row or a magnitude out of range)")
    return DoraTarget(module.layer, module.proj, magnitude, squares, bias, linear.row_parallel)


class DoraHook:
    """A step's LoRA hook for a batch where some segments' adapters are DoRA: the inner hook (shard/lora_batch.py)
    adds every segment's LoRA delta, then each DoRA segment's rows of the target's output are rescaled by g and
    shifted by c. Other rows are untouched."""

    def __init__(self, inner, segments: list[tuple[list[int], Scales]], device: torch.device):
        """`segments`: each DoRA segment's rows and its adapter's scales on `device`."""
        self.inner = inner
        self.segments = []
        for rows, scales in segments:
            runs = _runs(rows)
            where = runs if len(runs) <= _MAX_SLICED_RUNS else torch.tensor(rows, device=device)
            self.segments.append((where, scales))

    def apply(self, layer_idx: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = self.inner.apply(layer_idx, proj, x, y)
        for where, scales in self.segments:
            factors = scales.get((layer_idx, proj))
            if factors is None:
                continue
            g, c = factors
            if isinstance(where, list):
                for run in where:
                    part = y[run].mul_(g)
                    if c is not None:
                        part.add_(c)
            else:
                part = y.index_select(0, where).mul_(g)
                y.index_copy_(0, where, part if c is None else part.add_(c))
        return y
