"""Faults: a dead shard fails the requests of its step with a 5xx (an error event mid-stream) and loom exits
non-zero; a hung shard turns /health to 503 until it answers again; a damaged checkpoint is named."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx

from launcher.tiny_model import build_tiny_model
from tests.conftest import REPO, LoomServer, free_port
from tests.operating import SMALL_KV, children, completion, metric, sse_payloads, stream_outcome, wait_until

COMP = "/v1/completions"
TOKENS = 400


def stream_events(url: str) -> list:
    with httpx.stream("POST", url + COMP, json=completion(TOKENS, stream=True), timeout=60) as r:
        return sse_payloads(r.iter_lines())


def test_killed_shard_fails_in_flight_requests_and_loom_exits_non_zero(llama_dir):
    srv = LoomServer(llama_dir, *SMALL_KV).start()
    try:
        with ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(stream_events, srv.url) for _ in range(2)]
            plain = [pool.submit(httpx.post, srv.url + COMP, json=completion(TOKENS), timeout=60) for _ in range(2)]
            assert wait_until(lambda: metric(srv.url, "loom_running_requests") == 4, 10)
            children(srv, "shard")[0].kill()
            for future in streams:
                events = future.result(timeout=30)
                assert stream_outcome(events) == (None, None) and "shard failure" in events[-1]["error"]["message"]
                assert events[-1]["error"]["type"] == "server_error"
            for future in plain:
                r = future.result(timeout=30)
                assert r.status_code == 500 and "shard failure" in r.json()["error"]["message"]
        assert srv.proc.wait(timeout=30) == 1
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()


def test_health_follows_a_hung_shard(llama_dir):
    srv = LoomServer(llama_dir, *SMALL_KV).start()
    try:
        shard = children(srv, "shard")[0]
        shard.send_signal(signal.SIGSTOP)
        try:
            r = httpx.get(srv.url + "/health", timeout=30)
            assert r.status_code == 503 and r.json()["error_type"] == "unhealthy"
        finally:
            shard.send_signal(signal.SIGCONT)
        assert wait_until(lambda: httpx.get(srv.url + "/health", timeout=30).status_code == 200, 10)
        assert httpx.post(srv.url + COMP, json=completion(3), timeout=60).status_code == 200
    finally:
        assert srv.stop() == 0


def test_truncated_checkpoint_is_named(tmp_path):
    model = build_tiny_model(tmp_path / "broken", "llama")
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    run = subprocess.run([sys.executable, "-m", "launcher", "--model-id", str(model), "--port", str(free_port())],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert f"checkpoint file {weights} is corrupt or truncated" in run.stderr
    assert "Traceback" not in run.stderr
