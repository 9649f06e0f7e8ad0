"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import JSONResponse

from router.adapters import Adapter
from router.backend import Backend, parse_body
from router.errors import APIError, bad_request
from router.openai_schema import ChatCompletionRequest, CompletionRequest, SamplingFields
from router.generation import GenerationFailed, GenerationRequest
from router.sse import DONE, sse_event, sse_response
from router.structured import parse_tool_call
from router.text_stream import TextChunk, generate_text
from router.tokenization import ModelTokenizer

FINISH_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}


def _backend(request: Request) -> Backend:
    return request.app.state.backend


def _safe_logprob(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


@dataclass(slots=True)
class _Job:
    """One choice to generate: `n` of them per prompt (or `best_of`, of which the best `n` are kept)."""

    index: int
    prompt_index: int
    request: GenerationRequest
    echo: str = ""  # completions `echo`: the prompt text, put before the generated text


@dataclass(slots=True)
class _Choice:
    job: _Job
    texts: list[str] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    tokens: int = 0
    chars: int = 0  # text emitted so far, for completions' text_offset
    sum_logprob: float = 0.0
    finish: str | None = None


class _Completion:
    """Builds one OpenAI response (chat or legacy completions, stream or not) from generated chunks."""

    def __init__(self, backend: Backend, tokenizer: ModelTokenizer, body: SamplingFields, kind: str, prompt_tokens: int,
                 top_logprobs: int | None):
        self.tokenizer = tokenizer
        self.kind = kind  # "chat" or "text"
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = body.model or backend.config.model_id
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.top_logprobs = top_logprobs  # None: no logprobs asked
        self.tools: list[dict] = []  # chat tools: finished text that is a tool call becomes `tool_calls`

    def add(self, choice: _Choice, chunk: TextChunk) -> dict | None:
        """Records `chunk` on `choice`; returns its logprobs entry (None when not asked)."""
        self.completion_tokens += 1
        choice.tokens += 1
        choice.sum_logprob += chunk.token.logprob
        choice.finish = chunk.finish_reason or choice.finish
        lp = None
        if self.top_logprobs is not None:
            lp = self._token_logprobs(chunk.token.token_id, chunk.token.logprob, chunk.token.top_tokens, choice.chars)
            choice.logprobs.append(lp)
        choice.texts.append(chunk.text)
        choice.chars += len(chunk.text)
        return lp

    def echo(self, choice: _Choice, first: TextChunk) -> dict | None:
        """Completions `echo`: the prompt text (and, with logprobs, its tokens' logprobs) goes first."""
        choice.texts.append(choice.job.echo)
        lp = None
        if self.top_logprobs is not None:
            ids = choice.job.request.input_ids
            prefill = first.token.prefill_logprobs or [math.nan] * len(ids)
            parts, offset = [], 0
            for i, (token_id, logprob) in enumerate(zip(ids, prefill)):
                parts.append(self._token_logprobs(token_id, logprob, [], offset, first=i == 0))
                offset += len(self.tokenizer.decode_token(token_id))
            lp = _merge_logprobs(parts)
            choice.logprobs.append(lp)
        choice.chars += len(choice.job.echo)
        return lp

    def _token_logprobs(self, token_id: int, logprob: float, top: list[tuple[int, float]], offset: int,
                        first: bool = False) -> dict:
        tok = self.tokenizer
        top = top[: self.top_logprobs]
        if self.kind == "chat":
            def entry(tid: int, lp: float) -> dict:
                text = tok.decode_token(tid)
                return {"token": text, "logprob": _safe_logprob(lp), "bytes": list(text.encode())}
            item = entry(token_id, logprob)
            item["top_logprobs"] = [entry(t, lp) for t, lp in top]
            return {"content": [item]}
        text = tok.decode_token(token_id)
        return {"tokens": [text], "token_logprobs": [None if first else _safe_logprob(logprob)],
                "top_logprobs": [None if first else {tok.decode_token(t): _safe_logprob(lp) for t, lp in top} or
                                 {text: _safe_logprob(logprob)}],
                "text_offset": [offset]}

    def choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None, stream: bool,
               first: bool = False) -> dict:
        reason = FINISH_REASONS[finish_reason] if finish_reason else None
        call = parse_tool_call(text, self.tools) if self.tools and finish_reason else None
        if call is not None:
            if stream:
                return {"index": index, "delta": {"tool_calls": [{"index": 0, **call}]}, "logprobs": logprobs,
                        "finish_reason": "tool_calls"}
            return {"index": index, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                    "logprobs": logprobs, "finish_reason": "tool_calls"}
        if self.kind == "chat":
            if stream:
                delta = {"role": "assistant", "content": text} if first else {"content": text}
                return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            message = {"role": "assistant", "content": text}
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def envelope(self, choices: list[dict], stream: bool, usage: dict | None) -> dict:
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        if stream and self.kind == "chat":
            obj += ".chunk"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None or not stream:
            out["usage"] = usage
        return out

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def _merge_logprobs(parts: list[dict]) -> dict | None:
    if not parts:
        return None
    merged: dict = {}
    for part in parts:
        for key, value in part.items():
            merged.setdefault(key, []).extend(value)
    return merged


