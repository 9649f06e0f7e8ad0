"""/metrics tells operators what the server does, and every request leaves one (JSON) log line."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.operating import completion, kv_idle, metric, scrape, wait_until

COMP = "/v1/completions"


@pytest.fixture(scope="module")
def logged(ops_server):
    return ops_server, ops_server.log_path


def test_generation_metrics(logged):
    srv, _ = logged
    before = scrape(srv.url)
    r = httpx.post(srv.url + COMP, json=completion(5), timeout=60)
    assert r.status_code == 200
    assert wait_until(lambda: kv_idle(srv.url), 5)
    after = scrape(srv.url)

    def grew(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("loom_requests_total", route=COMP, status="200") == 1
    assert grew("loom_request_success_total") == 1
    assert grew("loom_request_duration_seconds_count", route=COMP) == 1
    assert grew("loom_generations_total", finish_reason="length") == 1
    assert grew("loom_generated_tokens_sum") == 5
    assert grew("loom_prompt_tokens_sum") == r.json()["usage"]["prompt_tokens"]
    for name in ("loom_queue_duration_seconds_count", "loom_time_to_first_token_seconds_count",
                 "loom_time_per_output_token_seconds_count"):
        assert grew(name) == 1, name
    assert grew("loom_batch_size_count") >= 5  # one step per token, plus the release
    assert grew("loom_step_duration_seconds_count") == grew("loom_forward_duration_seconds_count") >= 5
    assert after[("loom_kv_blocks_total", ())] > 0


def test_failures_are_counted_by_reason(logged):
    srv, _ = logged
    before = metric(srv.url, "loom_request_failures_total", reason="not_found")
    r = httpx.post(srv.url + COMP, json={"model": "ghost/adapter", "prompt": "hi"}, timeout=60)
    assert r.status_code == 404
    assert metric(srv.url, "loom_request_failures_total", reason="not_found") == before + 1
    invalid = metric(srv.url, "loom_request_failures_total", reason="invalid_request")
    assert httpx.post(srv.url + COMP, json={"model": ""}, timeout=10).status_code == 400
    assert metric(srv.url, "loom_request_failures_total", reason="invalid_request") == invalid + 1


def test_unknown_paths_share_one_label(logged):
    srv, _ = logged
    for i in range(5):
        httpx.get(f"{srv.url}/scan/{i}", timeout=10)
    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    assert "/scan/" not in text
    assert metric(srv.url, "loom_requests_total", route="other", status="404") >= 5


def test_one_json_log_line_per_request(logged):
    srv, log_path = logged
    r = httpx.post(srv.url + COMP, json=completion(3), headers={"X-Request-Id": "ops-trace-42"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "ops-trace-42"

    def line():
        for text in log_path.read_text().splitlines():
            if "ops-trace-42" in text:
                return json.loads(text)
        return None

    assert wait_until(lambda: line() is not None, 5)
    entry = line()
    assert entry["target"] == "router" and entry["level"] == "INFO"
    assert entry["id"] == "ops-trace-42" and entry["route"] == COMP and entry["status"] == 200
    assert entry["generated_tokens"] == 3 and entry["prompt_tokens"] > 0 and entry["finish_reason"] == "length"
    assert entry["adapter"] == "" and entry["total_ms"] >= entry["ttft_ms"] >= entry["queue_ms"] >= 0
    # Every process logs JSON lines: the launcher, the shard and the router.
    targets = {json.loads(t)["target"] for t in log_path.read_text().splitlines() if t.startswith("{")}
    assert {"loom", "router", "shard0"} <= targets
