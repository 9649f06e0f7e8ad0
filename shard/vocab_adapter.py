"""Adapters on the vocabulary: LoRA on `embed_tokens` and `lm_head`, PEFT's trainable tokens, and whole
embedding / LM-head matrices (`modules_to_save`, or the resized base layers PEFT saves with an adapter that
added tokens). Reading them (from the PEFT keys, planned from names and shapes before any data is read) and
applying them per request: a step's rows of such an adapter get its embeddings before the layers and its
logits after; every other row keeps the base model's, so these requests share a step with plain LoRA and
base-model requests.

An adapter's whole matrices (modules_to_save) are split by vocabulary rows across the tensor-parallel ranks
like the base model's (shard/layers.py VocabParallelEmbedding / ParallelLMHead: a masked lookup then an
all-reduce, a slice of logits then an all-gather), once per adapter part of a step, in the same order on every
rank. Its small tensors (LoRA factors, trained and added rows) are held whole on every rank and apply after the
base lookup's all-reduce and the logits' all-gather. They are bounded in bytes (the adapter cache's vocabulary
budget, per rank) before they are read.

PEFT's key names (after `base_model.model.`) under `model.embed_tokens` and `lm_head`:
- `lora_embedding_A` [r, V], `lora_embedding_B` [H, r]: embedding LoRA, e(ids) + (A^T[ids] @ B^T) * scale;
- `lora_A.weight` [r, H], `lora_B.weight` [V, r]: lm_head LoRA;
- `token_adapter.trainable_tokens_delta` [k, H]: the rows of `trainable_token_indices` (for a tied lm_head, the
  same rows of its weight);
- `modules_to_save.weight` [V', H]: the adapter's own matrix;
- `weight`, `base_layer.weight`, `token_adapter.base_layer.weight`, `original_module.weight`: the base layer as
  saved with the adapter, the base model's own weights (PEFT trains none of them): of the base model's shape it
  is not kept; resized (resize_token_embeddings), only its rows past the base vocabulary are, the added
  tokens' (its first rows are the base model's, which keep serving them).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from shard.layers import ParallelLMHead, VocabParallelEmbedding
from shard.lora import AdapterError

VOCAB_MODULES = ("embed_tokens", "lm_head")
_KEY = re.compile(r"base_model\.model\.(?:model\.)?(embed_tokens|lm_head)\.([\w.]+)")
_EMBED_LORA = ("lora_embedding_A", "lora_embedding_B")
_HEAD_LORA = ("lora_A.weight", "lora_B.weight")
_SAVED_BASE = ("weight", "base_layer.weight", "token_adapter.base_layer.weight", "original_module.weight")
_ROLES = {"lora_embedding_A": "lora_a", "lora_embedding_B": "lora_b", "lora_A.weight": "lora_a",
          "lora_B.weight": "lora_b", "token_adapter.trainable_tokens_delta": "rows",
          "modules_to_save.weight": "full", **{k: "saved" for k in _SAVED_BASE}}
# The largest vocabulary an adapter may bring, relative to the base model's (added tokens, not a new model).
MAX_VOCAB_GROWTH = 2
_MAX_ELEMENT_BYTES = 8
_COPIES_PER_MODULE = 4  # what a weights file may hold per module: its matrix and the saved base layers


@dataclass(frozen=True, slots=True)
class VocabShape:
    """The base model's vocabulary: rows of its embedding, its hidden size, whether lm_head is the embedding."""

    vocab_size: int
    hidden_size: int
    tied: bool
    tp_rank: int = 0
    tp_size: int = 1


def file_allowance(shape: VocabShape | None) -> int:
    """Bytes a weights file may spend on vocabulary tensors beyond its LoRA pages."""
    if shape is None:
        return 0
    rows = MAX_VOCAB_GROWTH * shape.vocab_size
    return len(VOCAB_MODULES) * _COPIES_PER_MODULE * rows * shape.hidden_size * _MAX_ELEMENT_BYTES


def is_vocab_key(key: str) -> bool:
    return _KEY.fullmatch(key) is not None


