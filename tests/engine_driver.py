"""Steps an Engine in-process the way the router's scheduler does, for the engine-level tests: the router's
BlockManager (router/kv_blocks.py) allocates each sequence's blocks, a prefill is one whole-prompt chunk and a
decode a one-token chunk. `step(prefill, decode, release)` returns results in the order asked (prefills, then
decodes), with the engine's errors for ids it does not hold; `generate` runs requests to a length."""

from __future__ import annotations

from router.kv_blocks import BlockManager
from shard.engine import Chunk, Engine, SequenceRequest, TokenResult


class EngineDriver:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.blocks = BlockManager(engine.num_blocks, engine.block_size, prefix_caching=False)
        self._tokens: dict[int, int] = {}  # sequence id -> tokens it holds (prompt + sampled)

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    @property
    def free_blocks(self) -> int:
        return self.blocks.num_free

    def clear(self) -> None:
        self.engine.clear()
        self.blocks.reset()
        self._tokens.clear()

    def step(self, prefill: list[SequenceRequest], decode: list[int], release: list[int]) -> list[TokenResult]:
        for seq_id in release:
            self.blocks.free(seq_id)
            self._tokens.pop(seq_id, None)
        chunks = [self._chunk(r.id, 0, len(r.input_ids) + len(r.generated_ids), admit=r) for r in prefill]
        chunks += [self._chunk(i, self._tokens.get(i, 1) - 1, 1) for i in decode]
        results = self.engine.step(prefill, [c for c in chunks if c is not None], release)
        by_id: dict[int, list[TokenResult]] = {}
        for r in results:
            by_id.setdefault(r.request_id, []).append(r)
            if r.error:
                if r.request_id not in self.engine.sequences:
                    self.blocks.free(r.request_id)
                    self._tokens.pop(r.request_id, None)
            elif r.request_id in self._tokens:
                self._tokens[r.request_id] += 1
        ordered = [r.id for r in prefill] + list(decode)
        return [by_id[i].pop(0) for i in ordered if by_id.get(i)]

    def _chunk(self, seq_id: int, start: int, n: int, admit: SequenceRequest | None = None) -> Chunk | None:
        """The chunk with the blocks it needs; a sequence the driver does not hold gets none (the engine
        then answers that it is not active)."""
        if admit is not None and seq_id not in self._tokens and n:
            self.blocks.admit(seq_id, [], "", use_cache=False)
            self._tokens[seq_id] = n
        if seq_id not in self._tokens:
            return Chunk(seq_id, start, max(n, 1))
        before = len(self.blocks.table(seq_id))
        if self.blocks.grow(seq_id, start + n) is None:
            raise RuntimeError(f"test KV cache out of blocks for sequence {seq_id}")
        return Chunk(seq_id, start, n, self.blocks.table(seq_id)[before:])

    def generate(self, requests: list[SequenceRequest], n: int) -> dict[int, list[int]]:
        """Prefills `requests` together, decodes until each has n tokens, then releases them; raises on an
        error result."""
        out: dict[int, list[int]] = {}
        for step in range(n):
            for r in self.step(requests if step == 0 else [], list(out) if step else [], []):
                if r.error:
                    raise RuntimeError(f"sequence {r.request_id}: {r.error}")
                out.setdefault(r.request_id, []).append(r.token_id)
        self.step([], [], list(out))
        return out
