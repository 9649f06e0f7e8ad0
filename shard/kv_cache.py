"""Paged KV cache: the cache tensors and their sizing from a memory budget (the router owns the blocks:
router/kv_blocks.py)."""

from __future__ import annotations

import mmap

import torch

from common.defaults import DEFAULT_CPU_KV_BYTES, DEFAULT_GPU_MEMORY_FRACTION

DEFAULT_BLOCK_SIZE = 16


def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def kv_budget_bytes(device: torch.device, requested: int | None,
                    gpu_fraction: float = DEFAULT_GPU_MEMORY_FRACTION, reserved_bytes: int = 0,
                    num_layers: int = 0) -> int:
    """Bytes available for the KV cache: `requested` when given; on CUDA the free memory times `gpu_fraction`
    minus `reserved_bytes` (the activation peak measured at warmup), less room for the decode gather; on CPU
    DEFAULT_CPU_KV_BYTES.

    A decode step copies each layer's context K/V of the running batch, each width group padded to at most twice
    its length (shard/attention.py DecodeGroup): up to twice one layer's share of the cache, beside it. With
    `num_layers`, the cache takes num_layers / (num_layers + 2) of what is left and the gather the rest."""
    if requested:
        return requested
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        left = max(0, int(free * gpu_fraction) - reserved_bytes)
        return left * num_layers // (num_layers + 2) if num_layers else left
    return DEFAULT_CPU_KV_BYTES


def num_blocks_for_budget(budget_bytes: int, block_bytes: int, max_total_tokens: int, block_size: int) -> int:
    """Blocks that fit the budget, capped at ceil(max_total_tokens / block_size) when that is > 0."""
    blocks = budget_bytes // block_bytes
    if max_total_tokens > 0:
        blocks = min(blocks, -(-max_total_tokens // block_size))
    return blocks


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """One zeroed [2, num_blocks * block_size, num_kv_heads, head_dim] tensor (K and V) per layer."""
    shape = (2, num_blocks * block_size, num_kv_heads, head_dim)
    if torch.device(device).type == "cpu" and hasattr(mmap, "MADV_HUGEPAGE") and num_blocks > 0:
        return [_on_huge_pages(shape, dtype) for _ in range(num_layers)]
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]


def _on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor in memory the kernel may back with 2 MiB pages (Linux transparent huge pages, in
    their default `madvise` mode). Decode reads each sequence's blocks, scattered over the cache, every step:
    with 4 KiB pages that is a TLB miss every two rows (measured: the CPU decode kernel 5-10% faster)."""
    numel = torch.Size(shape).numel()
    memory = mmap.mmap(-1, numel * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        memory.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without transparent huge pages: ordinary pages
        pass
    tensor = torch.frombuffer(memory, dtype=dtype, count=numel).view(shape)
    return tensor.zero_()  # anonymous pages read as 0 already; writing them commits the memory now, not mid-step
