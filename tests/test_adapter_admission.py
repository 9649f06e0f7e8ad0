"""Admission across adapters: a request whose adapter cannot get a slot in the running batch does not hold up
the requests behind it whose adapters already run, but it is passed over for at most --adapter-cycle-time-s;
after that admission waits for it, so it never starves. The scheduler runs on a real engine in this process
(tests/inprocess.py), with one adapter slot."""

from __future__ import annotations

import asyncio
import time

import pytest

from shard.engine import Engine
from tests.inprocess import Stack, collect, idle_capacity, request, settle

PROMPT = [5, 17, 42, 99, 7, 3]
LONG = 500  # tokens of the long request: about the tiny model's whole context, seconds of decoding here


@pytest.fixture(scope="module")
def engine(small_engine) -> Engine:
    return small_engine


@pytest.fixture(scope="module")
def a_and_b(engine, ops_adapters) -> list[tuple[str, int]]:
    """(id, pool pages) of two adapters registered on the engine."""
    return [(str(p), engine.adapters.entries[str(p)].num_pages) for p in ops_adapters[:2]]


def run(engine, tmp_path, cycle_s: float, body):
    async def main():
        async with Stack(engine, tmp_path, max_active_adapters=1, adapter_cycle_time_s=cycle_s) as stack:
            done: dict[str, float] = {}

            async def finish(name: str, req) -> list[int]:
                tokens = await collect(stack.scheduler.generate(req))
                done[name] = time.monotonic()
                return tokens

            await body(stack, finish)
            assert await settle(stack.scheduler, engine) == idle_capacity(engine)
            return done
    return asyncio.run(main())


def test_a_request_waiting_for_a_slot_does_not_block_running_adapters(engine, a_and_b, tmp_path):
    """A runs a long request; B's request waits for the one slot; a second A request queued behind B runs at
    once beside the first, instead of waiting for B's turn (strict FIFO: it finished last)."""
    a, b = a_and_b

    async def body(stack, finish):
        long_a = asyncio.create_task(finish("long_a", request(PROMPT, LONG, *a)))
        await asyncio.sleep(0.2)
        waiting_b = asyncio.create_task(finish("b", request(PROMPT, 8, *b)))
        await asyncio.sleep(0.05)
        short_a = asyncio.create_task(finish("short_a", request(PROMPT, 8, *a)))
        await asyncio.gather(long_a, waiting_b, short_a)

    done = run(engine, tmp_path, 60.0, body)
    assert done["short_a"] < done["long_a"] < done["b"]


def test_a_request_passed_over_past_the_cycle_time_is_admitted_next(engine, a_and_b, tmp_path):
    """With a 0.1 s cycle: B is passed over while A runs, then admission waits for it: an A request that comes
    after the cycle is over queues behind B instead of joining A's batch, so B is never starved."""
    a, b = a_and_b

    async def body(stack, finish):
        long_a = asyncio.create_task(finish("long_a", request(PROMPT, LONG, *a)))
        await asyncio.sleep(0.1)
        waiting_b = asyncio.create_task(finish("b", request(PROMPT, 8, *b)))
        await asyncio.sleep(0.3)
        assert stack.scheduler.num_waiting == 1 and stack.scheduler.num_running == 1  # long A runs, B waits
        late_a = asyncio.create_task(finish("late_a", request(PROMPT, 8, *a)))
        await asyncio.gather(long_a, waiting_b, late_a)

    done = run(engine, tmp_path, 0.1, body)
    assert done["long_a"] < done["b"] < done["late_a"]
