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
CHAT, COMP, GEN = "/v1/chat/completions", "/v1/completions", "/generate"
USER = [{"role": "user", "content": "hi"}]
FAST_S = 5.0  # a refusal must not wait for the batch (a shared 2-core machine: generous)


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


def router_rss_mb(server: LoomServer) -> float:
    return children(server, "router")[0].memory_info().rss / 2**20


def health_s(url: str) -> float:
    """How long /health took (it must answer 200)."""
    start = time.perf_counter()
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    return time.perf_counter() - start


def post(url: str, path: str, body: dict | None = None, raw: bytes | None = None, **kw) -> httpx.Response:
    if raw is not None:
        return httpx.post(url + path, content=raw, headers={"content-type": "application/json"}, timeout=60, **kw)
    return httpx.post(url + path, json=body, timeout=60, **kw)


def error_text(r: httpx.Response) -> str:
    """The message of an error in either route family's shape."""
    error = r.json()["error"]
    return error["message"] if isinstance(error, dict) else error


def stream_events(url: str, tokens: int) -> list:
    return timed_stream(url, tokens)[0]


def timed_stream(url: str, tokens: int) -> tuple[list, float]:
    """A base-model stream of `tokens` tokens: its events, and the longest wait between two of them (s)."""
    gaps, last = [0.0], None
    with httpx.stream("POST", url + COMP, json=completion(tokens, stream=True), timeout=120) as r:
        assert r.status_code == 200

        def lines():
            nonlocal last
            for line in r.iter_lines():
                now = time.perf_counter()
                if line.startswith("data: "):
                    if last is not None:
                        gaps.append(now - last)
                    last = now
                yield line

        return sse_payloads(lines()), max(gaps)


def capacity_idle(url: str) -> bool:
    """kv_idle, and no adapter in the running batch or pool page held by one."""
    return kv_idle(url) and metric(url, "loom_active_adapters") == 0 and metric(url, "loom_adapter_pages_used") == 0


def read_to_close(sock) -> bytes:
    """Everything a socket receives until the server closes it (set a timeout on it first)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def ids_of(response: httpx.Response) -> list[int]:
    """The token ids of a native `/generate` answer asked with `details` (it must be a 200)."""
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]
