"""Reading a PEFT LoRA adapter directory into host pages (the page layout: shard/lora.py).

An adapter's files are untrusted input, so reading is bounded before anything large happens:
- adapter_config.json: at most MAX_CONFIG_BYTES, a JSON object whose fields have the types PEFT writes;
- every regular expression it carries (a `target_modules` string, `rank_pattern` / `alpha_pattern` keys) is
  matched under one time budget per adapter (PATTERN_BUDGET_S, the `regex` module's timeouts), so a
  backtracking pattern is refused instead of stalling the shard;
- the weights file: its size is bounded by what the adapter pool could hold, and with safetensors every
  tensor's name and shape are checked against the base model and the declared ranks from the header alone,
  and the pages the adapter needs against the pool (`max_pages`), before any tensor data is read or any
  page allocated;
- the weights themselves: every value finite, and the update each target adds to its base layer bounded
  (MAX_LORA_DELTA), so a NaN or an absurd `lora_alpha` is refused at load and never reaches the KV cache.
Errors name the file, field or tensor that is wrong, never the content that was read.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import regex
import torch
from safetensors import safe_open

from shard import peft_experts, vocab_adapter
from shard.dora import BaseLinear, is_magnitude_key, read_dora
from shard.lora import AdapterError, HostAdapter, PageLayout
from shard.models.base import apply_renames
from shard.peft_experts import TARGET_PARAMETERS

# Modules PEFT could target that Loom does not serve adapters on.
_UNSUPPORTED_PATHS = ("model.norm",)
# The vocabulary modules (shard/vocab_adapter.py), as target_modules paths.
_VOCAB_PATHS = ("model.embed_tokens", "lm_head")
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.([\w.]+)\.lora_([AB])\.weight")
CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

MAX_CONFIG_BYTES = 1 << 20
MAX_PATTERN_CHARS = 1024  # a target_modules regex, a rank_pattern / alpha_pattern key
MAX_PATTERNS = 4096  # keys of rank_pattern + alpha_pattern
PATTERN_BUDGET_S = 0.25  # all of one adapter's regex matching
# Largest element a target's update scale * B @ A may reach (bounded through the norms of B's rows and A's
# columns): trained adapters stay orders of magnitude below; past it the base layer's output is swamped and
# half-precision activations overflow.
MAX_LORA_DELTA = 1e4
# Bytes per weight element a weights file may spend beyond the pages it fills (float64 at most), and slack
# for names and headers.
_MAX_ELEMENT_BYTES = 8
_FILE_SLACK_BYTES = 1 << 20


@dataclass(slots=True)
class _Module:
    """One (layer, projection) target: the keys of its tensors, its rank and the scale folded into B."""

    layer: int
    proj: str
    a_key: str = ""
    b_key: str = ""
    rank: int = 0
    scale: float = 0.0


class _Patterns:
    """An adapter's regular expressions, compiled once and matched under one shared time budget."""

    def __init__(self, name: str, budget_s: float = PATTERN_BUDGET_S):
        self.name = name
        self.budget_s = budget_s
        self.deadline = time.monotonic() + budget_s
        self._compiled: dict[str, regex.Pattern] = {}

    def compile(self, pattern: object, field: str, suffix: bool = False) -> regex.Pattern:
        """`pattern` compiled; `suffix`: wrapped to match a dotted suffix of a module path (PEFT's rule for
        rank_pattern / alpha_pattern keys)."""
        if not isinstance(pattern, str) or not 0 < len(pattern) <= MAX_PATTERN_CHARS:
            raise AdapterError(f"adapter {self.name}: {CONFIG_FILE}: {field} must be a regular expression of 1 to "
                               f"{MAX_PATTERN_CHARS} characters")
        source = rf"(.*\.)?({pattern})" if suffix else pattern
        if source not in self._compiled:
            try:
                self._compiled[source] = regex.compile(source)
            except (regex.error, RecursionError, OverflowError, ValueError):
                raise AdapterError(f"adapter {self.name}: {CONFIG_FILE}: {field} is not a valid regular "
                                   "expression") from None
        return self._compiled[source]

    def fullmatch(self, compiled: regex.Pattern, text: str, field: str) -> bool:
        left = self.deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            return compiled.fullmatch(text, timeout=left) is not None
        except TimeoutError:
            raise AdapterError(f"adapter {self.name}: {CONFIG_FILE}: matching {field} against the model's module "
                               f"names took over {self.budget_s}s: use a simpler pattern") from None

    def lookup(self, patterns: dict, module_path: str, default, field: str):
        """PEFT's rank_pattern / alpha_pattern rule: the first key matching a dotted suffix of the path."""
        for key, value in patterns.items():
            if self.fullmatch(self.compile(key, f"a {field} key", suffix=True), module_path, field):
                return value
        return default


