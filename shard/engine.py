"""The model runner: registers sequences (shard/sequence.py), runs batched prefill/decode forwards, samples.

The router owns the KV blocks (router/kv_blocks.py) and decides what each step computes: which chunk of which
sequence, in which blocks. The engine never decides when a sequence stops (EOS, max tokens, stop strings are
the router's); it keeps every sequence's tokens until the router releases it.
"""

from __future__ import annotations

import itertools
import os

import torch
import torch.distributed as dist
from transformers import AutoConfig

from common.defaults import (
    DEFAULT_ADAPTER_HOST_CACHE_BYTES,
    DEFAULT_ADAPTER_MEMORY_FRACTION,
    DEFAULT_ADAPTER_PAGE_RANK,
    DEFAULT_ADAPTER_VOCAB_BYTES,
    DEFAULT_MAX_ACTIVE_ADAPTERS,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
)
from shard.adapter_cache import AdapterCache
from shard.attention import batch_metadata, decode_kernel, decode_metadata, prefill_metadata
from shard.decode_graphs import DecodeRunner, graphs_requested
from shard.dora import base_linears
from shard.engine_info import AdapterInfo, EngineInfo
from shard.expert_lora import expert_layout
from shard.kv_cache import DEFAULT_BLOCK_SIZE, allocate_kv_cache
from shard.lora import AdapterError, HostAdapter, PageLayout, projection_shapes
from shard.packed_linear import pack_linears
from shard.prompt_logprobs import prompt_logprobs
from shard.sampler import SamplerOutput, SamplerRow, SamplingParams, sample
from shard.sequence import Chunk, Sequence, SequenceRequest, TokenResult, accept, error_result
from shard.vocab_adapter import VocabBatch, VocabShape
from shard.grammar import Grammars
from shard.weights import load_model

__all__ = ["AdapterError", "AdapterInfo", "Chunk", "Engine", "EngineInfo", "SamplingParams", "SequenceRequest",
           "TokenResult"]


