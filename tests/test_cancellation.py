"""A client that goes away (streaming or not) frees its KV blocks within a step; the batch carries on."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.operating import completion, kv_idle, metric, sse_payloads, wait_until

COMP = "/v1/completions"
LONG = 480  # tokens: far more than the test waits for (the tiny model has 512 positions)


@pytest.fixture(scope="module")
def srv(ops_server):
    return ops_server


def test_aborted_stream_frees_its_blocks(srv):
    cancelled = metric(srv.url, "loom_generations_total", finish_reason="cancelled")
    with httpx.stream("POST", srv.url + COMP, json=completion(LONG, stream=True), timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert metric(srv.url, "loom_running_requests") == 1
    assert wait_until(lambda: kv_idle(srv.url), 2)
    assert metric(srv.url, "loom_generations_total", finish_reason="cancelled") == cancelled + 1


@pytest.mark.parametrize("path,body", [
    (COMP, completion(LONG)),
    ("/generate", {"inputs": "The operator said", "parameters": {"max_new_tokens": LONG, "ignore_eos_token": True}}),
])
def test_abandoned_non_stream_request_frees_its_blocks(srv, path, body):
    gone = metric(srv.url, "loom_request_failures_total", reason="cancelled")
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(srv.url + path, json=body, timeout=httpx.Timeout(30, read=0.5))
    assert wait_until(lambda: kv_idle(srv.url), 2)
    assert metric(srv.url, "loom_request_failures_total", reason="cancelled") == gone + 1
    assert metric(srv.url, "loom_requests_total", route=path, status="499") >= 1


def test_batch_continues_for_everyone_else(srv):
    alone = httpx.post(srv.url + COMP, json=completion(40, prompt="A steady stream"), timeout=60).json()
    survivor: dict = {}

    def run_survivor():
        with httpx.stream("POST", srv.url + COMP, json=completion(40, "A steady stream", stream=True),
                          timeout=60) as r:
            survivor["events"] = sse_payloads(r.iter_lines())

    thread = threading.Thread(target=run_survivor)
    thread.start()
    for _ in range(3):  # streams that join the batch and leave it mid-way
        with httpx.stream("POST", srv.url + COMP, json=completion(LONG, stream=True), timeout=30) as r:
            next(r.iter_lines())
    thread.join(60)
    events = [e for e in survivor["events"] if e["choices"]]  # the last event is the usage chunk
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in events) == alone["choices"][0]["text"]
    assert wait_until(lambda: kv_idle(srv.url), 2)
