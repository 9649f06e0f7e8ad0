"""The shard group's client interface over an Engine in this process, without gRPC: the router's scheduler
drives it exactly as it drives ShardClient (the in-process bench measures the serving overhead against it)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor

from proto import generate_pb2 as pb
from router.shard_client import ShardError
from shard.engine import Engine
from shard.server import engine_thread, run_step


class LocalShard:
    def __init__(self, engine: Engine, worker: ThreadPoolExecutor | None = None):
        self.engine = engine
        self._worker = worker or engine_thread()

    @property
    def world_size(self) -> int:
        return 1

    def step(self, request: pb.StepRequest) -> Awaitable[pb.StepResponse]:
        """Starts the step on the engine thread at once, as ShardClient.step does."""
        future = asyncio.get_running_loop().run_in_executor(self._worker, run_step, self.engine, request)
        return self._result(future)

    @staticmethod
    async def _result(future: Awaitable[pb.StepResponse]) -> pb.StepResponse:
        try:
            return await future
        except Exception as e:  # as a remote shard's failure reaches the router
            raise ShardError(f"shard 0 Step failed: {e!r}") from e

    async def clear(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._worker, self.engine.clear)

    def close(self) -> None:
        self._worker.shutdown(wait=True)
