"""Continuous batching: the request queue, the KV cache's blocks, admission, preemption and the step loop.

Every loop iteration is one `Step` on the shards. The scheduler owns the KV blocks (router/kv_blocks.py): a
request takes blocks as it grows, starting from the cached blocks of its longest prefix computed before
under the same adapter. Each step, running requests come first, oldest first: a decoding one computes its
last token, a prefilling one its next chunk of the prompt within the step's prefill-token budget
(--max-batch-prefill-tokens, else sized at warmup: router/prefill_budget.py), so a long prompt runs in chunks beside
the decodes instead of stalling them.
When a running request finds no block, the newest running requests are preempted (their blocks freed, their
cached full blocks kept for reuse) and queued again at the front; they resume by recomputing their tokens,
exactly. Waiting requests are admitted in FIFO order while their first chunk fits; one whose adapter cannot
get a slot yet is passed over for a bounded time (`_admit`). Text work (detokenization, stop strings) happens in
each request's own coroutine, off this loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from common.defaults import DEFAULT_ADAPTER_CYCLE_TIME_S, DEFAULT_MAX_ACTIVE_ADAPTERS, DEFAULT_MAX_QUEUE_TIME_S
from proto import generate_pb2 as pb
from router.adapter_slots import AdapterSlots
from router.errors import redact_paths
from router.generation import (
    Generation,
    GenerationFailed,
    GenerationRequest,
    GenerationStats,
    InvalidRequest,
    Overloaded,
    QueueTimeout,
    Sequence,
    State,
    TokenEvent,
    request_generations,
)
from router.kv_blocks import BlockManager
from router.shard_client import ShardClient, ShardError
from router.waiting_queue import WaitingQueue

log = logging.getLogger("loom.scheduler")


@dataclass(slots=True)
class _Flight:
    """A step on its way: the call, and each chunk's (sequence, its admission epoch, end position)."""

    call: asyncio.Future
    chunks: list[tuple[Sequence, int, int]]
    started: float


