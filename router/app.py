"""The router's Starlette app: routes, auth, error shapes, and the startup that sizes the batch."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from proto import generate_pb2 as pb
from router import native_api, openai_api
from router.adapters import AdapterRegistry
from router.backend import Backend, parse_body
from router.config import RouterConfig
from router.errors import APIError
from router.metrics import Metrics
from router.scheduler import Overloaded, Scheduler
from router.shard_client import ShardClient
from router.tokenization import ModelTokenizer

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
        "max_batch_prefill_tokens": cfg.max_batch_prefill_tokens,
        "max_batch_total_tokens": backend.max_supported_total_tokens,
        "max_concurrent_requests": cfg.max_concurrent_requests,
        "max_active_adapters": cfg.max_active_adapters,
        "block_size": backend.scheduler.block_size,
        "version": VERSION,
    })


class TokenizeRequest(openai_api._Strict):
    inputs: str


async def tokenize(request: Request):
    backend: Backend = request.app.state.backend
    body = await parse_body(request, TokenizeRequest)
    pieces = await asyncio.to_thread(backend.tokenizer.tokenize_with_offsets, body.inputs)
    return JSONResponse([{"id": i, "text": text, "start": start, "stop": stop} for i, text, start, stop in pieces])


async def metrics(request: Request):
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


ROUTES = [
    Route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"]),
    Route("/v1/completions", openai_api.completions, methods=["POST"]),
    Route("/v1/models", openai_api.models, methods=["GET"]),
    Route("/generate", native_api.generate, methods=["POST"]),
    Route("/generate_stream", native_api.generate_stream, methods=["POST"]),
    Route("/", native_api.compat_generate, methods=["POST"]),
    Route("/health", health, methods=["GET"]),
    Route("/info", info, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/tokenize", tokenize, methods=["POST"]),
]


class GuardMiddleware:
    """Auth, the error shape of every failure, and request metrics, in one place."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: Metrics):
        self.app = app
        self.api_key = api_key
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = {}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        start = time.perf_counter()
        try:
            self._authorize(scope)
            await self.app(scope, receive, send_wrapper)
        except Exception as e:
            if "code" in status:  # the response already started; nothing else can be sent
                raise
            error = e if isinstance(e, APIError) else _as_api_error(e)
            status["code"] = error.status
            await error.response(path)(scope, receive, send)
        finally:
            if path != "/metrics":
                self.metrics.requests.labels(path, str(status.get("code", 500))).inc()
                self.metrics.request_duration.labels(path).observe(time.perf_counter() - start)

    def _authorize(self, scope: Scope) -> None:
        if not self.api_key or scope["path"] == "/health":
            return
        headers = dict(scope["headers"])
        supplied = headers.get(b"authorization", b"").decode("latin-1")
        if not hmac.compare_digest(supplied.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`")


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    """Unknown routes and wrong methods, in the same error shapes as everything else."""
    return APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}").response(request.url.path)


def _as_api_error(e: Exception) -> APIError:
    if isinstance(e, Overloaded):
        return APIError(429, str(e), headers={"Retry-After": "1"})
    log.exception("unhandled error")
    return APIError(500, f"internal error: {type(e).__name__}: {e}")


async def _start_backend(app: Starlette, config: RouterConfig) -> None:
    client = ShardClient(config.shard_sockets, config.step_timeout_s)
    app.state.shard_info = await client.info()
    warm = await client.warmup(pb.WarmupRequest(
        max_input_length=config.max_input_length,
        max_batch_prefill_tokens=config.max_batch_prefill_tokens,
        max_total_tokens=config.max_total_tokens,
        max_batch_total_tokens=config.max_batch_total_tokens,
    ))
    capacity = warm.max_supported_total_tokens
    if capacity < config.max_total_tokens:
        raise RuntimeError(f"the KV cache holds {capacity} tokens, fewer than --max-total-tokens="
                           f"{config.max_total_tokens}: lower it or give the shards more memory")
    tokenizer = await asyncio.to_thread(ModelTokenizer.from_dir, config.model_dir)
    scheduler = Scheduler(client, warm.num_blocks, warm.block_size, config.max_batch_prefill_tokens,
                          config.max_concurrent_requests, config.max_active_adapters, warm.adapter_pages)
    adapters = AdapterRegistry(config.model_id, tokenizer, client, config.adapters, config.local_adapter_roots,
                               config.adapter_source, warm.adapter_pages, app.state.metrics)
    app.state.backend = Backend(config, tokenizer, scheduler, capacity, app.state.shard_info.vocab_size, adapters)
    app.state.metrics.watch(scheduler)
    log.info("KV cache: %d blocks of %d tokens (%d tokens)", warm.num_blocks, warm.block_size, capacity)


def create_app(config: RouterConfig) -> Starlette:
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await _start_backend(app, config)
        loop_task = asyncio.create_task(app.state.backend.scheduler.run(), name="scheduler")
        try:
            yield
        finally:
            loop_task.cancel()
            await app.state.backend.scheduler.client.close()

    app = Starlette(routes=ROUTES, lifespan=lifespan,
                    middleware=[Middleware(GuardMiddleware, api_key=config.api_key, metrics=metrics)],
                    exception_handlers={HTTPException: _http_exception})
    app.state.metrics = metrics
    return app
