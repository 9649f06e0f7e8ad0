"""The OpenAI Responses API: `POST /v1/responses` (stream or not) and `GET /v1/responses/{id}`.

A request is a chat turn underneath: its input items become template messages (router/responses_schema.py), and
the answer is read like a chat answer (router/chat_output.py) into output items: reasoning, a message, function
calls. `previous_response_id` continues a stored conversation (ResponseStore: bounded in entries, characters and
age; a miss is a 404).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse

from common.defaults import RESPONSES_STORE_CHARS, RESPONSES_STORE_ENTRIES, RESPONSES_STORE_TTL_S
from router.backend import Backend, parse_body
from router.chat_output import AnswerFormat, ChatAnswer
from router.chat_prompt import render_prompt
from router.errors import APIError
from router.generation import GenerationFailed
from router.openai_output import FINISH_REASONS
from router.responses_schema import ResponsesRequest
from router.sse import sse_response
from router.text_stream import generate_text


@dataclass(slots=True)
class _Stored:
    response: dict
    messages: list[dict]  # the whole conversation so far (without instructions), this answer included
    chars: int
    created: float


class ResponseStore:
    """Stored responses for `previous_response_id`: at most `max_entries` and `max_chars` of conversation,
    each for `ttl_s` seconds; the oldest go first."""

    def __init__(self, max_entries: int = RESPONSES_STORE_ENTRIES, max_chars: int = RESPONSES_STORE_CHARS,
                 ttl_s: float = RESPONSES_STORE_TTL_S):
        self.max_entries, self.max_chars, self.ttl_s = max_entries, max_chars, ttl_s
        self._entries: OrderedDict[str, _Stored] = OrderedDict()
        self._chars = 0

    def put(self, response: dict, messages: list[dict]) -> None:
        chars = len(json.dumps(messages, ensure_ascii=False)) + len(json.dumps(response, ensure_ascii=False))
        if chars > self.max_chars:
            return  # larger than the whole store: never kept
        self._entries[response["id"]] = _Stored(response, messages, chars, time.monotonic())
        self._chars += chars
        while len(self._entries) > self.max_entries or self._chars > self.max_chars:
            self._drop_oldest()

    def get(self, response_id: str, param: str) -> _Stored:
        self._expire()
        stored = self._entries.get(response_id)
        if stored is None:
            raise APIError(404, f"no stored response '{response_id[:128]}' (never stored, or expired)", param=param,
                           code="response_not_found")
        return stored

    def _expire(self) -> None:
        now = time.monotonic()
        while self._entries and now - next(iter(self._entries.values())).created > self.ttl_s:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, stored = self._entries.popitem(last=False)
        self._chars -= stored.chars


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Output:
    """The answer's output items, built as its parts arrive; with `events`, the stream's events too."""

    def __init__(self):
        self.items: list[dict] = []
        self.events: list[dict] = []
        self._open: tuple | None = None  # (kind, tool index) of the item being written

    def add(self, parts: list[tuple]) -> None:
        for part in parts:
            kind = ("tool", part[1]) if part[0] == "tool" else (part[0], None)
            if kind != self._open:
                self.close()
                self._start(part)
            self._extend(part)

    def _start(self, part: tuple) -> None:
        if part[0] == "reasoning":
            item = {"type": "reasoning", "id": _item_id("rs"), "summary": [],
                    "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"}
        elif part[0] == "content":
            item = {"type": "message", "id": _item_id("msg"), "status": "in_progress", "role": "assistant",
                    "content": []}
        else:
            item = {"type": "function_call", "id": _item_id("fc"), "call_id": part[2], "name": part[3],
                    "arguments": "", "status": "in_progress"}
        self.items.append(item)
        self._open = ("tool", part[1]) if part[0] == "tool" else (part[0], None)
        self._event("response.output_item.added", item=dict(item))
        if part[0] == "content":
            item["content"].append({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            self._event("response.content_part.added", item_id=item["id"], content_index=0,
                        part=dict(item["content"][0]))

    def _extend(self, part: tuple) -> None:
        item = self.items[-1]
        where = {"item_id": item["id"], "output_index": len(self.items) - 1}
        if part[0] == "reasoning":
            item["content"][0]["text"] += part[1]
            self._event("response.reasoning_text.delta", content_index=0, delta=part[1], **where)
        elif part[0] == "content":
            item["content"][0]["text"] += part[1]
            self._event("response.output_text.delta", content_index=0, delta=part[1], logprobs=[], **where)
        elif part[4]:
            item["arguments"] += part[4]
            self._event("response.function_call_arguments.delta", delta=part[4], **where)

    def close(self) -> None:
        """Ends the item being written (its `.done` events)."""
        if self._open is None:
            return
        item, self._open = self.items[-1], None
        item["status"] = "completed"
        where = {"item_id": item["id"], "output_index": len(self.items) - 1}
        if item["type"] == "reasoning":
            self._event("response.reasoning_text.done", content_index=0, text=item["content"][0]["text"], **where)
        elif item["type"] == "message":
            text_part = item["content"][0]
            self._event("response.output_text.done", content_index=0, text=text_part["text"], logprobs=[], **where)
            self._event("response.content_part.done", content_index=0, part=text_part, **where)
        else:
            self._event("response.function_call_arguments.done", name=item["name"], arguments=item["arguments"],
                        **where)
        self._event("response.output_item.done", output_index=where["output_index"], item=item)

    def _event(self, kind: str, **fields) -> None:
        fields.setdefault("output_index", len(self.items) - 1)
        self.events.append({"type": kind, **fields})

    def messages(self) -> list[dict]:
        """The answer as template messages (to continue the conversation from)."""
        content = "".join(i["content"][0]["text"] for i in self.items if i["type"] == "message")
        reasoning = "".join(i["content"][0]["text"] for i in self.items if i["type"] == "reasoning")
        calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
                 for i in self.items if i["type"] == "function_call"]
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        if reasoning:
            message["reasoning_content"] = reasoning
        return [message]


def _response(body: ResponsesRequest, response_id: str, model: str, created: int, status: str, output: list[dict],
              usage: dict | None, incomplete: str | None = None) -> dict:
    fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format else \
        {"type": "text"}
    choice = body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice
    return {
        "id": response_id, "object": "response", "created_at": created, "status": status, "error": None,
        "incomplete_details": {"reason": incomplete} if incomplete else None, "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens, "model": model, "output": output,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id, "reasoning": {"effort": None, "summary": None},
        "store": body.store, "temperature": body.temperature, "text": {"format": fmt},
        "tool_choice": choice or "auto", "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
        "top_p": body.top_p, "truncation": "disabled", "usage": usage, "user": body.user,
        "metadata": body.metadata or {},
    }


def _usage(prompt_tokens: int, output_tokens: int) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}


async def create(request: Request):
    backend: Backend = request.app.state.backend
    store: ResponseStore = request.app.state.responses
    body: ResponsesRequest = await parse_body(request, ResponsesRequest)
    history = store.get(body.previous_response_id, "previous_response_id").messages \
        if body.previous_response_id else []
    adapter, tokenizer = await backend.resolve_model(body.model)
    conversation = history + body.messages()
    instructions = [{"role": "system", "content": body.instructions}] if body.instructions else []
    tools = body.chat_tools
    prompt = await render_prompt(backend, adapter, tokenizer, instructions + conversation, tools)
    grammar, param = body.grammar()
    grammar = await backend.grammars.prepare(grammar, param) if grammar else ""
    cfg = backend.config
    answer_format = AnswerFormat.of(tokenizer.chat_template, prompt.text, tools, bool(grammar), cfg.tool_call_parser,
                                    cfg.reasoning_parser, body.parallel_tool_calls)
    backend.check_token_ids(body.logit_bias_ids(), "logit_bias", adapter)
    max_new = backend.check_lengths(prompt.input_ids, body.max_output_tokens, None, "input", "max_output_tokens")
    generation_request = backend.generation_request(prompt.input_ids, max_new, adapter, tokenizer, body.sampling(),
                                                    grammar=grammar, priority=body.priority)
    generation = backend.scheduler.generate_all([generation_request])[0]
    response_id, created = _item_id("resp"), int(time.time())
    model = body.model or cfg.model_id
    answer, output = ChatAnswer(answer_format), _Output()

    async def run():
        """Yields the stream's events as they come; the last one is response.completed."""
        tokens, finish = 0, None
        async for chunk in generate_text(generation, tokenizer, []):
            tokens += 1
            output.add(answer.feed(chunk.text) + (answer.finish() if chunk.finish_reason else []))
            finish = chunk.finish_reason or finish
            yield
        output.close()
        incomplete = "max_output_tokens" if FINISH_REASONS.get(finish) == "length" else None
        final = _response(body, response_id, model, created, "incomplete" if incomplete else "completed",
                          output.items, _usage(len(prompt.input_ids), tokens), incomplete)
        if body.store:
            store.put(final, conversation + output.messages())
        output.events.append({"type": "response.completed" if not incomplete else "response.incomplete",
                              "response": final})

    if not body.stream:
        try:
            async for _ in run():
                pass
        except GenerationFailed as e:
            raise APIError(500 if e.server_error else 400, str(e)) from None
        return JSONResponse(output.events[-1]["response"])
    return sse_response(_events(body, response_id, model, created, run(), output))


async def _events(body: ResponsesRequest, response_id: str, model: str, created: int, steps, output: _Output):
    """The Responses stream: response.created, response.in_progress, the items' events, response.completed."""
    started = _response(body, response_id, model, created, "in_progress", [], None)
    output.events += [{"type": "response.created", "response": started},
                      {"type": "response.in_progress", "response": started}]
    number = 0
    try:
        async for _ in steps:
            for event in output.events:
                yield _frame(event, number)
                number += 1
            output.events.clear()
    except GenerationFailed as e:
        error = APIError(500 if e.server_error else 400, str(e)).openai_body()["error"]
        output.events.append({"type": "error", "code": error["code"], "message": error["message"], "param": None})
    for event in output.events:
        yield _frame(event, number)
        number += 1


def _frame(event: dict, number: int) -> bytes:
    """One SSE event as OpenAI frames the Responses stream: the type as the event name, then its data."""
    payload = json.dumps({**event, "sequence_number": number}, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {payload}\n\n".encode()


async def retrieve(request: Request):
    store: ResponseStore = request.app.state.responses
    return JSONResponse(store.get(request.path_params["response_id"], "response_id").response)
