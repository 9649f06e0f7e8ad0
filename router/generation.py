"""What a generation is, as the HTTP layer sees it: the request, its token events, its timeline, the handle
(`Generation`) it iterates, and the errors it can end with. The scheduler (router/scheduler.py) drives them."""

from __future__ import annotations

import asyncio
import enum
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proto import generate_pb2 as pb

if TYPE_CHECKING:
    from router.scheduler import Scheduler


@dataclass(slots=True)
class GenerationRequest:
    input_ids: list[int]
    max_new_tokens: int
    sampling: pb.SamplingParameters = field(default_factory=pb.SamplingParameters)
    adapter_id: str = ""
    adapter_pages: int = 0
    stop_token_ids: frozenset[int] = frozenset()  # the model's EOS ids
    ignore_eos: bool = False
    extra_stop_ids: frozenset[int] = frozenset()  # the request's own stop_token_ids: they stop even with ignore_eos
    # Lower runs first (vLLM's meaning): the queue is ordered by it, and preemption takes the highest first.
    priority: int = 0
    top_n_tokens: int = 0
    prefill_logprobs: bool = False
    prefill_top_n: int = 0  # with prefill_logprobs: alternatives per prompt position
    min_new_tokens: int = 0
    grammar: str = ""
    # Whose KV a cached prefix may be reused under: "" for the base model, else the adapter's load identity
    # (a name rebound to other weights gets a new one). Requests with equal keys share cached prefixes.
    cache_key: str = ""


@dataclass(slots=True)
class TokenEvent:
    token_id: int
    logprob: float
    top_tokens: list[tuple[int, float]]
    finish_reason: str | None = None  # "length" | "eos_token"
    prefill_logprobs: list[float] | None = None
    # With prefill_top_n: per prompt position, (its most likely tokens, the prompt token's rank); first: ([], 0).
    prefill_top_tokens: list[tuple[list[tuple[int, float]], int]] | None = None


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
    max_new_tokens: int = 0  # what it was allowed to generate
    # length | eos_token | stop_token | stop_sequence | cancelled | error | shard_error | queue_timeout
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
    WAITING = 1  # queued, or preempted and queued again at the front
    RUNNING = 2  # holds KV blocks; prefilled chunk by chunk, then decoding
    DONE = 3


@dataclass(slots=True, eq=False)
class Sequence:
    id: int
    request: GenerationRequest
    stats: GenerationStats
    token_ids: list[int]  # prompt + generated so far
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    proto: pb.Request | None = None  # what registers it on the shards, built (and so checked) when it is queued
    state: State = State.WAITING
    generated: int = 0
    computed: int = 0  # leading tokens whose KV is in the cache once the steps on their way are done
    pending: int = 0  # tokens being sampled in steps on their way
    epoch: int = 0  # admissions so far: a step sent before a preemption does not speak for the re-admitted one
    prefilled: bool = False  # its last chunk since it was (re)admitted was sent: decodes from then on
    registered: bool = False  # the shards hold its sampling state
    shard_blocks: int = 0  # blocks of its table the shards were sent
    timer: asyncio.TimerHandle | None = None  # the queue timeout, while first WAITING
    passed_over_since: float | None = None  # when admission first passed it over for want of an adapter slot

    @property
    def num_tokens(self) -> int:
        """Tokens it holds on the shards once the steps on their way are done."""
        return len(self.token_ids) + self.pending

    def to_proto(self) -> pb.Request:
        """What registers it on the shards (protobuf checks every field's range here)."""
        r = self.request
        return pb.Request(
            id=self.id,
            input_ids=r.input_ids,
            sampling=r.sampling,
            adapter_id=r.adapter_id,
            top_n_tokens=r.top_n_tokens,
            prefill_logprobs=r.prefill_logprobs,
            prefill_top_n=r.prefill_top_n,
            min_new_tokens=r.min_new_tokens,
            grammar=r.grammar,
            stop_token_ids=sorted(r.stop_token_ids | r.extra_stop_ids) if r.min_new_tokens else [],
        )

    def accept(self, gen: pb.Generation) -> TokenEvent:
        """Takes a sampled token; the event says whether it ends the generation (the stop decision's one
        home: EOS ids unless ignored, then max_new_tokens; stop strings are the text layer's)."""
        self.generated += 1
        self.token_ids.append(gen.token_id)
        self.stats.generated = self.generated
        if self.stats.first_token is None:
            self.stats.first_token = time.perf_counter()
        finish = None
        if gen.token_id in self.request.extra_stop_ids:
            finish = "stop_token"
        elif gen.token_id in self.request.stop_token_ids and not self.request.ignore_eos:
            finish = "eos_token"
        elif self.generated >= self.request.max_new_tokens:
            finish = "length"
        return TokenEvent(
            token_id=gen.token_id,
            logprob=gen.logprob,
            top_tokens=[(t.token_id, t.logprob) for t in gen.top_tokens],
            finish_reason=finish,
            prefill_logprobs=list(gen.prefill_logprobs) if gen.prefill_logprobs else None,
            prefill_top_tokens=[([(t.token_id, t.logprob) for t in p.top], p.rank) for p in gen.prefill_top_tokens]
            if gen.prefill_top_tokens else None,
        )

    def resume_proto(self) -> pb.Request:
        """What registers the sequence again after a preemption: its tokens so far, prompt logprobs only if none
        were returned yet."""
        if not self.generated:
            return self.proto
        proto = pb.Request()
        proto.CopyFrom(self.proto)
        proto.generated_ids[:] = self.token_ids[len(self.request.input_ids):]
        proto.prefill_logprobs = False
        return proto


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


