"""Streams requests at a running Loom server and times them: TTFT, time per output token, throughput."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass

import httpx


@dataclass(slots=True)
class Timing:
    ttft: float  # seconds to the first token
    tpot: float  # seconds per output token after the first
    tokens: int
    latency: float


async def stream_one(client: httpx.AsyncClient, url: str, prompt: str, max_new_tokens: int,
                     adapter_id: str | None = None) -> Timing:
    params = {"max_new_tokens": max_new_tokens, "ignore_eos_token": True, "details": False}
    if adapter_id:
        params["adapter_id"] = adapter_id
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", f"{url}/generate_stream", json={"inputs": prompt, "parameters": params}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(event["error"])
            tokens += 1
            first = first or time.perf_counter()
    end = time.perf_counter()
    return Timing(ttft=first - start, tpot=(end - first) / max(tokens - 1, 1), tokens=tokens, latency=end - start)


async def run_concurrent(url: str, prompts: list[str], max_new_tokens: int, concurrency: int,
                         adapters: list[str | None] | None = None) -> dict:
    """Runs every prompt with at most `concurrency` in flight; returns throughput and latency percentiles."""
    adapters = adapters or [None] * len(prompts)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(prompt, adapter):
            async with gate:
                return await stream_one(client, url, prompt, max_new_tokens, adapter)

        start = time.perf_counter()
        timings = await asyncio.gather(*(one(p, a) for p, a in zip(prompts, adapters)))
        wall = time.perf_counter() - start
    return summarize(timings, wall)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(timings: list[Timing], wall: float) -> dict:
    tokens = sum(t.tokens for t in timings)
    return {
        "requests": len(timings),
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "throughput_tok_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(percentile([t.ttft for t in timings], 0.5) * 1000, 1),
        "ttft_p99_ms": round(percentile([t.ttft for t in timings], 0.99) * 1000, 1),
        "tpot_p50_ms": round(percentile([t.tpot for t in timings], 0.5) * 1000, 2),
        "tpot_p99_ms": round(percentile([t.tpot for t in timings], 0.99) * 1000, 2),
        "decode_tok_s_per_request": round(1 / statistics.median([t.tpot for t in timings]), 1),
    }
