"""The in-process engine: sequence state, KV blocks, batched prefill/decode forwards and sampling.

The engine never decides when a sequence stops (EOS, max tokens, stop strings are the router's); it keeps
every sequence's tokens until the router releases it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from transformers import AutoConfig

from shard.attention import decode_metadata, prefill_metadata
from shard.kv_cache import (
    DEFAULT_BLOCK_SIZE,
    BlockManager,
    KVCacheExhausted,
    allocate_kv_cache,
    bytes_per_block,
    kv_budget_bytes,
    num_blocks_for_budget,
)
from shard.model import head_dim_of
from shard.sampler import SamplerOutput, SamplerRow, SamplingParams, sample
from shard.weights import load_model

__all__ = ["Engine", "EngineInfo", "SamplingParams", "SequenceRequest", "TokenResult"]


@dataclass(slots=True)
class SequenceRequest:
    """A new sequence to prefill."""

    id: int
    input_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter_id: str = ""  # "" = base model
    top_n_tokens: int = 0
    prefill_logprobs: bool = False


@dataclass(slots=True)
class TokenResult:
    request_id: int
    token_id: int
    logprob: float
    top_tokens: list[tuple[int, float]] = field(default_factory=list)
    # Only on the prefill result when asked: one per prompt token, the first is 0.0.
    prefill_logprobs: list[float] = field(default_factory=list)
    error: str = ""


@dataclass(slots=True)
class EngineInfo:
    model_type: str
    dtype: str
    device: str
    vocab_size: int
    max_position_embeddings: int
    block_size: int
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None
    rank: int
    world_size: int


def _error(request_id: int, message: str) -> TokenResult:
    return TokenResult(request_id, 0, 0.0, error=message)


class Engine:
    def __init__(self, model_dir: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 block_size: int = DEFAULT_BLOCK_SIZE, kv_cache_bytes: int | None = None,
                 tp_rank: int = 0, tp_size: int = 1):
        self.device = torch.device(device)
        self.dtype = dtype
        self.block_size = block_size
        self.kv_cache_bytes = kv_cache_bytes
        config = AutoConfig.from_pretrained(model_dir)
        self.model = load_model(config, model_dir, dtype, self.device, tp_rank, tp_size)
        self.vocab_size = config.vocab_size
        self.info = EngineInfo(
            model_type=config.model_type,
            dtype=str(dtype).removeprefix("torch."),
            device=str(self.device),
            vocab_size=config.vocab_size,
            max_position_embeddings=config.max_position_embeddings,
            block_size=block_size,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim_of(config),
            sliding_window=self.model.sliding_window,
            rank=tp_rank,
            world_size=tp_size,
        )
        self.blocks: BlockManager | None = None
        # A sequence's state is exactly what sampling needs: its tokens, params and generator.
        self.sequences: dict[int, SamplerRow] = {}

    @property
    def _distributed(self) -> bool:
        return self.info.world_size > 1 and dist.is_initialized()

    # ---- capacity -------------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks if self.blocks else 0

    @property
    def free_blocks(self) -> int:
        return self.blocks.num_free if self.blocks else 0

    def _install_cache(self, num_blocks: int) -> None:
        info = self.info
        caches = allocate_kv_cache(info.num_layers, num_blocks, self.block_size, self.model.local_kv_heads,
                                   info.head_dim, self.dtype, self.device)
        self.model.set_kv_cache(caches)
        self.blocks = BlockManager(num_blocks, self.block_size)
        self.sequences.clear()

    def _drop_cache(self) -> None:
        self.model.set_kv_cache([torch.empty(0)] * self.info.num_layers)
        self.blocks = None
        self.sequences.clear()

    def _dummy_prefill(self, num_tokens: int) -> None:
        # Prompts no longer than the model's positions, together `num_tokens` long.
        chunk = self.info.max_position_embeddings
        sizes = [chunk] * (num_tokens // chunk) + ([num_tokens % chunk] if num_tokens % chunk else [])
        requests = [SequenceRequest(-1 - i, [0] * n) for i, n in enumerate(sizes)]
        results = self._prefill(requests)
        for r in results:
            if r.error:
                raise RuntimeError(f"warmup prefill failed: {r.error}")
            self.blocks.release(r.request_id)
            del self.sequences[r.request_id]

    def _activation_peak(self, num_tokens: int) -> int:
        """CUDA bytes a prefill of `num_tokens` needs beyond weights and KV cache."""
        torch.cuda.reset_peak_memory_stats(self.device)
        self._install_cache(math.ceil(num_tokens / self.block_size))
        self._dummy_prefill(num_tokens)
        peak = torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)
        self._drop_cache()
        torch.cuda.empty_cache()
        return peak

    @torch.inference_mode()
    def warmup(self, max_batch_prefill_tokens: int, max_batch_total_tokens: int = 0) -> int:
        """Sizes and allocates the KV cache, runs a dummy prefill of `max_batch_prefill_tokens` tokens and
        returns the number of blocks. Budget: kv_cache_bytes when given; else on CUDA 90% of free memory
        less the measured prefill activation peak, on CPU 1 GiB. max_batch_total_tokens > 0 caps the cache
        at ceil(max_batch_total_tokens / block_size) blocks. Drops every sequence."""
        self._drop_cache()
        reserved = 0
        if self.device.type == "cuda" and not self.kv_cache_bytes:
            reserved = self._activation_peak(max_batch_prefill_tokens)
        budget = kv_budget_bytes(self.device, self.kv_cache_bytes, reserved_bytes=reserved)
        block_bytes = bytes_per_block(self.info.num_layers, self.model.local_kv_heads, self.info.head_dim,
                                      self.block_size, self.dtype)
        num_blocks = num_blocks_for_budget(budget, block_bytes, max_batch_total_tokens, self.block_size)
        if self._distributed:
            # Ranks run identical block tables, so they share the smallest rank's capacity.
            blocks = torch.tensor([num_blocks], device=self.device)
            dist.all_reduce(blocks, op=dist.ReduceOp.MIN)
            num_blocks = int(blocks.item())
        needed = math.ceil(max_batch_prefill_tokens / self.block_size)
        if num_blocks < max(1, needed):
            raise RuntimeError(
                f"KV cache of {num_blocks} blocks ({budget} bytes budget, {block_bytes} bytes per block, "
                f"max_batch_total_tokens={max_batch_total_tokens}) cannot hold a prefill of "
                f"{max_batch_prefill_tokens} tokens ({needed} blocks)"
            )
        self._install_cache(num_blocks)
        self._dummy_prefill(max_batch_prefill_tokens)
        return num_blocks

    def clear(self) -> None:
        """Drops every sequence and frees all KV blocks."""
        self.sequences.clear()
        if self.blocks:
            self.blocks.reset()

    # ---- stepping -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, prefill: list[SequenceRequest], decode: list[int], release: list[int]) -> list[TokenResult]:
        """Frees `release` (unknown ids ignored), prefills `prefill` (sampling each one's first token), then
        decodes one token for each id in `decode`. Returns prefill results, then decode results."""
        if self.blocks is None:
            raise RuntimeError("Engine.step before warmup: the KV cache is not allocated")
        for seq_id in release:
            self.blocks.release(seq_id)
            self.sequences.pop(seq_id, None)
        results = self._prefill(prefill) if prefill else []
        if decode:
            results += self._decode(decode)
        return results

    def _validate(self, req: SequenceRequest, taken: set[int], free_blocks: int) -> str:
        if req.adapter_id:
            return f"adapter {req.adapter_id!r} is not loaded on this shard"
        if not req.input_ids:
            return "empty prompt: input_ids must hold at least one token"
        bad = [t for t in req.input_ids if not 0 <= t < self.vocab_size]
        if bad:
            return f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
        if req.id in self.sequences or req.id in taken:
            return f"sequence {req.id} is already active"
        needed = self.blocks.blocks_for(len(req.input_ids))
        if needed > free_blocks:
            return f"KV cache out of blocks: the prompt needs {needed}, {free_blocks} free"
        return ""

    def _prefill(self, requests: list[SequenceRequest]) -> list[TokenResult]:
        results: list[TokenResult | None] = [None] * len(requests)
        accepted: list[int] = []
        taken: set[int] = set()
        free = self.blocks.num_free
        for i, req in enumerate(requests):
            if message := self._validate(req, taken, free):
                results[i] = _error(req.id, message)
                continue
            accepted.append(i)
            taken.add(req.id)
            free -= self.blocks.blocks_for(len(req.input_ids))
        if not accepted:
            return results

        ids, positions, slots, seq_lens = [], [], [], []
        logit_rows, last_rows = [], []  # hidden rows to project; per request, its last row in that selection
        offset = 0
        for i in accepted:
            req = requests[i]
            n = len(req.input_ids)
            ids += req.input_ids
            positions += range(n)
            slots += self.blocks.allocate(req.id, n)
            seq_lens.append(n)
            logit_rows += range(offset, offset + n) if req.prefill_logprobs else [offset + n - 1]
            last_rows.append(len(logit_rows) - 1)
            offset += n

        dev = self.device
        meta = prefill_metadata(seq_lens, torch.tensor(slots, device=dev), self.model.sliding_window)
        hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), meta)
        logits = self.model.compute_logits(hidden[torch.tensor(logit_rows, device=dev)])

        rows = [self._new_sequence(requests[i]) for i in accepted]
        out = self._sample(logits[last_rows], rows)
        for j, i in enumerate(accepted):
            req, row = requests[i], rows[j]
            row.token_ids.append(out.token_ids[j])
            result = TokenResult(req.id, out.token_ids[j], out.logprobs[j], out.top_tokens[j])
            if req.prefill_logprobs:
                result.prefill_logprobs = self._prompt_logprobs(logits, last_rows[j], req.input_ids)
            results[i] = result
        return results

    def _sample(self, logits: torch.Tensor, rows: list[SamplerRow]) -> SamplerOutput:
        out = sample(logits, rows)
        if self._distributed:
            # Unseeded draws differ between ranks; every rank must feed the same tokens to the next step.
            tokens = torch.tensor(out.token_ids, device=self.device)
            dist.broadcast(tokens, src=0)
            out.token_ids = tokens.tolist()
        return out

    def _new_sequence(self, req: SequenceRequest) -> SamplerRow:
        generator = None
        if req.sampling.seed is not None:
            generator = torch.Generator(self.device)
            generator.manual_seed(req.sampling.seed)
        row = SamplerRow(req.sampling, list(req.input_ids), len(req.input_ids), req.top_n_tokens, generator)
        self.sequences[req.id] = row
        return row

    @staticmethod
    def _prompt_logprobs(logits: torch.Tensor, last_row: int, prompt: list[int]) -> list[float]:
        """logprob of each prompt token given the ones before it (raw logits); the first gets 0.0."""
        n = len(prompt)
        if n == 1:
            return [0.0]
        lp = logits[last_row - n + 1:last_row].log_softmax(-1)
        targets = torch.tensor(prompt[1:], device=logits.device)[:, None]
        return [0.0] + lp.gather(1, targets)[:, 0].tolist()

    def _decode(self, seq_ids: list[int]) -> list[TokenResult]:
        results: list[TokenResult | None] = [None] * len(seq_ids)
        live: list[int] = []
        seen: set[int] = set()
        for i, seq_id in enumerate(seq_ids):
            if seq_id not in self.sequences or seq_id in seen:
                results[i] = _error(seq_id, f"sequence {seq_id} is not active (never prefilled, released or repeated)")
            else:
                live.append(i)
                seen.add(seq_id)
        if not live:
            return results

        bm = self.blocks
        rows = [self.sequences[seq_ids[i]] for i in live]
        needed = sum(1 for i in live if bm.lengths[seq_ids[i]] % bm.block_size == 0)
        if needed > bm.num_free:
            raise KVCacheExhausted(f"KV cache out of blocks: decode needs {needed} new blocks, {bm.num_free} free")
        slots = [bm.append_slot(seq_ids[i]) for i in live]
        tables = [bm.tables[seq_ids[i]] for i in live]
        width = max(len(t) for t in tables)

        dev = self.device
        context_lens = [len(r.token_ids) for r in rows]
        meta = decode_metadata(
            torch.tensor([t + [0] * (width - len(t)) for t in tables], device=dev),
            torch.tensor(context_lens, device=dev),
            torch.tensor(slots, device=dev),
            bm.block_size,
            self.model.sliding_window,
        )
        input_ids = torch.tensor([r.token_ids[-1] for r in rows], device=dev)
        positions = torch.tensor([n - 1 for n in context_lens], device=dev)
        logits = self.model.compute_logits(self.model(input_ids, positions, meta))

        out = self._sample(logits, rows)
        for j, i in enumerate(live):
            rows[j].token_ids.append(out.token_ids[j])
            results[i] = TokenResult(seq_ids[i], out.token_ids[j], out.logprobs[j], out.top_tokens[j])
        return results
