"""vLLM's conventions that its users' code relies on: `model` may be omitted, vLLM's /tokenize and /detokenize
bodies, /version and /ping, `stop_token_ids`, `priority`, and an unknown adapter is a 404 even when the hub
cannot be reached."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import LoomServer, hermetic_env
from tests.inprocess import Stack, collect, request
from tests.test_openai_api import PIRATE, chat_ids

USER = [{"role": "user", "content": "Tell me about ships."}]


def test_model_may_be_omitted(server, openai_client):
    with_model = openai_client.chat.completions.create(model="", messages=USER, max_tokens=6)
    without = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": USER, "max_tokens": 6}, timeout=60)
    assert without.status_code == 200, without.text
    assert without.json()["choices"][0]["message"]["content"] == with_model.choices[0].message.content
    text = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
    assert text.status_code == 200 and text.json()["usage"]["completion_tokens"] == 4


def test_version_and_ping(server):
    assert httpx.get(f"{server.url}/version", timeout=10).json()["version"]
    assert httpx.get(f"{server.url}/ping", timeout=10).status_code == 200
    assert httpx.post(f"{server.url}/ping", timeout=10).status_code == 200


def test_tokenize_takes_vllms_bodies_beside_loraxs(server, tokenizer):
    prompt = "The quick brown fox"
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": prompt, "return_token_strs": True}, timeout=30).json()
    ids = tokenizer(prompt)["input_ids"]
    assert r["tokens"] == ids and r["count"] == len(ids) and r["max_model_len"] > len(ids)
    assert r["token_strs"] == [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    no_bos = httpx.post(f"{server.url}/tokenize", json={"prompt": prompt, "add_special_tokens": False}, timeout=30)
    assert no_bos.json()["tokens"] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    chat = httpx.post(f"{server.url}/tokenize", json={"model": "", "messages": PIRATE}, timeout=30).json()
    assert chat["tokens"] == chat_ids(tokenizer, PIRATE)
    lorax = httpx.post(f"{server.url}/tokenize", json={"inputs": prompt}, timeout=30).json()
    assert [t["id"] for t in lorax] == ids


def test_detokenize(server, tokenizer):
    ids = tokenizer("Größe 東京 🙂")["input_ids"]
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}, timeout=30)
    assert r.json() == {"prompt": tokenizer.decode(ids, skip_special_tokens=True)}


def generated_ids(server, prompt: str, n: int) -> list[int]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": n, "details": True, "ignore_eos_token": True}}
    return [t["id"] for t in httpx.post(f"{server.url}/generate", json=body, timeout=60).json()["details"]["tokens"]]


def test_stop_token_ids_end_the_answer_before_that_token(server, tokenizer):
    prompt = "Once upon a time"
    ids = generated_ids(server, prompt, 12)
    stop_at = next(i for i in range(2, 12) if ids[i] not in ids[:i])
    for ignore_eos in (False, True):
        cut = httpx.post(f"{server.url}/v1/completions", json={
            "prompt": prompt, "max_tokens": 12, "ignore_eos": ignore_eos, "stop_token_ids": [ids[stop_at]]},
            timeout=60).json()
        assert cut["choices"][0]["finish_reason"] == "stop"
        assert cut["usage"]["completion_tokens"] == stop_at + 1
        assert cut["choices"][0]["text"] == tokenizer.decode(ids[:stop_at], skip_special_tokens=True)
    kept = httpx.post(f"{server.url}/v1/completions", json={
        "prompt": prompt, "max_tokens": 12, "stop_token_ids": [ids[stop_at]], "include_stop_str_in_output": True},
        timeout=60).json()
    assert kept["choices"][0]["text"] == tokenizer.decode(ids[:stop_at + 1], skip_special_tokens=True)


def test_priority_orders_the_queue(llama_dir, tmp_path):
    """With room for one request at a time, queued requests are admitted by priority (lower first), FIFO within
    one priority, and each gets exactly its greedy tokens."""
    from shard.engine import Engine

    engine = Engine(str(llama_dir))
    engine.warmup(engine.block_size, engine.block_size)  # one block: one request at a time
    priorities = [0, 5, -1, 3, -1, 0]

    async def run():
        async with Stack(engine, tmp_path) as stack:
            generations = stack.scheduler.generate_all(
                [request([7 + i, 8, 9], 4, priority=p) for i, p in enumerate(priorities)])
            await asyncio.gather(*(collect(g) for g in generations))
            return [g.stats.admitted for g in generations]

    admitted = asyncio.run(run())
    order = sorted(range(len(priorities)), key=lambda i: admitted[i])
    assert order == sorted(range(len(priorities)), key=lambda i: (priorities[i], i))


def test_unknown_adapter_is_404_when_the_hub_cannot_be_reached(llama_dir, tmp_path):
    env = {**hermetic_env(tmp_path), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    srv = LoomServer(llama_dir, env=env).start()
    try:
        r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "nobody/nothing", "messages": USER},
                       timeout=60)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "model_not_found" and "nobody/nothing" in r.json()["error"]["message"]
    finally:
        srv.stop()
