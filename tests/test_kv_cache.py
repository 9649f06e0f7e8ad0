import torch

from common.defaults import DEFAULT_CPU_KV_BYTES
from shard.kv_cache import (
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


def test_cuda_budget_leaves_room_for_the_decode_gather(monkeypatch):
    """On CUDA the cache is sized so that a decode step's gathered context copy (at most twice one layer's share
    of the cache) fits beside it: cache + 2 * cache / layers <= what the activation peak leaves."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10_000_000_000, 80_000_000_000))
    cuda = torch.device("cuda")
    left = int(10_000_000_000 * 0.9) - 1_000_000_000
    assert kv_budget_bytes(cuda, None, reserved_bytes=1_000_000_000) == left
    cache = kv_budget_bytes(cuda, None, reserved_bytes=1_000_000_000, num_layers=32)
    assert cache + 2 * cache / 32 <= left and cache == left * 32 // 34
    assert kv_budget_bytes(cuda, 12345, num_layers=32) == 12345  # an explicit --kv-cache-mb is taken as it is
