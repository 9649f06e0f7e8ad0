"""Building blocks of the decoder families, tensor-parallel aware.

Every parallel layer owns the slicing rule for its weights: `load(param_name, src, parts)` reads only this
rank's part of a checkpoint tensor (`src` is a safetensors slice, indexable like a tensor without loading
it; `parts` names the logical projections of a fused layer that tensor holds). The same accessors say which
rows of a LoRA tensor a rank keeps. With tp_size == 1 no torch.distributed call is ever made.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shard.kernels import cpu
from shard.packed_linear import linear


def _is_distributed(tp_size: int) -> bool:
    return tp_size > 1 and dist.is_available() and dist.is_initialized()


def all_reduce(y: torch.Tensor, tp_size: int) -> torch.Tensor:
    """Sums the ranks' partial results in place (nothing to do on one rank)."""
    if _is_distributed(tp_size):
        dist.all_reduce(y)
    return y


def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"tensor {name}: checkpoint slice has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.eps = eps
        self.weight = _param((hidden_size,), dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu.runs_on(x) and (x.is_contiguous() or (x.dim() == 2 and x.stride(1) == 1)):
            return cpu.rms_norm(x, self.weight, self.eps)
        # Same op order as transformers: normalise in float32, cast back, then scale.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def load(self, param_name: str, src, parts: tuple[str, ...] | None = None) -> None:
        _copy(getattr(self, param_name).data, src[:], param_name)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with the output features split across ranks; the result stays sharded.

    `out_sizes` names the logical projections fused into this one, with their full sizes (gate and up:
    {"gate": n, "up": n}); each is split evenly, and rank r holds part r of every one of them, concatenated.
    """

    def __init__(self, in_features: int, out_sizes: dict[str, int], bias: bool, dtype: torch.dtype,
                 device: torch.device | str, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        for size in out_sizes.values():
            if size % tp_size:
                raise ValueError(f"output size {size} is not divisible by tp_size {tp_size}")
        self._init_params(in_features, out_sizes, {p: n // tp_size for p, n in out_sizes.items()}, bias, dtype,
                          device, tp_rank, tp_size)

    def _init_params(self, in_features: int, full_sizes: dict[str, int], local_sizes: dict[str, int], bias: bool,
                     dtype: torch.dtype, device: torch.device | str, tp_rank: int, tp_size: int) -> None:
        self.in_features, self.tp_rank, self.tp_size = in_features, tp_rank, tp_size
        self.full_sizes, self.local_sizes = full_sizes, local_sizes
        out = sum(local_sizes.values())
        self.weight = _param((out, in_features), dtype, device)
        self.bias = _param((out,), dtype, device) if bias else None
        self.packed: torch.Tensor | None = None  # the weight packed for oneDNN (shard/packed_linear.py)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.full_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.packed, self.bias)

    def _source_start(self, part: str) -> int:
        """Where this rank's rows of `part` start in that part's full tensor."""
        return self.tp_rank * self.local_sizes[part]

    def local_columns(self, parts: tuple[str, ...]) -> tuple[int, int]:
        """(start, size) of consecutive `parts` in this rank's output columns."""
        names = self.parts
        first = names.index(parts[0])
        if names[first:first + len(parts)] != parts:
            raise ValueError(f"parts {parts} are not consecutive in {names}")
        return sum(self.local_sizes[p] for p in names[:first]), sum(self.local_sizes[p] for p in parts)

    def source_rows(self, parts: tuple[str, ...]) -> list[tuple[int, int]]:
        """(start, size) of this rank's rows in a tensor that concatenates the full `parts` (a checkpoint's
        fused qkv_proj, or one LoRA B over them), in this rank's output order."""
        runs, offset = [], 0
        for part in parts:
            runs.append((offset + self._source_start(part), self.local_sizes[part]))
            offset += self.full_sizes[part]
        return runs

    def load(self, param_name: str, src, parts: tuple[str, ...] | None = None) -> None:
        """Loads `parts` (default: all of them) from `src`, which holds those full parts concatenated."""
        parts = parts or self.parts
        dst = getattr(self, param_name).data
        dst_start = self.local_columns(parts)[0]
        for (start, size), part in zip(self.source_rows(parts), parts):
            _copy(dst[dst_start:dst_start + size], src[start:start + size], f"{param_name} ({part})")
            dst_start += size


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection split by heads (parts "q", "k", "v"). When there are fewer kv heads than
    ranks, kv heads are replicated so that each rank holds the one its query heads use."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 dtype: torch.dtype, device: torch.device | str, tp_rank: int = 0, tp_size: int = 1):
        nn.Module.__init__(self)
        if num_heads % tp_size:
            raise ValueError(f"num_attention_heads {num_heads} is not divisible by tp_size {tp_size}")
        if num_kv_heads % tp_size and tp_size % num_kv_heads:
            raise ValueError(f"num_key_value_heads {num_kv_heads} and tp_size {tp_size} do not divide each other")
        self.num_heads = num_heads // tp_size
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.head_dim = head_dim
        self.kv_head_start = tp_rank * num_kv_heads // tp_size
        full = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim}
        q_size, kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self._init_params(hidden_size, full, {"q": q_size, "k": kv_size, "v": kv_size}, bias, dtype, device,
                          tp_rank, tp_size)

    def _source_start(self, part: str) -> int:
        return self.tp_rank * self.local_sizes[part] if part == "q" else self.kv_head_start * self.head_dim


