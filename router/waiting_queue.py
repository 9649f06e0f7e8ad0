"""The queue of requests waiting for admission: priority order, and which of them admission may try now."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

from router.generation import GenerationRequest, Sequence


class WaitingQueue:
    """Waiting sequences, most urgent first (lower `priority` first); FIFO within a priority, except that a
    preempted sequence goes ahead of the others of its priority."""

    def __init__(self) -> None:
        self._queue: deque[Sequence] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self._queue)

    def push(self, seq: Sequence, resumed: bool = False) -> None:
        """Queues `seq` behind every waiting sequence of its priority or a more urgent one; a preempted one
        (`resumed`) goes ahead of those of its priority."""
        priority = seq.request.priority
        ahead = (lambda p: p < priority) if resumed else (lambda p: p <= priority)
        if not self._queue or ahead(self._queue[-1].request.priority):
            self._queue.append(seq)
            return
        at = next(i for i, s in enumerate(self._queue) if not ahead(s.request.priority))
        self._queue.insert(at, seq)

    def remove(self, seq: Sequence) -> None:
        self._queue.remove(seq)

    def candidates(self, adapter_fits: Callable[[GenerationRequest], bool], now: float,
                   cycle_time_s: float) -> Iterator[Sequence]:
        """The sequences admission may try now, in queue order; the caller removes those it admits.

        One whose adapter cannot get a slot (`adapter_fits` false) is passed over, so that it does not hold up
        those behind it, but only for `cycle_time_s` since it was first passed over: from then on the queue
        stops at it, the running adapters drain, and it gets the next slot (no request starves). A preempted
        sequence with a token still on its way also stops the queue: it must go first once that token lands.
        """
        for seq in list(self._queue):
            if seq.pending:
                return
            if adapter_fits(seq.request):
                yield seq
                continue
            if seq.passed_over_since is None:
                seq.passed_over_since = now
            if now - seq.passed_over_since >= cycle_time_s:
                return

    def adapters(self) -> list[str]:
        """Distinct adapters of the waiting sequences, in queue order."""
        return list(dict.fromkeys(s.request.adapter_id for s in self._queue if s.request.adapter_id))

    def users(self, adapter_id: str) -> int:
        """Waiting sequences with `adapter_id`."""
        return sum(1 for s in self._queue if s.request.adapter_id == adapter_id)
