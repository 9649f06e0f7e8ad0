"""gRPC client for the shard group: every call goes to every rank; rank 0's answer is used."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import grpc

from proto import generate_pb2 as pb
from proto import generate_pb2_grpc as pb_grpc


class ShardError(RuntimeError):
    """A shard failed, hung past the step timeout, or is unreachable."""


def _raise_failed(method: str, results: list) -> None:
    """Raises ShardError for the first rank whose call failed."""
    for rank, result in enumerate(results):
        if isinstance(result, grpc.aio.AioRpcError):
            raise ShardError(f"shard {rank} {method} failed: {result.code().name}: {result.details()}")
        if isinstance(result, BaseException):
            raise ShardError(f"shard {rank} {method} failed: {result!r}")


class ShardClient:
    def __init__(self, sockets: list[str], step_timeout_s: float = 120.0):
        self._channels = [
            grpc.aio.insecure_channel(
                f"unix://{path}",
                options=[("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)],
            )
            for path in sockets
        ]
        self._stubs = [pb_grpc.ShardStub(c) for c in self._channels]
        self.step_timeout_s = step_timeout_s

    @property
    def world_size(self) -> int:
        return len(self._stubs)

    def _all(self, method: str, request, timeout: float) -> Awaitable:
        """Starts the call on every rank now (not when awaited); the awaitable gives rank 0's reply or raises
        ShardError."""
        calls = [getattr(stub, method)(request, timeout=timeout) for stub in self._stubs]
        return self._gather(method, calls)

    @staticmethod
    async def _gather(method: str, calls: list):
        results = await asyncio.gather(*calls, return_exceptions=True)
        _raise_failed(method, results)
        return results[0]

    async def info(self) -> pb.InfoResponse:
        return await self._all("Info", pb.InfoRequest(), timeout=30)

    async def health(self, timeout: float = 5.0) -> bool:
        try:
            await self._all("Health", pb.HealthRequest(), timeout=timeout)
            return True
        except ShardError:
            return False

    async def warmup(self, request: pb.WarmupRequest) -> pb.WarmupResponse:
        return await self._all("Warmup", request, timeout=600)

    def step(self, request: pb.StepRequest) -> Awaitable[pb.StepResponse]:
        """Starts the step at once, so the caller can do other work while the request is on its way."""
        return self._all("Step", request, timeout=self.step_timeout_s)

    async def clear(self) -> None:
        await self._all("Clear", pb.ClearRequest(), timeout=30)

    async def load_adapter(self, adapter_id: str, path: str,
                           preloaded: bool = False) -> tuple[str, int, int, int]:
        """Registers an adapter on every rank or on none (`preloaded`: resident for good); returns (error, rank,
        pool pages, the vocabulary of its requests). Each rank checks its own slice of the weights, so one rank may refuse what the others took:
        they then forget it again, and no rank serves an adapter another does not have."""
        request = pb.LoadAdapterRequest(adapter_id=adapter_id, path=path, preloaded=preloaded)
        calls = [stub.LoadAdapter(request, timeout=600) for stub in self._stubs]
        replies = await asyncio.gather(*calls, return_exceptions=True)
        errors = [r.error for r in replies if isinstance(r, pb.LoadAdapterResponse) and r.error]
        if errors or any(isinstance(r, BaseException) for r in replies):
            await self._gather("UnloadAdapter", [stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter_id=adapter_id),
                                                                     timeout=60) for stub in self._stubs])
        _raise_failed("LoadAdapter", replies)
        reply = replies[0]
        return (errors[0] if errors else ""), reply.rank, reply.pages, reply.vocab_size

    async def unload_adapter(self, adapter_id: str) -> str:
        """Forgets an adapter on every rank; returns the error ("" when done)."""
        reply = await self._all("UnloadAdapter", pb.UnloadAdapterRequest(adapter_id=adapter_id), timeout=60)
        return reply.error

    async def prepare_grammar(self, grammar: str) -> str:
        """Has every rank compile `grammar` into its cache; returns why it cannot be used ("" when it compiled)."""
        reply = await self._all("PrepareGrammar", pb.PrepareGrammarRequest(grammar=grammar), timeout=60)
        return reply.error

    async def adapter_residency(self, timeout: float = 2.0) -> pb.AdapterResidencyResponse:
        """Rank 0's adapters in its device pool and host cache (every rank pages the same adapters)."""
        try:
            return await self._stubs[0].AdapterResidency(pb.AdapterResidencyRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise ShardError(f"shard 0 AdapterResidency failed: {e.code().name}: {e.details()}") from None

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))
