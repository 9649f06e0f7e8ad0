"""/metrics tells operators what the server does, and every request leaves one (JSON) log line."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LoomServer
from tests.operating import SMALL_KV, completion, kv_idle, metric, scrape, wait_until

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


# -- the Gateway API Inference Extension's model-server protocol -------------------------------------------
# The endpoint picker (llm-d-router's core metrics extractor, vLLM mapping) reads /metrics like this: gauges
# only (an untyped sample reads as 0); per metric the series with the newest timestamp; for
# vllm:lora_requests_info the series with the largest value, its adapter lists split on commas and trimmed,
# max_lora and the cache labels parsed as integers.


def _gauge(family) -> float:
    assert family.type == "gauge", f"{family.name} is {family.type}: the endpoint picker reads gauges only"
    newest = max(family.samples, key=lambda s: s.timestamp or 0)  # no timestamps: the first series
    return newest.value


def endpoint_picker_view(text: str) -> dict:
    families = {f.name: f for f in text_string_to_metric_families(text)}
    lora = families["vllm:lora_requests_info"]
    _gauge(lora)
    latest = max(lora.samples, key=lambda s: s.value).labels
    adapters = lambda label: {a.strip() for a in latest[label].split(",") if a.strip()}  # noqa: E731
    cache = max(families["vllm:cache_config_info"].samples, key=lambda s: s.timestamp or 0).labels
    return {
        "waiting": int(_gauge(families["vllm:num_requests_waiting"])),
        "running": int(_gauge(families["vllm:num_requests_running"])),
        "kv_usage": _gauge(families["vllm:kv_cache_usage_perc"]),
        "max_lora": int(latest["max_lora"]),
        "active_models": adapters("running_lora_adapters"),
        "waiting_models": adapters("waiting_lora_adapters"),
        "lora_labels": set(latest),
        "block_size": int(cache["block_size"]),
        "num_gpu_blocks": int(cache["num_gpu_blocks"]),
        "model_names": {s.labels.get("model_name") for n in ("vllm:num_requests_waiting", "vllm:num_requests_running",
                                                              "vllm:kv_cache_usage_perc") for s in families[n].samples},
    }


@pytest.fixture(scope="module")
def routed(llama_dir, ops_adapters):
    """As a Kubernetes pod runs it: an API key, /metrics open to the endpoint picker; one adapter at a time, so
    a second adapter's requests wait."""
    srv = LoomServer(llama_dir, *SMALL_KV, "--api-key", "k8s", "--public-metrics", "--max-active-adapters", "1",
                     "--local-adapter-root", str(ops_adapters[0].parent)).start()
    yield srv
    srv.stop()


def test_endpoint_picker_reads_running_and_waiting_adapters(routed, ops_adapters):
    auth = {"Authorization": "Bearer k8s"}
    running, waiting = str(ops_adapters[0]), str(ops_adapters[1])
    info = httpx.get(f"{routed.url}/info", headers=auth, timeout=10).json()
    queued: list[httpx.Response] = []

    def post(model: str) -> None:
        body = {**completion(4), "model": model}
        queued.append(httpx.post(routed.url + COMP, json=body, headers=auth, timeout=120))

    # Both adapters registered first, so that the queue order below is the order the requests are sent in.
    for model in (running, waiting):
        assert httpx.post(routed.url + COMP, json={**completion(1), "model": model}, headers=auth, timeout=60).is_success
    long_run = {**completion(480, stream=True), "model": running}
    with httpx.stream("POST", routed.url + COMP, json=long_run, headers=auth, timeout=120) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()  # kept referenced: a collected iterator closes the stream
        next(line for line in lines if line.startswith("data: "))  # the adapter is running
        threads = [threading.Thread(target=post, args=(m,)) for m in (waiting, "")]
        for t in threads:
            t.start()
            time.sleep(0.2)  # queue order: the adapter, then the base model
        assert wait_until(lambda: endpoint_picker_view(_scrape_text(routed.url))["waiting"] == 2, 30)
        text = _scrape_text(routed.url)  # without the API key: --public-metrics
    for t in threads:
        t.join()
    assert [r.status_code for r in queued] == [200, 200]

    view = endpoint_picker_view(text)
    assert view["running"] == 1 and view["waiting"] == 2
    assert view["active_models"] == {running} and view["waiting_models"] == {waiting}  # the base model is no adapter
    assert view["max_lora"] == 1
    assert view["lora_labels"] == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
    loom = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
    assert 0 < view["kv_usage"] == pytest.approx(loom["loom_kv_blocks_used"] / loom["loom_kv_blocks_total"])
    assert view["block_size"] == info["block_size"] and view["num_gpu_blocks"] == loom["loom_kv_blocks_total"]
    assert view["model_names"] == {info["model_id"]}

    assert wait_until(lambda: endpoint_picker_view(_scrape_text(routed.url))["running"] == 0, 10)
    idle = endpoint_picker_view(_scrape_text(routed.url))
    assert idle["waiting"] == 0 and idle["kv_usage"] == 0
    assert idle["active_models"] == idle["waiting_models"] == set()


