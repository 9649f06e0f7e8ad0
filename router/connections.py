"""HTTP connections: deadlines for every request head and body, a cap on open connections, quiet accept errors.

uvicorn closes a kept-alive connection that stays idle, but not one that never sends a request (or sends its
body a byte at a time), and it accepts connections until the process runs out of file descriptors; then every
accept fails (and is logged), /health included. Here each connection must send a complete request head within
`--header-timeout` seconds of opening (or of its last response), and then its body within as long again
(counted afresh after each BODY_PROGRESS_BYTES that arrive: a slow but real upload goes on); past it, a 408.
Past `--max-connections`, the oldest connection that is not being served (idle, or still sending its head or
body) makes room, with a 503 if it had begun a request; when every one is being served, the new connection is
kept just long enough to answer its request with a 503 (/health is still served), up to SHED_ALLOWANCE such
connections. No request is answered by a reset.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time

from router.errors import APIError

log = logging.getLogger("loom.connections")

FD_RESERVE = 128  # descriptors kept for everything but client connections: shard channels, files, logs
SHED_ALLOWANCE = 32  # connections past the cap kept only to answer 503 (inside FD_RESERVE)
BODY_PROGRESS_BYTES = 64 << 10  # a body that sends this much more earns another deadline
ACCEPT_LOG_INTERVAL_S = 10.0
# Set in a request's scope["state"] when its connection is past the cap: the app answers 503 (not /health).
OVER_CAPACITY = "loom_over_capacity"


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
    """uvicorn's httptools protocol with the head and body deadlines and the connection cap ("auto" without
    httptools)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        log.warning("httptools is not installed: no request deadlines or connection cap")
        return "auto"
    open_connections: dict[HttpToolsProtocol, None] = {}  # oldest first
    shed = _RateLimitedLog(f"at --max-connections={max_connections}: made room")

    class GuardedProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._timer: asyncio.TimerHandle | None = None
            self._body_bytes = 0  # received since the body deadline was last armed
            self._began = False  # some of a request has arrived
            self._over_capacity = False
            open_connections[self] = None
            self._arm(self._head_timeout)
            if len(open_connections) > max_connections:
                self._make_room()

        def _make_room(self) -> None:
            victim = next((c for c in open_connections if c is not self and not c._serving()), None)
            if victim is not None:
                shed.hit("closed a connection that was not being served")
                victim._refuse(503, "the server has too many open connections; retry the request")
            elif len(open_connections) > max_connections + SHED_ALLOWANCE:
                shed.hit("closed the new connection (every one is being served)")
                self.transport.close()
            else:
                shed.hit("answering the new connection's request with 503 (every one is being served)")
                self._over_capacity = True

        def connection_lost(self, exc: Exception | None) -> None:
            open_connections.pop(self, None)
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._began = True
            super().data_received(data)

        def on_headers_complete(self) -> None:
            if self._over_capacity:
                self.scope["state"][OVER_CAPACITY] = True
            self._body_bytes = 0
            self._arm(self._body_timeout)
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            self._body_bytes += len(body)
            if self._body_bytes >= BODY_PROGRESS_BYTES:
                self._body_bytes = 0
                self._arm(self._body_timeout)
            super().on_body(body)

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._began = False
                self._arm(self._head_timeout)  # the next request's head, on a kept-alive connection

        def _serving(self) -> bool:
            """The app has a complete request and has not finished its answer (or answers are queued)."""
            if self.pipeline:
                return True
            cycle = self.cycle
            return cycle is not None and not cycle.response_complete and \
                (not cycle.more_body or cycle.response_started)

        def _refuse(self, status: int, message: str) -> None:
            """Answers the request under way (if one began and no answer started) with `status`, then closes."""
            self._disarm()
            if self.transport.is_closing():
                return
            cycle = self.cycle
            begun = self._began and not (cycle is not None and (cycle.response_complete or cycle.response_started))
            if begun:
                scope = getattr(self, "scope", None) or {}
                body = json.dumps(APIError(status, message).body_for(scope.get("path", "/"))).encode()
                reason = {408: b"Request Timeout", 503: b"Service Unavailable"}[status]
                self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                                     b"retry-after: 1\r\nconnection: close\r\n\r\n%s"
                                     % (status, reason, len(body), body))
            self.transport.close()

        def _arm(self, callback) -> None:
            self._disarm()
            self._timer = self.loop.call_later(header_timeout_s, callback)

        def _disarm(self) -> None:
            if getattr(self, "_timer", None) is not None:
                self._timer.cancel()
                self._timer = None

        def _head_timeout(self) -> None:
            self._timer = None
            if not self._serving() and not self.transport.is_closing():
                self._refuse(408, f"the request head was not received within --header-timeout={header_timeout_s:g} s")

        def _body_timeout(self) -> None:
            self._timer = None
            if not self._serving() and not self.transport.is_closing():
                self._refuse(408, "the request body was not received within --header-timeout="
                             f"{header_timeout_s:g} s")

    return GuardedProtocol
