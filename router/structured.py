"""Structured output and tool calls: request fields → an llguidance grammar that the shards enforce with
token masks, and generated text → OpenAI `tool_calls`.

llguidance (see README: dependencies) compiles JSON schemas lazily and computes a token mask in tens of
microseconds, so constrained and free requests share a batch at almost no cost.
"""

from __future__ import annotations

import asyncio
import functools
import json

import llguidance
import llguidance.hf
from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

from common.limits import MAX_GRAMMAR_CHARS, MAX_PARALLEL_TOOL_CALLS
from router.errors import bad_request
from router.shard_client import ShardClient
from router.tokenization import ModelTokenizer

# Compact JSON: a random or weak model cannot wander off into endless whitespace, and it is what
# OpenAI's own structured outputs produce.
JSON_OPTIONS = {"whitespace_flexible": False}


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
        if spec.get("strict") is True:  # OpenAI's strict mode: only the declared properties
            schema = closed(schema)
    else:
        raise bad_request(f"`{param}.type` must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                          param=f"{param}.type")
    if not isinstance(schema, dict):
        raise bad_request(f"`{param}` schema must be a JSON object", param=param)
    return json_grammar(schema)


def guided_grammar(kind: str, value, param: str) -> str:
    """vLLM's guided_* / structured_outputs constraints as an llguidance grammar: a JSON schema (an object or its
    JSON text), a regular expression, a choice of literal strings, or a grammar in Lark (llguidance's, as vLLM's
    guidance backend takes) or GBNF (llama.cpp's, as vLLM's xgrammar backend takes)."""
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise bad_request(f"`{param}` is not a JSON schema: not valid JSON", param=param) from None
        if not isinstance(value, (dict, bool)):
            raise bad_request(f"`{param}` must be a JSON schema (an object)", param=param)
        return json_grammar(value)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        # Lark string literals take JSON's escapes: every choice is matched exactly, whatever it holds.
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
    try:
        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(value))
    except (GbnfToLarkError, ValueError) as e:
        raise bad_request(f"`{param}` is not a usable grammar: {e}", param=param) from None


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def closed(schema):
    """`schema` with every object schema that does not say otherwise closed (`additionalProperties: false`): an
    answer then holds only the properties the schema declares, each at most once, and it ends when its value
    closes. A schema that allows more (`additionalProperties`, `patternProperties`) keeps it."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(s) for name, s in out[key].items()}
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), dict):
            out[key] = closed(out[key])
    is_object = out.get("type") == "object" or (isinstance(out.get("type"), list) and "object" in out["type"]) \
        or "properties" in out
    if is_object and not {"additionalProperties", "patternProperties", "unevaluatedProperties"} & out.keys():
        out["additionalProperties"] = False
    return out


def tool_call_schema(tool: dict) -> dict:
    function = tool["function"]
    parameters = closed(function.get("parameters") or {"type": "object", "properties": {}})
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_choice_grammar(tools: list[dict], tool_choice, parallel: bool = False) -> str:
    """`required` → calls to any of the tools (a list of up to MAX_PARALLEL_TOOL_CALLS when `parallel`, else
    one); a named function → one call to that one; else unconstrained. Parameters are closed (`closed`)."""
    if tool_choice == "required":
        call = {"anyOf": [tool_call_schema(t) for t in tools]}
        if not parallel:
            return json_grammar(call)
        return json_grammar({"type": "array", "items": call, "minItems": 1, "maxItems": MAX_PARALLEL_TOOL_CALLS})
    if isinstance(tool_choice, dict):
        name = tool_choice.get("function", {}).get("name")
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise bad_request(f"`tool_choice` names function {name!r}, which is not in `tools`", param="tool_choice")
        return json_grammar(tool_call_schema(chosen[0]))
    return ""


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
