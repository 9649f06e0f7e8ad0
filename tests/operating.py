"""Helpers for the operations tests: reading /metrics, finding loom's child processes, waiting."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LoomServer


# A small KV cache: the router's warmup (and so the server's start) is quicker, and still plenty here.
SMALL_KV = ("--max-batch-total-tokens", "16384")


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample on /metrics as {(name, sorted label items): value}."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(url: str, name: str, **labels: str) -> float:
    return scrape(url).get((name, tuple(sorted(labels.items()))), 0.0)


def kv_idle(url: str) -> bool:
    """Nothing queued or running, and no KV block held by a request (cached prefixes count as free)."""
    m = scrape(url)
    get = lambda name: m.get((name, ()), -1.0)  # noqa: E731
    return (get("loom_running_requests") == 0 and get("loom_waiting_requests") == 0
            and get("loom_kv_blocks_used") == 0 and get("loom_kv_blocks_free") == get("loom_kv_blocks_total"))


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def children(server: LoomServer, module: str) -> list[psutil.Process]:
    """loom's child processes started as `python -m MODULE` (shard or router)."""
    procs = psutil.Process(server.proc.pid).children(recursive=True)
    return [p for p in procs if p.cmdline()[1:3] == ["-m", module]]


def sse_payloads(lines) -> list:
    """The JSON payloads of an SSE stream's `data:` lines, up to `[DONE]`."""
    out = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            break
        out.append(json.loads(line[len("data: "):]))
    return out


def completion(max_tokens: int, prompt: str = "The operator said", stream: bool = False) -> dict:
    """A base-model legacy completion that generates exactly `max_tokens` tokens; a stream ends with usage."""
    body = {"model": "", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def stream_outcome(events: list) -> tuple[str | None, int | None]:
    """(finish reason, completion tokens) of a completed stream's events."""
    reasons = [e["choices"][0]["finish_reason"] for e in events if e.get("choices")]
    usage = events[-1].get("usage") if events else None
    return (reasons[-1] if reasons else None), (usage["completion_tokens"] if usage else None)
