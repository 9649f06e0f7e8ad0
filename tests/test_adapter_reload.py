"""In-place reload (vLLM's `load_inplace`): a runtime adapter's name gets new weights; a request running when
the reload lands finishes with the old weights, every later one gets the new weights, and no prefix cached
under the old weights serves them. Token-exact with peft on both sides."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest

from launcher.tiny_model import build_tiny_adapter
from tests.conftest import LoomServer

# Longer than a KV block (16 tokens), so that the prefix cache holds whole blocks of it.
PROMPT = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun by the old red barn"


@pytest.fixture(scope="module")
def versions(tmp_path_factory, llama_dir):
    root = tmp_path_factory.mktemp("reload")
    built = {v: build_tiny_adapter(root / "builds" / v, llama_dir, rank=8, alpha=16,
                                   target_modules=["q_proj", "v_proj", "down_proj"], seed=seed)
             for v, seed in (("v1", 91), ("v2", 92))}
    live = root / "live" / "sql"
    shutil.copytree(built["v1"], live)
    return {**built, "live": live, "root": root / "live"}


@pytest.fixture(scope="module")
def reload_server(llama_dir, versions):
    srv = LoomServer(llama_dir, "--enable-adapter-api", "--local-adapter-root", str(versions["root"])).start(300)
    yield srv
    srv.stop()


def load(url: str, path, inplace: bool) -> httpx.Response:
    return httpx.post(f"{url}/v1/load_lora_adapter", timeout=60,
                      json={"lora_name": "sql", "lora_path": str(path), "load_inplace": inplace})


def generate_ids(url: str, max_new: int, ignore_eos: bool = False) -> list[int]:
    r = httpx.post(f"{url}/generate", timeout=300, json={"inputs": PROMPT, "parameters": {
        "adapter_id": "sql", "max_new_tokens": max_new, "details": True, "ignore_eos_token": ignore_eos}})
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def prefix_hits(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:prefix_cache_hits_total"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no vllm:prefix_cache_hits_total")


def test_load_inplace_swaps_weights_for_new_requests_only(reload_server, versions, llama_dir, reference, tokenizer):
    url = reload_server.url
    ids = tokenizer(PROMPT)["input_ids"]
    want = {v: reference.greedy(llama_dir, ids, 8, adapter_dir=versions[v]) for v in ("v1", "v2")}
    long_old = reference.greedy(llama_dir, ids, 300, stop_at_eos=False, adapter_dir=versions["v1"])
    assert want["v1"] != want["v2"]
    assert load(url, versions["live"], inplace=False).status_code == 200
    assert load(url, versions["live"], inplace=False).status_code == 400, "a second load without load_inplace"
    assert generate_ids(url, 8) == want["v1"]
    assert generate_ids(url, 8) == want["v1"]  # now from the prefix cache too

    running: dict = {}
    thread = threading.Thread(target=lambda: running.update(ids=generate_ids(url, 300, ignore_eos=True),
                                                            ended=time.monotonic()))
    thread.start()
    time.sleep(0.5)  # admitted and decoding under the old weights
    for built in versions["v2"].iterdir():  # new files in the same directory, as a retrained adapter lands
        shutil.copy(built, versions["live"] / built.name)
    hits = prefix_hits(url)
    r = load(url, versions["live"], inplace=True)
    reloaded = time.monotonic()
    assert r.status_code == 200, r.text
    assert generate_ids(url, 8) == want["v2"], "a request after the reload gets the new weights"
    assert prefix_hits(url) == hits, "no prefix cached under the old weights is reused"
    thread.join(300)
    assert running["ended"] > reloaded, "the long request was still running when the reload landed"
    assert running["ids"] == long_old, "a request running across the reload keeps the old weights to its end"
    assert generate_ids(url, 8) == want["v2"]
    assert prefix_hits(url) > hits  # the new load's own prefixes are cached and reused
    listed = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]
    assert listed.count("sql") == 1 and not any(i.startswith("sql#") for i in listed)
    # The old load leaves the shards once its request ended; the name unloads like any other.
    deadline = time.monotonic() + 30
    while httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "sql"}, timeout=30).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert httpx.post(f"{url}/v1/completions", json={"model": "sql", "prompt": "hi"}, timeout=30).status_code == 404


def test_load_inplace_of_a_name_never_loaded_is_a_first_load(reload_server, versions):
    r = httpx.post(f"{reload_server.url}/v1/load_lora_adapter", timeout=60,
                   json={"lora_name": "fresh", "lora_path": str(versions["live"]), "load_inplace": True})
    assert r.status_code == 200, r.text
    r = httpx.post(f"{reload_server.url}/v1/completions", json={"model": "fresh", "prompt": "hi", "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200, r.text
