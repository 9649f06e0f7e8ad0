"""Continuous batching: the request queue, KV-budget admission and the step loop.

Every loop iteration is one `Step` on the shards: requests that ended are released, waiting requests
that fit the KV budget are prefilled, and every running request decodes one token. Requests join and
leave between steps. Each request reserves KV blocks for its prompt plus `max_new_tokens` when it is
admitted, so the shards can never run out of blocks mid-generation. Text work (detokenization, stop
strings) happens in each request's own coroutine, off this loop.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

from proto import generate_pb2 as pb
from router.errors import redact_paths
from router.shard_client import ShardClient, ShardError

log = logging.getLogger("loom.scheduler")


@dataclass(slots=True)
class GenerationRequest:
    input_ids: list[int]
    max_new_tokens: int
    sampling: pb.SamplingParameters = field(default_factory=pb.SamplingParameters)
    adapter_id: str = ""
    adapter_pages: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    top_n_tokens: int = 0
    prefill_logprobs: bool = False
    min_new_tokens: int = 0
    grammar: str = ""


@dataclass(slots=True)
class TokenEvent:
    token_id: int
    logprob: float
    top_tokens: list[tuple[int, float]]
    finish_reason: str | None = None  # "length" | "eos_token"
    prefill_logprobs: list[float] | None = None


@dataclass(slots=True)
class GenerationStats:
    """One generation's timeline (perf_counter seconds) and outcome, for metrics and the request log."""

    adapter_id: str
    prompt_tokens: int
    enqueued: float
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    generated: int = 0
    # length | eos_token | stop_sequence | cancelled | error | shard_error | queue_timeout
    finish_reason: str | None = None

    @property
    def queue_s(self) -> float:
        return (self.admitted or self.finished or self.enqueued) - self.enqueued

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.enqueued

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if self.generated < 2 or self.first_token is None or self.finished is None:
            return None
        return (self.finished - self.first_token) / (self.generated - 1)


# The HTTP layer sets a list here per request; every generation the request starts appends itself, and the
# HTTP layer closes them all when the exchange ends, whichever way it ends (`Generation.close`).
request_generations: ContextVar[list["Generation"] | None] = ContextVar("request_generations", default=None)


class GenerationFailed(RuntimeError):
    """The request failed on the shards; `server_error` says whether it was the server's fault."""

    def __init__(self, message: str, server_error: bool = True):
        super().__init__(message)
        self.server_error = server_error


class Overloaded(RuntimeError):
    pass


class InvalidRequest(ValueError):
    """A request the shards' protocol cannot carry (a field out of its proto type's range): refused before it
    is queued, so it can never fail a step that other requests share."""


class QueueTimeout(RuntimeError):
    """The request waited for admission longer than max_queue_time_s."""


class State(enum.Enum):
    WAITING = 1
    PREFILLING = 2
    RUNNING = 3
    DONE = 4


@dataclass(slots=True, eq=False)
class Sequence:
    id: int
    request: GenerationRequest
    blocks: int
    stats: GenerationStats
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    proto: pb.Request | None = None  # what the prefill sends, built (and so checked) when the request is queued
    state: State = State.WAITING
    generated: int = 0
    timer: asyncio.TimerHandle | None = None  # the queue timeout, while WAITING


class Generation:
    """What `Scheduler.generate` returns: `async with` it and iterate TokenEvents.

    Leaving the block early (stop string, client gone, error) releases the sequence on the shards.
    """

    def __init__(self, scheduler: "Scheduler", seq: Sequence):
        self._scheduler = scheduler
        self._seq = seq

    @property
    def stats(self) -> GenerationStats:
        return self._seq.stats

    def close(self, reason: str = "cancelled") -> None:
        """Releases the sequence unless it has ended already; safe to call any number of times."""
        self._scheduler.cancel(self._seq, reason)

    async def __aenter__(self) -> "Generation":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        # Leaving early without an error means the consumer has what it wanted (a stop string); a
        # cancellation or a closed generator means the client went away.
        if exc_type is None:
            reason = "stop_sequence"
        elif issubclass(exc_type, (asyncio.CancelledError, GeneratorExit)):
            reason = "cancelled"
        else:
            reason = "error"
        self._scheduler.cancel(self._seq, reason)

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenEvent:
        if self._seq.state is State.DONE and self._seq.events.empty():
            raise StopAsyncIteration
        item = await self._seq.events.get()
        if isinstance(item, BaseException):
            raise item
        return item