class RowParallelLinear(nn.Module):
    """y = x W^T + b with the input features split across ranks; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        if in_features % tp_size:
            raise ValueError(f"input size {in_features} is not divisible by tp_size {tp_size}")
        self.in_features, self.out_features = in_features, out_features
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.local_in = in_features // tp_size
        self.weight = _param((out_features, self.local_in), dtype, device)
        self.bias = _param((out_features,), dtype, device) if bias else None
        self.packed: torch.Tensor | None = None  # the weight packed for oneDNN (shard/packed_linear.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.partial(x))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum; LoRA deltas of row-parallel targets are added to it before `reduce`."""
        return linear(x, self.weight, self.packed)

    def reduce(self, y: torch.Tensor) -> torch.Tensor:
        # The bias is added once, after the reduction, not once per rank.
        if _is_distributed(self.tp_size):
            dist.all_reduce(y)
        return y if self.bias is None else y + self.bias

    @property
    def input_start(self) -> int:
        """Where this rank's input features start in the full input."""
        return self.tp_rank * self.local_in

    def load(self, param_name: str, src, parts: tuple[str, ...] | None = None) -> None:
        dst = getattr(self, param_name).data
        if param_name == "bias":
            _copy(dst, src[:], param_name)
        else:
            _copy(dst, src[:, self.input_start:self.input_start + self.local_in], param_name)


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocab rows (padded to a multiple of tp_size). Also serves as the lm_head
    weight, so that tied embeddings share one partitioned tensor."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device | str,
                 tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.vocab_size, self.tp_size = vocab_size, tp_size
        self.local_vocab = -(-vocab_size // tp_size)
        self.vocab_start = tp_rank * self.local_vocab
        self.weight = _param((self.local_vocab, hidden_size), dtype, device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not _is_distributed(self.tp_size):
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.local_vocab)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        y = y.masked_fill(outside.unsqueeze(-1), 0)
        dist.all_reduce(y)
        return y

    def load(self, param_name: str, src, parts: tuple[str, ...] | None = None) -> None:
        end = min(self.vocab_start + self.local_vocab, self.vocab_size)
        dst = self.weight.data
        if end < self.vocab_start + self.local_vocab:
            dst[end - self.vocab_start:].zero_()  # padding rows of the last rank
        _copy(dst[:end - self.vocab_start], src[self.vocab_start:end], param_name)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to full-vocab logits (gathered from every rank's vocab slice)."""

    packed: torch.Tensor | None = None  # the weight packed for oneDNN (shard/packed_linear.py)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.weight, self.packed)
        if _is_distributed(self.tp_size):
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(parts, logits)
            logits = torch.cat(parts, dim=-1)
        return logits[..., :self.vocab_size]
