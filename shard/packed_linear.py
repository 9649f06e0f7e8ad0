"""Base weights pre-packed for oneDNN on CPU float32.

torch's float32 `F.linear` on CPU goes to its BLAS, which on this class of machine (AVX-512, not Intel) runs the
decode step's skinny matmuls at half the rate oneDNN reaches with weights reordered once into its blocked layout
(1.4–3.9× per projection at 1–256 rows; `make bench` / the README's decode-step figures). The packed copy sits
beside the dense weight, which everything else keeps reading (checkpoint loading, DoRA's norms, vocabulary
adapters, tied embeddings): it costs one more copy of the projection weights, so it is made only where the host
has that memory to spare. Results differ from BLAS's in rounding only (the sum order of each dot product), as BLAS
results already differ between batch sizes. `LOOM_CPU_PACKED_LINEAR=0` turns it off.
"""

from __future__ import annotations

import logging
import os

import psutil
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("loom.shard")

# The batch size oneDNN picks its packing for; any row count runs on it.
PACK_ROWS_HINT = 64


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights of this device and dtype are packed (CPU float32, oneDNN there, not turned off)."""
    return device.type == "cpu" and dtype == torch.float32 and available() \
        and os.environ.get("LOOM_CPU_PACKED_LINEAR", "1") != "0"


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` packed for oneDNN, or None where weights of its device and dtype are not packed."""
    if not enabled(weight.device, weight.dtype):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b, through the packed copy of W when there is one."""
    if packed is None or x.dtype != torch.float32 or x.dim() != 2:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def pack_linears(model: nn.Module, device: torch.device, dtype: torch.dtype) -> int:
    """Gives every module with a `packed` slot (the parallel linears, the LM head) a packed copy of its weight,
    on CPU float32 when oneDNN is there and the host's available memory holds the copies twice over; returns the
    bytes packed (0: none)."""
    if not enabled(device, dtype):
        return 0
    modules = [m for m in model.modules() if hasattr(m, "packed") and getattr(m, "weight", None) is not None]
    total = sum(m.weight.numel() * m.weight.element_size() for m in modules)
    if 2 * total > psutil.virtual_memory().available:
        log.info("base weights not packed for oneDNN: %.1f GB more would not fit the host's memory", total / 1e9)
        return 0
    for m in modules:
        m.packed = pack(m.weight)
    log.info("base weights packed for oneDNN (%.2f GB beside the dense copy)", total / 1e9)
    return total
