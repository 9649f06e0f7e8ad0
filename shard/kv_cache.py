"""Paged KV cache: block bookkeeping, cache tensors and sizing from a memory budget."""

from __future__ import annotations

import torch

DEFAULT_BLOCK_SIZE = 16
DEFAULT_CPU_KV_BYTES = 1 << 30  # 1 GiB per rank when the caller names no budget on CPU
DEFAULT_GPU_MEMORY_FRACTION = 0.9


class KVCacheExhausted(RuntimeError):
    pass


class BlockManager:
    """Fixed-size blocks handed out from a free list; each sequence owns a block table and a token count."""

    def __init__(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: list[int] = []
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self.reset()

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self.free)

    def _take(self, count: int, seq_id: int) -> list[int]:
        if count > len(self.free):
            raise KVCacheExhausted(
                f"KV cache out of blocks: sequence {seq_id} needs {count}, {len(self.free)} of {self.num_blocks} free"
            )
        taken = self.free[len(self.free) - count:][::-1]
        del self.free[len(self.free) - count:]
        return taken

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Blocks for a new sequence's first `num_tokens` tokens; returns their cache slots."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already holds KV blocks")
        self.tables[seq_id] = self._take(self.blocks_for(num_tokens), seq_id)
        self.lengths[seq_id] = num_tokens
        return self.slots(seq_id, 0, num_tokens)

    def append_slot(self, seq_id: int) -> int:
        """Room for one more token of `seq_id` (a new block when it crosses a boundary); returns its slot."""
        table, pos = self.tables[seq_id], self.lengths[seq_id]
        if pos == len(table) * self.block_size:
            table.extend(self._take(1, seq_id))
        self.lengths[seq_id] = pos + 1
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def slots(self, seq_id: int, start: int, end: int) -> list[int]:
        table, bs = self.tables[seq_id], self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def release(self, seq_id: int) -> None:
        """Returns the sequence's blocks to the free list; unknown ids are ignored."""
        table = self.tables.pop(seq_id, None)
        if table is not None:
            del self.lengths[seq_id]
            self.free.extend(reversed(table))

    def reset(self) -> None:
        """Drops every sequence. The free list is popped from its end, so low block ids go out first."""
        self.free = list(range(self.num_blocks - 1, -1, -1))
        self.tables.clear()
        self.lengths.clear()


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
