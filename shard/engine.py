"""The in-process engine: sequence state, KV blocks, batched prefill/decode forwards and sampling.

The engine never decides when a sequence stops (EOS, max tokens, stop strings are the router's); it keeps
every sequence's tokens until the router releases it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from transformers import AutoConfig

from shard.adapter_cache import (
    DEFAULT_ADAPTER_HOST_CACHE_BYTES,
    DEFAULT_ADAPTER_MEMORY_FRACTION,
    DEFAULT_ADAPTER_PAGE_RANK,
    DEFAULT_STACKS_SHARE,
    AdapterCache,
)
from shard.attention import decode_metadata, prefill_metadata
from shard.kv_cache import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CPU_KV_BYTES,
    BlockManager,
    KVCacheExhausted,
    allocate_kv_cache,
    bytes_per_block,
    kv_budget_bytes,
    num_blocks_for_budget,
)
from shard.lora import AdapterError, PageLayout, projection_shapes
from shard.lora_batch import LoraBatch, PageGather, TritonLoraBatch
from shard.models import head_dim_of
from shard.sampler import SamplerOutput, SamplerRow, SamplingParams, sample
from shard.grammar import GrammarError, Grammars
from shard.weights import load_model

# Rows of prompt logits materialised at once for prompt logprobs (128 x a 128k vocabulary: 64 MB of float32).
PROMPT_LOGPROBS_CHUNK = 128

__all__ = ["AdapterError", "AdapterInfo", "Engine", "EngineInfo", "SamplingParams", "SequenceRequest", "TokenResult"]


@dataclass(slots=True)
class SequenceRequest:
    """A new sequence to prefill."""

    id: int
    input_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter_id: str = ""  # "" = base model
    top_n_tokens: int = 0
    prefill_logprobs: bool = False
    grammar: str = ""  # llguidance grammar the output must follow; "" = free
    min_new_tokens: int = 0  # stop_token_ids are masked until this many tokens were generated
    stop_token_ids: list[int] = field(default_factory=list)


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


@dataclass(slots=True)
class AdapterInfo:
    rank: int
    pages: int  # adapter pool pages it occupies while resident


def _accept(row: SamplerRow, token_id: int) -> None:
    """Appends a sampled token to its sequence and advances the sequence's grammar."""
    row.token_ids.append(token_id)
    if row.matcher is not None:
        row.matcher.consume_token(token_id)


def _error(request_id: int, message: str) -> TokenResult:
    return TokenResult(request_id, 0, 0.0, error=message)