async def _merged(streams: dict[int, AsyncIterator[TextChunk]]) -> AsyncIterator[tuple[int, TextChunk]]:
    """Interleaves several choices' chunks as they come. Leaving early cancels every generation."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, chunks: AsyncIterator[TextChunk]) -> None:
        try:
            async for chunk in chunks:
                queue.put_nowait((index, chunk))
        except Exception as e:  # handed to the consumer, which raises it
            queue.put_nowait((index, e))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in streams.items()]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


def _best(choices: list[_Choice], n: int) -> list[_Choice]:
    """`best_of`: per prompt, the `n` choices with the highest log-probability per token, renumbered."""
    kept = []
    for prompt in sorted({c.job.prompt_index for c in choices}):
        mine = [c for c in choices if c.job.prompt_index == prompt]
        mine.sort(key=lambda c: c.sum_logprob / max(c.tokens, 1), reverse=True)
        kept += mine[:n]
    for i, c in enumerate(kept):
        c.job.index = i
    return kept


async def _run_to_end(completion: _Completion, choices: dict[int, _Choice], events, keep: int | None) -> dict:
    async for index, chunk in events:
        choice = choices[index]
        if choice.tokens == 0 and choice.job.echo:
            completion.echo(choice, chunk)
        completion.add(choice, chunk)
    ordered = list(choices.values())
    if keep is not None:
        ordered = _best(ordered, keep)
    return completion.envelope([completion.choice(c.job.index, "".join(c.texts), _merge_logprobs(c.logprobs),
                                                  c.finish, stream=False) for c in ordered],
                               stream=False, usage=completion.usage())


async def _stream(completion: _Completion, choices: dict[int, _Choice], events, include_usage: bool):
    try:
        if completion.kind == "chat":
            first = [completion.choice(i, "", None, None, stream=True, first=True) for i in choices]
            yield sse_event(completion.envelope(first, stream=True, usage=None))
        async for index, chunk in events:
            choice = choices[index]
            text, lp = chunk.text, None
            if choice.tokens == 0 and choice.job.echo:
                lp = completion.echo(choice, chunk)
                text = choice.job.echo + text
            token_lp = completion.add(choice, chunk)
            lp = _merge_logprobs([p for p in (lp, token_lp) if p])
            if completion.tools:  # a tool call is only known once complete: send the whole text at the end
                if not chunk.finish_reason:
                    continue
                text, lp = "".join(choice.texts), _merge_logprobs(choice.logprobs)
            if text or lp or chunk.finish_reason:
                out = completion.choice(index, text, lp, chunk.finish_reason, stream=True)
                yield sse_event(completion.envelope([out], stream=True, usage=None))
        if include_usage:
            yield sse_event(completion.envelope([], stream=True, usage=completion.usage()))
    except GenerationFailed as e:
        yield sse_event(_failure(e).openai_body())
    yield DONE


def _failure(e: GenerationFailed) -> APIError:
    return APIError(500 if e.server_error else 400, str(e))


def _seeded(sampling, offset: int):
    """The i-th of several samples of one request: a distinct, still reproducible seed."""
    if offset and sampling.HasField("seed"):
        sampling = type(sampling).FromString(sampling.SerializeToString())
        sampling.seed = (sampling.seed + offset) % (1 << 64)
    return sampling


async def _respond(backend: Backend, adapter: Adapter | None, tokenizer: ModelTokenizer, body: SamplingFields, kind: str,
                   prompts: list[tuple[list[int], str]], max_tokens: int | None, default_max_tokens: int | None,
                   input_param: str, top_logprobs: int | None, best_of: int | None = None, echo: bool = False,
                   grammar: str = "", tools: list[dict] | None = None):
    tokens_param = "max_completion_tokens" if kind == "chat" and body.max_tokens is None else "max_tokens"
    per_prompt = best_of or body.n
    jobs = []
    for p, (input_ids, text) in enumerate(prompts):
        max_new = backend.check_lengths(input_ids, max_tokens, default_max_tokens, input_param, tokens_param,
                                        min_new_tokens=body.min_tokens)
        for j in range(per_prompt):
            request = backend.generation_request(
                input_ids, max_new, adapter, tokenizer, _seeded(body.sampling(), j), ignore_eos=body.ignore_eos,
                top_n_tokens=top_logprobs or 0, prefill_logprobs=echo and top_logprobs is not None,
                min_new_tokens=body.min_tokens, grammar=grammar)
            jobs.append(_Job(len(jobs), p, request, echo=text if echo else ""))
    completion = _Completion(backend, tokenizer, body, kind, sum(len(ids) for ids, _ in prompts), top_logprobs)
    completion.tools = tools or []
    choices = {job.index: _Choice(job) for job in jobs}
    stops = body.stop_strings()
    # Queued before the answer starts: past --max-concurrent-requests this is a 429, never a 200 and then an error.
    generations = backend.scheduler.generate_all([job.request for job in jobs])
    events = _merged({job.index: generate_text(g, tokenizer, stops) for job, g in zip(jobs, generations)})
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_stream(completion, choices, events, include_usage))
    try:
        return JSONResponse(await _run_to_end(completion, choices, events, body.n if best_of else None))
    except GenerationFailed as e:
        raise _failure(e) from None


async def chat_completions(request: Request):
    backend = _backend(request)
    body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
    backend.check_choices(body.n, "n")
    messages = [m.as_template_input() for m in body.messages]
    adapter, tokenizer = await backend.resolve_model(body.model)
    tools = body.tool_dicts
    text = await backend.render_chat(adapter, tokenizer, messages, tools or None)
    # The rendered text holds every special token the template wants: no BOS/EOS added again.
    input_ids = await backend.encode(tokenizer, text, "messages", add_special_tokens=False)
    grammar, param = body.grammar()
    grammar = await backend.grammars.prepare(grammar, param) if grammar else ""
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return await _respond(backend, adapter, tokenizer, body, "chat", [(input_ids, "")], max_tokens, None,
                          "messages", top_logprobs, grammar=grammar, tools=tools)


async def completions(request: Request):
    backend = _backend(request)
    body: CompletionRequest = await parse_body(request, CompletionRequest)
    backend.check_choices(len(body.prompts()) * (body.best_of or body.n), "best_of" if body.best_of else "n")
    adapter, tokenizer = await backend.resolve_model(body.model)
    prompts = []
    for prompt in body.prompts():
        if isinstance(prompt, str):
            prompts.append((await backend.encode(tokenizer, prompt, "prompt"), prompt))
            continue
        backend.check_input_length(len(prompt), "prompt")
        bad = [t for t in prompt if not 0 <= t < backend.vocab_size]
        if bad:
            raise bad_request(f"`prompt` holds token id {bad[0]}, outside the vocabulary [0, {backend.vocab_size})",
                              param="prompt")
        prompts.append((prompt, tokenizer.decode(prompt)))
    # OpenAI's legacy completions default to 16 new tokens.
    return await _respond(backend, adapter, tokenizer, body, "text", prompts, body.max_tokens, 16, "prompt",
                          body.logprobs, best_of=body.best_of if (body.best_of or 1) > 1 else None, echo=body.echo)


async def models(request: Request):
    backend = _backend(request)
    base = backend.config.model_id
    data = [{"id": base, "object": "model", "created": backend.started, "owned_by": "loom", "parent": None}]
    data += backend.adapters.listed()
    return JSONResponse({"object": "list", "data": data})
