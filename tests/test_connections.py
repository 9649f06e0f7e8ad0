"""Connections: a body deadline beside the head deadline, slow senders cannot crowd out /health or new clients, and
every request in an overload ends with an HTTP answer (408, 429, 503), never a reset. Real sockets against a real
uvicorn: the router, and the router's own protocol and middleware around an app that holds requests."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import LoomServer, free_port
from tests.operating import (
    COMP,
    FAST_S,
    capacity_idle,
    completion,
    health_s,
    metric,
    post,
    read_to_close,
    stream_outcome,
    timed_stream,
    wait_until,
)

MAX_CONNECTIONS = 40
HEADER_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def guarded(llama_dir):
    srv = LoomServer(llama_dir, "--max-batch-total-tokens", "16384", "--max-connections", str(MAX_CONNECTIONS),
                     "--header-timeout", str(HEADER_TIMEOUT_S)).start()
    yield srv
    assert srv.stop() == 0


class SlowSenders:
    """`count` connections that each send a complete head and then their body one byte at a time."""

    def __init__(self, port: int, count: int, interval_s: float):
        self.sockets = []
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 64\r\n\r\n")
            self.sockets.append(s)
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._drip, daemon=True)
        self.thread.start()

    def _drip(self) -> None:
        while not self.stop.wait(self.interval_s):
            for s in self.sockets:
                try:
                    s.send(b" ")
                except OSError:
                    pass  # answered and closed by the server

    def answers(self) -> list[bytes]:
        self.stop.set()
        self.thread.join()
        out = []
        for s in self.sockets:
            s.settimeout(FAST_S)
            try:
                out.append(read_to_close(s))
            except (ConnectionResetError, TimeoutError):
                out.append(b"<reset or silent>")
            s.close()
        return out


def test_slow_bodies_get_408_and_never_crowd_out_health_or_new_clients(guarded):
    url = guarded.url
    with ThreadPoolExecutor(2) as pool:
        bystanders = [pool.submit(timed_stream, url, 200) for _ in range(2)]
        assert wait_until(lambda: metric(url, "loom_running_requests") == 2, 30)
        slow = SlowSenders(guarded.port, MAX_CONNECTIONS - len(bystanders), interval_s=1.0)  # every slot taken
        try:
            for _ in range(3):  # while the slow senders hold every connection slot
                assert health_s(url) < FAST_S
                start = time.perf_counter()
                assert post(url, COMP, completion(3)).status_code == 200
                assert time.perf_counter() - start < FAST_S
                time.sleep(0.3)
            time.sleep(HEADER_TIMEOUT_S + 1)
        finally:
            answers = slow.answers()
        for future in bystanders:
            events, gap = future.result(timeout=120)
            assert stream_outcome(events) == ("length", 200) and gap < FAST_S
    # Each slow sender got an answer: 408 at its body deadline, or 503 when it was made to give up its slot.
    statuses = {a[:12] for a in answers}
    assert statuses <= {b"HTTP/1.1 408", b"HTTP/1.1 503"} and b"HTTP/1.1 408" in statuses, statuses
    assert all(b'"error"' in a for a in answers)
    assert health_s(url) < FAST_S
    assert wait_until(lambda: capacity_idle(url), 10)


def test_a_slow_but_real_upload_goes_on(guarded):
    """The body deadline counts afresh for every 64 KiB that arrives: a large body sent slower than the deadline
    as a whole, but steadily, is served."""
    body = b'{"model": "", "prompt": "hi", "max_tokens": 2, "user": "' + b"u" * (200 << 10) + b'"}'
    s = socket.create_connection(("127.0.0.1", guarded.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body))
    for i in range(0, len(body), 64 << 10):
        s.sendall(body[i:i + (64 << 10)])
        time.sleep(HEADER_TIMEOUT_S * 0.6)
    s.settimeout(30)
    assert read_to_close(s).startswith(b"HTTP/1.1 200")


# ---- in process: the router's protocol and middleware on a real uvicorn, around an app that holds requests ---


class HeldApp:
    """/hold waits until released; everything else answers at once."""

    def __init__(self):
        self.release = threading.Event()
        self.holding = 0

    async def __call__(self, scope, receive, send):
        if scope["path"] == "/hold":
            self.holding += 1
            while not self.release.is_set():
                await asyncio.sleep(0.02)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})


def test_when_every_connection_is_busy_a_new_one_gets_503_and_health_still_answers():
    import uvicorn

    from router.app import GuardMiddleware
    from router.connections import guarded_protocol
    from router.metrics import Metrics

    held, cap = HeldApp(), 4
    app = GuardMiddleware(held, api_key=None, metrics=Metrics(), open_paths=frozenset(), max_request_bytes=1000)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning",
                                           loop="asyncio", http=guarded_protocol(cap, 5.0)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    assert wait_until(lambda: server.started, 10)
    try:
        with ThreadPoolExecutor(cap) as pool:
            busy = [pool.submit(httpx.get, url + "/hold", timeout=30) for _ in range(cap)]
            assert wait_until(lambda: held.holding == cap, 10)
            over = httpx.get(url + "/v1/models", timeout=10)
            assert over.status_code == 503 and over.headers["retry-after"] == "1"
            assert "too many open connections" in over.json()["error"]["message"]
            assert httpx.get(url + "/health", timeout=10).status_code == 200
            held.release.set()
            assert [f.result(timeout=30).status_code for f in busy] == [200] * cap
    finally:
        server.should_exit = True
        thread.join(timeout=10)
