"""The shard's gRPC service: turns `Step` calls into engine steps.

The engine is synchronous PyTorch; it runs on one worker thread so that Health keeps answering
while a step computes, and steps never overlap.

A step that fails on one rank of a tensor-parallel group leaves the others inside (or past) collectives
that rank never joined: the next step's all-reduce would pair with a stale one (a hang, or wrong
activations). A sticky device error (a CUDA fault) poisons every later kernel the same way. Either ends the
process: it answers nothing more and exits 1, the peers' collectives fail or the launcher kills them, and
the launcher takes the whole group down. A single-rank step error stays the step's own (the router fails
that step's requests, clears and serves on).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from proto import generate_pb2 as pb
from proto import generate_pb2_grpc as pb_grpc
from shard.engine import AdapterError, Chunk, Engine, SamplingParams, SequenceRequest, TokenResult
from shard.step_costs import measure_step_costs

log = logging.getLogger("loom.shard")

FATAL_EXIT_CODE = 1
FATAL_EXIT_DELAY_S = 0.2  # lets the failing Step's error reach the router before the process goes


def is_sticky_device_error(error: BaseException) -> bool:
    """A CUDA fault (illegal address, device-side assert, ECC...): the context is unusable from then on.
    Out-of-memory is not one: the allocator recovers."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return (accelerator_error is not None and isinstance(error, accelerator_error)) or "CUDA error" in str(error)


def sampling_from_proto(p: pb.SamplingParameters) -> SamplingParams:
    return SamplingParams(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p or 1.0,
        min_p=p.min_p,
        typical_p=p.typical_p or 1.0,
        repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
        seed=p.seed if p.HasField("seed") else None,
        logit_bias=dict(p.logit_bias) or None,
    )


def request_from_proto(r: pb.Request) -> SequenceRequest:
    return SequenceRequest(
        id=r.id,
        input_ids=list(r.input_ids),
        sampling=sampling_from_proto(r.sampling),
        adapter_id=r.adapter_id,
        top_n_tokens=r.top_n_tokens,
        prefill_logprobs=r.prefill_logprobs,
        prefill_top_n=r.prefill_top_n,
        grammar=r.grammar,
        min_new_tokens=r.min_new_tokens,
        stop_token_ids=list(r.stop_token_ids),
        generated_ids=list(r.generated_ids),
    )


def chunk_from_proto(c: pb.Chunk) -> Chunk:
    return Chunk(c.id, c.start, c.num_tokens, list(c.new_blocks))


def run_step(engine: Engine, request: pb.StepRequest) -> pb.StepResponse:
    """One Step on the engine, proto in and out (on the engine thread)."""
    started = time.perf_counter()
    results = engine.step([request_from_proto(r) for r in request.new],
                          [chunk_from_proto(c) for c in request.chunks], list(request.release))
    return pb.StepResponse(generations=[generation_to_proto(t) for t in results],
                           forward_ms=(time.perf_counter() - started) * 1000)


def generation_to_proto(t: TokenResult) -> pb.Generation:
    return pb.Generation(
        request_id=t.request_id,
        token_id=t.token_id,
        logprob=t.logprob,
        top_tokens=[pb.TopToken(token_id=i, logprob=lp) for i, lp in t.top_tokens],
        prefill_logprobs=t.prefill_logprobs,
        error=t.error,
        prefill_top_tokens=[pb.PromptToken(top=[pb.TopToken(token_id=i, logprob=lp) for i, lp in top], rank=rank)
                            for top, rank in t.prefill_top_tokens],
    )