class Scheduler:
    def __init__(
        self,
        client: ShardClient,
        num_blocks: int,
        block_size: int,
        max_batch_prefill_tokens: int,
        max_concurrent_requests: int,
        max_active_adapters: int = 128,
        adapter_pages: int = 0,
        max_queue_time_s: float = 600.0,
    ):
        self.client = client
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_batch_prefill_tokens = max_batch_prefill_tokens
        self.max_concurrent_requests = max_concurrent_requests
        self.reserved_blocks = 0
        self.max_active_adapters = max_active_adapters
        self.adapter_pages = adapter_pages
        self.adapter_pages_used = 0
        self._adapter_refs: dict[str, int] = {}  # adapter id → running sequences using it
        self.healthy = True
        self._ids = itertools.count(1)
        self._waiting: deque[Sequence] = deque()
        self._running: dict[int, Sequence] = {}
        self._to_release: list[int] = []
        # Events of the last reply, handed to the consumers only once the next step is on its way (`_post`).
        self._outbox: list[tuple[Sequence, TokenEvent | BaseException]] = []
        self._wake = asyncio.Event()
        self.max_queue_time_s = max_queue_time_s
        # Observers (the metrics): on_step(batch size, reply, step seconds), on_finish(stats) once per sequence.
        self.on_step: Callable[[int, pb.StepResponse, float], None] | None = None
        self.on_finish: Callable[[GenerationStats], None] | None = None
        self.on_adapter_active: Callable[[], None] | None = None  # an adapter joined the running batch

    # -- what request handlers call -------------------------------------------------------------

    def check_capacity(self, count: int = 1) -> None:
        """Raises Overloaded unless `count` more requests fit under --max-concurrent-requests.

        Handlers call it before they start a streamed response, so that overload is a plain 429."""
        if self.num_active + count > self.max_concurrent_requests:
            raise Overloaded(f"the server is at --max-concurrent-requests={self.max_concurrent_requests}")

    def generate(self, request: GenerationRequest) -> Generation:
        """Queues `request`; raises Overloaded past --max-concurrent-requests."""
        return self.generate_all([request])[0]

    def generate_all(self, requests: list[GenerationRequest]) -> list[Generation]:
        """Queues every request or none: Overloaded when they do not all fit under --max-concurrent-requests,
        InvalidRequest when one cannot be sent to the shards. Handlers queue before they answer, so a stream
        that got its 200 holds its place."""
        self.check_capacity(len(requests))
        seqs = [self._sequence(r) for r in requests]
        loop = asyncio.get_running_loop()
        generations = [Generation(self, seq) for seq in seqs]
        tracked = request_generations.get()
        for seq, generation in zip(seqs, generations):
            seq.timer = loop.call_later(self.max_queue_time_s, self._expire, seq)
            if tracked is not None:
                tracked.append(generation)
            self._waiting.append(seq)
        self._wake.set()
        return generations

    def _sequence(self, request: GenerationRequest) -> Sequence:
        blocks = math.ceil((len(request.input_ids) + request.max_new_tokens) / self.block_size)
        stats = GenerationStats(request.adapter_id, len(request.input_ids), time.perf_counter())
        seq = Sequence(id=next(self._ids), request=request, blocks=blocks, stats=stats)
        try:
            seq.proto = self._to_proto(seq)
        except (ValueError, TypeError) as e:  # protobuf's range and type checks
            raise InvalidRequest(f"a request field is out of range: {e}") from None
        return seq

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        """The consumer is done with `seq`; frees its place in the queue, or its KV blocks and adapter
        reference at once (the shards drop it at the start of the next step)."""
        if seq.state is State.WAITING:
            self._waiting.remove(seq)
            self._end_waiting(seq, reason)
        elif seq.state in (State.PREFILLING, State.RUNNING):
            self._finish(seq, reason)

    @property
    def num_active(self) -> int:
        return len(self._waiting) + len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    # -- the step loop --------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            if not (self._waiting or self._running or self._to_release):
                self._post()
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._step()
            except Exception:  # a bug here must not wedge every request: fail the batch, go on
                log.exception("scheduler step crashed")
                self._post()
                self._fail_running("internal error in the batch step; the request can be retried")
                await self._recover()

    async def _step(self) -> None:
        admitted = self._admit()
        decode = [sid for sid, s in self._running.items() if s.state is State.RUNNING]
        release, self._to_release = self._to_release, []
        step = pb.StepRequest(prefill=[s.proto for s in admitted], decode=decode, release=release)
        started = time.perf_counter()
        try:
            call = self.client.step(step)
            # The consumers of the last reply's tokens (detokenizer, SSE writes) run while the shards compute this
            # step: woken now, they queue behind the call's send instead of delaying it.
            self._post()
            reply = await call
        except ShardError as e:
            log.error("step failed: %s", e)  # the details (ranks, library messages) stay in the log
            self._fail_running("the batch step failed on the shards; the request can be retried")
            await self._recover()
            return
        self.healthy = True
        for seq in admitted:
            if seq.state is State.PREFILLING:
                seq.state = State.RUNNING
        for gen in reply.generations:
            self._deliver(gen)
        if self.on_step is not None:
            self.on_step(len(admitted) + len(decode), reply, time.perf_counter() - started)

    def _admit(self) -> list[Sequence]:
        """Strict FIFO admission under the KV-block, prefill-token and adapter budgets.

        Stopping at the first request that does not fit (instead of skipping it) is what keeps a request
        for a new adapter from starving behind a stream of requests for already-active adapters.
        """
        admitted, prefill_tokens = [], 0
        while self._waiting:
            seq = self._waiting[0]
            n = len(seq.request.input_ids)
            if self.reserved_blocks + seq.blocks > self.num_blocks:
                break
            if admitted and prefill_tokens + n > self.max_batch_prefill_tokens:
                break
            if not self._adapter_fits(seq.request):
                break
            self._waiting.popleft()
            seq.timer.cancel()
            seq.stats.admitted = time.perf_counter()
            # Running from here on: whatever happens to this step, `_finish` or `_fail_running` gives the blocks
            # and the adapter reference back.
            self.reserved_blocks += seq.blocks
            self._acquire_adapter(seq.request)
            self._running[seq.id] = seq
            prefill_tokens += n
            seq.state = State.PREFILLING
            admitted.append(seq)
        return admitted

    def _adapter_fits(self, request: GenerationRequest) -> bool:
        adapter = request.adapter_id
        if not adapter or adapter in self._adapter_refs:
            return True
        return (len(self._adapter_refs) < self.max_active_adapters
                and self.adapter_pages_used + request.adapter_pages <= self.adapter_pages)

    def _acquire_adapter(self, request: GenerationRequest) -> None:
        adapter = request.adapter_id
        if adapter:
            if adapter not in self._adapter_refs:
                self.adapter_pages_used += request.adapter_pages
                if self.on_adapter_active is not None:
                    self.on_adapter_active()
            self._adapter_refs[adapter] = self._adapter_refs.get(adapter, 0) + 1

    def _release_adapter(self, request: GenerationRequest) -> None:
        adapter = request.adapter_id
        if adapter:
            self._adapter_refs[adapter] -= 1
            if not self._adapter_refs[adapter]:
                del self._adapter_refs[adapter]
                self.adapter_pages_used -= request.adapter_pages

    @property
    def active_adapters(self) -> int:
        return len(self._adapter_refs)

    # -- what the inference extension's endpoint picker reads (router/metrics.py) ---------------------

    def kv_cache_usage(self) -> float:
        """KV cache in use, 0-1: blocks reserved by admitted requests over all blocks. Admission reserves a
        request's prompt + max_new_tokens blocks, so this is the figure that decides whether a request fits."""
        return self.reserved_blocks / self.num_blocks if self.num_blocks else 0.0

    @property
    def max_running_adapters(self) -> int:
        """Adapters that can run at once: --max-active-adapters, and each takes at least one pool page."""
        return min(self.max_active_adapters, self.adapter_pages)

    @property
    def running_adapters(self) -> list[str]:
        return list(self._adapter_refs)

    @property
    def waiting_adapters(self) -> list[str]:
        """Distinct adapters of the queued requests, in queue order."""
        return list(dict.fromkeys(s.request.adapter_id for s in self._waiting if s.request.adapter_id))

    def adapter_users(self, adapter_id: str) -> int:
        """Requests queued or running with `adapter_id`."""
        queued = sum(1 for s in self._waiting if s.request.adapter_id == adapter_id)
        return queued + self._adapter_refs.get(adapter_id, 0)

    def _deliver(self, gen: pb.Generation) -> None:
        seq = self._running.get(gen.request_id)
        if seq is None or seq.state is State.DONE:
            return  # cancelled while the step ran; already queued for release
        if gen.error:
            self._finish(seq, "error")
            self._outbox.append((seq, GenerationFailed(redact_paths(gen.error), server_error=False)))
            return
        seq.generated += 1
        seq.stats.generated = seq.generated
        if seq.stats.first_token is None:
            seq.stats.first_token = time.perf_counter()
        request = seq.request
        finish = None
        if gen.token_id in request.stop_token_ids and not request.ignore_eos:
            finish = "eos_token"
        elif seq.generated >= request.max_new_tokens:
            finish = "length"
        self._outbox.append((seq, TokenEvent(
            token_id=gen.token_id,
            logprob=gen.logprob,
            top_tokens=[(t.token_id, t.logprob) for t in gen.top_tokens],
            finish_reason=finish,
            prefill_logprobs=list(gen.prefill_logprobs) if gen.prefill_logprobs else None,
        )))
        if finish:
            self._finish(seq, finish)

    def _post(self) -> None:
        """Hands the held events to their consumers. Between `_deliver` and here nothing awaits, so a consumer
        never sees its sequence DONE before its last event is queued."""
        for seq, item in self._outbox:
            seq.events.put_nowait(item)
        self._outbox.clear()

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.state = State.DONE
        if self._running.pop(seq.id, None) is not None:
            self.reserved_blocks -= seq.blocks
            self._release_adapter(seq.request)
            self._to_release.append(seq.id)
            self._wake.set()
            self._record_end(seq, reason)

    def _end_waiting(self, seq: Sequence, reason: str) -> None:
        seq.timer.cancel()
        seq.state = State.DONE
        self._record_end(seq, reason)

    def _record_end(self, seq: Sequence, reason: str) -> None:
        seq.stats.finished = time.perf_counter()
        seq.stats.finish_reason = reason
        if self.on_finish is not None:
            self.on_finish(seq.stats)

    def _expire(self, seq: Sequence) -> None:
        """The queue timeout: a request that could not be admitted in time fails instead of waiting on."""
        if seq.state is not State.WAITING:
            return
        self._waiting.remove(seq)
        self._end_waiting(seq, "queue_timeout")
        seq.events.put_nowait(QueueTimeout(
            f"the request waited {self.max_queue_time_s:g} s in the queue without being scheduled: "
            "the server is overloaded, retry later"))

    def _fail_running(self, message: str) -> None:
        self.healthy = False
        for seq in list(self._running.values()):
            self._finish(seq, "shard_error")
            seq.events.put_nowait(GenerationFailed(f"shard failure: {message}"))
        self._to_release.clear()

    async def _recover(self) -> None:
        """After a failed step the shards' sequence state is unknown: drop it all. Once the shards have
        cleared, the server is healthy again."""
        try:
            await self.client.clear()
            self.healthy = True
        except ShardError as e:
            log.error("clearing the shards failed: %s", e)
            await asyncio.sleep(1.0)

    @staticmethod
    def _to_proto(seq: Sequence) -> pb.Request:
        r = seq.request
        return pb.Request(
            id=seq.id,
            input_ids=r.input_ids,
            sampling=r.sampling,
            adapter_id=r.adapter_id,
            top_n_tokens=r.top_n_tokens,
            prefill_logprobs=r.prefill_logprobs,
            min_new_tokens=r.min_new_tokens,
            grammar=r.grammar,
            stop_token_ids=sorted(r.stop_token_ids) if r.min_new_tokens else [],
        )