class Scheduler:
    def __init__(
        self,
        client: ShardClient,
        num_blocks: int,
        block_size: int,
        max_batch_prefill_tokens: int,
        max_concurrent_requests: int,
        max_active_adapters: int = DEFAULT_MAX_ACTIVE_ADAPTERS,
        adapter_pages: int = 0,
        max_queue_time_s: float = DEFAULT_MAX_QUEUE_TIME_S,
        prefix_caching: bool = True,
        pipeline_depth: int = 2,
        adapter_cycle_time_s: float = DEFAULT_ADAPTER_CYCLE_TIME_S,
    ):
        self.client = client
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.adapters = AdapterSlots(max_active_adapters, adapter_pages)
        self.max_batch_prefill_tokens = max_batch_prefill_tokens
        self.max_concurrent_requests = max_concurrent_requests
        self.max_queue_time_s = max_queue_time_s
        self.adapter_cycle_time_s = adapter_cycle_time_s
        self.num_preemptions = 0
        self.healthy = True
        self._ids = itertools.count(1)
        self._waiting = WaitingQueue()
        self._running: dict[int, Sequence] = {}  # in admission order: preemption takes the newest
        self._to_release: list[int] = []
        # Steps on their way to the shards, oldest first: up to pipeline_depth, so that the shards never wait
        # for the router between steps.
        self.pipeline_depth = pipeline_depth
        self._flights: deque[_Flight] = deque()
        self._step_number = 0
        # Events of the last reply, handed to the consumers only once the next step is on its way (`_post`).
        self._outbox: list[tuple[Sequence, TokenEvent | BaseException]] = []
        self._wake = asyncio.Event()
        # Observers (the metrics): on_step(batch size, reply, step seconds), on_finish(stats) once per sequence.
        self.on_step: Callable[[int, pb.StepResponse, float], None] | None = None
        self.on_finish: Callable[[GenerationStats], None] | None = None

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
            self._waiting.push(seq)
        self._wake.set()
        return generations

    def _sequence(self, request: GenerationRequest) -> Sequence:
        stats = GenerationStats(request.adapter_id, len(request.input_ids), time.perf_counter(),
                                max_new_tokens=request.max_new_tokens)
        seq = Sequence(id=next(self._ids), request=request, stats=stats, token_ids=list(request.input_ids))
        try:
            seq.proto = seq.to_proto()
        except (ValueError, TypeError) as e:  # protobuf's range and type checks
            raise InvalidRequest(f"a request field is out of range: {e}") from None
        return seq

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        """The consumer is done with `seq`; frees its place in the queue, or its KV blocks and adapter
        reference at once (the shards drop it at the start of the next step)."""
        self._end(seq, reason)

    def _end(self, seq: Sequence, reason: str) -> None:
        if seq.state is State.WAITING:
            self._waiting.remove(seq)
            self._end_waiting(seq, reason)
        elif seq.state is State.RUNNING:
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

    @property
    def idle(self) -> bool:
        """Nothing queued, running, still to be released on the shards, or in a step on its way."""
        return not (self._waiting or self._running or self._to_release or self._flights)

    # -- the step loop --------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                while len(self._flights) < self.pipeline_depth and (flight := self._send()) is not None:
                    self._flights.append(flight)
                # The consumers of the last reply's tokens (detokenizer, SSE writes) run while the shards compute:
                # woken now, they queue behind the calls' sends instead of delaying them.
                self._post()
                if not self._flights:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                flight = self._flights[0]
                reply = await flight.call
                self._flights.popleft()
                self._receive(flight, reply)
            except ShardError as e:
                log.error("step failed: %s", e)  # the details (ranks, library messages) stay in the log
                await self._fail("the batch step failed on the shards; the request can be retried")
            except Exception:  # a bug here must not wedge every request: fail the batch, go on
                log.exception("scheduler step crashed")
                await self._fail("internal error in the batch step; the request can be retried")

    def _send(self) -> _Flight | None:
        """Plans the next step from what the steps on their way will leave (each sampling chunk one more token)
        and sends it; None when there is nothing to send."""
        plan = self._schedule()
        release, self._to_release = self._to_release, []
        if not plan and not release:
            return None
        new, chunks, sent = [], [], []
        for seq, n in plan:
            if not seq.registered:
                new.append(seq.resume_proto())
                seq.registered = True
            chunks.append(pb.Chunk(id=seq.id, start=seq.computed, num_tokens=n, new_blocks=self._new_blocks(seq)))
            seq.computed += n
            if seq.computed == seq.num_tokens:  # it reaches its last token: the shards sample the next one
                seq.pending += 1
                seq.prefilled = True
            sent.append((seq, seq.epoch, seq.computed))
        self._step_number += 1
        step = pb.StepRequest(step=self._step_number, new=new, chunks=chunks, release=release)
        return _Flight(asyncio.ensure_future(self.client.step(step)), sent, time.perf_counter())

    def _receive(self, flight: _Flight, reply: pb.StepResponse) -> None:
        self.healthy = True
        by_id = {}
        for seq, epoch, end in flight.chunks:
            if seq.epoch == epoch:
                by_id[seq.id] = seq
                if seq.state is State.RUNNING:  # its KV up to `end` is computed: full blocks may be shared now
                    self.blocks.commit(seq.id, seq.token_ids, end)
        for gen in reply.generations:
            if (seq := by_id.get(gen.request_id)) is not None:
                self._deliver(seq, gen)
        if self.on_step is not None:
            self.on_step(len(flight.chunks), reply, time.perf_counter() - flight.started)

    async def _fail(self, message: str) -> None:
        """After a failed step: waits out the steps still on their way, fails the running requests and clears
        the shards."""
        for flight in self._flights:
            with contextlib.suppress(Exception):
                await flight.call
        self._flights.clear()
        self._post()
        self._fail_running(message)
        await self._recover()

    def _new_blocks(self, seq: Sequence) -> list[int]:
        """The blocks of the sequence's table the shards have not been sent yet (they append them)."""
        new = self.blocks.table(seq.id, seq.shard_blocks)
        seq.shard_blocks += len(new)
        return new

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """This step's chunks: (sequence, tokens to compute from its `computed`). Running sequences first,
        oldest first, preempting the newest when blocks run out; then waiting ones, FIFO, unless this step
        preempted (the cache is full)."""
        budget = self.max_batch_prefill_tokens
        plan, preempted = [], False
        for seq in list(self._running.values()):
            if seq.state is not State.RUNNING:  # preempted by an older sequence of this loop
                continue
            if seq.generated + seq.pending >= seq.request.max_new_tokens:
                continue  # its last token is being sampled
            n = seq.num_tokens - seq.computed
            if not seq.prefilled:
                n = min(n, budget)
                if n == 0:
                    continue
            if not self._make_room(seq, seq.computed + n):
                preempted = True
                continue
            if not seq.prefilled:
                budget -= n
            plan.append((seq, n))
        if not preempted:
            plan += self._admit(budget)
        return plan

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Grows the sequence's blocks to `num_tokens`, preempting the newest running sequences until they fit;
        False when `seq` itself had to go."""
        while self.blocks.grow(seq.id, num_tokens) is None:
            victim = self._victim()
            if victim is seq and len(self._running) == 1:
                self._finish(seq, "error")
                seq.events.put_nowait(GenerationFailed(
                    f"the KV cache ({self.blocks.num_blocks} blocks) cannot hold this request's "
                    f"{num_tokens} tokens"))
                return False
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _victim(self) -> Sequence:
        """The running sequence to preempt: the least urgent (highest priority value), newest among those."""
        return max(reversed(self._running.values()), key=lambda s: s.request.priority)

    def _preempt(self, seq: Sequence) -> None:
        """Frees a running sequence's blocks (its computed full blocks stay in the prefix cache) and queues it
        again at the front; it resumes by recomputing its tokens."""
        del self._running[seq.id]
        self.blocks.free(seq.id)
        self.adapters.release(seq.request)
        self._to_release.append(seq.id)
        seq.state, seq.computed, seq.prefilled, seq.registered, seq.shard_blocks = State.WAITING, 0, False, False, 0
        self._waiting.push(seq, resumed=True)
        self.num_preemptions += 1
        log.debug("preempted request %d at %d tokens", seq.id, len(seq.token_ids))

    def _admit(self, budget: int) -> list[tuple[Sequence, int]]:
        """Admission in queue order while the first chunk fits the prefill budget and the free blocks (both
        strictly FIFO); a request whose adapter cannot get a slot yet is passed over for a bounded time
        (--adapter-cycle-time-s: `WaitingQueue.candidates`), as vLLM skips it and LoRAX cycles adapters."""
        admitted = []
        if budget <= 0:
            return admitted
        for seq in self._waiting.candidates(self.adapters.fits, time.monotonic(), self.adapter_cycle_time_s):
            # Prompt logprobs need every prompt position computed: such a prompt reuses no cached prefix.
            fresh_logprobs = seq.request.prefill_logprobs and not seq.generated
            cached = self.blocks.admit(seq.id, seq.token_ids, seq.request.cache_key, use_cache=not fresh_logprobs)
            n = min(len(seq.token_ids) - cached, budget)
            if self.blocks.grow(seq.id, cached + n) is None:
                self.blocks.free(seq.id)
                break
            self._waiting.remove(seq)
            if seq.timer is not None:
                seq.timer.cancel()
                seq.timer = None
            if seq.stats.admitted is None:
                seq.stats.admitted = time.perf_counter()
            # Running from here on: whatever happens to this step, `_finish` or `_fail_running` gives the blocks
            # and the adapter reference back.
            self.adapters.acquire(seq.request)
            self._running[seq.id] = seq
            seq.state, seq.computed, seq.passed_over_since = State.RUNNING, cached, None
            seq.epoch += 1
            budget -= n
            admitted.append((seq, n))
            if budget <= 0:
                break
        return admitted

    # -- what the metrics read (router/metrics.py) ---------------------------------------------------

    def kv_cache_usage(self) -> float:
        """KV cache in use, 0-1: blocks held by running requests over all blocks (cached blocks that no request
        holds are free: any allocation may evict them)."""
        return self.blocks.usage()

    @property
    def waiting_adapters(self) -> list[str]:
        """Distinct adapters of the queued requests, in queue order."""
        return self._waiting.adapters()

    def adapter_users(self, adapter_id: str) -> int:
        """Requests queued or running with `adapter_id`."""
        return self._waiting.users(adapter_id) + self.adapters.users(adapter_id)

    # -- results --------------------------------------------------------------------------------

    def _deliver(self, seq: Sequence, gen: pb.Generation) -> None:
        """One sampled token (or a failure) of a running sequence, or of one preempted while it was sampled."""
        if seq.state is State.DONE:
            return  # cancelled while the step ran; already queued for release
        seq.pending -= 1
        if gen.error:
            self._end(seq, "error")
            self._outbox.append((seq, GenerationFailed(redact_paths(gen.error), server_error=False)))
            return
        event = seq.accept(gen)
        self._outbox.append((seq, event))
        if event.finish_reason:
            self._end(seq, event.finish_reason)

    def _post(self) -> None:
        """Hands the held events to their consumers. Between `_deliver` and here nothing awaits, so a consumer
        never sees its sequence DONE before its last event is queued."""
        for seq, item in self._outbox:
            seq.events.put_nowait(item)
        self._outbox.clear()

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.state = State.DONE
        if self._running.pop(seq.id, None) is not None:
            self.blocks.free(seq.id)
            self.adapters.release(seq.request)
            self._to_release.append(seq.id)
            self._wake.set()
            self._record_end(seq, reason)

    def _end_waiting(self, seq: Sequence, reason: str) -> None:
        if seq.timer is not None:
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
        for seq in self._waiting:  # preempted ones resume from their tokens: the shards forget everything
            seq.computed, seq.prefilled, seq.registered, seq.shard_blocks, seq.pending = 0, False, False, 0, 0
        self._to_release.clear()

    async def _recover(self) -> None:
        """After a failed step the shards' sequence state and KV content are unknown: drop it all, cached
        prefixes included. Once the shards have cleared, the server is healthy again."""
        self.blocks.reset()
        try:
            await self.client.clear()
            self.healthy = True
        except ShardError as e:
            log.error("clearing the shards failed: %s", e)
            await asyncio.sleep(1.0)