def _scrape_text(url: str) -> str:
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    return r.text


def test_an_exception_cannot_forge_a_log_line():
    """An exception's text (a library's message, a file's contents) goes through the same escaping as every
    other field: a traceback keeps its lines, each escaped and indented, so none starts a line of its own."""
    import io
    import logging

    from common.logs import TextFormatter

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextFormatter("%(asctime)s router %(levelname)s %(message)s"))
    logger = logging.getLogger("loom.test-forgery")
    logger.addHandler(handler)
    try:
        raise ValueError("bad config\n2026-01-01 00:00:00,000 router INFO FORGED request status=200\r\x1b[2K")
    except ValueError:
        logger.exception("unhandled error\nFORGED too")
    finally:
        logger.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert "Traceback" in out.getvalue() and len(lines) > 2
    assert all(line.startswith("    ") for line in lines[1:]), lines
    assert not any("FORGED" in line.split(" ", 1)[0] for line in lines) and "\x1b" not in out.getvalue()


# What vLLM's published Grafana dashboard (examples/online_serving/prometheus_grafana) queries, all by model_name.
VLLM_DASHBOARD_SERIES = [
    "vllm:e2e_request_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_sum",
    "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:time_per_output_token_seconds_bucket", "vllm:time_per_output_token_seconds_sum",
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:time_to_first_token_seconds_bucket",
    "vllm:time_to_first_token_seconds_sum", "vllm:gpu_cache_usage_perc", "vllm:request_prompt_tokens_bucket",
    "vllm:request_generation_tokens_bucket", "vllm:request_success_total", "vllm:request_queue_time_seconds_sum",
    "vllm:request_prefill_time_seconds_sum", "vllm:request_decode_time_seconds_sum",
    "vllm:request_max_num_generation_tokens_sum",
]


def test_vllm_request_and_token_families(logged):
    """vLLM's names, labels and meanings, so that vLLM's dashboards (and deploy/grafana/loom.json) read Loom."""
    from pathlib import Path
    import re

    srv, _ = logged
    before = scrape(srv.url)
    r = httpx.post(srv.url + COMP, json=completion(5), timeout=60)
    assert wait_until(lambda: kv_idle(srv.url), 5)
    after = scrape(srv.url)
    model = next(dict(k[1])["model_name"] for k in after if k[0] == "vllm:prompt_tokens_total")
    labels = {"model_name": model, "engine": "0"}

    def grew(name: str, **extra) -> float:
        key = (name, tuple(sorted({**labels, **extra}.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("vllm:prompt_tokens_total") == r.json()["usage"]["prompt_tokens"]
    assert grew("vllm:generation_tokens_total") == 5
    assert grew("vllm:request_success_total", finished_reason="length") == 1
    assert grew("vllm:inter_token_latency_seconds_count") == 4  # one per gap between the 5 tokens
    for name in ("vllm:e2e_request_latency_seconds_count", "vllm:time_to_first_token_seconds_count",
                 "vllm:request_queue_time_seconds_count", "vllm:request_prefill_time_seconds_count",
                 "vllm:request_decode_time_seconds_count", "vllm:request_inference_time_seconds_count"):
        assert grew(name) == 1, name
    assert grew("vllm:request_params_max_tokens_sum") == 5
    names = {name for name, _ in after}
    for series in VLLM_DASHBOARD_SERIES:
        assert any(n == series and dict(k).get("model_name") == model for n, k in after), series
    shipped = json.loads((Path(__file__).parent.parent / "deploy/grafana/loom.json").read_text())
    exprs = [t["expr"] for p in shipped["panels"] for t in p["targets"]]
    for series in {m for e in exprs for m in re.findall(r"\b(?:vllm:|loom_)[a-z0-9_:]+", e)}:
        assert series in names, series
