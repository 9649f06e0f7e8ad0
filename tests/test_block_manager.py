"""router/kv_blocks.py: block allocation, reference counts and adapter-aware prefix caching."""

import random

import pytest

from router.kv_blocks import BlockManager

BS = 4


def run(bm: BlockManager, seq_id: int, tokens: list[int], key: str = "", use_cache: bool = True) -> int:
    """Admits, allocates and commits a whole prompt (as the scheduler does after its prefill); the hit."""
    hit = bm.admit(seq_id, tokens, key, use_cache)
    assert bm.grow(seq_id, len(tokens)) is not None
    bm.commit(seq_id, tokens)
    bm._check()
    return hit


def test_bad_sizes_refused():
    with pytest.raises(ValueError):
        BlockManager(0, BS)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def test_blocks_for_rounds_up():
    bm = BlockManager(4, BS)
    assert [bm.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_tables_grow_on_demand_across_boundaries():
    bm = BlockManager(8, BS)
    assert bm.admit(1, [1, 2, 3], "") == 0
    assert bm.table(1) == []
    assert bm.grow(1, 3) == [0]
    assert bm.grow(1, 4) == []  # still inside the first block
    assert bm.grow(1, 5) == [1]
    assert bm.grow(1, 13) == [2, 3]
    assert bm.grow(1, 2) == []  # never shrinks
    assert bm.table(1) == [0, 1, 2, 3]
    assert bm.num_free == 4 and bm.usage() == 0.5
    bm.table(1).append(99)  # a copy
    assert bm.table(1) == [0, 1, 2, 3]
    bm._check()


def test_grow_when_full_changes_nothing():
    bm = BlockManager(3, BS)
    bm.admit(1, [], "")
    bm.admit(2, [], "")
    assert bm.grow(1, 8) == [0, 1]
    assert bm.grow(2, 8) is None
    assert bm.table(2) == [] and bm.num_free == 1
    assert bm.grow(2, 4) == [2]
    assert bm.grow(1, 9) is None and bm.table(1) == [0, 1]
    bm._check()


def test_free_returns_capacity_exactly():
    bm = BlockManager(6, BS)
    run(bm, 1, list(range(10)))
    run(bm, 2, list(range(5)), use_cache=False)
    assert bm.num_free == 1
    bm.free(1)
    assert bm.num_free == 4
    bm.free(2)
    bm.free(2)  # unknown ids are ignored
    bm.free(77)
    assert bm.num_free == 6 and bm.usage() == 0.0
    bm._check()


def test_admit_twice_refused():
    bm = BlockManager(4, BS)
    bm.admit(1, [1], "")
    with pytest.raises(ValueError):
        bm.admit(1, [1], "")


def test_hit_after_the_first_sequence_finished():
    bm = BlockManager(8, BS)
    prompt = list(range(10))
    assert run(bm, 1, prompt) == 0
    first = bm.table(1)
    bm.free(1)
    assert bm.num_free == 8  # cached blocks count as free (evictable)
    assert bm.admit(2, prompt + [50, 51], "") == 8
    assert bm.table(2) == first[:2]
    assert bm.num_free == 6
    assert bm.grow(2, 12) == [first[2]]  # the clean block the first sequence freed
    bm._check()


def test_hit_while_the_first_sequence_runs_shares_the_blocks():
    bm = BlockManager(8, BS)
    prompt = list(range(9))
    run(bm, 1, prompt)
    assert bm.num_free == 5
    assert bm.admit(2, prompt, "") == 8
    assert bm.table(2) == bm.table(1)[:2]
    assert bm._ref[bm.table(1)[0]] == 2
    assert bm.num_free == 5  # shared blocks are held once
    assert bm.grow(2, 9) == [3]
    bm.free(1)
    assert bm.num_free == 5  # the shared blocks are still held by 2; 1's last block is clean again
    bm.free(2)
    assert bm.num_free == 8
    bm._check()


def test_no_hit_for_another_key_another_earlier_block_or_before_commit():
    bm = BlockManager(16, BS)
    prompt = list(range(9))
    run(bm, 1, prompt, key="adapter-a")
    bm.free(1)
    assert bm.admit(2, prompt, "") == 0  # the base model never reads an adapter's KV
    assert bm.admit(3, prompt, "adapter-b") == 0
    assert bm.admit(4, [9, 9, 9, 9] + prompt[4:], "adapter-a") == 0  # same second block, other parent
    assert bm.admit(5, prompt, "adapter-a") == 8
    bm.admit(6, [7] * 9, "")
    bm.grow(6, 9)
    assert bm.admit(7, [7] * 9, "") == 0  # 6 has not committed yet
    bm._check()


def test_hit_leaves_the_last_token_to_compute():
    bm = BlockManager(8, BS)
    prompt = list(range(8))
    run(bm, 1, prompt)
    assert bm.admit(2, prompt, "") == 4  # both blocks cached, one reused
    assert bm.admit(3, prompt[:1], "") == 0
    assert bm.admit(4, [], "") == 0
    bm._check()


def test_use_cache_off_and_prefix_caching_off_hash_nothing():
    bm = BlockManager(8, BS)
    prompt = list(range(8))
    run(bm, 1, prompt)
    assert run(bm, 2, prompt, use_cache=False) == 0
    assert set(bm.table(2)).isdisjoint(bm.table(1))
    assert all(bm._digest[b] is None for b in bm.table(2))

    off = BlockManager(8, BS, prefix_caching=False)
    assert run(off, 1, prompt) == 0
    off.free(1)
    assert run(off, 2, prompt) == 0
    assert off._by_digest == {} and not off._evictable
    assert off.queried_tokens == 0 and off.hit_tokens == 0


def test_clean_blocks_go_before_cached_ones_oldest_freed_first():
    bm = BlockManager(4, BS)
    run(bm, 1, [1] * 4)  # block 0
    run(bm, 2, [2] * 4)  # block 1
    bm.free(2)
    bm.free(1)  # 1 was freed last: evicted last
    bm.admit(3, [], "")
    assert bm.grow(3, 8) == [2, 3]  # the clean ones first
    assert bm.grow(3, 12) == [1]  # then the least recently freed cached block
    assert bm.admit(4, [2] * 5, "") == 0  # its hash is gone
    assert bm.admit(5, [1] * 5, "") == 4  # the other is still cached
    assert bm.num_free == 0 and bm.usage() == 1.0
    bm._check()


def test_free_evicts_a_sequence_tail_before_its_head():
    bm = BlockManager(2, BS)
    prompt = list(range(8))
    run(bm, 1, prompt)
    bm.free(1)
    bm.admit(2, [], "")
    assert bm.grow(2, 1) == [1]  # the second block goes; the first one still hits
    assert bm.admit(3, prompt + [99], "") == 4
    bm._check()


def test_a_duplicate_block_stays_unregistered_but_keeps_the_chain():
    bm = BlockManager(16, BS)
    prompt = list(range(8))
    bm.admit(1, prompt, "")
    bm.admit(2, prompt + [8, 9, 10, 11, 12], "")  # admitted before 1 committed: computes its own copy
    bm.grow(1, 8)
    bm.grow(2, 13)
    bm.commit(1, prompt)
    bm.commit(2, prompt + [8, 9, 10, 11, 12])
    assert all(bm._digest[b] is None for b in bm.table(2)[:2])
    assert bm._digest[bm.table(2)[2]] is not None
    assert bm.admit(3, prompt + [8, 9, 10, 11, 99], "") == 12
    assert bm.table(3) == bm.table(1)[:2] + bm.table(2)[2:3]
    bm._check()


def test_reset_forgets_sequences_and_hashes():
    bm = BlockManager(4, BS)
    prompt = list(range(8))
    run(bm, 1, prompt)
    bm.reset()
    assert bm.num_free == 4 and bm.usage() == 0.0
    with pytest.raises(KeyError):
        bm.table(1)
    assert bm.admit(1, prompt, "") == 0
    bm._check()


def test_counters():
    bm = BlockManager(8, BS)
    prompt = list(range(9))
    run(bm, 1, prompt)
    run(bm, 2, prompt)
    run(bm, 3, prompt, use_cache=False)
    assert bm.queried_tokens == 18 and bm.hit_tokens == 8


def test_random_operations_keep_the_books():
    rng = random.Random(1234)
    bm = BlockManager(24, 2)
    live: dict[int, list[int]] = {}  # seq → its tokens so far
    keys: dict[int, str] = {}
    hits: dict[int, int] = {}  # seq → blocks it got from the cache
    content: dict[int, tuple] = {}  # block → (key, the token prefix its KV was computed for)
    prompts: list[list[int]] = [[]]
    next_id = 0

    def expected(seq: int, i: int) -> tuple:
        return keys[seq], tuple(live[seq][:(i + 1) * bm.block_size])

    for _ in range(600):
        op = rng.random()
        if op < 0.3 or not live:
            seq, next_id = next_id, next_id + 1
            prompt = rng.choice(prompts)[:rng.randint(0, 8)] + [rng.randint(0, 1) for _ in range(rng.randint(1, 6))]
            keys[seq], live[seq] = rng.choice(["", "a"]), prompt
            hit = bm.admit(seq, prompt, keys[seq], use_cache=rng.random() < 0.8)
            assert hit % bm.block_size == 0 and hit < len(prompt)
            hits[seq] = hit // bm.block_size
            for i, block in enumerate(bm.table(seq)):
                assert content[block] == expected(seq, i)  # the cache never serves other KV
            if bm.grow(seq, len(prompt)) is None:
                bm.free(seq)
                del live[seq]
            else:
                prompts.append(prompt)
        else:
            seq = rng.choice(sorted(live))
            if op < 0.55:
                extra = [rng.randint(0, 1) for _ in range(rng.randint(1, 3))]
                if bm.grow(seq, len(live[seq]) + len(extra)) is not None:
                    live[seq] += extra
            elif op < 0.85:
                n = rng.randint(0, min(len(live[seq]), len(bm.table(seq)) * bm.block_size))
                for i in range(hits[seq], n // bm.block_size):
                    content[bm.table(seq)[i]] = expected(seq, i)  # this sequence computed it
                bm.commit(seq, live[seq][:n])
            else:
                bm.free(seq)
                del live[seq]
        bm._check()
        holders: dict[int, list[tuple[int, int]]] = {}
        for seq in live:
            for i, block in enumerate(bm.table(seq)):
                holders.setdefault(block, []).append((seq, i))
        for block, where in holders.items():
            if len(where) > 1:
                assert bm._digest[block] is not None
                assert all(len(live[s]) >= (i + 1) * bm.block_size for s, i in where)
    assert bm.hit_tokens > 0  # the run did exercise the cache
