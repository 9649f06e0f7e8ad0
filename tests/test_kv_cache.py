import pytest
import torch

from shard.kv_cache import (
    DEFAULT_CPU_KV_BYTES,
    BlockManager,
    KVCacheExhausted,
    allocate_kv_cache,
    bytes_per_block,
    kv_budget_bytes,
    num_blocks_for_budget,
)


def test_allocate_maps_positions_to_slots():
    bm = BlockManager(num_blocks=8, block_size=4)
    slots = bm.allocate(1, 6)
    assert bm.tables[1] == [0, 1]
    assert slots == [0, 1, 2, 3, 4, 5]
    assert bm.allocate(2, 4) == [8, 9, 10, 11]
    assert bm.num_free == 5


def test_append_takes_a_block_only_at_a_boundary():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate(7, 3)
    assert bm.append_slot(7) == 3  # fills block 0
    assert bm.num_free == 3
    assert bm.append_slot(7) == 4  # crosses into a new block
    assert bm.tables[7] == [0, 1]
    assert bm.num_free == 2
    assert bm.lengths[7] == 5


def test_release_returns_blocks_and_ignores_unknown_ids():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate(1, 3)
    bm.allocate(2, 2)
    bm.release(1)
    bm.release(99)
    assert bm.num_free == 3
    assert 1 not in bm.tables and 1 not in bm.lengths
    # Freed blocks are reused.
    bm.allocate(3, 6)
    assert sorted(bm.tables[3]) == [0, 1, 3]
    bm.reset()
    assert bm.num_free == 4 and not bm.tables


def test_exhaustion_is_a_clear_error():
    bm = BlockManager(num_blocks=2, block_size=4)
    assert not bm.can_allocate(9)
    with pytest.raises(KVCacheExhausted, match="sequence 5 needs 3, 2 of 2 free"):
        bm.allocate(5, 9)
    assert bm.num_free == 2  # a failed allocation takes nothing
    bm.allocate(1, 8)
    with pytest.raises(KVCacheExhausted, match="out of blocks"):
        bm.append_slot(1)


def test_double_allocation_is_rejected():
    bm = BlockManager(num_blocks=2, block_size=4)
    bm.allocate(1, 1)
    with pytest.raises(ValueError, match="already holds"):
        bm.allocate(1, 1)


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
