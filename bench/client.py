"""Open-loop HTTP load: each request is sent at its arrival time and streamed over /generate_stream, so that
TTFT and every token's arrival are seen as a client sees them."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx

from bench.stats import Timing
from bench.workload import BenchRequest


def _params(req: BenchRequest, adapters: list[Path]) -> dict:
    params = {"max_new_tokens": req.output_len, "ignore_eos_token": True, "details": False}
    if req.adapter >= 0:
        params |= {"adapter_id": str(adapters[req.adapter]), "adapter_source": "local"}
    return params


async def stream_one(client: httpx.AsyncClient, url: str, req: BenchRequest, adapters: list[Path],
                     start: float) -> Timing:
    """Waits for the request's arrival, streams it; times count from the arrival (queueing included)."""
    await asyncio.sleep(max(0.0, start + req.arrival - time.perf_counter()))
    sent = time.perf_counter()
    stamps: list[float] = []
    body = {"inputs": req.text, "parameters": _params(req, adapters)}
    async with client.stream("POST", f"{url}/generate_stream", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                if '"error"' in line and "error" in (event := json.loads(line[5:])):
                    raise RuntimeError(event["error"])
                stamps.append(time.perf_counter())
    if len(stamps) != req.output_len:
        raise RuntimeError(f"asked for {req.output_len} tokens, got {len(stamps)}")
    return Timing(sent - start, [s - sent for s in stamps])


async def run_http(url: str, requests: list[BenchRequest], adapters: list[Path]) -> tuple[list[Timing], float]:
    """Timings of every request and the run's wall time (first arrival to last token)."""
    limits = httpx.Limits(max_connections=len(requests) + 8, max_keepalive_connections=len(requests) + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        timings = await asyncio.gather(*(stream_one(client, url, r, adapters, start) for r in requests))
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
