"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import math
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse

from router.adapters import Adapter
from router.backend import Backend, parse_body, sampling_parameters
from router.errors import APIError, bad_request
from router.scheduler import GenerationFailed
from router.sse import DONE, sse_event, sse_response
from router.text_stream import TextChunk, generate_text
from router.tokenization import ChatTemplateError, ModelTokenizer

FINISH_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def as_template_input(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        message = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields chat and legacy completions share (OpenAI's, plus vLLM's common extensions)."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    def sampling(self):
        return sampling_parameters(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty, seed=self.seed,
        )


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError("only one prompt per request is supported")
            return prompt[0]
        return prompt


def _backend(request: Request) -> Backend:
    return request.app.state.backend


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _safe_logprob(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


class _Completion:
    """The state one OpenAI response is built from, for both routes and both stream modes."""

    def __init__(self, backend: Backend, tokenizer: ModelTokenizer, body: _Sampling, kind: str, prompt_tokens: int,
                 top_logprobs: int | None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.body = body
        self.kind = kind  # "chat" or "text"
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = body.model or backend.config.model_id
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.top_logprobs = top_logprobs  # None: no logprobs asked

    def token_logprobs(self, chunk: TextChunk) -> dict | None:
        if self.top_logprobs is None:
            return None
        tok = self.tokenizer
        event = chunk.token
        top = event.top_tokens[: self.top_logprobs]
        if self.kind == "chat":
            def entry(tid: int, lp: float) -> dict:
                text = tok.decode_token(tid)
                return {"token": text, "logprob": _safe_logprob(lp), "bytes": list(text.encode())}
            item = entry(event.token_id, event.logprob)
            item["top_logprobs"] = [entry(t, lp) for t, lp in top]
            return {"content": [item]}
        return {"tokens": [tok.decode_token(event.token_id)], "token_logprobs": [_safe_logprob(event.logprob)],
                "top_logprobs": [{tok.decode_token(t): _safe_logprob(lp) for t, lp in top}] if top else [None]}

    def choice(self, text: str, logprobs: dict | None, finish_reason: str | None, stream: bool) -> dict:
        reason = FINISH_REASONS[finish_reason] if finish_reason else None
        if self.kind == "chat":
            key = "delta" if stream else "message"
            message = {"content": text} if stream else {"role": "assistant", "content": text}
            return {"index": 0, key: message, "logprobs": logprobs, "finish_reason": reason}
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def envelope(self, choices: list[dict], stream: bool, usage: dict | None) -> dict:
        obj = {"chat": "chat.completion", "text": "text_completion"}[self.kind] + (".chunk" if stream and self.kind == "chat" else "")
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None or not stream:
            out["usage"] = usage
        return out

    def usage(self) -> dict:
        return _usage(self.prompt_tokens, self.completion_tokens)


def _merge_logprobs(parts: list[dict]) -> dict | None:
    if not parts:
        return None
    merged: dict = {}
    for part in parts:
        for key, value in part.items():
            merged.setdefault(key, []).extend(value)
    return merged


async def _run_to_end(completion: _Completion, chunks) -> JSONResponse:
    texts, logprobs, finish = [], [], None
    async for chunk in chunks:
        completion.completion_tokens += 1
        texts.append(chunk.text)
        lp = completion.token_logprobs(chunk)
        if lp:
            logprobs.append(lp)
        finish = chunk.finish_reason
    choice = completion.choice("".join(texts), _merge_logprobs(logprobs), finish, stream=False)
    return JSONResponse(completion.envelope([choice], stream=False, usage=completion.usage()))


async def _stream(completion: _Completion, chunks, include_usage: bool):
    try:
        if completion.kind == "chat":
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            yield sse_event(completion.envelope([first], stream=True, usage=None))
        async for chunk in chunks:
            completion.completion_tokens += 1
            lp = completion.token_logprobs(chunk)
            if chunk.text or lp or chunk.finish_reason:
                choice = completion.choice(chunk.text, lp, chunk.finish_reason, stream=True)
                yield sse_event(completion.envelope([choice], stream=True, usage=None))
        if include_usage:
            yield sse_event(completion.envelope([], stream=True, usage=completion.usage()))
    except GenerationFailed as e:
        yield sse_event(_failure(e).openai_body())
    yield DONE


def _failure(e: GenerationFailed) -> APIError:
    return APIError(500 if e.server_error else 400, str(e))


async def _respond(backend: Backend, adapter: Adapter | None, tokenizer: ModelTokenizer, body: _Sampling, kind: str,
                   input_ids: list[int], max_tokens: int | None, default_max_tokens: int | None, input_param: str,
                   top_logprobs: int | None):
    tokens_param = "max_completion_tokens" if kind == "chat" and body.max_tokens is None else "max_tokens"
    max_new = backend.check_lengths(input_ids, max_tokens, default_max_tokens, input_param, tokens_param)
    request = backend.generation_request(input_ids, max_new, adapter, tokenizer, body.sampling(),
                                         ignore_eos=body.ignore_eos, top_n_tokens=top_logprobs or 0)
    completion = _Completion(backend, tokenizer, body, kind, len(input_ids), top_logprobs)
    chunks = generate_text(backend.scheduler, tokenizer, request, body.stop_strings())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_stream(completion, chunks, include_usage))
    try:
        return await _run_to_end(completion, chunks)
    except GenerationFailed as e:
        raise _failure(e) from None


async def chat_completions(request: Request):
    backend = _backend(request)
    body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
    messages = [m.as_template_input() for m in body.messages]
    adapter, tokenizer = await backend.resolve_model(body.model)
    try:
        input_ids = await backend.tokenize(tokenizer.apply_chat_template, messages)
    except ChatTemplateError as e:
        raise bad_request(str(e), param="messages") from None
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs and not body.logprobs:
        raise bad_request("`top_logprobs` requires `logprobs` to be true", param="top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return await _respond(backend, adapter, tokenizer, body, "chat", input_ids, max_tokens, None, "messages",
                          top_logprobs)


async def completions(request: Request):
    backend = _backend(request)
    body: CompletionRequest = await parse_body(request, CompletionRequest)
    adapter, tokenizer = await backend.resolve_model(body.model)
    if isinstance(body.prompt, str):
        input_ids = await backend.tokenize(tokenizer.encode, body.prompt)
    else:
        input_ids = body.prompt
        bad = [t for t in input_ids if not 0 <= t < backend.vocab_size]
        if bad:
            raise bad_request(f"`prompt` holds token id {bad[0]}, outside the vocabulary "
                              f"[0, {backend.vocab_size})", param="prompt")
    # OpenAI's legacy completions default to 16 new tokens.
    return await _respond(backend, adapter, tokenizer, body, "text", input_ids, body.max_tokens, 16, "prompt",
                          body.logprobs)


async def models(request: Request):
    backend = _backend(request)
    base = backend.config.model_id
    data = [{"id": base, "object": "model", "created": backend.started, "owned_by": "loom", "parent": None}]
    data += backend.adapters.listed()
    return JSONResponse({"object": "list", "data": data})
