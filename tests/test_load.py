"""A load test on loopback: 320 requests, 64 at a time, for the base model and three adapters mixed, a fifth
of them abandoned mid-stream. Every survivor gets its full, correct answer, and afterwards /metrics shows
every KV block free."""

from __future__ import annotations

import asyncio
import random

import httpx

from tests.operating import completion, kv_idle, metric, sse_payloads, stream_outcome, wait_until

REQUESTS = 320
CONCURRENCY = 64
ABORT_EVERY = 5  # 20% of the requests leave mid-stream
TOKENS = 12
PROMPTS = ["The operator said", "Load shedding is", "A queue of requests", "Every block is free"]
COMP = "/v1/completions"


def body(prompt: str, model: str, stream: bool = False) -> dict:
    return {**completion(TOKENS, prompt, stream=stream), "model": model}


async def run(client: httpx.AsyncClient, i: int, gate: asyncio.Semaphore, models: list[str],
              expected: dict[tuple[str, str], str]) -> str:
    """One request; returns "ok", "aborted", or what went wrong."""
    prompt, model = PROMPTS[i % len(PROMPTS)], models[i // len(PROMPTS) % len(models)]
    async with gate:
        if i % ABORT_EVERY == 0:
            async with client.stream("POST", COMP, json=body(prompt, model, stream=True)) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        return "aborted"  # closing the stream here is the client going away
            return f"stream {i} ended before its first event"
        if i % 2:
            r = await client.post(COMP, json=body(prompt, model))
            if r.status_code != 200:
                return f"{r.status_code}: {r.text}"
            choice = r.json()["choices"][0]
            text, finish, count = choice["text"], choice["finish_reason"], r.json()["usage"]["completion_tokens"]
        else:
            async with client.stream("POST", COMP, json=body(prompt, model, stream=True)) as r:
                events = sse_payloads([line async for line in r.aiter_lines()])
            finish, count = stream_outcome(events)
            text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
        if (finish, count, text) != ("length", TOKENS, expected[prompt, model]):
            return f"request {i} ({model or 'base'}): {finish} {count} {text!r}"
        return "ok"


async def load(url: str, models: list[str], expected: dict[tuple[str, str], str]) -> list[str]:
    gate = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        tasks = [run(client, i, gate, models, expected) for i in random.Random(6).sample(range(REQUESTS), REQUESTS)]
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=150)


def test_load_with_aborts_leaves_no_failed_survivor_and_no_block_held(ops_server, ops_adapters):
    url = ops_server.url
    models = [""] + [str(a) for a in ops_adapters]
    # Greedy: each (prompt, adapter)'s answer alone is its answer in any batch.
    expected = {(p, m): httpx.post(url + COMP, json=body(p, m), timeout=60).json()["choices"][0]["text"]
                for p in PROMPTS for m in models}
    failures_before = sum(metric(url, "loom_request_failures_total", reason=r) for r in ("shard_error", "server_error"))
    outcomes = asyncio.run(load(url, models, expected))
    problems = [o for o in outcomes if o not in ("ok", "aborted")]
    assert not problems, problems[:5]
    assert outcomes.count("aborted") == REQUESTS // ABORT_EVERY
    assert wait_until(lambda: kv_idle(url), 5), "KV blocks still held after the load"
    assert metric(url, "loom_batch_size_bucket", le="8.0") < metric(url, "loom_batch_size_count")  # real batching
    failures = sum(metric(url, "loom_request_failures_total", reason=r) for r in ("shard_error", "server_error"))
    assert failures == failures_before