# ---- adapter_config.json ---------------------------------------------------------------------------------


def _read_config(name: str, path: Path) -> dict:
    if not path.is_dir():
        raise AdapterError(f"adapter {name}: {path} is not a directory")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"adapter {name}: {CONFIG_FILE} is missing")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(f"adapter {name}: {CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(config_path.read_bytes())
    except (OSError, ValueError, RecursionError):
        raise AdapterError(f"adapter {name}: {CONFIG_FILE} is not valid JSON (or nests too deeply)") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name}: {CONFIG_FILE} must hold a JSON object")
    _check_config(name, config)
    return config


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_config(name: str, config: dict) -> None:
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    targets = config.get("target_modules")
    checks = [
        (config.get("peft_type", "LORA") == "LORA", "peft_type is not LORA"),
        (not config.get("fan_in_fan_out", False), "fan_in_fan_out adapters are not supported"),
        (config.get("bias", "none") == "none", "bias is not supported (only 'none')"),
        (isinstance(config.get("use_dora", False), bool), "use_dora must be true or false"),
        (not config.get("lora_bias", False), "lora_bias is not supported"),
        (config.get("target_parameters") is None or (isinstance(config["target_parameters"], list) and all(
            isinstance(t, str) for t in config["target_parameters"])), "target_parameters must be a list of strings"),
        (isinstance(config.get("r"), int) and not isinstance(config["r"], bool) and config["r"] > 0,
         "r must be a positive integer"),
        (_is_number(config.get("lora_alpha", 8)), "lora_alpha must be a finite number"),
        (isinstance(config.get("use_rslora", False), bool), "use_rslora must be true or false"),
        (targets is None or isinstance(targets, str) or (isinstance(targets, list) and all(
            isinstance(t, str) for t in targets)), "target_modules must be a string or a list of strings"),
        (isinstance(rank_pattern, dict) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                for v in rank_pattern.values()),
         "rank_pattern must map patterns to positive integers"),
        (isinstance(alpha_pattern, dict) and all(_is_number(v) for v in alpha_pattern.values()),
         "alpha_pattern must map patterns to finite numbers"),
        (len(rank_pattern) + len(alpha_pattern) <= MAX_PATTERNS,
         f"rank_pattern and alpha_pattern hold more than {MAX_PATTERNS} keys"),
    ]
    for ok, message in checks:
        if not ok:
            raise AdapterError(f"adapter {name}: {CONFIG_FILE}: {message}")


def _check_target_parameters(name: str, target_parameters: list[str], layout: PageLayout) -> None:
    """Parameters PEFT wraps directly: the experts' fused tensors, and the router's weight (`gate.weight`)."""
    supported = [f"experts.{p}" for p in TARGET_PARAMETERS] if layout.experts is not None else []
    supported += ["gate.weight"] if "gate" in layout.shapes else []
    for target in target_parameters:
        parts = target.split(".")
        if not ((parts[-1] in TARGET_PARAMETERS and layout.experts is not None) or
                (parts[-2:] == ["gate", "weight"] and "gate" in layout.shapes)):
            shown = target if len(target) <= 64 else target[:64] + "..."
            raise AdapterError(f"adapter {name}: unsupported target parameter {shown!r} (supported: "
                               f"{', '.join(supported) or 'none'})")


