"""The paged KV cache's blocks, owned by the router: which block ids each sequence uses, and prefix caching.

A block holds `block_size` consecutive token positions of one sequence; a sequence's block table grows on
demand. Once a full block's KV is computed it is hashed (chained to the block before it and to the cache
key, the adapter identity: "" for the base model) and a later sequence with the same prefix and the same key
reuses it instead of computing it again. KV computed under one adapter is never served to another.

A block is in exactly one of three states: held (reference count > 0, by one or more live sequences),
evictable (count 0 but hashed: still findable, taken last, least recently freed first) or clean free.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Seq:
    key: str  # the cache key its KV is computed under
    cached: bool  # prefix caching applies to it (reads in admit, registers in commit)
    table: list[int] = field(default_factory=list)
    # Chain digests of its first len(digests) blocks: the parent of the next block to hash.
    digests: list[bytes] = field(default_factory=list)


def _block_digest(parent: bytes, key: bytes, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    # Length prefixes keep the fields apart: no key or parent can pass for another's bytes.
    h.update(bytes([len(parent)]))
    h.update(parent)
    h.update(struct.pack("<I", len(key)))
    h.update(key)
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.queried_tokens = 0
        self.hit_tokens = 0
        self._init_blocks()

    def _init_blocks(self) -> None:
        self._seqs: dict[int, _Seq] = {}
        self._ref = [0] * self.num_blocks
        self._digest: list[bytes | None] = [None] * self.num_blocks
        self._by_digest: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest freed first
        # Popped from the end: low ids go out first, which keeps tables predictable.
        self._clean = list(range(self.num_blocks - 1, -1, -1))

    # -- capacity -----------------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._clean) + len(self._evictable)

    @property
    def num_held(self) -> int:
        """Blocks live sequences hold."""
        return self.num_blocks - self.num_free

    def usage(self) -> float:
        return self.num_held / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- sequences ----------------------------------------------------------------------------------------

    def admit(self, seq_id: int, token_ids: list[int], cache_key: str, use_cache: bool = True) -> int:
        """Starts a sequence holding the cached blocks of its longest cached prefix; returns the cached
        token count (whole blocks, at most len(token_ids) - 1, so the last token is always computed and no
        shared block is ever written)."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} is already live")
        seq = _Seq(cache_key, self.prefix_caching and use_cache)
        self._seqs[seq_id] = seq
        if not seq.cached:
            return 0
        key = cache_key.encode()
        parent = b""
        for i in range(max(0, (len(token_ids) - 1) // self.block_size)):
            parent = _block_digest(parent, key, self._block_tokens(token_ids, i))
            block = self._by_digest.get(parent)
            if block is None:
                break
            self._hold(block)
            seq.table.append(block)
            seq.digests.append(parent)
        hit = len(seq.table) * self.block_size
        self.queried_tokens += len(token_ids)
        self.hit_tokens += hit
        return hit

    def grow(self, seq_id: int, num_tokens: int) -> list[int] | None:
        """Extends the sequence's table to cover `num_tokens` positions; returns the new block ids in table
        order, or None (changing nothing) when too few blocks are free."""
        seq = self._seqs[seq_id]
        need = self.blocks_for(num_tokens) - len(seq.table)
        if need <= 0:
            return []
        if need > self.num_free:
            return None
        new = [self._take() for _ in range(need)]
        seq.table.extend(new)
        return new

    def commit(self, seq_id: int, token_ids: list[int], num_computed: int | None = None) -> None:
        """Registers the sequence's full blocks within its first `num_computed` tokens (default: all of
        `token_ids`), whose KV is now computed, that have no hash yet. A block whose hash another block already
        has stays unregistered."""
        seq = self._seqs[seq_id]
        if not seq.cached:
            return
        key = seq.key.encode()
        computed = len(token_ids) if num_computed is None else num_computed
        full = min(computed // self.block_size, len(seq.table))
        for i in range(len(seq.digests), full):
            parent = seq.digests[-1] if seq.digests else b""
            digest = _block_digest(parent, key, self._block_tokens(token_ids, i))
            # The chain continues through an unregistered duplicate: later blocks still hash the same.
            seq.digests.append(digest)
            if digest not in self._by_digest:
                block = seq.table[i]
                self._by_digest[digest] = block
                self._digest[block] = digest

    def free(self, seq_id: int) -> None:
        """Releases the sequence's blocks; unknown ids are ignored."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        # Last block first, so a prefix's head is evicted after its tail: the head is what others share.
        for block in reversed(seq.table):
            self._ref[block] -= 1
            if self._ref[block] > 0:
                continue
            if self._digest[block] is not None:
                self._evictable[block] = None
            else:
                self._clean.append(block)

    def table(self, seq_id: int, start: int = 0) -> list[int]:
        """The sequence's block ids from table index `start` on (a copy)."""
        return self._seqs[seq_id].table[start:]

    def reset(self) -> None:
        """Drops every sequence and every cached hash: after a shard failure the KV content is unknown."""
        self._init_blocks()

    # -- blocks -------------------------------------------------------------------------------------------

    def _block_tokens(self, token_ids: list[int], i: int) -> list[int]:
        return token_ids[i * self.block_size:(i + 1) * self.block_size]

    def _hold(self, block: int) -> None:
        if self._ref[block] == 0:
            del self._evictable[block]
        self._ref[block] += 1

    def _take(self) -> int:
        """A block for new KV: a clean one if any, else the least recently freed cached one, unhashed."""
        if self._clean:
            block = self._clean.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._by_digest[self._digest[block]]
            self._digest[block] = None
        self._ref[block] = 1
        return block

    def _check(self) -> None:
        """Asserts the bookkeeping is consistent (for tests; never called on a serving path)."""
        held: dict[int, int] = {}
        for seq in self._seqs.values():
            assert len(seq.digests) <= len(seq.table)
            for block in seq.table:
                held[block] = held.get(block, 0) + 1
        assert self.num_free + len(held) == self.num_blocks
        for block in range(self.num_blocks):
            assert self._ref[block] == held.get(block, 0), block
        assert all(self._ref[b] == 0 and self._digest[b] is not None for b in self._evictable)
        assert all(self._ref[b] == 0 and self._digest[b] is None for b in self._clean)
        assert len(set(self._clean)) == len(self._clean)
        assert {b: d for b, d in enumerate(self._digest) if d is not None} == {
            b: d for d, b in self._by_digest.items()}
