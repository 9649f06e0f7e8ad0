"""The router's start-up: the shards' warmup, and the scheduler and backend sized from what it measured."""

from __future__ import annotations

import asyncio
import logging

from proto import generate_pb2 as pb
from router.adapters import AdapterRegistry
from router.backend import Backend
from router.config import RouterConfig
from router.errors import APIError
from router.merged_adapters import MergedAdapters
from router.prefill_budget import measured_prefill_budget
from router.scheduler import Scheduler
from router.shard_client import ShardClient
from router.sources import build_sources
from router.structured import GrammarChecker
from router.templates import TemplateRenderer
from router.tokenization import ModelTokenizer

log = logging.getLogger("loom.router")


async def start_backend(state, config: RouterConfig) -> None:
    """Asks the shards what they hold, warms them up (which sizes the KV cache, the adapter pool and, unless
    given, the prefill budget), preloads adapters, and puts the backend on `state` (the app's state, which
    already holds its metrics)."""
    client = ShardClient(config.shard_sockets, config.step_timeout_s)
    state.shard_info = await client.info()
    warm = await client.warmup(pb.WarmupRequest(
        max_input_length=config.max_input_length,
        max_batch_prefill_tokens=config.max_batch_prefill_tokens,
        max_total_tokens=config.max_total_tokens,
        max_batch_total_tokens=config.max_batch_total_tokens,
        max_concurrent_requests=config.max_concurrent_requests,
        max_active_adapters=config.max_active_adapters,
        measure_step_costs=config.measure_prefill_budget,
    ))
    state.warmup = warm
    capacity = warm.max_supported_total_tokens
    if capacity < config.max_total_tokens:
        raise RuntimeError(f"the KV cache holds {capacity} tokens, fewer than --max-total-tokens="
                           f"{config.max_total_tokens}: lower it or give the shards more memory")
    tokenizer = await asyncio.to_thread(ModelTokenizer.from_dir, config.model_dir)
    if config.chat_template:  # `--chat-template` (vLLM's flag)
        tokenizer = tokenizer.with_chat_template(config.chat_template)
    adapters = AdapterRegistry(config.model_id, tokenizer, client, config.adapters, build_sources(config),
                               config.adapter_source, warm.adapter_pages, state.metrics,
                               max_rank=config.max_lora_rank)
    state.metrics.vllm.bind(config.model_id)  # before the preloads, whose load times it counts
    try:
        await adapters.preload(config.preloaded_adapter_ids)
    except APIError as e:
        raise RuntimeError(f"--preloaded-adapter-ids: {e.message}") from None
    # Admission shares out the pool pages that the preloaded adapters leave.
    prefix_caching = config.prefix_caching and state.shard_info.prefix_cacheable
    if config.prefix_caching and not prefix_caching:
        log.info("prefix caching off: this model's KV depends on more than the prefix (it is recomputed past a "
                 "length)")
    scheduler = Scheduler(client, warm.num_blocks, warm.block_size, _prefill_budget(config, warm),
                          config.max_concurrent_requests, config.max_active_adapters, adapters.pool_pages,
                          config.max_queue_time_s, prefix_caching,
                          adapter_cycle_time_s=config.adapter_cycle_time_s)
    state.backend = Backend(config, tokenizer, scheduler, capacity, state.shard_info.vocab_size, adapters,
                                GrammarChecker(tokenizer, client), TemplateRenderer(),
                                MergedAdapters(adapters, scheduler.adapter_users))
    state.backend.templates.warm()
    state.metrics.watch(scheduler, config.model_id, adapters.label, adapters.get)
    log.info("KV cache: %d blocks of %d tokens (%d tokens), prefix caching %s", warm.num_blocks, warm.block_size,
             capacity, "on" if prefix_caching else "off")
    log.info("%s", adapter_pool_line(warm, scheduler.adapters.max_running, config.max_active_adapters))


def adapter_pool_line(warm: pb.WarmupResponse, running: int, max_active: int) -> str:
    """The adapter pool in what a user counts: adapters of common ranks, and what really runs at once."""
    rank, pages = warm.adapter_page_rank, warm.adapter_pages
    fits = ", ".join(f"{pages // -(-r // rank)} of rank {r}" for r in (8, 16, 64))
    cap = "--max-active-adapters" if running == max_active else "the pool's pages"
    return (f"adapter pool: {pages} pages of {rank} ranks ({warm.adapter_page_bytes / 2**20:.1f} MB each, "
            f"{pages * warm.adapter_page_bytes / 2**30:.2f} GB): resident at once {fits}; at most {running} "
            f"adapters run in one batch ({cap})")


def _prefill_budget(config: RouterConfig, warm: pb.WarmupResponse) -> int:
    """--max-batch-prefill-tokens, or when not given the budget sized from the step costs the shards measured."""
    if not config.measure_prefill_budget:
        log.info("prefill budget: %d prompt tokens per step (--max-batch-prefill-tokens)",
                 config.max_batch_prefill_tokens)
        return config.max_batch_prefill_tokens
    budget = measured_prefill_budget(warm.prompt_token_ms / 1000, warm.decode_step_ms / 1000,
                                     config.max_batch_prefill_tokens)
    log.info("prefill budget: %d prompt tokens per step, sized from a one-row decode step of %.2f ms and %.4f ms "
             "per prompt token (at most %d; --max-batch-prefill-tokens sets it)", budget, warm.decode_step_ms,
             warm.prompt_token_ms, config.max_batch_prefill_tokens)
    return budget
