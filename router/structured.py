"""Structured output and tool calls: request fields → an llguidance grammar that the shards enforce with
token masks, and generated text → OpenAI `tool_calls`.

llguidance (see README: dependencies) compiles JSON schemas lazily and computes a token mask in tens of
microseconds, so constrained and free requests share a batch at almost no cost.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import uuid

import llguidance
import llguidance.hf

from common.limits import MAX_GRAMMAR_CHARS
from router.errors import bad_request
from router.shard_client import ShardClient
from router.tokenization import ModelTokenizer

# Compact JSON: a random or weak model cannot wander off into endless whitespace, and it is what
# OpenAI's own structured outputs produce.
JSON_OPTIONS = {"whitespace_flexible": False}
TOOL_CALL_TAG = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def json_grammar(schema: dict | bool) -> str:
    schema = {} if schema is True else dict(schema)
    schema.setdefault("x-guidance", JSON_OPTIONS)
    return llguidance.LLMatcher.grammar_from_json_schema(schema)


def response_format_grammar(response_format: dict | None, param: str = "response_format") -> str:
    """OpenAI's `{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}` and
    LoRAX's `{"type": "json_object", "schema": {...}}`; "" means unconstrained."""
    if not response_format:
        return ""
    kind = response_format.get("type")
    if kind == "text":
        return ""
    if kind == "json_object":
        schema = response_format.get("schema") or {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad_request("`response_format.json_schema` must be an object with a `schema` object",
                              param=f"{param}.json_schema")
        schema = spec.get("schema") or {}
    else:
        raise bad_request(f"`{param}.type` must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                          param=f"{param}.type")
    if not isinstance(schema, dict):
        raise bad_request(f"`{param}` schema must be a JSON object", param=param)
    return json_grammar(schema)


def tool_call_schema(tool: dict) -> dict:
    function = tool["function"]
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_choice_grammar(tools: list[dict], tool_choice) -> str:
    """`required` → one call to any tool; a named function → a call to that one; else unconstrained."""
    if tool_choice == "required":
        return json_grammar({"anyOf": [tool_call_schema(t) for t in tools]})
    if isinstance(tool_choice, dict):
        name = tool_choice.get("function", {}).get("name")
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise bad_request(f"`tool_choice` names function {name!r}, which is not in `tools`", param="tool_choice")
        return json_grammar(tool_call_schema(chosen[0]))
    return ""


def parse_tool_call(text: str, tools: list[dict]) -> dict | None:
    """A generated `{"name": ..., "arguments": {...}}` (bare, or in <tool_call> tags) as an OpenAI tool call."""
    match = TOOL_CALL_TAG.search(text)
    candidate = (match.group(1) if match else text).strip()
    try:
        call = json.loads(candidate)
    except json.JSONDecodeError:
        return None
    names = {t["function"]["name"] for t in tools}
    if not isinstance(call, dict) or call.get("name") not in names:
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


class GrammarChecker:
    """Admits a request's grammar before the request is queued: bounded in size, validated off the event loop
    (a bad schema is a 400 naming the field; results cached per grammar), then compiled by every shard on a
    thread of its own (`shards`), so that no batch step waits for a compilation."""

    def __init__(self, tokenizer: ModelTokenizer, shards: ShardClient | None = None):
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer.hf)
        self._shards = shards
        self.check = functools.lru_cache(maxsize=1024)(self._check)

    async def prepare(self, grammar: str, param: str) -> str:
        """`grammar`, checked and compiled on the shards; raises a 400 naming `param` when it is unusable."""
        if len(grammar) > MAX_GRAMMAR_CHARS:
            raise bad_request(f"`{param}` compiles to a grammar of {len(grammar)} characters, more than "
                              f"{MAX_GRAMMAR_CHARS}: use a smaller schema", param=param)
        await asyncio.to_thread(self.check, grammar, param)
        if self._shards is not None and (error := await self._shards.prepare_grammar(grammar)):
            raise bad_request(f"`{param}` is not a usable schema: {error}", param=param)
        return grammar

    def _check(self, grammar: str, param: str) -> str:
        error = llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer)
        if error:
            raise bad_request(f"`{param}` is not a usable schema: {error}", param=param)
        return grammar