def check_config(name: str, config: dict) -> None:
    """modules_to_save and trainable_token_indices name only the vocabulary modules, with integer ids."""
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved):
        raise AdapterError(f"adapter {name}: adapter_config.json: modules_to_save must be a list of module names")
    for module in saved:
        if module.rpartition(".")[2] not in VOCAB_MODULES:
            shown = module if len(module) <= 64 else module[:64] + "..."
            raise AdapterError(f"adapter {name}: modules_to_save names {shown!r}: only embed_tokens and lm_head are "
                               "supported")
    indices = _token_indices(config)
    if indices is None:
        raise AdapterError(f"adapter {name}: adapter_config.json: trainable_token_indices must be a list of token "
                           "ids or map embed_tokens to one")


def _token_indices(config: dict) -> list[int] | None:
    """trainable_token_indices as the embedding's ids ([] when absent); None when malformed."""
    value = config.get("trainable_token_indices") or []
    if isinstance(value, dict):
        if not set(value) <= {"embed_tokens", "model.embed_tokens"} or len(value) > 1:
            return None
        value = next(iter(value.values()), [])
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        return None
    return value


# ---- planned from the names and shapes, then read ---------------------------------------------------------


@dataclass(slots=True)
class _ModulePlan:
    keys: dict[str, str] = field(default_factory=dict)  # role -> tensor key
    rank: int = 0
    scale: float = 0.0


@dataclass(slots=True)
class VocabPlan:
    vocab_size: int  # the adapter's vocabulary (the base model's unless it brings a matrix of another size)
    modules: dict[str, _ModulePlan]
    indices: list[int]
    nbytes: int  # what the kept tensors take in the pool's dtype


def plan(name: str, file: str, shapes: dict[str, list[int]], base: VocabShape | None, config: dict, lookup,
         element_bytes: int, max_bytes: int | None) -> VocabPlan | None:
    """The vocabulary tensors among `shapes` (keys is_vocab_key), checked against the model and the config from
    their names and shapes alone; None when there are none. `lookup(field, module path, default)`: PEFT's
    rank_pattern / alpha_pattern rule. Raises AdapterError naming the tensor or field."""
    if not shapes:
        if _token_indices(config):
            raise AdapterError(f"adapter {name}: {file}: trainable_token_indices without trainable_tokens_delta")
        return None
    if base is None:
        raise AdapterError(f"adapter {name}: this model serves no adapters on embed_tokens or lm_head")
    modules: dict[str, _ModulePlan] = {}
    saved: dict[str, str] = {}  # module -> a resized base layer saved with the adapter
    for key in shapes:
        module, suffix = _KEY.fullmatch(key).groups()
        role = _ROLES.get(suffix)
        if role is None or suffix in (_HEAD_LORA if module == "embed_tokens" else _EMBED_LORA):
            raise AdapterError(f"adapter {name}: {file}: a tensor of {module} is of a kind Loom does not serve")
        if role == "saved":  # the base layer as saved: the adapter's own matrix only when resized
            if shapes[key][0] != base.vocab_size:
                saved.setdefault(module, key)
            continue
        modules.setdefault(module, _ModulePlan()).keys[role] = key
    for module, key in saved.items():  # modules_to_save's matrix, where there is one, is the one used
        if "full" not in modules.get(module, _ModulePlan()).keys:
            modules.setdefault(module, _ModulePlan()).keys["extra"] = key
    if base.tied and "lm_head" not in modules and "embed_tokens" in saved:  # a resized tied lm_head: the embedding
        modules["lm_head"] = _ModulePlan({"extra": saved["embed_tokens"]})
    vocab = _vocab_size(name, file, shapes, modules, base)
    for module, m in modules.items():
        _check_module(name, file, module, m, shapes, base, vocab, config, lookup)
    indices = _token_indices(config) or []
    if any("rows" in m.keys for m in modules.values()):
        rows = shapes[next(m.keys["rows"] for m in modules.values() if "rows" in m.keys)][0]
        if len(indices) != rows or len(set(indices)) != rows or not all(0 <= i < vocab for i in indices):
            raise AdapterError(f"adapter {name}: trainable_token_indices must be {rows} distinct ids in [0, {vocab}) "
                               "(one per row of trainable_tokens_delta)")
    elif indices:
        raise AdapterError(f"adapter {name}: {file}: trainable_token_indices without trainable_tokens_delta")
    head = modules.get("lm_head", _ModulePlan()).keys
    if vocab != base.vocab_size and "full" not in head and "extra" not in head and not base.tied:
        raise AdapterError(f"adapter {name}: {file}: its vocabulary has {vocab} tokens but it holds no lm_head of "
                           "that size")
    nbytes = sum(_kept_numel(role, shapes[k], base) for m in modules.values()
                 for role, k in m.keys.items()) * element_bytes
    if max_bytes is not None and nbytes > max_bytes:
        raise AdapterError(f"adapter {name}: its embedding and lm_head tensors take {nbytes} bytes, more than the "
                           f"{max_bytes} bytes left for adapter vocabularies (--adapter-vocab-memory-mb)")
    return VocabPlan(vocab, modules, indices, nbytes)


