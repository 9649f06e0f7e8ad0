"""LoRAX's native API: /generate, /generate_stream and `POST /` (LoRAX's own client), token-exact."""

from __future__ import annotations

import json

import httpx
import pytest


def test_generate_returns_lorax_shape_and_reference_tokens(server, reference, llama_dir, tokenizer):
    prompt = "How many helicopters can a human eat?"
    r = httpx.post(f"{server.url}/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 24,
                                                                                    "details": True}}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    ids = reference.greedy(llama_dir, tokenizer(prompt)["input_ids"], 24)
    details = body["details"]
    assert [t["id"] for t in details["tokens"]] == ids
    assert body["generated_text"] == tokenizer.decode(ids, skip_special_tokens=True)
    assert details["generated_tokens"] == len(ids)
    assert details["prompt_tokens"] == len(tokenizer(prompt)["input_ids"])
    assert details["finish_reason"] in ("length", "eos_token")


def test_generate_stream_events_concatenate_to_generate(server):
    payload = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 30}}
    full = httpx.post(f"{server.url}/generate", json=payload, timeout=60).json()
    events = []
    with httpx.stream("POST", f"{server.url}/generate_stream", json=payload, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert "".join(e["token"]["text"] for e in events) == full["generated_text"]
    assert events[-1]["generated_text"] == full["generated_text"]
    assert events[-1]["details"]["generated_tokens"] == 30
    assert all(e["details"] is None for e in events[:-1])


def test_return_full_text_and_stop_sequences(server):
    base = httpx.post(f"{server.url}/generate", json={"inputs": "abc", "parameters": {"max_new_tokens": 30}},
                      timeout=60).json()["generated_text"]
    stop = base[8:11]
    r = httpx.post(f"{server.url}/generate", json={"inputs": "abc", "parameters": {
        "max_new_tokens": 30, "stop": [stop], "return_full_text": True}}, timeout=60).json()
    assert r["generated_text"] == "abc" + base[: base.index(stop)]
    assert r["details"]["finish_reason"] == "stop_sequence"


def test_lorax_client_generate_and_stream(server, reference, llama_dir, tokenizer):
    lorax = pytest.importorskip("lorax")
    client = lorax.Client(server.url, timeout=60)
    prompt = "Write a detailed analogy"
    resp = client.generate(prompt, max_new_tokens=16)
    ids = reference.greedy(llama_dir, tokenizer(prompt)["input_ids"], 16)
    assert resp.generated_text == tokenizer.decode(ids, skip_special_tokens=True)
    assert [t.id for t in resp.details.tokens] == ids
    streamed = "".join(r.token.text for r in client.generate_stream(prompt, max_new_tokens=16))
    assert streamed == resp.generated_text


def test_seeded_sampling_repeats(server):
    payload = {"inputs": "The quick", "parameters": {"max_new_tokens": 20, "do_sample": True, "seed": 7,
                                                     "temperature": 0.9, "top_k": 50}}
    a = httpx.post(f"{server.url}/generate", json=payload, timeout=60).json()
    b = httpx.post(f"{server.url}/generate", json=payload, timeout=60).json()
    assert a["generated_text"] == b["generated_text"]
    assert a["details"]["seed"] == 7


def test_tokenize_route(server, tokenizer):
    r = httpx.post(f"{server.url}/tokenize", json={"inputs": "Hello world"}, timeout=30)
    assert r.status_code == 200
    assert [t["id"] for t in r.json()] == tokenizer("Hello world")["input_ids"]


def test_info_and_health_and_metrics(server):
    info = httpx.get(f"{server.url}/info", timeout=10).json()
    assert info["num_shard"] == 1 and info["max_total_tokens"] > info["max_input_length"]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert "loom_kv_blocks_total" in metrics and "loom_requests_total" in metrics


def test_a_held_tail_goes_to_the_token_it_belongs_to(llama_dir):
    """An answer ending in an incomplete character right before a special EOS: the stream's non-special token
    texts (what lorax-client users join) equal generated_text, the replacement character included."""
    import asyncio

    from router.generation import TokenEvent
    from router.native_api import token_texts
    from router.text_stream import generate_text
    from router.tokenization import ModelTokenizer

    tok = ModelTokenizer.from_dir(llama_dir)
    ids = tok.encode("ok 東", add_special_tokens=False)
    assert tok.decode_raw(ids[:-1]).endswith("\ufffd"), "the character must be split across tokens"
    eos = next(iter(tok.eos_token_ids))
    assert eos in tok.special_ids
    generated = ids[:-1] + [eos]

    class Replay:
        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return None

        def __aiter__(self):
            return self._events()

        async def _events(self):
            for i, t in enumerate(generated):
                yield TokenEvent(t, 0.0, [], "eos_token" if i == len(generated) - 1 else None)

    async def run():
        return [pair async for pair in token_texts(generate_text(Replay(), tok, []), tok.special_ids)]

    pairs = asyncio.run(run())
    joined = "".join(text for chunk, text in pairs if chunk.token.token_id not in tok.special_ids)
    assert joined == "".join(chunk.text for chunk, _ in pairs) == tok.decode(generated)
    assert joined.endswith("\ufffd")
