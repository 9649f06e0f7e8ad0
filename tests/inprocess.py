"""The router's scheduler on a real engine in this process: the shard's own gRPC service (shard/server.py) on
a unix socket, the router's own ShardClient, no HTTP. Tests drive requests through it (faults injected at each
stage, caches small enough to preempt, prompts chunked) and compare the capacity held before and after."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass
from pathlib import Path

import grpc

from proto import generate_pb2_grpc as pb_grpc
from router.backend import sampling_parameters
from router.generation import GenerationRequest
from router.scheduler import Scheduler
from router.shard_client import ShardClient
from shard.engine import Engine
from shard.server import ShardService, engine_thread

_sockets = itertools.count()


@dataclass(frozen=True, slots=True)
class Capacity:
    """Everything a request holds while it lives, router side and shard side."""

    held_blocks: int  # KV blocks that running requests hold (cached blocks no request holds are free)
    adapter_pages_used: int
    active_adapters: int
    queued_or_running: int
    engine_sequences: int
    adapter_pins: int


def capacity(scheduler: Scheduler, engine: Engine) -> Capacity:
    blocks = scheduler.blocks
    return Capacity(blocks.num_held, scheduler.adapters.pages_used, len(scheduler.adapters.active),
                    scheduler.num_active, len(engine.sequences),
                    sum(e.pins for e in engine.adapters.entries.values()))


def idle_capacity(engine: Engine) -> Capacity:
    return Capacity(0, 0, 0, 0, 0, 0)


async def settle(scheduler: Scheduler, engine: Engine, timeout: float = 20.0) -> Capacity:
    """Waits (bounded) until the scheduler has handed everything back; returns what it holds then."""
    deadline = asyncio.get_running_loop().time() + timeout
    while capacity(scheduler, engine) != idle_capacity(engine) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    return capacity(scheduler, engine)


class Stack:
    """Engine ← ShardService (gRPC, unix socket) ← ShardClient ← Scheduler, all on this event loop."""

    def __init__(self, engine: Engine, socket_dir: Path, max_concurrent: int = 32, max_queue_time_s: float = 600.0,
                 max_batch_prefill_tokens: int = 4096, prefix_caching: bool = True, max_active_adapters: int = 4,
                 adapter_cycle_time_s: float = 2.0):
        self.engine = engine
        self.max_active_adapters = max_active_adapters
        self.adapter_cycle_time_s = adapter_cycle_time_s
        self.socket = socket_dir / f"shard{next(_sockets)}.sock"
        self.max_concurrent = max_concurrent
        self.max_queue_time_s = max_queue_time_s
        self.max_batch_prefill_tokens = max_batch_prefill_tokens
        self.prefix_caching = prefix_caching

    async def __aenter__(self) -> "Stack":
        self.worker = engine_thread()
        self.server = grpc.aio.server()
        pb_grpc.add_ShardServicer_to_server(ShardService(self.engine, 0, 1, self.worker), self.server)
        self.server.add_insecure_port(f"unix://{self.socket}")
        await self.server.start()
        self.client = ShardClient([str(self.socket)], step_timeout_s=30)
        e = self.engine
        self.scheduler = Scheduler(self.client, e.num_blocks, e.block_size, self.max_batch_prefill_tokens,
                                   self.max_concurrent, max_active_adapters=self.max_active_adapters,
                                   adapter_pages=e.adapter_pages, max_queue_time_s=self.max_queue_time_s,
                                   prefix_caching=self.prefix_caching, adapter_cycle_time_s=self.adapter_cycle_time_s)
        self.loop_task = asyncio.create_task(self.scheduler.run())
        return self

    async def __aexit__(self, *exc) -> None:
        self.loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.loop_task
        await self.client.close()
        await self.server.stop(None)
        self.worker.shutdown(wait=True)


def request(prompt: list[int], tokens: int, adapter: str = "", pages: int = 0, **fields) -> GenerationRequest:
    fields.setdefault("sampling", sampling_parameters())
    return GenerationRequest(input_ids=prompt, max_new_tokens=tokens, adapter_id=adapter, adapter_pages=pages,
                             ignore_eos=True, **fields)


async def collect(generation) -> list[int]:
    """Every token id of a generation, to its end (raises what the generation raises)."""
    out = []
    async with generation:
        async for event in generation:
            out.append(event.token_id)
    return out
