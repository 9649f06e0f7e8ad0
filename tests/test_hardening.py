"""Hostile requests against a real server: each gets a fast 4xx (or a harmless answer), the requests in flight
beside it finish untouched, capacity comes back to exactly where it was, no file outside the allowed roots is
read by any spelling, and the router's memory and /health stay where they were."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import LoomServer, install_in_hub_cache
from tests.operating import (
    CHAT,
    COMP,
    FAST_S,
    GEN,
    USER,
    completion,
    error_text,
    health_s,
    kv_idle,
    metric,
    post,
    read_to_close,
    router_rss_mb,
    sse_payloads,
    stream_events,
    stream_outcome,
    wait_until,
)

MAX_BYTES = 65536
CAPACITY = 12
HEADER_TIMEOUT_S = 2
MAX_CONNECTIONS = 40


@pytest.fixture(scope="module")
def roots(tmp_path_factory, ops_adapters):
    """An allowed local root with good and symlinked adapters, a directory outside it, and a hub cache."""
    base = tmp_path_factory.mktemp("hardening")
    root, outside, hf_home = base / "root", base / "outside", base / "hf_home"
    shutil.copytree(ops_adapters[0], root / "a0")
    shutil.copytree(ops_adapters[1], outside / "elsewhere")
    (outside / "secret.txt").write_text("{% for m in messages %}SECRET{% endfor %}")
    for name, link, target in [("linked-config", "adapter_config.json", outside / "elsewhere" / "adapter_config.json"),
                               ("linked-template", "chat_template.jinja", outside / "secret.txt")]:
        shutil.copytree(ops_adapters[0], root / name)
        (root / name / link).unlink(missing_ok=True)
        (root / name / link).symlink_to(target)
    (root / "linked-dir").symlink_to(outside / "elsewhere", target_is_directory=True)
    install_in_hub_cache(ops_adapters[2], hf_home, "org/hub-lora")
    (hf_home / "planted").mkdir()
    shutil.copytree(ops_adapters[1], hf_home / "planted" / "snap")
    return {"root": root, "outside": outside, "hf_home": hf_home}


@pytest.fixture(scope="module")
def hardened(llama_dir, roots, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("hardening-logs") / "loom.log"
    with open(log_path, "w") as log_file:
        srv = LoomServer(llama_dir, "--max-input-length", "64", "--max-total-tokens", "128",
                         "--max-batch-total-tokens", "16384", "--max-request-bytes", str(MAX_BYTES),
                         "--max-concurrent-requests", str(CAPACITY), "--max-active-adapters", "2",
                         "--max-connections", str(MAX_CONNECTIONS), "--header-timeout", str(HEADER_TIMEOUT_S),
                         "--local-adapter-root", str(roots["root"]), stderr=log_file,
                         env={"HF_HOME": str(roots["hf_home"]), "HF_HUB_OFFLINE": "1"}).start()
        srv.log_path = log_path
        yield srv
        assert srv.stop() == 0


NATIVE = {"inputs": "hi", "parameters": {"max_new_tokens": 3}}


def native(**params) -> dict:
    return {"inputs": "hi", "parameters": {"max_new_tokens": 3, **params}}


# (route, body or raw bytes, status, words the error must hold)
POISON = [
    (COMP, {"model": "", "prompt": "hi", "max_tokens": 3, "min_tokens": 2**32}, 400, "min_tokens"),
    (COMP, {"model": "", "prompt": "hi", "max_tokens": 3, "min_tokens": 50}, 400, "min_tokens"),
    (GEN, native(return_k_alternatives=2**32), 400, "return_k_alternatives"),
    (GEN, native(return_k_alternatives=21), 400, "return_k_alternatives"),
    (CHAT, {"model": "", "messages": USER, "max_tokens": 3, "top_k": 2**40}, 400, "top_k"),
    (CHAT, {"model": "", "messages": USER, "max_tokens": 3, "seed": 2**64}, 400, "seed"),
    (GEN, native(seed=2**64, do_sample=True), 400, "seed"),
    (CHAT, {"model": "", "messages": USER, "max_tokens": 3, "n": 129}, 400, "n"),
    (COMP, {"model": "", "prompt": "hi", "max_tokens": 3, "n": CAPACITY + 1}, 400, "max-concurrent-requests"),
    (COMP, {"model": "", "prompt": ["a", "b"], "max_tokens": 3, "best_of": 7}, 400, "max-concurrent-requests"),
    (GEN, native(best_of=10**6, do_sample=True), 400, "best_of"),
    (GEN, native(best_of=CAPACITY + 1, do_sample=True), 400, "max-concurrent-requests"),
    (CHAT, {"model": "", "messages": USER, "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs"),
    (COMP, {"model": "", "prompt": "hi", "stop": ["s"] * 17}, 400, "stop"),
    (COMP, {"model": "", "prompt": "hi", "stop": "x" * 600}, 400, "stop"),
    (GEN, native(stop=["y" * 600]), 400, "stop"),
    (GEN, native(temperature=1e308), 400, "temperature"),
    (GEN, native(repetition_penalty=1e9), 400, "repetition_penalty"),
    (GEN, native(truncate=2**40), 400, "truncate"),
    (GEN, native(adapter_source="ftp", adapter_id="org/hub-lora"), 400, "adapter_source"),
    (CHAT, {"model": "x\nFORGED status=200", "messages": USER}, 400, "control characters"),
    (CHAT, {"model": "a" * 600, "messages": USER}, 400, "model"),
    (COMP, b'{"model": "", "prompt": "hi", "temperature": NaN}', 400, "not valid JSON"),
    (COMP, b'{"model": "", "prompt": "hi", "temperature": 1e999}', 400, "out of range"),
    (COMP, b'{"model": "", "prompt": "\\ud800 lone"}', 400, "surrogate"),
    (GEN, b'{"inputs": "hi", "parameters": {"stop": ["\\udfff"]}}', 400, "surrogate"),
    (COMP, b'{"model": "", "prompt": "hi", "user": ' + b"[" * 10000 + b"]" * 10000 + b"}", 400, "nested"),
    (COMP, b'{"model": "", "prompt": "hi", "seed": ' + b"9" * 20000 + b"}", 400, "too long"),
    (COMP, {"model": "", "prompt": "word " * 10000}, 400, "max-input-length"),
    (COMP, {"model": "", "prompt": list(range(65))}, 400, "max-input-length"),
    ("/tokenize", {"inputs": "hello " * 5000}, 400, "max-input-length"),
    ("/tokenize", {"inputs": "hello " * 130}, 400, "max-input-length"),
    (COMP, {"model": "", "prompt": "x" * (MAX_BYTES + 1)}, 413, "max-request-bytes"),
]


def test_poison_requests_are_fast_4xx_and_bystanders_finish_untouched(hardened):
    url = hardened.url
    rss = router_rss_mb(hardened)
    with ThreadPoolExecutor(3) as pool:
        bystanders = [pool.submit(stream_events, url, 100) for _ in range(3)]
        assert wait_until(lambda: metric(url, "loom_running_requests") == 3, 30)
        for path, body, status, words in POISON:
            start = time.perf_counter()
            r = post(url, path, raw=body) if isinstance(body, bytes) else post(url, path, body)
            assert r.status_code == status, (path, r.text[:300])
            assert words in error_text(r), (path, r.text[:300])
            assert time.perf_counter() - start < FAST_S, (path, body if isinstance(body, dict) else body[:60])
            assert health_s(url) < FAST_S
        for future in bystanders:
            assert stream_outcome(future.result(timeout=120)) == ("length", 100)
    assert wait_until(lambda: kv_idle(url), 10)
    assert router_rss_mb(hardened) < rss + 100
    with open(hardened.log_path) as log:  # the newline in the model id was refused, never logged raw
        assert not any(line.startswith("FORGED") for line in log)


def test_large_bodies_are_413_before_they_are_read(hardened):
    url = hardened.url
    rss = router_rss_mb(hardened)
    start = time.perf_counter()
    r = post(url, COMP, raw=b'{"model": "", "prompt": "' + b"x" * (20 << 20) + b'"}')
    assert r.status_code == 413 and "max-request-bytes" in error_text(r)
    chunks = (b"x" * 65536 for _ in range(32))  # no Content-Length: counted as it arrives
    r = httpx.post(url + GEN, content=chunks, timeout=60)
    assert r.status_code == 413 and r.json()["error_type"] == "validation"
    assert time.perf_counter() - start < 2 * FAST_S
    assert router_rss_mb(hardened) < rss + 100
    assert health_s(url) < FAST_S


def test_tokenize_and_stops_are_bounded(hardened):
    url = hardened.url
    r = post(url, "/tokenize", {"inputs": "Once upon a time"})
    assert r.status_code == 200 and 0 < len(r.json()) <= 64
    start = time.perf_counter()  # the longest stop string allowed, matched in linear time
    r = post(url, COMP, {"model": "", "prompt": "hi", "max_tokens": 20, "ignore_eos": True, "stop": ["ab" * 256] * 16})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20
    assert time.perf_counter() - start < 3 * FAST_S


@pytest.mark.parametrize("revision", ["../../../../dev/zero", "../../refs/main", "../../../planted/snap",
                                      "main/../../..", "/etc", "a//b", "refs/../../x", "..", "main\\..\\.."])
def test_hub_revision_cannot_leave_the_cache(hardened, roots, revision):
    start = time.perf_counter()
    r = post(hardened.url, GEN, native(adapter_id=f"org/hub-lora@{revision}"))
    assert time.perf_counter() - start < FAST_S
    # The same answer whether the target is a file, a directory or missing: no existence oracle.
    assert r.status_code == 400 and "revision must be a branch, tag or commit" in error_text(r), r.text
    assert str(roots["hf_home"]) not in r.text


def test_hub_ids_and_revisions_that_are_fine(hardened, roots):
    url = hardened.url
    for spelling in ("org/hub-lora", "org/hub-lora@main"):  # one snapshot directory: one adapter
        assert post(url, GEN, native(adapter_id=spelling)).status_code == 200
    listed = [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]]
    assert [m for m in listed if m.startswith("org/hub-lora")] == ["org/hub-lora"]
    r = post(url, GEN, native(adapter_id="org/hub-lora@no-such-branch"))
    assert r.status_code == 404 and str(roots["hf_home"]) not in r.text
    # The source is checked on every request, cache hit or not.
    for source, status in (("ftp", 400), ("HUB", 400), ("local", 400), ("hub", 200)):
        r = post(url, GEN, native(adapter_id="org/hub-lora", adapter_source=source))
        assert r.status_code == status, (source, r.text)


@pytest.mark.parametrize("name", ["linked-config", "linked-template", "linked-dir"])
def test_symlinks_out_of_the_root_are_refused(hardened, roots, name):
    r = post(hardened.url, GEN, native(adapter_id=str(roots["root"] / name)))
    assert r.status_code == 400, r.text
    assert str(roots["outside"]) not in r.text
    r = post(hardened.url, CHAT, {"model": str(roots["root"] / name), "messages": USER, "max_tokens": 2})
    assert r.status_code == 400 and "SECRET" not in r.text


def test_spellings_of_one_directory_are_one_adapter(hardened, roots):
    url = hardened.url
    a0 = str(roots["root"] / "a0")
    before = metric(url, "loom_adapter_loads_total")
    spellings = [a0, a0 + "/", a0 + "/./.", a0.replace("/a0", "//a0"), a0 + "/../a0", a0 + "//"]
    outputs = set()
    for spelling in spellings:
        r = post(url, COMP, {"model": spelling, "prompt": "The operator said", "max_tokens": 5})
        assert r.status_code == 200, (spelling, r.text)
        outputs.add(r.json()["choices"][0]["text"])
    assert len(outputs) == 1
    assert metric(url, "loom_adapter_loads_total") == before + 1
    listed = [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]]
    assert listed.count(a0) == 1 and not any(m.startswith(a0) and m != a0 for m in listed)


def test_over_limit_streams_get_429_before_any_200(hardened):
    url = hardened.url

    def one(_):
        with httpx.stream("POST", url + COMP, json=completion(8, stream=True), timeout=120) as r:
            if r.status_code == 429:
                return "refused", None
            assert r.status_code == 200
            return "served", stream_outcome(sse_payloads(r.iter_lines()))

    with ThreadPoolExecutor(3 * CAPACITY) as pool:
        results = list(pool.map(one, range(3 * CAPACITY)))
    served = [outcome for kind, outcome in results if kind == "served"]
    assert served and all(outcome == ("length", 8) for outcome in served), results
    assert wait_until(lambda: kv_idle(url), 10)


def test_refused_best_of_leaves_nothing_running(hardened):
    url = hardened.url
    busy_count = lambda: metric(url, "loom_running_requests") + metric(url, "loom_waiting_requests")  # noqa: E731
    # The tiny model streams 100 tokens in well under a second: if a stream ends before the refusal is
    # decided the server rightly admits best_of, so such a round is run again.
    for _ in range(5):
        with ThreadPoolExecutor(CAPACITY) as pool:
            busy = [pool.submit(stream_events, url, 100) for _ in range(CAPACITY - 2)]
            assert wait_until(lambda: busy_count() == CAPACITY - 2, 30)
            r = post(url, GEN, native(best_of=4, do_sample=True))
            refused, still_busy = r.status_code == 429, busy_count()
            for future in busy:
                assert stream_outcome(future.result(timeout=120)) == ("length", 100)
        if refused:
            assert r.headers["retry-after"] and still_busy <= CAPACITY - 2
            break
        assert r.status_code == 200, r.text
    else:
        pytest.fail("best_of beside a nearly full server was never refused")
    assert wait_until(lambda: kv_idle(url), 10)


def test_idle_connections_are_closed_and_capped(hardened):
    url = hardened.url
    idle = [socket.create_connection(("127.0.0.1", hardened.port)) for _ in range(MAX_CONNECTIONS + 20)]
    slow = socket.create_connection(("127.0.0.1", hardened.port))
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
    try:
        assert health_s(url) < FAST_S  # the cap closes the oldest idle ones to make room
        time.sleep(HEADER_TIMEOUT_S + 1)
        for s in idle:
            s.settimeout(FAST_S)
            try:
                assert s.recv(1) == b""  # closed by the server
            except ConnectionResetError:
                pass
        slow.settimeout(FAST_S)  # a request was begun: it is answered before the connection closes
        assert read_to_close(slow).startswith(b"HTTP/1.1 408 ")
        assert health_s(url) < FAST_S
    finally:
        for s in idle + [slow]:
            s.close()


# ---- in process: what a real hub or a real drain would take too long (or a network) to show -----------------


def test_stream_cut_by_shutdown_ends_with_an_error_event_and_done():
    """uvicorn cancels what is still running when the drain's grace period ends: the stream must still end
    with an error event and [DONE], not a cut connection."""
    from router.app import GuardMiddleware
    from router.metrics import Metrics
    from router.sse import sse_event, sse_response

    async def endless(scope, receive, send):
        async def events():
            yield sse_event({"choices": []})
            await asyncio.sleep(3600)
        await sse_response(events())(scope, receive, send)

    sent: list[dict] = []

    async def run():
        incoming = asyncio.Queue()
        incoming.put_nowait({"type": "http.request", "body": b"{}", "more_body": False})

        async def send(message):
            sent.append(message)

        guard = GuardMiddleware(endless, api_key=None, metrics=Metrics(), open_paths=frozenset(), max_request_bytes=1000)
        scope = {"type": "http", "path": COMP, "method": "POST", "headers": [], "query_string": b""}
        task = asyncio.create_task(guard(scope, incoming.get, send))
        while not any(m.get("body", b"").startswith(b"data: {") for m in sent):
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert body.endswith(b"data: [DONE]\n\n") and b"shutting down" in body, body


def test_adapter_fetched_with_a_token_is_served_and_named_only_with_that_token(llama_dir, ops_adapters, tmp_path,
                                                                     monkeypatch):
    """The hub cannot run here: `snapshot` stands in for it, with one private repo that only the token
    'secret' may read. Everything else (registry, shard, engine) is real."""
    from common import hub
    from router.adapters import AdapterRegistry
    from router.config import RouterConfig
    from router.sources import build_sources
    from router.sources import hub as registry_module
    from router.errors import APIError
    from router.metrics import Metrics
    from router.tokenization import ModelTokenizer
    from shard.engine import Engine
    from tests.inprocess import Stack

    snap = install_in_hub_cache(ops_adapters[0], tmp_path / "hf", "org/private")

    def private_hub(repo_id, revision, patterns, what="model", token=None):
        hub.check_ref(repo_id, revision, what)
        if repo_id != "org/private" or token != "secret":
            raise hub.not_found(f"{repo_id}@{revision}" if revision else repo_id, what)
        return snap

    monkeypatch.setattr(registry_module, "snapshot", private_hub)
    monkeypatch.setattr(registry_module, "repo_cache_dir", lambda repo_id: snap.parent.parent)
    monkeypatch.setattr(registry_module, "hub_offline", lambda: False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    engine = Engine(str(llama_dir), kv_cache_bytes=1 << 20, adapter_pool_pages=4)
    engine.warmup(64)

    async def refused(registry, name, token) -> str:
        with pytest.raises(APIError) as e:
            await registry.resolve(name, api_token=token)
        assert e.value.status == 404
        return e.value.message

    async def run():
        async with Stack(engine, tmp_path) as stack:
            sources = build_sources(RouterConfig(model_dir=str(llama_dir), model_id="base", shard_sockets=[]))
            registry = AdapterRegistry("base", ModelTokenizer.from_dir(llama_dir), stack.client, {}, sources,
                                       "hub", engine.adapter_pages, Metrics())
            adapter = await registry.resolve("org/private", api_token="secret")
            # Named to nobody: not in /v1/models, not in metric labels.
            assert registry.listed() == [] and registry.label(adapter.id) is None
            assert adapter.ref == f"org/private@{snap.name}"
            for token in (None, "guess"):
                for name in ("org/private", "org/private@main"):
                    message = await refused(registry, name, token)
                    # Word for word what a repo that does not exist gets: no oracle.
                    assert message == (await refused(registry, "org/nothing", token)).replace("org/nothing", name)
            assert await registry.resolve("org/private", api_token="secret") is adapter

    asyncio.run(run())
