"""LoRA adapters: the PEFT on-disk format, the page layout they are stored in, and batched compute.

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


# ---- batched heterogeneous compute -----------------------------------------------------------------------


class AdapterStacks:
    """Each (layer, projection)'s LoRA rows of the adapters in the current step, adapter-major and dense:
    A as [slots, R, in], B as [slots, R, out], R the widest rank among them (narrower adapters read the pool's
    zero page past their own). A step's adapters hold slots 0..n-1, so bmm reads them as one batch. Slots
    outlive the step: an adapter joining or leaving costs copying that adapter's rows (and moving one other
    into the hole it leaves), never re-gathering the whole batch's pages. The adapter cache drops an adapter
    whose pool pages it frees."""

    __slots__ = ("views", "page_rank", "device", "rank", "capacity", "slots", "a", "b")

    def __init__(self, views: list[dict[str, tuple[torch.Tensor, torch.Tensor]]], page_rank: int):
        self.views, self.page_rank = views, page_rank
        self.device = next(iter(views[0].values()))[0].device if views else torch.device("cpu")
        self.rank = self.capacity = 0
        self.slots: dict[str, int] = {}
        self.a: dict[tuple[int, str], torch.Tensor] = {}
        self.b: dict[tuple[int, str], torch.Tensor] = {}

    def drop(self, adapter_id: str) -> None:
        self.slots.pop(adapter_id, None)

    def arrange(self, pages: dict[str, list[int]]) -> list[str]:
        """Makes slots 0..n-1 hold exactly the adapters of `pages` (id -> its pool pages); returns the ids in
        slot order."""
        n, rank = len(pages), max(len(p) for p in pages.values()) * self.page_rank
        if rank != self.rank or n > self.capacity:
            self._allocate(rank, n)
        for adapter_id in [a for a in self.slots if a not in pages]:
            del self.slots[adapter_id]
        holes = sorted(set(range(n)) - set(self.slots.values()))
        movers = [a for a, slot in self.slots.items() if slot >= n]
        if movers:
            src = [self.slots[a] for a in movers]
            for adapter_id, hole in zip(movers, holes):
                self.slots[adapter_id] = hole
            self._move(src, holes[:len(movers)])
        new = [a for a in pages if a not in self.slots]
        if new:
            self._copy_in([pages[a] for a in new], holes[len(movers):])
            self.slots.update(zip(new, holes[len(movers):]))
        return sorted(pages, key=self.slots.__getitem__)

    def _allocate(self, rank: int, n: int) -> None:
        """New stacks for `rank` (adapters keep their slots if it is unchanged) with room for n adapters."""
        capacity = max(n, 2 * self.capacity if rank == self.rank else n)
        keep = self.capacity if rank == self.rank else 0
        if not keep:
            self.slots = {}
        for stacks, key, pages in self._pool_views():
            grown = pages.new_zeros(capacity, rank, pages.shape[-1])
            if keep:
                grown[:keep] = stacks[key]
            stacks[key] = grown
        self.rank, self.capacity = rank, capacity

    def _pool_views(self):
        """(stacks dict, (layer, projection), its pool pages view) for every A and B."""
        for layer, per_proj in enumerate(self.views):
            for proj, (a_pages, b_pages) in per_proj.items():
                yield self.a, (layer, proj), a_pages
                yield self.b, (layer, proj), b_pages

    def _move(self, src: list[int], dst: list[int]) -> None:
        src_t, dst_t = (torch.tensor(s, device=self.device) for s in (src, dst))
        for stacks in (self.a, self.b):
            for t in stacks.values():
                t.index_copy_(0, dst_t, t.index_select(0, src_t))

    def _copy_in(self, page_tables: list[list[int]], slots: list[int]) -> None:
        width = self.rank // self.page_rank
        flat = torch.tensor([p for t in page_tables for p in t + [0] * (width - len(t))], device=self.device)
        slots_t = torch.tensor(slots, device=self.device)
        for stacks, key, pages in self._pool_views():
            stacks[key].index_copy_(0, slots_t, pages.index_select(0, flat).view(len(slots), self.rank, -1))


class LoraBatch:
    """One step's LoRA: implements model.LoraHook for a batch where every sequence has its own adapter or
    none. Tokens are grouped into one segment per adapter (segment i uses AdapterStacks slot i), padded to the
    longest segment, and each projection does a fixed handful of ops whatever the number of adapters: shrink
    and expand with two bmm over the stacks, then gather the deltas back into token order (base-model rows
    read a zero row) to add them."""

    def __init__(self, stacks: AdapterStacks, segments: list[list[int]], targets: set[str], num_tokens: int,
                 device: torch.device):
        n, longest = len(segments), max(len(s) for s in segments)
        self.stacks, self.targets = stacks, targets
        self.num_segments, self.length = n, longest
        order = [t for s in segments for t in s]
        self.src = torch.tensor(order, device=device)
        self.dense = all(len(s) == longest for s in segments)
        # Segments that are the leading rows in order, all of one length (decode rows grouped by adapter, as
        # the engine orders them): the token rows are the segments themselves, no packing and no gathering back.
        self.in_place = self.dense and order == list(range(len(order)))
        self.dst = self.pad = None
        if not self.dense:
            self.dst = torch.tensor([i * longest + j for i, s in enumerate(segments) for j in range(len(s))],
                                    device=device)
            self.pad = torch.tensor([i * longest + j for i, s in enumerate(segments) for j in range(len(s), longest)],
                                    device=device)
        # Each token's row in the segment-major deltas; base-model tokens read the zero row past them. A gather
        # then a dense add is far cheaper on CPU than index_add_'s scatter.
        rows = n * longest
        back = [rows] * num_tokens
        for i, s in enumerate(segments):
            for j, t in enumerate(s):
                back[t] = i * longest + j
        self.back = torch.tensor(back, device=device)
        self._x: torch.Tensor | None = None
        self._xs: torch.Tensor | None = None

    def _segments(self, x: torch.Tensor) -> torch.Tensor:
        # q/k/v (and gate/up) share one input: pack it into segments once. Only padding rows are zeroed (`back`
        # never reads their results, but uninitialised memory could hold anything).
        if x is not self._x:
            rows = x[:self.src.numel()] if self.in_place else x.index_select(0, self.src)
            if not self.dense:
                packed = x.new_empty(self.num_segments * self.length, x.shape[1])
                rows = packed.index_fill_(0, self.pad, 0).index_copy_(0, self.dst, rows)
            self._x, self._xs = x, rows.view(self.num_segments, self.length, -1)
        return self._xs

    def apply(self, layer_idx: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if proj not in self.targets:
            return y
        n = self.num_segments
        a, b = self.stacks.a[layer_idx, proj][:n], self.stacks.b[layer_idx, proj][:n]
        rows = n * self.length
        shrunk = torch.bmm(self._segments(x), a.transpose(1, 2))
        if self.in_place:
            out = y[:rows].view(n, self.length, -1)
            # q/k/v and gate/up are column slices of one fused output: batched BLAS cannot write those in place.
            if n == 1 or y.is_contiguous():
                out.baddbmm_(shrunk, b)
            else:
                out.add_(torch.bmm(shrunk, b))
            return y
        delta = y.new_empty(rows + 1, y.shape[1])
        delta[rows].zero_()
        torch.bmm(shrunk, b, out=delta[:rows].view(n, self.length, -1))
        return y.add_(delta.index_select(0, self.back))


class TritonLoraBatch:
    """LoraBatch's contract on CUDA through the Triton SGMV kernels (shard/kernels/sgmv.py), which read each
    segment's adapter pages straight out of the pool: no stacks, no packing. Opt-in with LOOM_TRITON_LORA=1
    until verified on a GPU; tested against LoraBatch on CPU under Triton's interpreter."""

    def __init__(self, pool: torch.Tensor, layout: PageLayout, segments: list[list[int]],
                 page_tables: list[list[int]], targets: set[str], device: torch.device):
        width = max(len(t) for t in page_tables)
        lens = [len(s) for s in segments]
        self.pool, self.layout, self.targets, self.longest = pool, layout, targets, max(lens)
        self.table = torch.tensor([t + [0] * (width - len(t)) for t in page_tables], device=device)
        self.tokens = torch.tensor([t for s in segments for t in s], device=device)
        self.lens = torch.tensor(lens, device=device)
        self.starts = torch.tensor([sum(lens[:i]) for i in range(len(lens))], device=device)

    def apply(self, layer_idx: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if proj not in self.targets:
            return y
        from shard.kernels.sgmv import sgmv_lora

        a_offset, b_offset = self.layout.offsets[layer_idx, proj]
        return sgmv_lora(x, y, self.pool, a_offset, b_offset, self.layout.page_rank, self.table, self.tokens,
                         self.starts, self.lens, self.longest)