class Engine:
    def __init__(self, model_dir: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 block_size: int = DEFAULT_BLOCK_SIZE, kv_cache_bytes: int | None = None,
                 tp_rank: int = 0, tp_size: int = 1,
                 adapter_memory_fraction: float = DEFAULT_ADAPTER_MEMORY_FRACTION,
                 adapter_pool_pages: int | None = None,
                 adapter_host_cache_bytes: int = DEFAULT_ADAPTER_HOST_CACHE_BYTES,
                 adapter_page_rank: int = DEFAULT_ADAPTER_PAGE_RANK, enforce_eager: bool = False,
                 padded_decode: bool | None = None, adapter_vocab_bytes: int = DEFAULT_ADAPTER_VOCAB_BYTES):
        """padded_decode: decode-only steps padded to fixed buckets (shard/decode_graphs.py), captured as CUDA
        graphs on CUDA unless enforce_eager; None: where LOOM_CUDA_GRAPHS=1 asks for graphs. Never for a family
        whose decode is not of fixed shapes (CausalLM.padded_decode: the mixtures of experts)."""
        self.device = torch.device(device)
        self.dtype = dtype
        self.block_size = block_size
        self.kv_cache_bytes = kv_cache_bytes
        self.adapter_memory_fraction = adapter_memory_fraction
        self.adapter_pool_pages = adapter_pool_pages
        config = AutoConfig.from_pretrained(model_dir)
        self.model = load_model(config, model_dir, dtype, self.device, tp_rank, tp_size)
        pack_linears(self.model, self.device, dtype)
        self.vocab_size = config.vocab_size
        self.info = EngineInfo.describe(config, self.model, dtype, self.device, block_size, tp_rank, tp_size)
        self._num_blocks = 0  # KV cache blocks, once warmup allocated them
        self.sequences: dict[int, Sequence] = {}
        layout = PageLayout.build(config.num_hidden_layers, adapter_page_rank, projection_shapes(self.model))
        layout.experts = expert_layout(self.model, layout.page_numel, adapter_page_rank)
        layout.vocab = VocabShape(config.vocab_size, config.hidden_size, bool(config.tie_word_embeddings), tp_rank,
                                  tp_size)
        self.adapters = AdapterCache(layout, dtype, self.device, adapter_host_cache_bytes, base_linears(self.model),
                                     tp_size, adapter_vocab_bytes)
        # Triton SGMV instead of the torch LoRA path: CUDA only, opt-in until checked on a GPU.
        self.triton_lora = self.device.type == "cuda" and os.environ.get("LOOM_TRITON_LORA") == "1"
        # Built now, never while serving.
        self.decode_kernel = decode_kernel(self.device, dtype) if self.model.paged_decode_kernel else None
        if padded_decode is None:
            padded_decode = graphs_requested(self.device, tp_size, enforce_eager)
        self.decode_runner = DecodeRunner(self.model, self.adapters, block_size, self.device, self.decode_kernel,
                                          capture=self.device.type == "cuda" and not enforce_eager) \
            if padded_decode and self.model.padded_decode else None
        self.reserved_bytes = 0  # activation (and graph) memory the last warmup measured and kept free
        self.grammars = Grammars(model_dir, config.vocab_size)

    @property
    def _distributed(self) -> bool:
        return self.info.world_size > 1 and dist.is_initialized()

    # ---- capacity -------------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    def install_kv_cache(self, num_blocks: int) -> None:
        """A zeroed KV cache of `num_blocks` blocks in place of the current one (and the padded decode's scratch
        block past them); drops every sequence."""
        info = self.info
        self._reset_decode_runner()
        spare = 1 if self.decode_runner else 0
        caches = allocate_kv_cache(info.num_layers, num_blocks + spare, self.block_size, self.model.local_kv_heads,
                                   info.head_dim, self.dtype, self.device)
        self.model.set_kv_cache(caches)
        self._num_blocks = num_blocks
        self._forget_all()

    def drop_kv_cache(self) -> None:
        """Frees the KV cache (until the next install) and drops every sequence."""
        self._reset_decode_runner()
        self.model.set_kv_cache([torch.empty(0)] * self.info.num_layers)
        self._num_blocks = 0
        self._forget_all()

    def _reset_decode_runner(self) -> None:
        if self.decode_runner is not None:  # its graphs point into the KV cache being replaced
            self.decode_runner.reset()

    def _forget(self, seq_id: int) -> None:
        seq = self.sequences.pop(seq_id, None)
        if seq is not None and seq.adapter_id:
            self.adapters.unpin(seq.adapter_id)

    def _forget_all(self) -> None:
        self.sequences.clear()
        self.adapters.unpin_all()

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @torch.inference_mode()
    def warmup(self, max_batch_prefill_tokens: int, max_batch_total_tokens: int = 0,
               max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
               max_active_adapters: int = DEFAULT_MAX_ACTIVE_ADAPTERS) -> int:
        """Allocates the adapter pool and the KV cache and runs the worst steps the router's limits allow
        (shard/warmup.py); returns the KV cache's blocks. Budget: kv_cache_bytes when given; else on CUDA 90%
        of free memory less the measured activation peak, on CPU 1 GiB; max_batch_total_tokens > 0 caps the
        cache at ceil(max_batch_total_tokens / block_size) blocks. Drops every sequence."""
        from shard.warmup import WarmupLimits, warm_up  # it imports this module, so not at the top

        return warm_up(self, WarmupLimits(max_batch_prefill_tokens, max_batch_total_tokens, max_concurrent_requests,
                                          max_active_adapters))

    def min_over_ranks(self, value: int) -> int:
        """The smallest `value` of the tensor-parallel ranks: ranks run identical block and page tables, so they
        share the smallest rank's capacity."""
        if not self._distributed:
            return value
        smallest = torch.tensor([value], device=self.device)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        return int(smallest.item())

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
        return self.register_adapter(adapter_id, path, self.read_adapter(adapter_id, path), preloaded)

    def read_adapter(self, adapter_id: str, path: str) -> HostAdapter:
        """The first half of load_adapter: reads and checks the files. Safe off the engine thread."""
        if not adapter_id:
            raise AdapterError("adapter id must not be empty (\"\" is the base model)")
        return self.adapters.read(adapter_id, path)

    def register_adapter(self, adapter_id: str, path: str, host: HostAdapter, preloaded: bool = False) -> AdapterInfo:
        """The second half of load_adapter, on the engine thread: `host` joins the adapter cache."""
        entry = self.adapters.register(adapter_id, path, host)
        if preloaded:
            with torch.inference_mode():  # the pool is an inference tensor, written in place
                self.adapters.preload(adapter_id)
        return AdapterInfo(entry.rank, entry.num_pages, self.adapters.vocab_size(adapter_id, self.vocab_size))

    def unload_adapter(self, adapter_id: str) -> None:
        """Forgets a registered adapter; raises AdapterError while live sequences use it."""
        self.adapters.unregister(adapter_id)

    def _by_adapter(self, chunks: list[Chunk]) -> list[Chunk]:
        """`chunks` with the single-token ones (decodes) first, each part grouped by adapter, adapters in their
        AdapterStacks slot order (else in order of appearance) and base-model rows last: LoRA then reads and
        writes the decode rows in place, and each adapter's prompt tokens as one run of rows."""
        adapter_of = {c.id: self.sequences[c.id].adapter_id for c in chunks}
        slot: dict[str, int] = {}
        if not self.triton_lora and any(adapter_of.values()):
            slot = {a: i for i, a in enumerate(self.adapters.slot_order(list(adapter_of.values())))}
        return sorted(chunks, key=lambda c: (c.num_tokens > 1, slot.get(adapter_of[c.id], len(slot))))

    def clear(self) -> None:
        """Drops every sequence (unpinning their adapters) and frees all KV blocks."""
        self._forget_all()

    # ---- stepping -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, new: list[SequenceRequest], chunks: list[Chunk], release: list[int]) -> list[TokenResult]:
        """Forgets `release` (unknown ids ignored), registers `new` sequences, then computes every chunk's tokens
        into the KV cache. A chunk that reaches its sequence's last token samples the next one. Returns one
        result per sampled chunk and one error per request or chunk that failed (alone: the others go on)."""
        if self.num_blocks == 0:
            raise RuntimeError("Engine.step before warmup: the KV cache is not allocated")
        for seq_id in release:
            self._forget(seq_id)
        errors = self._register(new)
        failed = {e.request_id for e in errors} - self.sequences.keys()  # a duplicate id leaves the live one be
        runnable = []
        for chunk in chunks:
            if chunk.id in failed:
                continue
            if message := self._extend(chunk):
                errors.append(error_result(chunk.id, message))
                failed.add(chunk.id)
                self._forget(chunk.id)
            else:
                runnable.append(self._recompute_whole(chunk))
        return errors + self._run(runnable)

    def _register(self, requests: list[SequenceRequest]) -> list[TokenResult]:
        errors, accepted, taken = [], [], set()
        for req in requests:
            if message := self._validate(req, taken):
                errors.append(error_result(req.id, message))
            else:
                accepted.append(req)
                taken.add(req.id)
        # Page in the adapters; requests whose adapter is unknown or does not fit the pool fail alone.
        failed = self.adapters.make_resident([r.adapter_id for r in accepted if r.adapter_id])
        for req in accepted:
            if message := failed.get(req.adapter_id):
                errors.append(error_result(req.id, message))
            else:
                self._new_sequence(req)
        return errors

    def _validate(self, req: SequenceRequest, taken: set[int]) -> str:
        if not req.input_ids:
            return "empty prompt: input_ids must hold at least one token"
        vocab = self.adapters.vocab_size(req.adapter_id, self.vocab_size)
        bad = [t for t in itertools.chain(req.input_ids, req.generated_ids) if not 0 <= t < vocab]
        if bad:
            return f"token id {bad[0]} is outside the vocabulary [0, {vocab})"
        if req.grammar and vocab != self.vocab_size:
            return "constrained decoding is not supported with an adapter that brings its own vocabulary"
        if req.id in self.sequences or req.id in taken:
            return f"sequence {req.id} is already active"
        if req.grammar:
            try:
                return self.grammars.prepare(req.grammar)  # cached by PrepareGrammar: a look-up, no compile
            except (ValueError, RuntimeError) as e:
                return str(e)
        return ""

    def _new_sequence(self, req: SequenceRequest) -> None:
        row = SamplerRow(req.sampling, [*req.input_ids, *req.generated_ids], len(req.input_ids), req.top_n_tokens,
                         matcher=self.grammars.matcher(req.grammar) if req.grammar else None,
                         json_keys=self.grammars.key_guard(req.grammar) if req.grammar else None,
                         min_new_tokens=req.min_new_tokens, stop_token_ids=list(req.stop_token_ids))
        for token_id in req.generated_ids:  # a resumed sequence: its grammar state after the tokens it has
            if row.matcher is not None:
                row.matcher.consume_token(token_id)
            if row.json_keys is not None:
                row.json_keys.consume(token_id)
        if req.adapter_id:
            self.adapters.pin(req.adapter_id)
        self.sequences[req.id] = Sequence(row, [], req.adapter_id, [0.0] if req.prefill_logprobs else None,
                                          req.prefill_top_n if req.prefill_logprobs else 0,
                                          [([], 0)] if req.prefill_logprobs and req.prefill_top_n else [])

    def _extend(self, chunk: Chunk) -> str:
        """Appends the chunk's new blocks to its sequence's table and checks that the chunk fits it."""
        seq = self.sequences.get(chunk.id)
        if seq is None:
            return f"sequence {chunk.id} is not active (never registered, released or failed)"
        if any(not 0 <= b < self.num_blocks for b in chunk.new_blocks):
            return f"block id outside the KV cache [0, {self.num_blocks})"
        seq.table.extend(chunk.new_blocks)
        end = chunk.start + chunk.num_tokens
        if chunk.num_tokens < 1 or end > len(seq.row.token_ids):
            return f"chunk [{chunk.start}, {end}) is outside sequence {chunk.id}'s {len(seq.row.token_ids)} tokens"
        if end > len(seq.table) * self.block_size:
            return f"chunk [{chunk.start}, {end}) is beyond sequence {chunk.id}'s {len(seq.table)} blocks"
        return ""

    def _recompute_whole(self, chunk: Chunk) -> Chunk:
        """A sequence that reaches the model's recompute length runs whole again, rewriting all its KV, as
        transformers' generate does for families whose earlier positions change with the length (Phi-3's
        longrope switching to its long factors past original_max_position_embeddings)."""
        tokens = len(self.sequences[chunk.id].row.token_ids)
        if self.model.recompute_at is not None and tokens == self.model.recompute_at == chunk.start + 1:
            return Chunk(chunk.id, 0, tokens)
        return chunk

    def _run(self, chunks: list[Chunk]) -> list[TokenResult]:
        """One forward over every chunk (the single-token ones, decodes, first), then one sampling pass over
        every chunk that reached its sequence's end."""
        ordered = self._by_adapter(chunks)
        decodes = [c for c in ordered if c.num_tokens == 1]
        sampled = self._forward(decodes, ordered[len(decodes):]) if chunks else []
        if not sampled:
            return []
        rows = [self.sequences[c.id].row for c, _ in sampled]
        vocab = self.adapters.vocab_batch([self.sequences[c.id].adapter_id for c, _ in sampled], [1] * len(sampled))
        out = self._sample(self.model.compute_logits(torch.stack([h for _, h in sampled]), vocab), rows)
        results = []
        for j, (chunk, _) in enumerate(sampled):
            accept(rows[j], out.token_ids[j])
            result = TokenResult(chunk.id, out.token_ids[j], out.logprobs[j], out.top_tokens[j])
            seq = self.sequences[chunk.id]
            if seq.prompt_logprobs is not None:
                result.prefill_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None
                result.prefill_top_tokens, seq.prompt_top = seq.prompt_top, []
            results.append(result)
        return results

    def _forward(self, decodes: list[Chunk], prefills: list[Chunk]) -> list[tuple[Chunk, torch.Tensor]]:
        """Runs the single-token chunks and the longer ones as one batch (one pass through the weights);
        returns the last hidden state of each chunk that reached its sequence's end, and accumulates prompt
        logprobs where they were asked."""
        chunks = decodes + prefills
        seqs = [self.sequences[c.id] for c in chunks]
        bs = self.block_size
        ids, positions, slots = [], [], []
        for chunk, seq in zip(chunks, seqs):
            end = chunk.start + chunk.num_tokens
            ids += seq.row.token_ids[chunk.start:end]
            positions += range(chunk.start, end)
            slots += [seq.table[p // bs] * bs + p % bs for p in range(chunk.start, end)]
        lengths = [len(seq.row.token_ids) for seq in seqs]
        hidden = None
        vocab = self.adapters.vocab_batch([s.adapter_id for s in seqs], [c.num_tokens for c in chunks])
        if self.decode_runner is not None and not prefills and vocab is None:
            hidden = self.decode_runner.run(ids, positions, slots, [s.table for s in seqs], lengths,
                                            [s.adapter_id for s in seqs])
        if hidden is None:
            hidden = self._run_model(decodes, prefills, seqs, ids, positions, slots, lengths, vocab)
        sampled, row = [], 0
        for chunk, seq, n in zip(chunks, seqs, lengths):
            if seq.prompt_logprobs is not None:
                logprobs, top = prompt_logprobs(self._logits_under(seq.adapter_id), hidden[row:row + chunk.num_tokens],
                                                chunk.start, seq.row.token_ids[:seq.row.num_prompt], seq.prompt_top_n)
                seq.prompt_logprobs += logprobs
                seq.prompt_top += top
            row += chunk.num_tokens
            if chunk.start + chunk.num_tokens == n:
                sampled.append((chunk, hidden[row - 1]))
        return sampled

    def _run_model(self, decodes: list[Chunk], prefills: list[Chunk], seqs: list[Sequence], ids: list[int],
                   positions: list[int], slots: list[int], lengths: list[int],
                   vocab: VocabBatch | None = None) -> torch.Tensor:
        """The model over the step's tokens as they are, unpadded: [tokens, hidden]."""
        bs, dev, nd = self.block_size, self.device, len(decodes)
        slot_t = torch.tensor(slots, device=dev)
        decode = prefill = None
        if decodes:
            decode = decode_metadata([s.table for s in seqs[:nd]], [c.start + 1 for c in decodes], slot_t[:nd], bs,
                                     self.model.sliding_window, lengths[:nd], self.decode_kernel)
        if prefills:
            prefill = prefill_metadata([c.num_tokens for c in prefills], slot_t[nd:], self.model.sliding_window,
                                       lengths[nd:], [c.start for c in prefills], [s.table for s in seqs[nd:]], bs)
        lora = self.adapters.lora_batch([s.adapter_id for s in seqs], [c.num_tokens for c in decodes + prefills],
                                        self.triton_lora)
        return self.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev),
                          batch_metadata(decode, prefill), lora, vocab)

    def _sample(self, logits: torch.Tensor, rows: list[SamplerRow]) -> SamplerOutput:
        out = sample(logits, rows, self.vocab_size)
        if self._distributed:
            # Unseeded draws differ between ranks; every rank must feed the same tokens to the next step.
            tokens = torch.tensor(out.token_ids, device=self.device)
            dist.broadcast(tokens, src=0)
            out.token_ids = tokens.tolist()
        return out

    def _logits_under(self, adapter_id: str):
        """The LM head under `adapter_id`'s vocabulary adapter, if it has one."""
        return lambda rows: self.model.compute_logits(rows, self.adapters.vocab_batch([adapter_id], [rows.shape[0]]))