def _check_targets(name: str, target_modules: str | list[str] | None, layout: PageLayout, patterns: _Patterns,
                   has_parameters: bool) -> None:
    supported = ", ".join(layout.shapes)
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return
        compiled = patterns.compile(target_modules, "target_modules")
        hit = [p for p in _UNSUPPORTED_PATHS if patterns.fullmatch(compiled, p, "target_modules")]
        if hit:
            raise AdapterError(f"adapter {name}: unsupported target module {hit[0]!r} (supported: {supported})")
        paths = [f"model.layers.{i}.{s.parent}.{p}" for i in range(layout.num_layers)
                 for p, s in layout.shapes.items()] + list(_VOCAB_PATHS if layout.vocab is not None else ())
        if layout.experts is not None:  # one expert stands for all (transformers 4 adapters named them per expert)
            paths += [f"model.layers.{i}.mlp.experts.0.{m}" for i in layout.experts.layers
                      for m in layout.experts.modules]
        if not has_parameters and not any(patterns.fullmatch(compiled, p, "target_modules") for p in paths):
            raise AdapterError(f"adapter {name}: target_modules matches no supported target ({supported})")
        return
    if not target_modules:
        if has_parameters:
            return
        raise AdapterError(f"adapter {name}: target_modules is empty")
    leaves = {p.rpartition(".")[2] for p in layout.shapes} | set(layout.experts.modules if layout.experts else ())
    leaves |= set(vocab_adapter.VOCAB_MODULES if layout.vocab is not None else ())
    for target in target_modules:
        if target.rpartition(".")[2] not in leaves:
            shown = target if len(target) <= 64 else target[:64] + "..."
            raise AdapterError(f"adapter {name}: unsupported target module {shown!r} (supported: {supported})")


# ---- weights: planned from names and shapes, then read ------------------------------------------------------


def _weights_file(name: str, path: Path, layout: PageLayout, max_pages: int | None) -> Path:
    files = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
    if not files:
        raise AdapterError(f"adapter {name}: no weights (expected {' or '.join(WEIGHT_FILES)})")
    if max_pages is not None:
        full = sum(s.in_features + s.out_features for s in layout.shapes.values()) * layout.num_layers
        if layout.experts is not None:  # every expert of every sparse layer
            e = layout.experts
            full += sum(s.in_features + s.out_features for s in e.shapes.values()) * e.num_experts * len(e.layers)
        limit = max_pages * layout.page_rank * full * _MAX_ELEMENT_BYTES + _FILE_SLACK_BYTES
        limit += vocab_adapter.file_allowance(layout.vocab)
        if files[0].stat().st_size > limit:
            raise AdapterError(f"adapter {name}: {files[0].name} is larger than an adapter the pool can hold "
                               f"({max_pages} pages of rank {layout.page_rank})")
    return files[0]


def _plan(name: str, file: Path, shapes: dict[str, list[int]], layout: PageLayout, config: dict,
          patterns: _Patterns) -> list[_Module]:
    """Every target's tensors, rank and scale, checked against the model and the config from the tensors'
    names and shapes alone."""
    modules: dict[tuple[int, str], _Module] = {}
    for key, shape in shapes.items():
        m = _KEY.fullmatch(key)
        if m is None or m[3] not in layout.shapes or layout.shapes[m[3]].parent != m[2]:
            raise AdapterError(f"adapter {name}: {file.name}: a tensor is on an unsupported target module "
                               f"(supported: {', '.join(layout.shapes)})")
        layer, proj, ab = int(m[1]), m[3], m[4]
        if layer >= layout.num_layers:
            raise AdapterError(f"adapter {name}: {file.name}: a tensor names layer {layer}, the base model has "
                               f"{layout.num_layers}")
        s = layout.shapes[proj]
        if len(shape) != 2 or shape[1 if ab == "A" else 0] != (s.in_features if ab == "A" else s.out_features):
            needed = ["r", s.in_features] if ab == "A" else [s.out_features, "r"]
            raise AdapterError(f"adapter {name}: lora_{ab} of layers.{layer}.{s.parent}.{proj} has shape "
                               f"{shape}, the base model needs [{', '.join(map(str, needed))}]")
        module = modules.setdefault((layer, proj), _Module(layer, proj))
        if ab == "A":
            module.a_key = key
        else:
            module.b_key = key
    for module in modules.values():
        where = f"layers.{module.layer}.{layout.shapes[module.proj].parent}.{module.proj}"
        if not module.a_key or not module.b_key:
            raise AdapterError(f"adapter {name}: {where} has lora_{'B' if module.a_key else 'A'} missing")
        r = patterns.lookup(config.get("rank_pattern") or {}, f"model.{where}", config["r"], "rank_pattern")
        if shapes[module.a_key][0] != r or shapes[module.b_key][1] != r:
            raise AdapterError(f"adapter {name}: {where} has rank {shapes[module.a_key][0]} (lora_A) / "
                               f"{shapes[module.b_key][1]} (lora_B), {CONFIG_FILE} says {r}")
        alpha = patterns.lookup(config.get("alpha_pattern") or {}, f"model.{where}", config.get("lora_alpha", 8),
                                "alpha_pattern")
        module.rank = r
        module.scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    return sorted(modules.values(), key=lambda m: (m.layer, m.proj))


