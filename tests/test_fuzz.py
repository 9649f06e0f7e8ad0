"""API fuzzing: random JSON (wrong types, numbers past every proto type, unicode, unknown keys) and hostile raw
bodies (deep nesting, NaN, endless digits, lone surrogates) at every route never get a 5xx, a stream never ends
in a server error, and afterwards the server holds no KV block and answers /health."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import LoomServer
from tests.operating import SMALL_KV, kv_idle, wait_until

# Small limits: whatever the fuzzer asks for, a generation stays short.
LIMITS = ["--max-input-length", "16", "--max-total-tokens", "32", *SMALL_KV]
POST_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/generate", "/generate_stream", "/",
               "/tokenize", "/detokenize"]
GET_ROUTES = ["/v1/models", "/health", "/info", "/metrics"]
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "n", "stream", "stream_options", "stop", "seed", "logprobs", "top_logprobs", "echo", "best_of",
          "ignore_eos", "inputs", "parameters", "max_new_tokens", "adapter_id", "details", "truncate", "role",
          "content", "decoder_input_details", "return_k_alternatives", "frequency_penalty", "min_p", "min_tokens",
          "repetition_penalty", "typical_p", "adapter_source", "api_token", "input", "instructions", "tools",
          "tool_choice", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
          "logit_bias", "stop_token_ids", "priority", "chat_template", "chat_template_kwargs", "prompt_logprobs",
          "continue_final_message", "add_generation_prompt", "tokens", "previous_response_id", "text"]

scalars = st.one_of(
    st.none(), st.booleans(), st.text(max_size=40),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, -1, 3, 31, 2**31, 2**32, 2**40, 2**63, 2**64, -(2**63) - 1, 10**6]),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1e308, -1e308, 5e-324]),
    st.sampled_from(["", "\u0000", "🦙" * 10, "\ud7ff", "A" * 500, "a\nb", "../../../../dev/zero",
                     "org/x@../../../etc", "hub", "HUB", "s3", "/etc/passwd"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
bodies = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6)
# Mostly well-formed requests with one field gone wrong, so the fuzzer gets past the first check.
CHAT = {"model": "", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
COMP = {"model": "", "prompt": "hi", "max_tokens": 3}
NATIVE = {"inputs": "hi", "parameters": {"max_new_tokens": 3}}
near_valid = st.tuples(st.sampled_from([CHAT, COMP, NATIVE]), st.sampled_from(FIELDS), values).map(
    lambda t: {**t[0], t[1]: t[2]})
param_mutations = st.tuples(st.sampled_from(FIELDS), values).map(
    lambda t: {**NATIVE, "parameters": {"max_new_tokens": 3, t[0]: t[1]}})


@pytest.fixture(scope="module")
def fuzzed(llama_dir):
    srv = LoomServer(llama_dir, *LIMITS).start()
    client = httpx.Client(base_url=srv.url, timeout=60)
    yield client
    client.close()
    assert srv.stop() == 0


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.request.url, response.request.content, response.text)
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                error = event.get("error")
                assert not (isinstance(error, dict) and error.get("type") == "server_error"), line
                assert event.get("error_type") not in ("generation", "unhealthy"), line


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(route=st.sampled_from(POST_ROUTES), body=st.one_of(bodies, near_valid, param_mutations))
def test_random_json_bodies(fuzzed, route, body):
    check(fuzzed.post(route, json=body))


@FUZZ
@given(route=st.sampled_from(POST_ROUTES), raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_random_bytes(fuzzed, route, raw):
    check(fuzzed.post(route, content=raw, headers={"content-type": "application/json"}))


def hostile_value() -> st.SearchStrategy[bytes]:
    """JSON text that Python's json module reads in surprising ways, or not at all."""
    return st.one_of(
        st.integers(50, 3000).map(lambda d: b"[" * d + b"]" * d),
        st.integers(50, 3000).map(lambda d: b'{"a":' * d + b"1" + b"}" * d),
        st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b'"\\ud800"', b'"\\udfff x"',
                         b'"\\ud800\\ud800"', b"9" * 5000, b"-" + b"1" * 4400, b"1." + b"0" * 5000]),
    )


@FUZZ
@given(route=st.sampled_from(POST_ROUTES), template=st.sampled_from([CHAT, COMP, NATIVE]),
       key=st.sampled_from(FIELDS), value=hostile_value())
def test_hostile_raw_bodies(fuzzed, route, template, key, value):
    body = json.dumps({k: v for k, v in template.items() if k != key})[:-1].encode()
    raw = body + (b", " if len(body) > 1 else b"") + json.dumps(key).encode() + b": " + value + b"}"
    check(fuzzed.post(route, content=raw, headers={"content-type": "application/json"}))


@settings(max_examples=30, deadline=None)
@given(route=st.sampled_from(GET_ROUTES + POST_ROUTES), method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
       query=st.text(max_size=20))
def test_methods_and_queries(fuzzed, route, method, query):
    check(fuzzed.request(method, route, params={"q": query}))


def test_nothing_is_left_behind(fuzzed):
    """Runs last: whatever the fuzzers sent, every KV block is free again and /health answers."""
    url = str(fuzzed.base_url).rstrip("/")
    assert wait_until(lambda: kv_idle(url), 10)
    assert fuzzed.get("/health").status_code == 200
