"""HTTP connections: a deadline for every request head, a cap on open connections, quiet accept errors.

uvicorn closes a kept-alive connection that stays idle, but not one that never sends a request, and it
accepts connections until the process runs out of file descriptors; then every accept fails (and is
logged), /health included. Here each connection must send a complete request head within
`--header-timeout` seconds of opening (or of its last response), and past `--max-connections` the oldest
connection that is serving no request is closed to make room (the new one, when every one is busy).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time

log = logging.getLogger("loom.connections")

FD_RESERVE = 128  # descriptors kept for everything but client connections: shard channels, files, logs
ACCEPT_LOG_INTERVAL_S = 10.0


def raise_open_file_limit() -> int:
    """Raises the soft open-file limit to the hard one (at most 65536); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard if hard != resource.RLIM_INFINITY else 65536, 65536)
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(requested: int) -> int:
    """`requested`, lowered so that client connections can never use up the open-file limit."""
    limit = max(raise_open_file_limit() - FD_RESERVE, 16)
    if requested > limit:
        log.warning("--max-connections %d lowered to %d to stay under the open-file limit", requested, limit)
    return min(requested, limit)


class _RateLimitedLog:
    def __init__(self, message: str):
        self.message = message
        self.count = 0
        self.since = 0.0

    def hit(self, detail: object) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.since >= ACCEPT_LOG_INTERVAL_S:
            log.warning("%s (%d time(s) in the last %.0f s): %s", self.message, self.count,
                        ACCEPT_LOG_INTERVAL_S, detail)
            self.count, self.since = 0, now


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs every failed accept (out of descriptors: many per loop tick); log them once per interval."""
    previous = loop.get_exception_handler()
    accepts = _RateLimitedLog("accepting a connection failed")

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            accepts.hit(context.get("exception"))
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def guarded_protocol(max_connections: int, header_timeout_s: float) -> type | str:
    """uvicorn's httptools protocol with the head deadline and the connection cap ("auto" without httptools)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        log.warning("httptools is not installed: no request-head deadline or connection cap")
        return "auto"
    open_connections: dict[HttpToolsProtocol, None] = {}  # oldest first
    shed = _RateLimitedLog(f"at --max-connections={max_connections}: closed a connection")

    class GuardedProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_timer: asyncio.TimerHandle | None = None
            open_connections[self] = None
            self._arm_head_timer()
            if len(open_connections) > max_connections:
                victim = next((c for c in open_connections if c is not self and c._idle()), self)
                shed.hit("an idle one" if victim is not self else "the new one (every connection is busy)")
                victim.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            open_connections.pop(self, None)
            self._disarm_head_timer()
            super().connection_lost(exc)

        def on_headers_complete(self) -> None:
            self._disarm_head_timer()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()  # the next request's head, on a kept-alive connection

        def _idle(self) -> bool:
            """Serving no request: nothing received, a head still incomplete, or kept alive after a response."""
            return not self.pipeline and (self.cycle is None or self.cycle.response_complete)

        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _disarm_head_timer(self) -> None:
            if getattr(self, "_head_timer", None) is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self._idle() and not self.transport.is_closing():
                self.transport.close()

    return GuardedProtocol
