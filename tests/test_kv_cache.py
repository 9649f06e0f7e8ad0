import pytest
import torch

from shard.kv_cache import (
    DEFAULT_CPU_KV_BYTES,
    allocate_kv_cache,
    bytes_per_block,
    kv_budget_bytes,
    num_blocks_for_budget,
)


def test_capacity_from_budget():
    per_block = bytes_per_block(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32)
    assert per_block == 2 * 2 * 16 * 2 * 16 * 4
    assert num_blocks_for_budget(10 * per_block + 5, per_block, 0, 16) == 10
    # max_total_tokens caps the cache at ceil(tokens / block_size) blocks.
    assert num_blocks_for_budget(10 * per_block, per_block, 33, 16) == 3
    assert num_blocks_for_budget(2 * per_block, per_block, 1000, 16) == 2
    assert bytes_per_block(2, 2, 16, 16, torch.bfloat16) == per_block // 2


def test_cpu_budget_defaults_and_overrides():
    cpu = torch.device("cpu")
    assert kv_budget_bytes(cpu, None) == DEFAULT_CPU_KV_BYTES
    assert kv_budget_bytes(cpu, 12345) == 12345


def test_cache_tensors():
    caches = allocate_kv_cache(3, 4, 16, 2, 8, torch.float32, torch.device("cpu"))
    assert len(caches) == 3
    assert caches[0].shape == (2, 64, 2, 8)
    assert not caches[0].any()  # zeros: masked slots must never hold nan