def _slice(layout: PageLayout, module: _Module, ab: str, src) -> torch.Tensor:
    """This tensor-parallel rank's part: row-parallel targets split A's input features, column-parallel ones
    B's output features (a fused target: each of its parts)."""
    s = layout.shapes[module.proj]
    if ab == "A":
        return src[:, s.in_start:s.in_start + s.in_size]
    runs = [src[start:start + size, :] for start, size in s.out_rows()]
    return runs[0] if len(runs) == 1 else torch.cat(runs)


def _fold(name: str, where: str, scale: float, a: torch.Tensor, b: torch.Tensor,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, scale * B^T) in the pool's dtype, refused unless finite and within MAX_LORA_DELTA."""
    a, bt = a.float(), b.float().t() * scale
    folded = a.to(dtype), bt.to(dtype)
    if not all(bool(torch.isfinite(t).all()) for t in (a, bt, *folded)):
        raise AdapterError(f"adapter {name}: {where} holds weights that are not finite (after lora_alpha scaling "
                           f"and conversion to {str(dtype).removeprefix('torch.')})")
    # |scale * (B @ A)_ij| <= |scale| * ||B_i|| * ||A_:j||: bounded without forming B @ A.
    bound = float(bt.norm(dim=0).max()) * float(a.norm(dim=0).max()) if a.numel() and bt.numel() else 0.0
    if not bound <= MAX_LORA_DELTA:
        raise AdapterError(f"adapter {name}: {where}: its update to the base weights reaches {bound:.3g}, past the "
                           f"bound of {MAX_LORA_DELTA:g} (lora_alpha or weights out of range)")
    return folded


def _lay_out(name: str, layout: PageLayout, modules: list[_Module], read, dtype: torch.dtype) -> torch.Tensor:
    rank = max((m.rank for m in modules), default=0)
    pages = torch.zeros(layout.pages_for(rank), layout.page_numel, dtype=dtype)
    views = layout.views(pages)
    for m in modules:
        where = f"layers.{m.layer}.{layout.shapes[m.proj].parent}.{m.proj}"
        a, bt = _fold(name, where, m.scale, _slice(layout, m, "A", read(m.a_key)),
                      _slice(layout, m, "B", read(m.b_key)), dtype)
        for view, rows in zip(views[m.layer][m.proj], (a, bt)):
            padded = rows.new_zeros(view.shape[0] * view.shape[1], rows.shape[1])  # pages are not contiguous
            padded[:m.rank] = rows
            view.copy_(padded.view(view.shape))
    return pages


def _check_pages(name: str, layout: PageLayout, modules: list[_Module], experts: list[peft_experts.ExpertTarget],
                 max_pages: int | None) -> None:
    rank = max((m.rank for m in modules), default=0)
    needed = layout.pages_for(rank) + (peft_experts.pages_for(layout.experts, experts) if experts else 0)
    if max_pages is not None and needed > max_pages:
        rank = max([rank] + [t.rank for t in experts])
        what = f"rank {rank}" + (" (with its experts)" if experts else "")
        raise AdapterError(f"adapter {name}: {what} needs {needed} adapter-pool pages, the pool has {max_pages} for it")


