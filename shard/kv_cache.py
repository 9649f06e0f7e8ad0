"""Paged KV cache: the cache tensors and their sizing from a memory budget (the router owns the blocks:
router/kv_blocks.py)."""

from __future__ import annotations

import torch

DEFAULT_BLOCK_SIZE = 16
DEFAULT_CPU_KV_BYTES = 1 << 30  # 1 GiB per rank when the caller names no budget on CPU
DEFAULT_GPU_MEMORY_FRACTION = 0.9


def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element


def kv_budget_bytes(device: torch.device, requested: int | None,
                    gpu_fraction: float = DEFAULT_GPU_MEMORY_FRACTION, reserved_bytes: int = 0) -> int:
    """Bytes available for the KV cache: `requested` when given; on CUDA the free memory times `gpu_fraction`
    minus `reserved_bytes` (the activation peak measured at warmup); on CPU DEFAULT_CPU_KV_BYTES."""
    if requested:
        return requested
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, int(free * gpu_fraction) - reserved_bytes)
    return DEFAULT_CPU_KV_BYTES


def num_blocks_for_budget(budget_bytes: int, block_bytes: int, max_total_tokens: int, block_size: int) -> int:
    """Blocks that fit the budget, capped at ceil(max_total_tokens / block_size) when that is > 0."""
    blocks = budget_bytes // block_bytes
    if max_total_tokens > 0:
        blocks = min(blocks, -(-max_total_tokens // block_size))
    return blocks


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """One [2, num_blocks * block_size, num_kv_heads, head_dim] tensor (K and V) per layer."""
    shape = (2, num_blocks * block_size, num_kv_heads, head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
