"""Failure isolation: a request that fails, at any stage of its life, fails alone, and every KV block,
adapter reference and adapter-pool page it held is handed back. The scheduler runs on a real engine in this
process (tests.inprocess.py); faults are injected into the engine's step, the scheduler's step
observer, the request itself and its consumer."""

from __future__ import annotations

import asyncio

import pytest

from router.generation import GenerationFailed, InvalidRequest, Overloaded, QueueTimeout
from shard.engine import Engine
from tests.inprocess import Stack, capacity, collect, idle_capacity, request, settle

PROMPT = [5, 17, 42, 99, 7, 3]
TOKENS = 24


@pytest.fixture(scope="module")
def engine(small_engine) -> Engine:
    return small_engine


@pytest.fixture(scope="module")
def adapter(engine, ops_adapters) -> tuple[str, int]:
    """(id, pool pages) of an adapter registered on the engine."""
    path = str(ops_adapters[1])
    return path, engine.adapters.entries[path].num_pages


@pytest.fixture(scope="module")
def alone(engine, adapter, tmp_path_factory) -> list[int]:
    """The bystander's tokens when it runs alone: what it must produce whatever fails beside it."""
    async def run():
        async with Stack(engine, tmp_path_factory.mktemp("alone")) as stack:
            tokens = await collect(stack.scheduler.generate(request(PROMPT, TOKENS, *adapter)))
            assert await settle(stack.scheduler, engine) == idle_capacity(engine)
            return tokens
    return asyncio.run(run())


def scenario(engine, tmp_path, body, **stack_args):
    """Runs `body(stack)` on a fresh stack; afterwards nothing may be held, on either side."""
    async def run():
        async with Stack(engine, tmp_path, **stack_args) as stack:
            assert capacity(stack.scheduler, engine) == idle_capacity(engine)
            result = await body(stack)
            assert await settle(stack.scheduler, engine) == idle_capacity(engine)
            return result
    return asyncio.run(run())


async def started(generation_task: asyncio.Task, stack: Stack, running: int = 1) -> None:
    """Waits until `running` sequences are decoding."""
    for _ in range(2000):
        if stack.scheduler.num_running >= running and stack.engine.sequences:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the generation never started")


def test_unsendable_request_is_refused_alone(engine, adapter, alone, tmp_path):
    """min_tokens ≥ 2**32 used to raise while the step's protobuf was built, failing the whole batch."""
    async def body(stack):
        bystander = asyncio.create_task(collect(stack.scheduler.generate(request(PROMPT, TOKENS, *adapter))))
        await started(bystander, stack)
        for poison in ({"min_new_tokens": 2**32}, {"top_n_tokens": 2**32}):
            with pytest.raises(InvalidRequest):
                stack.scheduler.generate_all([request(PROMPT, 4, *adapter), request(PROMPT, 4, **poison)])
        assert stack.scheduler.num_waiting == 0  # all or nothing: its valid sibling was not queued either
        return await bystander
    assert scenario(engine, tmp_path, body) == alone


def test_request_error_on_the_shard_fails_only_that_request(engine, adapter, alone, tmp_path):
    async def body(stack):
        bystander = asyncio.create_task(collect(stack.scheduler.generate(request(PROMPT, TOKENS, *adapter))))
        await started(bystander, stack)
        with pytest.raises(GenerationFailed) as failed:  # an adapter the shard never registered
            await collect(stack.scheduler.generate(request(PROMPT, 4, "never-loaded", 1)))
        assert not failed.value.server_error
        return await bystander
    assert scenario(engine, tmp_path, body) == alone


@pytest.mark.parametrize("where", ["engine_step", "step_observer"])
def test_failed_step_releases_everything(engine, adapter, tmp_path, where):
    """A shard that raises mid-step, or a bug in the router's step loop: the batch fails with an error
    (no request hangs), and the blocks, adapter references and pool pins all come back."""
    async def body(stack):
        gens = stack.scheduler.generate_all([request(PROMPT, TOKENS, *adapter), request(PROMPT[:3], TOKENS)])
        tasks = [asyncio.create_task(collect(g)) for g in gens]
        await started(tasks[0], stack, running=2)
        fault = _once(RuntimeError("injected fault"))
        if where == "engine_step":
            step = engine.step
            engine.step = lambda *a: (fault(), step(*a))[1]
        else:
            stack.scheduler.on_step = lambda *a: fault()
        try:
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        finally:
            engine.__dict__.pop("step", None)
            stack.scheduler.on_step = None
        assert all(isinstance(r, GenerationFailed) and r.server_error for r in results), results
        assert "injected" not in str(results[0])  # the cause is logged, not shown to clients
        # ...and the server serves on.
        return await collect(stack.scheduler.generate(request(PROMPT, 3)))
    assert len(scenario(engine, tmp_path, body)) == 3


@pytest.mark.parametrize("state", ["waiting", "prefilling", "running"])
def test_consumer_that_leaves_at_any_state_releases_it(engine, adapter, alone, tmp_path, state):
    async def body(stack):
        bystander = asyncio.create_task(collect(stack.scheduler.generate(request(PROMPT, TOKENS, *adapter))))
        if state == "waiting":  # closed before the step loop had a chance to admit it
            leaving = stack.scheduler.generate(request(PROMPT, TOKENS, *adapter))
            leaving.close()
        else:
            leaving = stack.scheduler.generate(request(PROMPT, TOKENS, *adapter))
            task = asyncio.create_task(collect(leaving))
            while stack.scheduler.num_waiting:
                await asyncio.sleep(0)
            if state == "running":
                await started(task, stack, running=2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return await bystander
    assert scenario(engine, tmp_path, body) == alone


def test_refused_and_expired_requests_leave_nothing(engine, adapter, tmp_path):
    async def body(stack):
        with pytest.raises(Overloaded):  # all or none: 3 do not fit under 2
            stack.scheduler.generate_all([request(PROMPT, 4, *adapter)] * 3)
        assert stack.scheduler.num_active == 0
        pool = stack.scheduler.adapters.pages
        unfit = request(PROMPT, 4, adapter[0], pool + 1)  # more pool pages than there are: expires in the queue
        with pytest.raises(QueueTimeout):
            await collect(stack.scheduler.generate(unfit))
        huge = request(PROMPT, engine.num_blocks * engine.block_size)  # outgrows the whole cache: fails alone
        with pytest.raises(GenerationFailed, match="cannot hold"):
            await collect(stack.scheduler.generate(huge))
    scenario(engine, tmp_path, body, max_concurrent=2, max_queue_time_s=0.3)


def _once(error: Exception):
    fired = []

    def fault():
        if not fired:
            fired.append(True)
            raise error
    return fault
