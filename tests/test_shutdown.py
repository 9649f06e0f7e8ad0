"""SIGTERM to loom: the router stops accepting, finishes what is in flight, then everything exits 0."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import LoomServer
from tests.operating import SMALL_KV, completion, metric, sse_payloads, stream_outcome, wait_until

TOKENS = 300
STREAMS = 6


def stream_text(url: str) -> list:
    with httpx.stream("POST", url + "/v1/completions", json=completion(TOKENS, stream=True), timeout=60) as r:
        return sse_payloads(r.iter_lines())


def refused(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=1)
        return False
    except httpx.TransportError:
        return True


def test_sigterm_drains_in_flight_requests(llama_dir):
    srv = LoomServer(llama_dir, *SMALL_KV).start()
    try:
        with ThreadPoolExecutor(STREAMS) as pool:
            streams = [pool.submit(stream_text, srv.url) for _ in range(STREAMS)]
            assert wait_until(lambda: metric(srv.url, "loom_running_requests") == STREAMS, 10)
            srv.proc.send_signal(signal.SIGTERM)
            assert wait_until(lambda: refused(srv.url), 5), "still accepting connections after SIGTERM"
            for future in streams:
                assert stream_outcome(future.result(timeout=30)) == ("length", TOKENS)
        assert srv.proc.wait(timeout=30) == 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()