class ShardService(pb_grpc.ShardServicer):
    def __init__(self, engine: Engine, rank: int, world_size: int, engine_thread: ThreadPoolExecutor):
        self.engine = engine
        self.rank = rank
        self.world_size = world_size
        self._worker = engine_thread
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-loader")
        self._compiler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self.failed: str = ""  # set once this rank cannot step any more; every RPC then refuses
        # The router keeps the next step on its way while one computes: steps start in their number's order.
        self._last_step = 0
        self._turn = asyncio.Condition()

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def _refuse_if_failed(self, context) -> None:
        if self.failed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"shard {self.rank} failed: {self.failed}")

    def _fail(self, error: BaseException) -> None:
        """Stops this rank for good: nothing after a desynchronised step or a sticky device error is sound."""
        self.failed = f"{type(error).__name__}: {error}"
        why = "a step failed under tensor parallelism" if self.world_size > 1 else "sticky device error"
        log.critical("shard %d/%d: %s (%s); exiting so that the group goes down", self.rank, self.world_size,
                     why, self.failed)
        asyncio.get_running_loop().call_later(FATAL_EXIT_DELAY_S, os._exit, FATAL_EXIT_CODE)

    async def Info(self, request, context):
        info = self.engine.info
        return pb.InfoResponse(
            model_type=info.model_type,
            dtype=info.dtype,
            device=info.device,
            rank=self.rank,
            world_size=self.world_size,
            vocab_size=info.vocab_size,
            max_position_embeddings=info.max_position_embeddings,
            block_size=info.block_size,
            prefix_cacheable=self.engine.model.recompute_at is None,
        )

    async def AdapterResidency(self, request, context):
        cache = self.engine.adapters  # read on the engine thread, which owns it
        device, host = await self._run(lambda: (list(cache.resident), list(cache.host)))
        return pb.AdapterResidencyResponse(device=device, host=host)

    async def Health(self, request, context):
        await self._refuse_if_failed(context)
        return pb.HealthResponse()

    async def Warmup(self, request, context):
        num_blocks = await self._run(
            self.engine.warmup, request.max_batch_prefill_tokens, request.max_batch_total_tokens,
            request.max_concurrent_requests, request.max_active_adapters,
        )
        block_size = self.engine.info.block_size
        reply = pb.WarmupResponse(
            num_blocks=num_blocks, block_size=block_size, max_supported_total_tokens=num_blocks * block_size,
            adapter_pages=self.engine.adapter_pages, adapter_page_rank=self.engine.adapter_page_rank,
            adapter_page_bytes=self.engine.adapters.page_bytes,
        )
        if request.measure_step_costs:
            costs = await self._run(measure_step_costs, self.engine, request.max_batch_prefill_tokens)
            reply.decode_step_ms, reply.prompt_token_ms = costs.decode_step_s * 1000, costs.prompt_token_s * 1000
        return reply

    async def Step(self, request, context):
        await self._refuse_if_failed(context)
        async with self._turn:
            await self._turn.wait_for(lambda: request.step <= self._last_step + 1)
            self._last_step = max(self._last_step, request.step)
            # Queued on the engine thread in order; the next step may queue behind it at once.
            result = asyncio.get_running_loop().run_in_executor(self._worker, run_step, self.engine, request)
            self._turn.notify_all()
        try:
            return await result
        except Exception as e:
            if self.world_size > 1 or is_sticky_device_error(e):
                self._fail(e)
            raise

    async def Clear(self, request, context):
        await self._refuse_if_failed(context)
        await self._run(self.engine.clear)
        return pb.ClearResponse()

    async def LoadAdapter(self, request, context):
        await self._refuse_if_failed(context)
        # Reading (disk, parsing, checks, layout) on the loader thread, so that a large or hostile adapter stalls
        # no step; registering on the engine thread, which owns the cache and must not race a step's paging.
        engine, loop = self.engine, asyncio.get_running_loop()
        try:
            host = await loop.run_in_executor(self._loader, engine.read_adapter, request.adapter_id, request.path)
            info = await self._run(engine.register_adapter, request.adapter_id, request.path, host, request.preloaded)
        except AdapterError as e:
            return pb.LoadAdapterResponse(error=str(e))
        return pb.LoadAdapterResponse(rank=info.rank, pages=info.pages, vocab_size=info.vocab_size)

    async def PrepareGrammar(self, request, context):
        await self._refuse_if_failed(context)
        loop = asyncio.get_running_loop()
        error = await loop.run_in_executor(self._compiler, self.engine.grammars.prepare, request.grammar)
        return pb.PrepareGrammarResponse(error=error)

    async def UnloadAdapter(self, request, context):
        try:
            await self._run(self.engine.unload_adapter, request.adapter_id)
        except AdapterError as e:
            return pb.UnloadAdapterResponse(error=str(e))
        return pb.UnloadAdapterResponse()


def engine_thread() -> ThreadPoolExecutor:
    """The one thread that runs every torch op of the shard: loading, warmup and steps. OpenMP gives each
    thread that starts parallel work its own team of threads; a second team on the same cores makes both
    spin less and sleep more between ops (served forwards measured ~25% slower than the same steps run
    from one thread)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")


async def serve(engine: Engine, socket_path: str, rank: int, world_size: int, worker: ThreadPoolExecutor) -> None:
    server = grpc.aio.server(
        options=[("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
    )
    pb_grpc.add_ShardServicer_to_server(ShardService(engine, rank, world_size, worker), server)
    server.add_insecure_port(f"unix://{socket_path}")
    await server.start()
    log.info("shard %d/%d serving on %s", rank, world_size, socket_path)
    await server.wait_for_termination()
