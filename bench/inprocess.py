"""The same workload on the router's own scheduler (admission, KV blocks, chunking, preemption) driving the
engine in this process (bench/local_shard.py): no HTTP, gRPC, tokenization or detokenization. The gap to the
served run is the serving overhead."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from bench.local_shard import LocalShard
from bench.stats import Timing
from bench.workload import BenchRequest
from proto import generate_pb2 as pb
from router.generation import GenerationRequest
from router.scheduler import Scheduler


def make_engine(model_dir: Path, adapters: list[Path], used: set[int], max_batch_prefill_tokens: int,
                adapter_pool_pages: int, host_cache_bytes: int, max_batch_total_tokens: int = 0,
                kv_cache_bytes: int | None = None):
    from shard.engine import Engine

    engine = Engine(str(model_dir), adapter_pool_pages=adapter_pool_pages, adapter_host_cache_bytes=host_cache_bytes,
                    kv_cache_bytes=kv_cache_bytes)
    engine.warmup(max_batch_prefill_tokens, max_batch_total_tokens)
    for i in sorted(used):  # registered up front, as warm_adapters does for the server
        engine.load_adapter(str(adapters[i]), str(adapters[i]))
    return engine


def make_scheduler(engine, max_batch_prefill_tokens: int, prefix_caching: bool = True,
                   max_concurrent: int = 1 << 20) -> Scheduler:
    return Scheduler(LocalShard(engine), engine.num_blocks, engine.block_size, max_batch_prefill_tokens,
                     max_concurrent, max_active_adapters=engine.adapter_pages, adapter_pages=engine.adapter_pages,
                     prefix_caching=prefix_caching)


def _request(engine, req: BenchRequest, adapters: list[Path], max_total_tokens: int | None) -> GenerationRequest:
    adapter = str(adapters[req.adapter]) if req.adapter >= 0 else ""
    pages = engine.adapters.entries[adapter].num_pages if adapter else 0
    limit = max_total_tokens - len(req.input_ids) if max_total_tokens else req.output_len
    return GenerationRequest(req.input_ids, limit, pb.SamplingParameters(), adapter_id=adapter, adapter_pages=pages,
                             ignore_eos=True, cache_key=adapter)


async def serve(scheduler: Scheduler, engine, requests: list[BenchRequest], adapters: list[Path],
                max_total_tokens: int | None = None,
                gate: asyncio.Semaphore | None = None) -> tuple[list[Timing], float]:
    """Each request queued at its arrival and read to `output_len` tokens. With `max_total_tokens` the
    scheduler sees the limit of a chat that names no max_tokens (the room left under it), else `output_len`;
    `gate` bounds how many run at once. Returns timings and wall time."""
    loop = asyncio.create_task(scheduler.run())
    start = time.perf_counter()

    async def one(req: BenchRequest) -> Timing:
        await asyncio.sleep(max(0.0, start + req.arrival - time.perf_counter()))
        sent = time.perf_counter()
        stamps = []
        async with gate or contextlib.nullcontext():
            async with scheduler.generate(_request(engine, req, adapters, max_total_tokens)) as generation:
                async for _ in generation:
                    stamps.append(time.perf_counter() - sent)
                    if len(stamps) == req.output_len:
                        break
        return Timing(sent - start, stamps)

    try:
        timings = await asyncio.gather(*(one(r) for r in requests))
        wall = time.perf_counter() - start
        while not scheduler.idle:  # the last releases reach the engine, which serves the next run clean
            await asyncio.sleep(0.001)
        return list(timings), wall
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop


def run_engine(engine, requests: list[BenchRequest], adapters: list[Path],
               max_batch_prefill_tokens: int) -> tuple[list[Timing], float]:
    scheduler = make_scheduler(engine, max_batch_prefill_tokens, prefix_caching=False)  # as the served runs
    try:
        return asyncio.run(serve(scheduler, engine, requests, adapters))
    finally:
        scheduler.client.close()