def _kept_numel(role: str, shape: list[int], base: VocabShape) -> int:
    """Elements this rank keeps of a planned tensor: a resized base layer's rows past the base vocabulary, its
    share of the rows of a whole matrix, else all."""
    if role == "extra":
        return max(shape[0] - base.vocab_size, 0) * shape[1]
    if role == "full":
        return -(-shape[0] // base.tp_size) * shape[1]
    return math.prod(shape)


def _vocab_size(name: str, file: str, shapes: dict, modules: dict[str, _ModulePlan], base: VocabShape) -> int:
    sizes = {shapes[m.keys[r]][0] for m in modules.values() for r in ("full", "extra") if r in m.keys}
    if len(sizes) > 1:
        raise AdapterError(f"adapter {name}: {file}: its embed_tokens and lm_head matrices have different "
                           "vocabulary sizes")
    vocab = sizes.pop() if sizes else base.vocab_size
    if not 0 < vocab <= MAX_VOCAB_GROWTH * base.vocab_size:
        raise AdapterError(f"adapter {name}: {file}: a vocabulary of {vocab} tokens, the base model has "
                           f"{base.vocab_size} (at most {MAX_VOCAB_GROWTH}x)")
    return vocab


def _check_module(name: str, file: str, module: str, m: _ModulePlan, shapes: dict, base: VocabShape, vocab: int,
                  config: dict, lookup) -> None:
    h = base.hidden_size
    expected = {"full": [vocab, h], "extra": [vocab, h], "rows": [None, h]}
    if "lora_a" in m.keys or "lora_b" in m.keys:
        if not ("lora_a" in m.keys and "lora_b" in m.keys):
            raise AdapterError(f"adapter {name}: {module} has only one of its two LoRA tensors")
        path = "model.embed_tokens" if module == "embed_tokens" else "lm_head"
        m.rank = lookup("rank_pattern", path, config["r"])
        alpha = lookup("alpha_pattern", path, config.get("lora_alpha", 8))
        m.scale = alpha / (math.sqrt(m.rank) if config.get("use_rslora") else m.rank)
        if module == "embed_tokens":
            expected |= {"lora_a": [m.rank, vocab], "lora_b": [h, m.rank]}
        else:
            expected |= {"lora_a": [m.rank, h], "lora_b": [vocab, m.rank]}
    for role, key in m.keys.items():
        shape, want = shapes[key], expected[role]
        if len(shape) != 2 or any(w is not None and s != w for s, w in zip(shape, want)) or not shape[0]:
            shown = ", ".join("k" if w is None else str(w) for w in want)
            raise AdapterError(f"adapter {name}: {file}: {module}.{key.rpartition(module + '.')[2]} has shape "
                               f"{shape}, the base model needs [{shown}]")


# ---- held per adapter --------------------------------------------------------------------------------------


@dataclass(slots=True)
class VocabWeights:
    """One adapter's vocabulary tensors, in the model's dtype, whole on this rank."""

    vocab_size: int  # its requests' vocabulary
    base_vocab: int  # the base model's
    embed: VocabParallelEmbedding | None = None  # [V', H] replaces the embedding (this rank's rows)
    head: ParallelLMHead | None = None  # [V', H] replaces lm_head (this rank's rows)
    embed_extra: torch.Tensor | None = None  # [V' - V, H] embedding rows of the added tokens (the rest: the base's)
    head_extra: torch.Tensor | None = None  # [V' - V, H] their lm_head rows
    token_ids: torch.Tensor | None = None  # [k] trainable token ids
    embed_rows: torch.Tensor | None = None  # [k, H] their embedding rows
    head_rows: torch.Tensor | None = None  # [k, H] their lm_head rows (a tied lm_head)
    embed_lora: tuple[torch.Tensor, torch.Tensor] | None = None  # (A^T [V', r], scale * B^T [r, H])
    head_lora: tuple[torch.Tensor, torch.Tensor] | None = None  # (A^T [H, r], scale * B^T [r, V'])

    _TENSORS = ("embed", "head", "embed_extra", "head_extra", "token_ids", "embed_rows", "head_rows")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self):
        for value in (*(getattr(self, a) for a in self._TENSORS), *(self.embed_lora or ()), *(self.head_lora or ())):
            if value is not None:
                yield value.weight if isinstance(value, nn.Module) else value

    def to(self, device: torch.device) -> VocabWeights:
        moved = VocabWeights(self.vocab_size, self.base_vocab)
        for attr in self._TENSORS:
            value = getattr(self, attr)
            setattr(moved, attr, None if value is None else value.to(device))
        for attr in ("embed_lora", "head_lora"):
            pair = getattr(self, attr)
            setattr(moved, attr, None if pair is None else (pair[0].to(device), pair[1].to(device)))
        return moved

    def embeddings(self, ids: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """This adapter's embeddings of `ids`, given the base model's `base` (rows of ids past the base
        vocabulary hold anything)."""
        if self.embed is not None:
            h = self.embed(ids)
        elif self.embed_extra is not None:
            added = ids - self.base_vocab
            h = torch.where((added >= 0)[:, None], self.embed_extra[added.clamp(min=0)], base)
        else:
            h = base
        if self.embed_rows is not None:
            h = _replace_rows(h, ids, self.token_ids, self.embed_rows, self.vocab_size)
        if self.embed_lora is not None:
            a_t, b_t = self.embed_lora
            h = h + a_t[ids] @ b_t
        return h

    def logits(self, hidden: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """This adapter's raw logits [n, V'] of `hidden`, given the base model's `base` [n, V]."""
        if self.head is not None:
            logits = self.head(hidden)
        else:
            logits = base[:, :self.vocab_size]
            if self.head_extra is not None:
                logits = torch.cat([logits, hidden @ self.head_extra.t()], dim=1)
        if self.head_rows is not None:
            logits = logits.index_copy(1, self.token_ids, hidden @ self.head_rows.t())
        if self.head_lora is not None:
            a_t, b_t = self.head_lora
            logits = logits + (hidden @ a_t) @ b_t
        return logits


def _replace_rows(h: torch.Tensor, ids: torch.Tensor, token_ids: torch.Tensor, rows: torch.Tensor,
                  vocab: int) -> torch.Tensor:
    """h with the rows whose id is one of `token_ids` replaced by that token's row."""
    where = torch.full((vocab,), -1, dtype=torch.long, device=ids.device)
    where[token_ids] = torch.arange(len(token_ids), device=ids.device)
    slot = where[ids]
    hit = slot >= 0
    return torch.where(hit[:, None], rows[slot.clamp(min=0)], h)


def read(name: str, vocab_plan: VocabPlan, base: VocabShape, read_tensor, fold, dtype: torch.dtype) -> VocabWeights:
    """The planned tensors read (`read_tensor(key)`: a tensor or a safetensors slice; of a resized base layer
    only its added rows), checked finite and converted to `dtype`. `fold(where, scale, a, b)` -> (A, scale *
    B^T): the LoRA pages' own checks and bound."""
    weights = VocabWeights(vocab_plan.vocab_size, base.vocab_size)
    for module, m in vocab_plan.modules.items():
        keys, prefix = m.keys, "embed" if module == "embed_tokens" else "head"
        for role, attr in (("full", prefix), ("extra", f"{prefix}_extra"), ("rows", f"{prefix}_rows")):
            if role == "extra" and role in keys and vocab_plan.vocab_size > base.vocab_size:
                setattr(weights, attr, _finite(name, module, read_tensor(keys[role])[base.vocab_size:], dtype))
            elif role == "full" and role in keys:
                setattr(weights, attr, _split(name, module, read_tensor(keys[role]), vocab_plan.vocab_size, base,
                                              dtype))
            elif role == "rows" and role in keys:
                setattr(weights, attr, _finite(name, module, read_tensor(keys[role])[:], dtype))
        if "lora_a" in keys:
            a, bt = fold(module, m.scale, read_tensor(keys["lora_a"])[:], read_tensor(keys["lora_b"])[:])
            setattr(weights, f"{prefix}_lora", (a.t().contiguous(), bt))
    if weights.embed_rows is not None or weights.head_rows is not None:
        weights.token_ids = torch.tensor(vocab_plan.indices, dtype=torch.long)
        if weights.head_rows is None and base.tied and weights.head is None:
            weights.head_rows = weights.embed_rows  # PEFT adapts a tied lm_head with the embedding's rows
    return weights


def _split(name: str, module: str, source, vocab: int, base: VocabShape,
           dtype: torch.dtype) -> VocabParallelEmbedding:
    """This rank's rows of a whole matrix (`source`: a tensor or a safetensors slice, only those rows read), as
    the base model's own vocabulary-parallel layer of that module."""
    cls = VocabParallelEmbedding if module == "embed_tokens" else ParallelLMHead
    layer = cls(vocab, base.hidden_size, dtype, "cpu", base.tp_rank, base.tp_size)
    layer.load(module, source)
    _check_finite(name, module, [layer.weight], dtype)
    return layer


def _finite(name: str, where: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    converted = tensor.to(dtype).contiguous()
    _check_finite(name, where, [tensor, converted], dtype)
    return converted


def _check_finite(name: str, where: str, tensors: list[torch.Tensor], dtype: torch.dtype) -> None:
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise AdapterError(f"adapter {name}: {where} holds weights that are not finite (after conversion to "
                           f"{str(dtype).removeprefix('torch.')})")


# ---- per step ----------------------------------------------------------------------------------------------


class VocabBatch:
    """A step's vocabulary adapters: `parts` holds each adapter's weights and its rows of the step (token rows
    for the embeddings, sampled rows for the logits). Rows of other adapters and of the base model keep the
    base model's values. Logits are as wide as the widest vocabulary in the step; a row's columns past its own
    vocabulary are -inf, so they are never sampled."""

    __slots__ = ("parts", "base_vocab", "width")

    def __init__(self, parts: list[tuple[VocabWeights, torch.Tensor]], base_vocab: int):
        self.parts, self.base_vocab = parts, base_vocab
        self.width = max([base_vocab] + [w.vocab_size for w, _ in parts])

    def base_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """`ids` as the base embedding may look them up: ids of added tokens read row 0 (replaced afterwards)."""
        return ids if self.width == self.base_vocab else ids.masked_fill(ids >= self.base_vocab, 0)

    def embeddings(self, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        for weights, rows in self.parts:
            h = h.index_copy(0, rows, weights.embeddings(ids[rows], h[rows]))
        return h

    def logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        logits = _widen(logits, self.width)
        for weights, rows in self.parts:
            own = weights.logits(hidden[rows], logits[rows, :self.base_vocab])
            logits = logits.index_copy(0, rows, _widen(own, self.width))
        return logits


def _widen(logits: torch.Tensor, width: int) -> torch.Tensor:
    """`logits` with -inf columns appended up to `width`."""
    if logits.shape[1] >= width:
        return logits
    return torch.cat([logits, logits.new_full((logits.shape[0], width - logits.shape[1]), float("-inf"))], dim=1)
