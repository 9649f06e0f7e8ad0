"""API fuzzing: random JSON (wrong types, huge numbers, unicode, unknown keys) at every route never gets a
5xx, and a stream never ends in a server error."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import LoomServer
from tests.operating import SMALL_KV

# Small limits: whatever the fuzzer asks for, a generation stays short.
LIMITS = ["--max-input-length", "16", "--max-total-tokens", "32", *SMALL_KV]
POST_ROUTES = ["/v1/chat/completions", "/v1/completions", "/generate", "/generate_stream", "/", "/tokenize"]
GET_ROUTES = ["/v1/models", "/health", "/info", "/metrics"]
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "n", "stream", "stream_options", "stop", "seed", "logprobs", "top_logprobs", "echo", "best_of",
          "ignore_eos", "inputs", "parameters", "max_new_tokens", "adapter_id", "details", "truncate", "role",
          "content", "decoder_input_details", "return_k_alternatives", "frequency_penalty", "min_p"]

scalars = st.one_of(
    st.none(), st.booleans(), st.text(max_size=40),
    st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, 1, 2, -1, 3, 31, 2**31, 2**63]),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(["", "\u0000", "🦙" * 10, "\ud7ff", "A" * 500]),
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


@settings(max_examples=30, deadline=None)
@given(route=st.sampled_from(GET_ROUTES + POST_ROUTES), method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
       query=st.text(max_size=20))
def test_methods_and_queries(fuzzed, route, method, query):
    check(fuzzed.request(method, route, params={"q": query}))
