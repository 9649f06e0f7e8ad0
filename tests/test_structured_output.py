"""Structured output: JSON schemas enforced by token masks in the shard, even on a random-weight model,
sharing the batch with free requests (which stay token-exact)."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import pytest

NAME = {"type": "string", "maxLength": 12}
SMALL_INT = {"type": "integer", "minimum": 0, "maximum": 999}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME}, "required": ["name"], "additionalProperties": False},
    {"type": "object", "properties": {"age": SMALL_INT}, "required": ["age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "maxItems": 3}}, "required": ["tags"],
     "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": SMALL_INT, "y": SMALL_INT},
                                                "required": ["x", "y"], "additionalProperties": False}},
     "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"value": {"anyOf": [SMALL_INT, {"type": "boolean"}]}}, "required": ["value"],
     "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "pirate"}, "ships": SMALL_INT}, "required": ["kind", "ships"],
     "additionalProperties": False},
    {"type": "array", "items": SMALL_INT, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"maybe": {"type": ["string", "null"], "maxLength": 8}}, "required": ["maybe"],
     "additionalProperties": False},
    {"type": "object", "properties": {"a": NAME, "b": SMALL_INT, "c": {"type": "boolean"}},
     "required": ["a", "b", "c"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
     "required": ["code"], "additionalProperties": False},
    {"type": "object", "properties": {"list": {"type": "array", "items": {"type": "object", "properties": {
        "id": SMALL_INT}, "required": ["id"], "additionalProperties": False}, "maxItems": 2}}, "required": ["list"],
     "additionalProperties": False},
    {"type": "integer", "minimum": 10, "maximum": 20},
    {"type": "boolean"},
    {"enum": ["yes", "no", 3]},
    {"type": "string", "maxLength": 5},
    {"type": "object", "properties": {"n": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["n"],
     "additionalProperties": False},
    {"$defs": {"item": {"type": "object", "properties": {"sku": NAME}, "required": ["sku"],
                        "additionalProperties": False}},
     "type": "object", "properties": {"item": {"$ref": "#/$defs/item"}}, "required": ["item"],
     "additionalProperties": False},
    {"type": "object", "properties": {"date": {"type": "string", "format": "date"}}, "required": ["date"],
     "additionalProperties": False},
    {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                      "y": {"enum": ["a", "b"]}}, "required": ["x", "y"],
     "additionalProperties": False},
    {"type": "object", "properties": {"empty": {"type": "array", "maxItems": 0}}, "required": ["empty"],
     "additionalProperties": False},
]


def chat(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"model": "", "messages": [
        {"role": "user", "content": "Answer in JSON."}], "max_tokens": 120, **body}, timeout=120)


def test_twenty_schemas_validate_while_free_requests_stay_exact(server, reference, llama_dir, tokenizer):
    free_prompt = "The quick brown fox"

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            constrained = [client.post(f"{server.url}/v1/chat/completions", json={
                "model": "", "messages": [{"role": "user", "content": f"Schema {i}, in JSON."}], "max_tokens": 120,
                "temperature": 0.0 if i % 2 else 1.0, "seed": i,
                "response_format": {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema,
                                                                            "strict": True}}})
                for i, schema in enumerate(SCHEMAS)]
            free = client.post(f"{server.url}/generate", json={"inputs": free_prompt, "parameters": {
                "max_new_tokens": 30, "details": True}})
            return await asyncio.gather(free, *constrained)

    free, *constrained = asyncio.run(run())
    want = reference.greedy(llama_dir, tokenizer(free_prompt)["input_ids"], 30)
    assert [t["id"] for t in free.json()["details"]["tokens"]] == want
    assert len(SCHEMAS) >= 20
    for schema, r in zip(SCHEMAS, constrained):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", (schema, choice)
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_json_object_mode(server):
    r = chat(server.url, {"response_format": {"type": "json_object"}, "temperature": 0.7, "seed": 1})
    assert r.status_code == 200
    content = r.json()["choices"][0]["message"]["content"]
    if r.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # a random model may fill an unbounded object until max_tokens; it is still a JSON prefix
        assert content.startswith("{")


def test_streamed_constrained_output_validates(server):
    schema = SCHEMAS[10]
    text = ""
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={
            "model": "", "messages": [{"role": "user", "content": "JSON please"}], "max_tokens": 120, "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
            timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and "[DONE]" not in line:
                for choice in json.loads(line[5:])["choices"]:
                    text += choice["delta"].get("content") or ""
    jsonschema.validate(json.loads(text), schema)


def test_lorax_response_format(server):
    schema = SCHEMAS[1]
    r = httpx.post(f"{server.url}/generate", json={"inputs": "Give me JSON", "parameters": {
        "max_new_tokens": 60, "response_format": {"type": "json_object", "schema": schema}}}, timeout=120)
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["generated_text"]), schema)


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}},
    {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "string", "pattern": "[a-z"}}},
    {"type": "xml"},
])
def test_bad_schema_is_a_400(server, fmt):
    r = chat(server.url, {"response_format": fmt})
    assert r.status_code == 400 and "response_format" in r.json()["error"]["message"]
    assert chat(server.url, {"max_tokens": 2}).status_code == 200


def test_schema_past_the_grammar_bound_is_a_400(server):
    """A ~630 KB schema (the probe's) would take the shards over half a second to compile: refused at the edge."""
    big = {"type": "object", "properties": {f"field_{i}_{'x' * 40}": {"enum": [f"v{i}_{j}" for j in range(5)]}
                                            for i in range(3400)}}
    r = chat(server.url, {"response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": big}}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "response_format" and "262144" in r.json()["error"]["message"]


def test_a_prepared_grammar_is_never_compiled_on_the_engine_thread(llama_dir, monkeypatch):
    """PrepareGrammar compiles into the shard's cache; the step's matcher then only copies (its compile path
    would raise here)."""
    from router.structured import json_grammar
    from shard.grammar import Grammars

    from transformers import AutoConfig

    grammars = Grammars(str(llama_dir), AutoConfig.from_pretrained(llama_dir).vocab_size)
    grammar = json_grammar(SCHEMAS[0])
    assert grammars.prepare(grammar) == ""
    assert grammars.prepare(json_grammar({"type": "string", "pattern": "[a-z"})).startswith("bad grammar")
    monkeypatch.setattr(grammars, "_compile", lambda g: pytest.fail("compiled on the step path"))
    assert not grammars.matcher(grammar).is_error()
