"""The router's Starlette app: routes, auth, error shapes; its start-up is router/startup.py."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router import adapter_api, native_api, openai_api, responses_api, tokenize_api
from router.backend import Backend
from router.config import RouterConfig
from router.connections import OVER_CAPACITY, quiet_accept_errors
from router.errors import APIError
from router.logs import RequestLine
from router.metrics import Metrics
from router.generation import (
    Generation,
    GenerationStats,
    InvalidRequest,
    Overloaded,
    QueueTimeout,
    request_generations,
)
from router.sse import DONE, sse_event
from router.startup import start_backend

log = logging.getLogger("loom.router")

VERSION = "0.1.0"


async def health(request: Request):
    backend: Backend = request.app.state.backend
    if backend.scheduler.healthy and await backend.scheduler.client.health():
        return Response(status_code=200)
    return JSONResponse({"error": "a shard is not answering", "error_type": "unhealthy"}, status_code=503)


async def info(request: Request):
    backend: Backend = request.app.state.backend
    cfg = backend.config
    return JSONResponse({
        "model_id": cfg.model_id,
        "model_dtype": request.app.state.shard_info.dtype,
        "model_device_type": request.app.state.shard_info.device.split(":")[0],
        "num_shard": len(cfg.shard_sockets),
        "max_input_length": cfg.max_input_length,
        "max_total_tokens": cfg.max_total_tokens,
        "max_batch_prefill_tokens": backend.scheduler.max_batch_prefill_tokens,
        "max_batch_total_tokens": backend.max_supported_total_tokens,
        "max_concurrent_requests": cfg.max_concurrent_requests,
        # What really runs at once: --max-active-adapters, capped by the pool (each adapter takes a page).
        "max_active_adapters": backend.scheduler.adapters.max_running,
        "adapter_pool_pages": request.app.state.warmup.adapter_pages,
        "adapter_page_rank": request.app.state.warmup.adapter_page_rank,
        "block_size": backend.scheduler.blocks.block_size,
        "prefix_caching": backend.scheduler.blocks.prefix_caching,
        "version": VERSION,
    })


async def version(request: Request):
    """vLLM's probe: the server's version."""
    return JSONResponse({"version": VERSION})


async def ping(request: Request):
    """vLLM's liveness probe: /health's answer, on GET and POST."""
    return await health(request)


async def metrics(request: Request):
    return Response(await request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


ROUTES = [
    Route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"]),
    Route("/v1/completions", openai_api.completions, methods=["POST"]),
    Route("/v1/models", openai_api.models, methods=["GET"]),
    Route("/v1/responses", responses_api.create, methods=["POST"]),
    Route("/v1/responses/{response_id}", responses_api.retrieve, methods=["GET"]),
    Route("/generate", native_api.generate, methods=["POST"]),
    Route("/generate_stream", native_api.generate_stream, methods=["POST"]),
    Route("/", native_api.compat_generate, methods=["POST"]),
    Route("/health", health, methods=["GET"]),
    Route("/info", info, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/tokenize", tokenize_api.tokenize, methods=["POST"]),
    Route("/detokenize", tokenize_api.detokenize, methods=["POST"]),
    Route("/version", version, methods=["GET"]),
    Route("/ping", ping, methods=["GET", "POST"]),
    *adapter_api.ROUTES,
]


class GuardMiddleware:
    """Auth, the body-size limit, the error shape of every failure, client disconnects, the release of every
    generation a request started, request metrics and the request log, in one place."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: Metrics, open_paths: frozenset[str],
                 max_request_bytes: int):
        self.app = app
        self.api_key = api_key
        self.metrics = metrics
        self.open_paths = open_paths  # answered without the API key
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        exchange = _Exchange(receive, send, _request_id(scope), self.max_request_bytes)
        generations: list[Generation] = []
        context = request_generations.set(generations)
        start = time.perf_counter()
        try:
            self._admit(scope)
            self._authorize(scope)
            exchange.check_declared_length(scope)
            await exchange.run(self.app, scope)
        except ClientDisconnect:  # gone while sending its body (or cut for being too slow): nobody to answer
            exchange.gone = True
        except asyncio.CancelledError:
            # The server is shutting down and gave up waiting (the drain): a stream still going ends with an
            # error event (and [DONE] on /v1/*) rather than a cut connection.
            if exchange.streaming and not exchange.complete and not exchange.gone:
                error = APIError(503, "the server is shutting down; retry the request")
                with contextlib.suppress(Exception):
                    await exchange.end_stream_with(error.body_for(path), done=path.startswith("/v1/"))
            raise
        except Exception as e:
            error = e if isinstance(e, APIError) else _as_api_error(e)
            if exchange.complete:
                raise
            if exchange.status is None:
                exchange.status = error.status
                await error.response(path)(scope, receive, exchange.send)
            elif exchange.streaming:  # mid-stream: an error event ends the stream in the route's shape
                await exchange.end_stream_with(error.body_for(path), done=path.startswith("/v1/"))
            else:
                raise
        finally:
            request_generations.reset(context)
            for generation in generations:  # whichever way the exchange ended, nothing it started runs on
                generation.close()
            if path not in UNLOGGED:
                self._account(scope, exchange, [g.stats for g in generations], time.perf_counter() - start)

    @staticmethod
    def _admit(scope: Scope) -> None:
        """A connection past --max-connections is answered 503 (and closed), except for /health."""
        if scope.get("state", {}).get(OVER_CAPACITY) and scope["path"] != "/health":
            raise APIError(503, "the server has too many open connections; retry the request",
                           headers={"Retry-After": "1", "Connection": "close"})

    def _authorize(self, scope: Scope) -> None:
        if not self.api_key or scope["path"] in self.open_paths:
            return
        headers = dict(scope["headers"])
        supplied = headers.get(b"authorization", b"").decode("latin-1")
        if not hmac.compare_digest(supplied.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`")

    def _account(self, scope: Scope, exchange: "_Exchange", generations: list[GenerationStats],
                 seconds: float) -> None:
        # Unknown paths share one label: a scanner must not grow the metrics without bound.
        route = scope["path"] if scope["path"] in ROUTE_PATHS else "other"
        status = CLIENT_GONE if exchange.gone else exchange.status or 500
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.request_duration.labels(route).observe(seconds)
        reason = _failure_reason(status, generations)
        if reason is None:
            self.metrics.request_success.inc()
        else:
            self.metrics.request_failures.labels(reason).inc()
        line = RequestLine(exchange.request_id, scope["method"], route, status, round(seconds * 1000, 1))
        line.add_generations(generations)
        line.log()


UNLOGGED = {"/metrics", "/health", "/ping"}  # polled by monitors and the launcher: no metrics, no log lines
ROUTE_PATHS = {route.path for route in ROUTES}
CLIENT_GONE = 499  # nginx's "client closed request"
# A generation's own failure wins over the HTTP status, which is 200 once a stream has started.
_GENERATION_FAILURES = {"shard_error": "shard_error", "queue_timeout": "queue_timeout", "error": "invalid_request"}
_STATUS_FAILURES = {401: "unauthorized", 404: "not_found", 429: "overloaded", 503: "queue_timeout",
                    CLIENT_GONE: "cancelled"}


def _failure_reason(status: int, generations: list[GenerationStats]) -> str | None:
    for g in generations:
        if g.finish_reason in _GENERATION_FAILURES:
            return _GENERATION_FAILURES[g.finish_reason]
    if status < 400:
        return None
    return _STATUS_FAILURES.get(status, "invalid_request" if status < 500 else "server_error")


def _request_id(scope: Scope) -> str:
    """The client's X-Request-Id when it sent a sane one, else a fresh id."""
    supplied = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
    if 0 < len(supplied) <= 64 and supplied.isprintable() and " " not in supplied:
        return supplied
    return uuid.uuid4().hex


class _Exchange:
    """One HTTP exchange as the middleware sees it: the response's progress, and the client's disconnect.

    Starlette does not cancel a handler when its client goes away, and a non-streaming generation would
    run to the end for nobody, holding its KV blocks. So once the request body has been read, a watcher
    keeps reading the connection and cancels the handler when the client disconnects; the handler's
    Generation releases its sequence on the way out.
    """

    def __init__(self, receive: Receive, send: Send, request_id: str, max_body_bytes: int):
        self._receive = receive
        self._send = send
        self.request_id = request_id
        self.max_body_bytes = max_body_bytes
        self._body_bytes = 0
        self.status: int | None = None
        self.streaming = False
        self.complete = False
        self.gone = False  # the client disconnected before the response was complete
        self._body_read = asyncio.Event()
        self._disconnected = asyncio.Event()

    async def run(self, app: ASGIApp, scope: Scope) -> None:
        handler = asyncio.create_task(app(scope, self.receive, self.send))
        watcher = asyncio.create_task(self._watch(handler))
        try:
            await handler
        except asyncio.CancelledError:
            if not self.gone or asyncio.current_task().cancelling():
                raise
        finally:
            watcher.cancel()

    async def _watch(self, handler: asyncio.Task) -> None:
        await self._body_read.wait()
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if not self.complete:
            self.gone = True
            self._disconnected.set()
            handler.cancel()

    def check_declared_length(self, scope: Scope) -> None:
        """A body announced larger than the limit is refused before any of it is read."""
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()

    def _too_large(self) -> APIError:
        # Connection: close, so that the server does not read the rest of a body nobody will use.
        return APIError(413, f"request body is larger than --max-request-bytes={self.max_body_bytes}",
                        headers={"Connection": "close"})

    async def receive(self) -> Message:
        """The handler's receive: the body as usual (up to the size limit), then (the watcher owns the
        connection) the disconnect."""
        if self._body_read.is_set():
            await self._disconnected.wait()
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self._body_bytes += len(message.get("body", b""))
            if self._body_bytes > self.max_body_bytes:  # a chunked body, or a Content-Length that lied
                raise self._too_large()
            if not message.get("more_body", False):
                self._body_read.set()
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = list(message.get("headers", []))
            self.streaming = (b"content-type", b"text/event-stream") in [
                (k.lower(), v.split(b";")[0]) for k, v in headers]
            message = {**message, "headers": headers + [(b"x-request-id", self.request_id.encode())]}
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True
        await self._send(message)

    async def end_stream_with(self, payload: dict, done: bool) -> None:
        body = sse_event(payload) + (DONE if done else b"")
        await self.send({"type": "http.response.body", "body": body, "more_body": False})


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    """Unknown routes and wrong methods, in the same error shapes as everything else."""
    return APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}").response(request.url.path)


def _as_api_error(e: Exception) -> APIError:
    if isinstance(e, Overloaded):
        return APIError(429, str(e), headers={"Retry-After": "1"})
    if isinstance(e, QueueTimeout):
        return APIError(503, str(e), headers={"Retry-After": "5"})
    if isinstance(e, InvalidRequest):
        return APIError(400, str(e))
    # Library messages and tracebacks go to the log only: they can name host paths and source files.
    log.exception("unhandled error")
    return APIError(500, "internal error (logged on the server)")


def _open_paths(config: RouterConfig) -> frozenset[str]:
    """Routes without the API key: /health and /ping for probes; /metrics with --public-metrics, for the
    inference extension's endpoint picker and Prometheus, which scrape without credentials."""
    probes = {"/health", "/ping"}
    return frozenset(probes | {"/metrics"} if config.public_metrics else probes)


def _cors(config: RouterConfig) -> list[Middleware]:
    """`--allowed-origins`: browsers on those origins may call every route (preflights answered before the
    API key is asked for, as a preflight carries none)."""
    if not config.allowed_origins:
        return []
    return [Middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=["*"],
                       allow_headers=["*"])]


def create_app(config: RouterConfig) -> Starlette:
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        quiet_accept_errors(asyncio.get_running_loop())
        await start_backend(app.state, config)
        loop_task = asyncio.create_task(app.state.backend.scheduler.run(), name="scheduler")
        try:
            yield
        finally:  # uvicorn has drained the in-flight requests (or given up on them) by now
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
            await app.state.backend.templates.close()
            app.state.backend.merges.close()
            await app.state.backend.scheduler.client.close()

    app = Starlette(routes=ROUTES, lifespan=lifespan,
                    middleware=_cors(config) + [
                        Middleware(GuardMiddleware, api_key=config.api_key, metrics=metrics,
                                   open_paths=_open_paths(config), max_request_bytes=config.max_request_bytes)],
                    exception_handlers={HTTPException: _http_exception})
    app.state.metrics = metrics
    app.state.responses = responses_api.ResponseStore()
    return app
