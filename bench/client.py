"""Open-loop HTTP load: each request is sent at its arrival time and streamed over /generate_stream, so that
TTFT and every token's arrival are seen as a client sees them."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from bench.stats import Timing
from bench.workload import BenchRequest


def _params(req: BenchRequest, adapters: list[Path]) -> dict:
    params = {"max_new_tokens": req.output_len, "ignore_eos_token": True, "details": False}
    if req.adapter >= 0:
        params |= {"adapter_id": str(adapters[req.adapter]), "adapter_source": "local"}
    return params


def _request_bytes(host: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = (f"POST /generate_stream HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    return head.encode() + data


async def stream_one(url: str, req: BenchRequest, adapters: list[Path], start: float) -> Timing:
    """Waits for the request's arrival, streams it; times count from the arrival (queueing included).

    A bare HTTP/1.1 exchange instead of an HTTP library: the client shares the two cores with the server, and
    it only has to stamp each event. Every SSE event starts a line with `data:` (JSON text never holds a raw
    newline), so counting b"\\ndata:" in the bytes as they arrive stamps each token without parsing it."""
    await asyncio.sleep(max(0.0, start + req.arrival - time.perf_counter()))
    sent = time.perf_counter()
    where = urlsplit(url)
    reader, writer = await asyncio.open_connection(where.hostname, where.port)
    stamps: list[float] = []
    raw, tail = bytearray(), b""
    try:
        writer.write(_request_bytes(where.netloc, {"inputs": req.text, "parameters": _params(req, adapters)}))
        while chunk := await reader.read(1 << 16):
            now = time.perf_counter()
            stamps.extend([now] * (tail + chunk).count(b"\ndata:"))
            tail = chunk[-5:]  # shorter than the marker: one split across reads is counted once
            raw += chunk
    finally:
        writer.close()
    if not raw.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"HTTP error: {bytes(raw[:200])!r}")
    if b'"error"' in raw:
        for line in raw.split(b"\n"):
            if line.startswith(b"data:") and "error" in (event := json.loads(line[5:])):
                raise RuntimeError(event["error"])
    if len(stamps) != req.output_len:
        raise RuntimeError(f"asked for {req.output_len} tokens, got {len(stamps)}")
    return Timing(sent - start, [s - sent for s in stamps])


async def run_http(url: str, requests: list[BenchRequest], adapters: list[Path]) -> tuple[list[Timing], float]:
    """Timings of every request and the run's wall time (first arrival to last token)."""
    start = time.perf_counter()
    timings = await asyncio.gather(*(stream_one(url, r, adapters, start) for r in requests))
    return list(timings), time.perf_counter() - start


async def warm_adapters(url: str, adapters: list[Path], used: set[int], concurrency: int = 8) -> None:
    """One 1-token request per adapter the run uses, so that adapters are registered (read from disk into the
    shard's host cache) before measuring, as they would be on a server that has been up for a while."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int) -> None:
            async with gate:
                body = {"inputs": "warm up", "parameters": _params(BenchRequest(0, [], "", 1, i), adapters)}
                (await client.post(f"{url}/generate", json=body)).raise_for_status()

        await asyncio.gather(*(one(i) for i in sorted(used) or [-1]))
