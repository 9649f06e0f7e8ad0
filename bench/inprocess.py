"""The same workload on shard.engine.Engine driven in this process: the router's continuous-batching loop
(FIFO admission under the prefill-token budget, new requests prefilled in the step that decodes the running
ones) without HTTP, gRPC, tokenization or detokenization. The gap to the served run is the serving overhead."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from bench.stats import Timing
from bench.workload import BenchRequest


@dataclass(slots=True)
class _Live:
    req: BenchRequest
    timing: Timing
    tokens: list[float] = field(default_factory=list)


def make_engine(model_dir: Path, adapters: list[Path], used: set[int], max_batch_prefill_tokens: int,
                adapter_pool_pages: int, host_cache_bytes: int):
    from shard.engine import Engine

    engine = Engine(str(model_dir), adapter_pool_pages=adapter_pool_pages, adapter_host_cache_bytes=host_cache_bytes)
    engine.warmup(max_batch_prefill_tokens)
    for i in sorted(used):  # registered up front, as warm_adapters does for the server
        engine.load_adapter(str(adapters[i]), str(adapters[i]))
    return engine


def run_engine(engine, requests: list[BenchRequest], adapters: list[Path],
               max_batch_prefill_tokens: int) -> tuple[list[Timing], float]:
    from shard.engine import SequenceRequest

    waiting = deque(sorted(enumerate(requests), key=lambda p: p[1].arrival))
    running: dict[int, _Live] = {}
    done: dict[int, Timing] = {}
    release: list[int] = []
    max_steps = sum(r.output_len for r in requests) + len(requests) + 1  # every step yields a token or admits
    start = time.perf_counter()
    for _ in range(max_steps):
        if not (waiting or running):
            break
        now = time.perf_counter() - start
        if not running and waiting[0][1].arrival > now:
            time.sleep(waiting[0][1].arrival - now)
            now = time.perf_counter() - start
        admitted, budget = [], max_batch_prefill_tokens
        while waiting and waiting[0][1].arrival <= now and (not admitted or len(waiting[0][1].input_ids) <= budget):
            i, req = waiting.popleft()
            budget -= len(req.input_ids)
            admitted.append(SequenceRequest(i, req.input_ids, adapter_id=str(adapters[req.adapter]) if req.adapter >= 0 else ""))
            running[i] = _Live(req, Timing(req.arrival, []))
        new = {a.id for a in admitted}
        decode = [i for i in running if i not in new]
        results = engine.step(admitted, decode, release)
        stamp = time.perf_counter() - start
        release = []
        for r in results:
            if r.error:
                raise RuntimeError(f"request {r.request_id}: {r.error}")
            live = running[r.request_id]
            live.timing.tokens.append(stamp - live.req.arrival)
            if len(live.timing.tokens) == live.req.output_len:
                done[r.request_id] = running.pop(r.request_id).timing
                release.append(r.request_id)
    else:
        raise RuntimeError(f"in-process loop did not finish in {max_steps} steps")
    wall = time.perf_counter() - start
    engine.step([], [], release)
    return [done[i] for i in range(len(requests))], wall
