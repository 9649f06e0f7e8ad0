"""Bad input gets a clear 4xx naming the problem, in the route's error shape; the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from launcher.tiny_model import build_tiny_model
from tests.conftest import LoomServer

LIMITS = ["--max-input-length", "32", "--max-total-tokens", "64"]
LONG = "The quick brown fox jumps over the lazy dog. " * 20
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]

BAD_OPENAI = [
    (CHAT, {"model": "", "messages": [{"role": "user", "content": LONG}]}, 400, "max-input-length"),
    (COMP, {"model": "", "prompt": LONG}, 400, "max-input-length"),
    (CHAT, {"model": "", "messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    (COMP, {"model": "", "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    (CHAT, {"model": "", "messages": USER, "max_tokens": 1000}, 400, "max-total-tokens"),
    (CHAT, {"model": "", "messages": USER, "max_completion_tokens": 1000}, 400, "max_completion_tokens"),
    (CHAT, {"model": "", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    (CHAT, {"model": "", "messages": []}, 400, "messages"),
    (CHAT, {"model": "", "messages": "hello"}, 400, "messages"),
    (CHAT, {"model": "", "messages": USER, "max_tokens": "ten"}, 400, "max_tokens"),
    (CHAT, {"model": "", "messages": USER, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"model": "", "messages": USER, "temperature": 7}, 400, "temperature"),
    (CHAT, {"model": "", "messages": USER, "top_p": 0}, 400, "top_p"),
    (CHAT, {"model": "", "messages": USER, "priority": 2**31}, 400, "priority"),
    (CHAT, {"model": "", "messages": USER, "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    (CHAT, {"model": "", "messages": USER, "stop_token_ids": list(range(65))}, 400, "stop_token_ids"),
    (CHAT, {"model": "", "messages": USER, "chat_template_kwargs": {"tokenize": True}}, 400, "chat_template_kwargs"),
    (CHAT, {"model": "", "messages": USER, "chat_template": "x" * 70000}, 400, "chat_template"),
    (CHAT, {"model": "", "messages": USER, "continue_final_message": True, "add_generation_prompt": False}, 400,
     "continue_final_message"),
    (CHAT, {"model": "", "messages": USER, "chat_template": "{{ raise_exception('no') }}"}, 400, "chat_template"),
    (CHAT, {"model": "", "messages": USER, "guided_regex": "a", "guided_choice": ["b"]}, 400, "guided_choice"),
    (CHAT, {"model": "", "messages": USER, "guided_json": "{not json"}, 400, "guided_json"),
    (CHAT, {"model": "", "messages": USER, "guided_choice": []}, 400, "guided_choice"),
    (CHAT, {"model": "", "messages": USER, "guided_grammar": "root ::= (("}, 400, "guided_grammar"),
    (CHAT, {"model": "", "messages": USER, "structured_outputs": {"regex": "a", "choice": ["b"]}}, 400,
     "structured_outputs.choice"),
    (CHAT, {"model": "", "messages": USER, "structured_outputs": {"structural_tag": "x"}}, 400, "structural_tag"),
    (CHAT, {"model": "", "messages": USER, "logit_bias": {"5": 101}}, 400, "logit_bias"),
    (CHAT, {"model": "", "messages": USER, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    (CHAT, {"model": "", "messages": USER, "logit_bias": {"1000000": 1}}, 400, "logit_bias"),
    (COMP, {"model": "", "prompt": "hi", "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    (COMP, {"model": "", "prompt": "hi", "prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs"),
    (CHAT, {"model": "", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages.0.content"),
    (CHAT, {"model": "", "messages": USER, "n": 0}, 400, "n"),
    (COMP, {"model": "", "prompt": "hi", "best_of": 1, "n": 2}, 400, "best_of"),
    (CHAT, {"model": "", "messages": USER, "frobnicate": True}, 400, "frobnicate"),
    (COMP, {"model": "", "prompt": [1, 2, 10**9]}, 400, "prompt"),
    (COMP, {"model": "", "prompt": 12}, 400, "prompt"),
    (CHAT, {"model": "no-such/adapter", "messages": USER}, 404, "no-such/adapter"),
]

BAD_NATIVE = [
    ("/generate", {"parameters": {"max_new_tokens": 5}}, 400, "inputs"),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 0}}, 400, "max_new_tokens"),
    ("/generate", {"inputs": "hi", "parameters": {"temperature": 0}}, 400, "temperature"),
    ("/generate", {"inputs": "hi", "parameters": {"top_p": 1.5}}, 400, "top_p"),
    ("/generate", {"inputs": LONG}, 400, "max-input-length"),
    ("/generate_stream", {"inputs": "hi", "parameters": {"max_new_tokens": 999}}, 400, "max-total-tokens"),
    ("/", {"inputs": "hi", "parameters": {"adapter_id": "ghost/lora"}}, 404, "ghost/lora"),
    ("/detokenize", {"tokens": [10**6]}, 400, "tokens"),
    ("/tokenize", {"prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
]


@pytest.fixture(scope="module")
def limited(llama_dir):
    srv = LoomServer(llama_dir, *LIMITS).start()
    yield srv
    srv.stop()


def assert_still_serving(url: str) -> None:
    r = httpx.post(f"{url}/v1/completions", json={"model": "", "prompt": "hi", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("path,body,status,needle", BAD_OPENAI, ids=[f"{p}:{n}" for p, _, _, n in BAD_OPENAI])
def test_bad_openai_request(limited, path, body, status, needle):
    r = httpx.post(limited.url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert_still_serving(limited.url)


@pytest.mark.parametrize("path,body,status,needle", BAD_NATIVE, ids=[f"{p}:{n}" for p, _, _, n in BAD_NATIVE])
def test_bad_native_request(limited, path, body, status, needle):
    r = httpx.post(limited.url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"] and r.json()["error_type"]
    assert_still_serving(limited.url)


@pytest.mark.parametrize("path", [CHAT, COMP, "/generate"])
def test_malformed_json(limited, path):
    r = httpx.post(limited.url + path, content=b'{"model": "", "messages": [', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.text
    assert_still_serving(limited.url)


def test_unknown_route_is_404_in_error_shape(limited):
    r = httpx.get(f"{limited.url}/v1/nothing", timeout=10)
    assert r.status_code == 404 and "error" in r.json()


def test_chat_without_template_is_a_clear_4xx(tmp_path):
    model = build_tiny_model(tmp_path / "plain", "llama", chat_template=False)
    srv = LoomServer(model).start()
    try:
        r = httpx.post(f"{srv.url}{CHAT}", json={"model": "", "messages": USER}, timeout=60)
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
        assert_still_serving(srv.url)
    finally:
        srv.stop()


def test_api_key_guards_every_route_but_health(llama_dir):
    srv = LoomServer(llama_dir, "--api-key", "sekret").start()
    try:
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200
        r = httpx.post(f"{srv.url}{COMP}", json={"model": "", "prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        ok = httpx.post(f"{srv.url}{COMP}", json={"model": "", "prompt": "hi", "max_tokens": 2}, timeout=30,
                        headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
    finally:
        srv.stop()