def _read_weights(name: str, file: Path, shapes: dict[str, list[int]], read, layout: PageLayout, config: dict,
                  patterns: _Patterns, max_pages: int | None, dtype: torch.dtype,
                  base: dict[tuple[int, str], BaseLinear] | None, max_vocab_bytes: int | None = None) -> HostAdapter:
    """Plans every tensor from `shapes` (checks before any tensor is read), then reads them (`read(key)`) into
    pages: the page layout's, then the experts' (shard/peft_experts.py); the vocabulary modules' tensors apart
    (shard/vocab_adapter.py); a DoRA adapter's factors besides (shard/dora.py, from `base`: the model's target
    weights)."""
    magnitudes = {k: shapes.pop(k) for k in [k for k in shapes if is_magnitude_key(k)]}
    if magnitudes and not config.get("use_dora"):
        raise AdapterError(f"adapter {name}: {file.name} holds lora_magnitude_vector tensors but {CONFIG_FILE} "
                           "does not set use_dora")
    experts_layout = layout.experts
    if experts_layout is not None and experts_layout.renames:  # an adapter of the model as older releases named it
        original = {apply_renames(k, experts_layout.renames): k for k in shapes}
        shapes = {k: shapes[v] for k, v in original.items()}
        read_original = read

        def read(key: str):
            return read_original(original[key])
    def lookup(field: str, path: str, default):
        return patterns.lookup(config.get(field) or {}, path, default, field)

    def fold(where: str, scale: float, a: torch.Tensor, b: torch.Tensor):
        return _fold(name, where, scale, a, b, dtype)
    expert_keys = {k for k in shapes if experts_layout is not None and peft_experts.is_expert_key(k)}
    vocab_keys = {k for k in shapes if vocab_adapter.is_vocab_key(k)}
    modules = _plan(name, file, {k: v for k, v in shapes.items() if k not in expert_keys | vocab_keys}, layout,
                    config, patterns)
    vocab_plan = vocab_adapter.plan(name, file.name, {k: shapes[k] for k in vocab_keys}, layout.vocab, config,
                                    lookup, torch.empty((), dtype=dtype).element_size(), max_vocab_bytes)
    experts = []
    if expert_keys:
        experts = peft_experts.plan(name, file.name, {k: shapes[k] for k in expert_keys}, experts_layout, config,
                                    lookup)
    if not modules and not experts and vocab_plan is None:
        raise AdapterError(f"adapter {name}: no LoRA tensors on a supported target module")
    if config.get("use_dora") and experts:
        raise AdapterError(f"adapter {name}: DoRA on expert parameters is not supported")
    _check_pages(name, layout, modules, experts, max_pages)
    pages = _lay_out(name, layout, modules, read, dtype)
    expert_pages = peft_experts.lay_out(name, experts_layout, experts, layout.page_numel, read, fold,
                                        dtype) if experts else pages[:0]
    vocab = vocab_adapter.read(name, vocab_plan, layout.vocab, read, fold, dtype) if vocab_plan else None
    ranks = [m.rank for m in modules] + [t.rank for t in experts]
    ranks += [m.rank for m in vocab_plan.modules.values()] if vocab_plan else []
    targets = {m.proj for m in modules} | {f"experts.{t.target}" for t in experts}
    dora = read_dora(name, modules, magnitudes, read, layout, base, lambda m, ab, src: _slice(layout, m, ab, src)) \
        if config.get("use_dora") else None
    return HostAdapter(max(ranks, default=0), frozenset(targets), torch.cat([pages, expert_pages]),
                       expert_pages.shape[0], dora, vocab)


def load_adapter(name: str, path: str | Path, layout: PageLayout, dtype: torch.dtype, max_pages: int | None = None,
                 pin_memory: bool = False, base: dict[tuple[int, str], BaseLinear] | None = None,
                 max_vocab_bytes: int | None = None) -> HostAdapter:
    """Reads and checks a PEFT LoRA adapter dir and lays it out as pages, each file read once; `max_pages`: the
    most pool pages an adapter may take, `max_vocab_bytes` the most its embedding / lm_head tensors may take
    (both checked before any tensor is read); `base`: the model's target weights (shard/dora.base_linears),
    which DoRA adapters need. Raises AdapterError naming the file, field or tensor that is wrong."""
    path = Path(path)
    config = _read_config(name, path)
    vocab_adapter.check_config(name, config)
    patterns = _Patterns(name)
    _check_target_parameters(name, config.get("target_parameters") or [], layout)
    _check_targets(name, config.get("target_modules"), layout, patterns, bool(config.get("target_parameters")))
    file = _weights_file(name, path, layout, max_pages)
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as f:
                sources = {key: f.get_slice(key) for key in f.keys()}
                host = _read_weights(name, file, {k: list(s.get_shape()) for k, s in sources.items()},
                                     sources.__getitem__, layout, config, patterns, max_pages, dtype, base,
                                     max_vocab_bytes)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise AdapterError(f"adapter {name}: {file.name} does not hold a dict of tensors")
            host = _read_weights(name, file, {k: list(t.shape) for k, t in state.items()}, state.__getitem__, layout,
                                 config, patterns, max_pages, dtype, base, max_vocab_bytes)
    except AdapterError:
        raise
    except Exception as e:  # a corrupt or truncated file: this adapter's error, named without its content
        raise AdapterError(f"adapter {name}: cannot read {file.name} ({type(e).__name__})") from None
    if pin_memory:
        host.pages = host.pages.pin_memory()
    return host