class Engine:
    def __init__(self, model_dir: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 block_size: int = DEFAULT_BLOCK_SIZE, kv_cache_bytes: int | None = None,
                 tp_rank: int = 0, tp_size: int = 1,
                 adapter_memory_fraction: float = DEFAULT_ADAPTER_MEMORY_FRACTION,
                 adapter_pool_pages: int | None = None,
                 adapter_host_cache_bytes: int = DEFAULT_ADAPTER_HOST_CACHE_BYTES,
                 adapter_page_rank: int = DEFAULT_ADAPTER_PAGE_RANK):
        self.device = torch.device(device)
        self.dtype = dtype
        self.block_size = block_size
        self.kv_cache_bytes = kv_cache_bytes
        self.adapter_memory_fraction = adapter_memory_fraction
        self.adapter_pool_pages = adapter_pool_pages
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
        layout = PageLayout.build(config.num_hidden_layers, adapter_page_rank, projection_shapes(self.model))
        self.adapters = AdapterCache(layout, dtype, self.device, adapter_host_cache_bytes)
        # Triton SGMV instead of the torch LoRA path: CUDA only, opt-in until checked on a GPU.
        self.triton_lora = self.device.type == "cuda" and os.environ.get("LOOM_TRITON_LORA") == "1"
        self.seq_adapters: dict[int, str] = {}  # sequences with an adapter -> its id, pinned while they live
        self.grammars = Grammars(model_dir, config.vocab_size)

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
        self._forget_all()

    def _drop_cache(self) -> None:
        self.model.set_kv_cache([torch.empty(0)] * self.info.num_layers)
        self.blocks = None
        self._forget_all()

    def _forget(self, seq_id: int) -> None:
        self.sequences.pop(seq_id, None)
        if adapter_id := self.seq_adapters.pop(seq_id, None):
            self.adapters.unpin(adapter_id)

    def _forget_all(self) -> None:
        self.sequences.clear()
        self.seq_adapters.clear()
        self.adapters.unpin_all()

    def _warmup_sizes(self, num_tokens: int) -> list[int]:
        """Prompts no longer than the model's positions, together `num_tokens` long."""
        chunk = self.info.max_position_embeddings
        return [chunk] * (num_tokens // chunk) + ([num_tokens % chunk] if num_tokens % chunk else [])

    def warmup_blocks(self, num_tokens: int, decode: bool = True) -> int:
        """KV blocks the warmup batch of `num_tokens` takes: each prompt's own blocks (a prompt that is not a
        multiple of the block size rounds up on its own), plus with `decode` one per prompt for its decode."""
        return sum(math.ceil(n / self.block_size) + decode for n in self._warmup_sizes(num_tokens))

    def _dummy_batch(self, num_tokens: int) -> None:
        """The worst step the limits allow, so that its activations are measured (and on CUDA, allocator
        pools and kernels are warm): a prefill of `num_tokens` prompt tokens with prompt logprobs, then a
        decode step of all of them."""
        sizes = self._warmup_sizes(num_tokens)
        requests = [SequenceRequest(-1 - i, [0] * n, prefill_logprobs=True) for i, n in enumerate(sizes)]
        results = self._prefill(requests)
        if not any(r.error for r in results):
            results += self._decode(self._decodable([r.request_id for r in results]))
        for r in results:
            if r.error:
                raise RuntimeError(f"warmup step failed: {r.error}")
        for r in requests:
            self.blocks.release(r.id)
            self._forget(r.id)

    def _decodable(self, seq_ids: list[int]) -> list[int]:
        """The sequences of `seq_ids` whose next token fits the free blocks (a cache sized to the limits
        exactly may have no block left for a prompt that ends on a block boundary)."""
        room, fits = self.blocks.num_free, []
        for seq_id in seq_ids:
            if self.blocks.lengths[seq_id] % self.block_size == 0:
                if room == 0:
                    continue
                room -= 1
            fits.append(seq_id)
        return fits

    def measure_activation_peak(self, num_tokens: int) -> int:
        """Bytes the worst step (_dummy_batch) needs beyond weights, adapters and KV cache: measured on CUDA,
        0 elsewhere. Runs on a KV cache of exactly warmup_blocks(num_tokens) blocks."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._install_cache(self.warmup_blocks(num_tokens))
        self._dummy_batch(num_tokens)
        peak = torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device) if cuda else 0
        self._drop_cache()
        if cuda:
            torch.cuda.empty_cache()
        return peak

    @torch.inference_mode()
    def warmup(self, max_batch_prefill_tokens: int, max_batch_total_tokens: int = 0) -> int:
        """Sizes and allocates the KV cache, runs a dummy prefill of `max_batch_prefill_tokens` tokens and
        returns the number of blocks. Budget: kv_cache_bytes when given; else on CUDA 90% of free memory
        less the measured prefill activation peak, on CPU 1 GiB. max_batch_total_tokens > 0 caps the cache
        at ceil(max_batch_total_tokens / block_size) blocks. Allocates the adapter pool first (see
        _allocate_adapter_pool), so that on CUDA the KV cache is sized from what the pool leaves. Drops every
        sequence."""
        self._drop_cache()
        self._allocate_adapter_pool()
        reserved = 0
        if self.device.type == "cuda" and not self.kv_cache_bytes:
            reserved = self.measure_activation_peak(max_batch_prefill_tokens)
        budget = kv_budget_bytes(self.device, self.kv_cache_bytes, reserved_bytes=reserved)
        block_bytes = bytes_per_block(self.info.num_layers, self.model.local_kv_heads, self.info.head_dim,
                                      self.block_size, self.dtype)
        num_blocks = num_blocks_for_budget(budget, block_bytes, max_batch_total_tokens, self.block_size)
        if self._distributed:
            # Ranks run identical block tables, so they share the smallest rank's capacity.
            blocks = torch.tensor([num_blocks], device=self.device)
            dist.all_reduce(blocks, op=dist.ReduceOp.MIN)
            num_blocks = int(blocks.item())
        needed = self.warmup_blocks(max_batch_prefill_tokens, decode=False)
        if num_blocks < max(1, needed):
            raise RuntimeError(
                f"KV cache of {num_blocks} blocks ({budget} bytes budget, {block_bytes} bytes per block, "
                f"max_batch_total_tokens={max_batch_total_tokens}) cannot hold a prefill of "
                f"{max_batch_prefill_tokens} tokens ({needed} blocks)"
            )
        self._install_cache(num_blocks)
        self._dummy_batch(max_batch_prefill_tokens)
        return num_blocks

    def _allocate_adapter_pool(self) -> None:
        """The adapter memory: adapter_memory_fraction of free CUDA memory (taken before the KV cache is sized)
        or, on CPU, of the KV cache budget; or adapter_pool_pages pages plus the stacks' share on top. The torch
        LoRA path keeps DEFAULT_STACKS_SHARE of it for the running adapters' dense rows (AdapterStacks)."""
        share = 0.0 if self.triton_lora else DEFAULT_STACKS_SHARE
        page_bytes = self.adapters.page_bytes
        if self.adapter_pool_pages is not None:
            pages = self.adapter_pool_pages
            budget = int((pages + 1) * page_bytes / (1 - share))
        else:
            if self.device.type == "cuda":
                free = torch.cuda.mem_get_info(self.device)[0]
            else:
                free = self.kv_cache_bytes or DEFAULT_CPU_KV_BYTES
            budget = int(free * self.adapter_memory_fraction)
            pages = max(0, int(budget * (1 - share)) // page_bytes - 1)  # the pool's zero page is in the budget
        if self._distributed:
            count = torch.tensor([pages], device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MIN)
            pages = int(count.item())
        self.adapters.allocate(pages, max(0, budget - (pages + 1) * page_bytes) if share else 0)

    # ---- adapters -------------------------------------------------------------------------------------

    @property
    def adapter_pages(self) -> int:
        return self.adapters.num_pages

    @property
    def adapter_page_rank(self) -> int:
        return self.adapters.layout.page_rank

    def load_adapter(self, adapter_id: str, path: str, preloaded: bool = False) -> AdapterInfo:
        """Checks a PEFT LoRA dir against the model and registers it under `adapter_id` (read into the host
        cache); requests may then name it. `preloaded`: paged into the pool now and never evicted. Raises
        AdapterError with a message naming the file or tensor."""
        if not adapter_id:
            raise AdapterError("adapter id must not be empty (\"\" is the base model)")
        entry = self.adapters.register(adapter_id, path)
        if preloaded:
            with torch.inference_mode():  # the pool is an inference tensor, written in place
                self.adapters.preload(adapter_id)
        return AdapterInfo(entry.rank, entry.num_pages)

    def unload_adapter(self, adapter_id: str) -> None:
        """Forgets a registered adapter; raises AdapterError while live sequences use it."""
        self.adapters.unregister(adapter_id)

    def _arrange(self, adapter_ids: list[str]) -> list[str] | None:
        """The step's adapters in AdapterStacks slot order (their rows made dense there), or None when the
        stacks cannot hold them (LoRA then gathers from the pool)."""
        entries = {a: self.adapters.entries[a] for a in adapter_ids if a}
        targets = set().union(*(e.targets for e in entries.values()))
        return self.adapters.stacks.arrange({a: e.pages for a, e in entries.items()}, targets)

    def _group_by_adapter(self, rows: list[int], adapter_ids: list[str]) -> list[int]:
        """`rows` reordered so each adapter's are together, adapters in their AdapterStacks slot order (else in
        order of appearance) and base-model rows last: LoRA then reads and writes the decode batch in place."""
        if self.triton_lora or not any(adapter_ids):
            return rows
        slots = self._arrange(adapter_ids) or list(dict.fromkeys(a for a in adapter_ids if a))
        slot = {a: i for i, a in enumerate(slots)}
        by_row = sorted(range(len(rows)), key=lambda j: slot.get(adapter_ids[j], len(slot)))
        return [rows[j] for j in by_row]

    def _lora_batch(self, adapter_ids: list[str], lengths: list[int]) -> LoraBatch | None:
        """The step's LoRA hook: one segment per adapter over its sequences' tokens; None when all are base."""
        if not any(adapter_ids):
            return None
        segments: dict[str, list[int]] = {}
        offset = 0
        for adapter_id, n in zip(adapter_ids, lengths):
            if adapter_id:
                segments.setdefault(adapter_id, []).extend(range(offset, offset + n))
            offset += n
        self.adapters.touch(list(segments))
        entries = {a: self.adapters.entries[a] for a in segments}
        targets = set().union(*(e.targets for e in entries.values()))
        if self.triton_lora:
            return TritonLoraBatch(self.adapters.pool, self.adapters.layout, list(segments.values()),
                                   [e.pages for e in entries.values()], targets, self.device)
        order = self._arrange(list(segments))
        source = self.adapters.stacks
        if order is None:
            order = list(segments)
            source = PageGather(self.adapters.views, self.adapters.layout.page_rank,
                                [entries[a].pages for a in order], self.device)
        return LoraBatch(source, [segments[a] for a in order], targets, offset, self.device)

    def clear(self) -> None:
        """Drops every sequence (unpinning their adapters) and frees all KV blocks."""
        self._forget_all()
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
            self._forget(seq_id)
        results = self._prefill(prefill) if prefill else []
        if decode:
            results += self._decode(decode)
        return results

    def _validate(self, req: SequenceRequest, taken: set[int], free_blocks: int) -> str:
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
        if req.grammar:
            try:
                self.grammars.matcher(req.grammar)
            except (GrammarError, ValueError, RuntimeError) as e:
                return str(e)
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
        # Page in the adapters; requests whose adapter is unknown or does not fit the pool fail alone.
        failed = self.adapters.make_resident([requests[i].adapter_id for i in accepted if requests[i].adapter_id])
        if failed:
            for i in accepted:
                if message := failed.get(requests[i].adapter_id):
                    results[i] = _error(requests[i].id, message)
            accepted = [i for i in accepted if results[i] is None]
        if not accepted:
            return results

        ids, positions, slots, seq_lens, last_rows = [], [], [], [], []
        offset = 0
        for i in accepted:
            req = requests[i]
            n = len(req.input_ids)
            ids += req.input_ids
            positions += range(n)
            slots += self.blocks.allocate(req.id, n)
            seq_lens.append(n)
            last_rows.append(offset + n - 1)
            offset += n

        dev = self.device
        last_rows_t = torch.tensor(last_rows, device=dev)
        meta = prefill_metadata(seq_lens, torch.tensor(slots, device=dev), self.model.sliding_window)
        lora = self._lora_batch([requests[i].adapter_id for i in accepted], seq_lens)
        hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), meta, lora)
        logits = self.model.compute_logits(hidden.index_select(0, last_rows_t))

        rows = [self._new_sequence(requests[i]) for i in accepted]
        out = self._sample(logits, rows)
        for j, i in enumerate(accepted):
            req, row = requests[i], rows[j]
            _accept(row, out.token_ids[j])
            result = TokenResult(req.id, out.token_ids[j], out.logprobs[j], out.top_tokens[j])
            if req.prefill_logprobs:
                result.prefill_logprobs = self._prompt_logprobs(hidden, last_rows[j], req.input_ids)
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
        row = SamplerRow(req.sampling, list(req.input_ids), len(req.input_ids), req.top_n_tokens, generator,
                         matcher=self.grammars.matcher(req.grammar) if req.grammar else None,
                         min_new_tokens=req.min_new_tokens, stop_token_ids=list(req.stop_token_ids))
        self.sequences[req.id] = row
        if req.adapter_id:
            self.adapters.pin(req.adapter_id)
            self.seq_adapters[req.id] = req.adapter_id
        return row

    def _prompt_logprobs(self, hidden: torch.Tensor, last_row: int, prompt: list[int]) -> list[float]:
        """logprob of each prompt token given the ones before it (raw logits); the first gets 0.0. Logits are
        computed PROMPT_LOGPROBS_CHUNK rows at a time: a whole long prompt's float32 logits over a large
        vocabulary would be gigabytes."""
        n = len(prompt)
        first = last_row - n + 1
        targets = torch.tensor(prompt[1:], device=hidden.device)
        parts = []
        for start in range(0, n - 1, PROMPT_LOGPROBS_CHUNK):
            end = min(start + PROMPT_LOGPROBS_CHUNK, n - 1)
            lp = self.model.compute_logits(hidden[first + start:first + end]).log_softmax(-1)
            parts.append(lp.gather(1, targets[start:end, None])[:, 0])
        return [0.0] + (torch.cat(parts).tolist() if parts else [])

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
        needed = sum(1 for i in live if bm.lengths[seq_ids[i]] % bm.block_size == 0)
        if needed > bm.num_free:
            raise KVCacheExhausted(f"KV cache out of blocks: decode needs {needed} new blocks, {bm.num_free} free")
        if self.model.recompute_at is not None:
            whole = [i for i in live if len(self.sequences[seq_ids[i]].token_ids) == self.model.recompute_at]
            for i, result in zip(whole, self._recompute([seq_ids[i] for i in whole]) if whole else []):
                results[i] = result
            live = [i for i in live if i not in whole]
            if not live:
                return results
        live = self._group_by_adapter(live, [self.seq_adapters.get(seq_ids[i], "") for i in live])
        rows = [self.sequences[seq_ids[i]] for i in live]
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
        lora = self._lora_batch([self.seq_adapters.get(seq_ids[i], "") for i in live], [1] * len(live))
        logits = self.model.compute_logits(self.model(input_ids, positions, meta, lora))

        out = self._sample(logits, rows)
        for j, i in enumerate(live):
            _accept(rows[j], out.token_ids[j])
            results[i] = TokenResult(seq_ids[i], out.token_ids[j], out.logprobs[j], out.top_tokens[j])
        return results

    def _recompute(self, seq_ids: list[int]) -> list[TokenResult]:
        """Decodes `seq_ids` by running each whole, as a prefill of every token it holds that rewrites all its
        KV slots, as transformers' generate does for families whose earlier positions change (Phi-3's longrope
        switching to its long factors once a sequence passes original_max_position_embeddings)."""
        bm, dev = self.blocks, self.device
        rows = [self.sequences[s] for s in seq_ids]
        ids, positions, slots, lengths, last_rows = [], [], [], [], []
        for seq_id, row in zip(seq_ids, rows):
            bm.append_slot(seq_id)
            n = len(row.token_ids)
            ids += row.token_ids
            positions += range(n)
            slots += bm.slots(seq_id, 0, n)
            lengths.append(n)
            last_rows.append(len(ids) - 1)
        meta = prefill_metadata(lengths, torch.tensor(slots, device=dev), self.model.sliding_window)
        lora = self._lora_batch([self.seq_adapters.get(s, "") for s in seq_ids], lengths)
        hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), meta, lora)
        out = self._sample(self.model.compute_logits(hidden[torch.tensor(last_rows, device=dev)]), rows)
        for j, row in enumerate(rows):
            _accept(row, out.token_ids[j])
        return [TokenResult(s, out.token_ids[j], out.logprobs[j], out.top_tokens[j]) for j, s in enumerate(seq_ids)]
