"""The warmup (Engine.warmup): the adapter pool, the KV cache sized from the memory left, and the worst steps
the router's limits allow, run once before serving.

On CUDA the worst steps first run on a KV cache of exactly their blocks, to measure their activation peak
(torch.cuda.max_memory_allocated beyond weights, adapters and KV cache); the KV cache is then sized from the
memory left less that peak, and the steps run again on it (allocator pools and kernels warm). The worst steps:

- a prefill of max_batch_prefill_tokens prompt tokens with prompt logprobs, beside one-token sequences up to
  max_concurrent_requests rows in all (the router runs decodes beside a prefill: its budget does not count them);
- a decode of every one of those rows: the largest decode batch the limits allow;

each sampled with every logits processor and the most top logprobs a request may ask, and every row with LoRA
on every projection of the page layout: up to max_active_adapters adapters that together fill the pool, so
that a step reads as many adapter rank-rows as any step can, through the engine's own LoRA path (AdapterStacks,
or gathered from the pool when they do not fit there). Their pages are zero, so they change no activation, and
they leave no trace (AdapterCache.zero_adapters).

With the padded decode (shard/decode_graphs.py) its buffers are allocated and, on CUDA, its graphs captured
for up to max_concurrent_requests rows and max_active_adapters adapters after the worst steps: once on the
measuring cache, where the memory they take joins the activation peak, and again on the cache itself.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import psutil
import torch

from common.limits import MAX_TOP_LOGPROBS
from shard.adapter_cache import DEFAULT_STACKS_SHARE
from shard.engine import Chunk, Engine, SequenceRequest
from shard.kv_cache import bytes_per_block, kv_budget_bytes, num_blocks_for_budget
from shard.sampler import SamplingParams

# The widest adapter the pool is sized for, when sized from memory: --max-active-adapters of this rank fill it.
POOL_RANK_PER_ADAPTER = 64
# Every logits processor on (penalties, temperature, top_k/top_p's sort, min_p, typical_p): the sampler's most
# [rows, vocab] temporaries.
WARMUP_SAMPLING = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05, typical_p=0.9,
                                 repetition_penalty=1.1, frequency_penalty=0.1, presence_penalty=0.1)


@dataclass(frozen=True, slots=True)
class WarmupLimits:
    """The router's limits that bound one step."""

    max_batch_prefill_tokens: int
    max_batch_total_tokens: int  # 0: the KV cache holds what memory allows
    max_concurrent_requests: int  # running sequences at once: the most rows of a step
    max_active_adapters: int  # distinct adapters in one step


