"""Load is shed cleanly: past --max-concurrent-requests a 429 with Retry-After, past --max-queue-time a 503.

The shard is paused (SIGSTOP) so that the queue fills deterministically: the first request sits in a
step that cannot finish, the next ones wait for admission.
"""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import LoomServer
from tests.operating import SMALL_KV, children, completion, kv_idle, metric, wait_until

COMP = "/v1/completions"
CAPACITY = 4
QUEUE_TIME_S = 1.5


@pytest.fixture(scope="module")
def limited(llama_dir):
    srv = LoomServer(llama_dir, *SMALL_KV, "--max-concurrent-requests", str(CAPACITY), "--max-queue-time",
                     str(QUEUE_TIME_S)).start()
    yield srv
    srv.stop()


class PausedShard:
    """The shard stopped for the duration of the block; requests pile up in front of it."""

    def __init__(self, server: LoomServer):
        self.shard = children(server, "shard")[0]

    def __enter__(self):
        self.shard.send_signal(signal.SIGSTOP)
        return self

    def __exit__(self, *exc):
        self.shard.send_signal(signal.SIGCONT)


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + COMP, json=body, timeout=60)


def test_overload_is_429_and_a_slow_queue_is_503(limited):
    url = limited.url
    with ThreadPoolExecutor(CAPACITY) as pool, PausedShard(limited):
        first = pool.submit(post, url, completion(3))
        assert wait_until(lambda: metric(url, "loom_running_requests") == 1, 10)
        queued = [pool.submit(post, url, completion(3)) for _ in range(CAPACITY - 1)]
        assert wait_until(lambda: metric(url, "loom_waiting_requests") == CAPACITY - 1, 10)

        over = post(url, completion(3))
        assert over.status_code == 429 and over.headers["retry-after"] == "1"
        assert "max-concurrent-requests" in over.json()["error"]["message"]
        native = httpx.post(url + "/generate", json={"inputs": "hi"}, timeout=10)
        assert native.status_code == 429 and native.json()["error_type"] == "overloaded"
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(api_key="x", base_url=url + "/v1", max_retries=0).completions.create(
                model="", prompt="hi", max_tokens=2)

        for future in queued:  # they time out while the shard is still paused
            r = future.result(timeout=QUEUE_TIME_S + 10)
            assert r.status_code == 503 and r.headers["retry-after"], r.text
            assert "queue" in r.json()["error"]["message"]
        assert metric(url, "loom_waiting_requests") == 0
    assert first.result(timeout=60).status_code == 200  # the admitted one finishes once the shard resumes
    assert wait_until(lambda: kv_idle(url), 5)
    assert metric(url, "loom_request_failures_total", reason="overloaded") >= 3
    assert metric(url, "loom_request_failures_total", reason="queue_timeout") >= CAPACITY - 1


def test_overloaded_stream_is_refused_before_it_starts(limited):
    url = limited.url
    with ThreadPoolExecutor(CAPACITY) as pool, PausedShard(limited):
        busy = [pool.submit(post, url, completion(2)) for _ in range(CAPACITY)]
        assert wait_until(lambda: metric(url, "loom_running_requests") + metric(url, "loom_waiting_requests")
                          == CAPACITY, 10)
        r = httpx.post(url + COMP, json=completion(2, stream=True), timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"]
        assert r.json()["error"]["type"] == "rate_limit_error"
    for future in busy:
        future.result(timeout=60)
    assert wait_until(lambda: kv_idle(url), 5)


def test_serves_normally_after_overload(limited):
    r = post(limited.url, completion(4))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