def prompt_sizes(engine: Engine, num_tokens: int) -> list[int]:
    """Prompts no longer than the model's positions, together `num_tokens` long."""
    chunk = engine.info.max_position_embeddings
    return [chunk] * (num_tokens // chunk) + ([num_tokens % chunk] if num_tokens % chunk else [])


def one_token_rows(engine: Engine, limits: WarmupLimits) -> int:
    """Sequences beside the prefill's prompts, up to max_concurrent_requests rows in all."""
    return max(0, limits.max_concurrent_requests - len(prompt_sizes(engine, limits.max_batch_prefill_tokens)))


def prefill_blocks(engine: Engine, limits: WarmupLimits) -> int:
    """KV blocks the prefill's prompts take, each on its own (one that is not a multiple of the block size
    rounds up alone): the least a KV cache must hold."""
    return sum(engine.blocks_for(n) for n in prompt_sizes(engine, limits.max_batch_prefill_tokens))


def warmup_blocks(engine: Engine, limits: WarmupLimits) -> int:
    """KV blocks all the worst steps take: the prompts' own, one more per prompt for its decode, and each
    one-token row's (its token and the one it decodes)."""
    prompts = len(prompt_sizes(engine, limits.max_batch_prefill_tokens))
    return prefill_blocks(engine, limits) + prompts + one_token_rows(engine, limits) * engine.blocks_for(2)


def warm_up(engine: Engine, limits: WarmupLimits) -> int:
    """Allocates the adapter pool (first, so that on CUDA the KV cache is sized from what it leaves), sizes and
    allocates the KV cache, runs the worst steps on it and returns its blocks. Budget: kv_cache_bytes when
    given; else on CUDA 90% of free memory less the measured activation peak, on CPU 1 GiB;
    max_batch_total_tokens > 0 caps it. Drops every sequence."""
    engine.drop_kv_cache()
    allocate_adapter_pool(engine, limits.max_active_adapters)
    reserved = vocab = 0
    if engine.device.type == "cuda" and not engine.kv_cache_bytes:
        reserved = measure_activation_peak(engine, limits)
        # Adapters' vocabulary tensors are allocated as adapters register, after warmup: the KV cache leaves them
        # room.
        vocab = engine.adapters.vocab_bytes_free
    info = engine.info
    budget = kv_budget_bytes(engine.device, engine.kv_cache_bytes, reserved_bytes=reserved + vocab,
                             num_layers=info.num_layers)
    block_bytes = bytes_per_block(info.num_layers, engine.model.local_kv_heads, info.head_dim, engine.block_size,
                                  engine.dtype)
    num_blocks = num_blocks_for_budget(budget, block_bytes, limits.max_batch_total_tokens, engine.block_size)
    num_blocks = engine.min_over_ranks(num_blocks)
    needed = prefill_blocks(engine, limits)
    if num_blocks < max(1, needed):
        raise RuntimeError(
            f"KV cache of {num_blocks} blocks ({budget} bytes budget, {block_bytes} bytes per block, "
            f"max_batch_total_tokens={limits.max_batch_total_tokens}) cannot hold a prefill of "
            f"{limits.max_batch_prefill_tokens} tokens ({needed} blocks)"
        )
    engine.install_kv_cache(num_blocks)
    run_worst_steps(engine, limits)
    prepare_padded_decode(engine, limits)
    engine.reserved_bytes = reserved
    return num_blocks


def measure_activation_peak(engine: Engine, limits: WarmupLimits) -> int:
    """Bytes the worst steps need beyond weights, adapters and KV cache: measured on CUDA, 0 elsewhere. Runs
    them on a KV cache of exactly warmup_blocks blocks, so that every row runs."""
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(engine.device)
    engine.install_kv_cache(warmup_blocks(engine, limits))
    run_worst_steps(engine, limits)
    peak = torch.cuda.max_memory_allocated(engine.device) - torch.cuda.memory_allocated(engine.device) if cuda else 0
    if cuda and engine.decode_runner is not None:
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(engine.device)[0]
        prepare_padded_decode(engine, limits)
        torch.cuda.empty_cache()
        peak += free - torch.cuda.mem_get_info(engine.device)[0]  # buffers and graph pool, held while serving
    engine.drop_kv_cache()
    if cuda:
        torch.cuda.empty_cache()
    return peak


def prepare_padded_decode(engine: Engine, limits: WarmupLimits) -> None:
    """The padded decode's buffers (and CUDA graphs) for the limits' largest decode step, with sequences as
    long as the model's positions allow (the same on the measuring cache as on the real one)."""
    if engine.decode_runner is not None:
        engine.decode_runner.prepare(limits.max_concurrent_requests, limits.max_active_adapters,
                                     engine.blocks_for(engine.info.max_position_embeddings),
                                     scratch_block=engine.num_blocks)


@torch.inference_mode()  # the adapter pool is an inference tensor, written in place
def run_worst_steps(engine: Engine, limits: WarmupLimits) -> None:
    """The worst steps (module doc) on the installed KV cache; drops every sequence."""
    prompts, singles, decodes = _worst_chunks(engine, limits)
    count, pages = _zero_adapter_shape(engine, limits, len(prompts) + len(singles))
    with engine.adapters.zero_adapters(count, pages) as adapter_ids:
        requests = [SequenceRequest(c.id, [0] * c.num_tokens, WARMUP_SAMPLING, top_n_tokens=MAX_TOP_LOGPROBS,
                                    prefill_logprobs=i < len(prompts), prefill_top_n=MAX_TOP_LOGPROBS,
                                    adapter_id=adapter_ids[i % count] if count else "")
                    for i, c in enumerate(prompts + singles)]
        try:
            results = engine.step(requests, prompts + singles, [])
            if not any(r.error for r in results):
                results += engine.step([], decodes, [])
        finally:
            engine.clear()  # no warmup sequence outlives its adapter
    for r in results:
        if r.error:
            raise RuntimeError(f"warmup step failed: {r.error}")


def _worst_chunks(engine: Engine, limits: WarmupLimits) -> tuple[list[Chunk], list[Chunk], list[Chunk]]:
    """(prompts, one-token rows, decodes of both). Blocks go to the prompts first, then one to each prompt
    whose decode starts a block, then to the one-token rows while blocks are left: a cache sized to the limits
    exactly may have none left for those (nor for a prompt that ends on a block boundary)."""
    blocks = iter(range(engine.num_blocks))
    prompts = [Chunk(-1 - i, 0, n, list(itertools.islice(blocks, engine.blocks_for(n))))
               for i, n in enumerate(prompt_sizes(engine, limits.max_batch_prefill_tokens))]
    decodes = []
    for chunk in prompts:
        boundary = chunk.num_tokens % engine.block_size == 0  # its next token needs a block of its own
        grow = list(itertools.islice(blocks, 1)) if boundary else []
        if grow or not boundary:
            decodes.append(Chunk(chunk.id, chunk.num_tokens, 1, grow))
    left = engine.num_blocks - sum(len(c.new_blocks) for c in prompts + decodes)
    rows = min(one_token_rows(engine, limits), left // engine.blocks_for(2))
    # Each takes the blocks of its token and of the one it decodes at once.
    singles = [Chunk(-1 - len(prompts) - i, 0, 1, list(itertools.islice(blocks, engine.blocks_for(2))))
               for i in range(rows)]
    return prompts, singles, decodes + [Chunk(c.id, 1, 1) for c in singles]


def _zero_adapter_shape(engine: Engine, limits: WarmupLimits, rows: int) -> tuple[int, int]:
    """(adapters, pages each) for the worst steps' LoRA: as many adapters as max_active_adapters, the free pool
    pages and the rows allow, each as wide as their share of the pool."""
    free = len(engine.adapters.free_pages)
    count = min(limits.max_active_adapters, free, rows)
    return count, free // count if count else 0


def allocate_adapter_pool(engine: Engine, max_active_adapters: int) -> None:
    """The adapter memory: adapter_memory_fraction of free CUDA memory (taken before the KV cache is sized) or,
    on CPU, of the host memory available (shared by the host's ranks), for at most max_active_adapters adapters
    of rank POOL_RANK_PER_ADAPTER: a pool larger than that never fills. Or adapter_pool_pages pages, plus the
    stacks' share on top. The torch LoRA path keeps DEFAULT_STACKS_SHARE of it for the running adapters' dense
    rows (AdapterStacks)."""
    share = 0.0 if engine.triton_lora else DEFAULT_STACKS_SHARE
    page_bytes = engine.adapters.page_bytes
    pages = engine.adapter_pool_pages
    if pages is None:
        budget = int(adapter_memory_bytes(engine) * engine.adapter_memory_fraction)
        useful = max_active_adapters * engine.adapters.layout.pages_for(POOL_RANK_PER_ADAPTER)
        pages = min(useful, max(0, int(budget * (1 - share)) // page_bytes - 1))  # the zero page is in the budget
    pages = engine.min_over_ranks(pages)
    budget = int((pages + 1) * page_bytes / (1 - share))
    engine.adapters.allocate(pages, max(0, budget - (pages + 1) * page_bytes) if share else 0)


def adapter_memory_bytes(engine: Engine) -> int:
    """What the adapter memory fraction is a share of: free memory of this rank's GPU, or the host memory
    available now, divided among the ranks that share the host."""
    if engine.device.type == "cuda":
        return torch.cuda.mem_get_info(engine.device)[0]
    return psutil.virtual_memory().available // engine.info.world_size
