"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse

from router.adapters import Adapter
from router.backend import Backend, parse_body
from router.chat_output import AnswerFormat, chat_delta, chat_message
from router.chat_prompt import render_prompt, template_messages
from router.errors import APIError
from router.generation import GenerationFailed
from router.openai_output import Choice, Completion, Job, best, merge_logprobs
from router.openai_schema import ChatCompletionRequest, CompletionRequest, SamplingFields
from router.sse import DONE, sse_event, sse_response
from router.text_stream import TextChunk, generate_text
from router.tokenization import ModelTokenizer


def _backend(request: Request) -> Backend:
    return request.app.state.backend


async def merged(streams: dict[int, AsyncIterator[TextChunk]]) -> AsyncIterator[tuple[int, TextChunk]]:
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


def _first_chunk(completion: Completion, choice: Choice, chunk: TextChunk) -> dict | None:
    """What a choice's first chunk adds before its own text: the echo (and its logprobs) and prompt_logprobs."""
    if choice.prompt_logprobs is None and chunk.token.prefill_logprobs is not None:
        choice.prompt_logprobs = completion.prompt_logprobs(choice.job.request.input_ids, chunk.token)
    return completion.echo(choice, chunk, completion.kind == "text") if choice.job.echo else None


def _chat_final(completion: Completion, c: Choice) -> dict:
    """The whole answer of a chat choice; an echoed message is content, never reasoning or a tool call."""
    generated = "".join(c.texts)[len(c.job.echo):]
    parts = ([("content", c.job.echo)] if c.job.echo else []) + c.answer.feed(generated) + c.answer.finish()
    return {"index": c.job.index, "message": chat_message(parts, c.answer.calls, completion.answer_format.thinking),
            "logprobs": merge_logprobs(c.logprobs), "finish_reason": completion.finish_reason(c)}


async def _run_to_end(completion: Completion, choices: dict[int, Choice], events, keep: int | None) -> dict:
    async for index, chunk in events:
        choice = choices[index]
        if choice.tokens == 0:
            _first_chunk(completion, choice, chunk)
        completion.add(choice, chunk)
    ordered = list(choices.values())
    if keep is not None:
        ordered = best(ordered, keep)
    if completion.kind == "chat":
        out = completion.envelope([_chat_final(completion, c) for c in ordered], stream=False,
                                  usage=completion.usage())
        if ordered[0].prompt_logprobs is not None:
            out["prompt_logprobs"] = ordered[0].prompt_logprobs
        return out
    answers = []
    for c in ordered:
        answer = {"index": c.job.index, "text": "".join(c.texts), "logprobs": merge_logprobs(c.logprobs),
                  "finish_reason": completion.finish_reason(c)}
        if c.prompt_logprobs is not None:
            answer["prompt_logprobs"] = c.prompt_logprobs
        answers.append(answer)
    return completion.envelope(answers, stream=False, usage=completion.usage())


def _stream_choice(completion: Completion, choice: Choice, chunk: TextChunk, lp: dict | None,
                   echoed: str) -> dict | None:
    """One chunk of one choice as a streamed choice (None when it carries nothing yet)."""
    if completion.kind == "text":
        text = echoed + chunk.text
        if not (text or lp):
            return None
        return {"index": choice.job.index, "text": text, "logprobs": lp, "finish_reason": None}
    parts = choice.answer.feed(chunk.text)
    if chunk.finish_reason:
        parts += choice.answer.finish()
    delta = chat_delta(([("content", echoed)] if echoed else []) + parts)
    if not (delta or lp):
        return None
    return {"index": choice.job.index, "delta": delta, "logprobs": lp, "finish_reason": None}


async def _stream(completion: Completion, choices: dict[int, Choice], events, include_usage: bool,
                  continuous_usage: bool):
    def envelope(answers: list[dict]) -> bytes:
        return sse_event(completion.envelope(answers, stream=True,
                                             usage=completion.usage() if continuous_usage else None))

    try:
        if completion.kind == "chat":
            yield envelope([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None} for i in choices])
        async for index, chunk in events:
            choice = choices[index]
            echo_lp = _first_chunk(completion, choice, chunk) if choice.tokens == 0 else None
            lp = merge_logprobs([p for p in (echo_lp, completion.add(choice, chunk)) if p])
            echoed = choice.job.echo if choice.tokens == 1 else ""
            if (out := _stream_choice(completion, choice, chunk, lp, echoed)) is not None:
                yield envelope([out])
            if chunk.finish_reason:  # in its own last chunk, as OpenAI sends it
                last = {"index": index, "logprobs": None, "finish_reason": completion.finish_reason(choice)}
                yield envelope([{**last, "delta": {}} if completion.kind == "chat" else {**last, "text": ""}])
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
                   grammar: str = "", answer_format: AnswerFormat | None = None):
    tokens_param = "max_completion_tokens" if kind == "chat" and body.max_tokens is None else "max_tokens"
    per_prompt = best_of or body.n
    backend.check_token_ids(body.stop_token_ids or (), "stop_token_ids", adapter)
    backend.check_token_ids(body.logit_bias_ids(), "logit_bias", adapter)
    # Completions' echo with logprobs shows the prompt tokens' logprobs and top alternatives.
    echo_logprobs = kind == "text" and echo and top_logprobs is not None
    prompt_top = max((top_logprobs or 0) if echo_logprobs else 0, body.prompt_logprobs or 0)
    jobs = []
    for p, (input_ids, text) in enumerate(prompts):
        max_new = backend.check_lengths(input_ids, max_tokens, default_max_tokens, input_param, tokens_param,
                                        min_new_tokens=body.min_tokens)
        for j in range(per_prompt):
            request = backend.generation_request(
                input_ids, max_new, adapter, tokenizer, _seeded(body.sampling(), j), ignore_eos=body.ignore_eos,
                top_n_tokens=top_logprobs or 0, prefill_logprobs=echo_logprobs or body.prompt_logprobs is not None,
                min_new_tokens=body.min_tokens, grammar=grammar, stop_token_ids=body.stop_token_ids or (),
                priority=body.priority, prefill_top_n=prompt_top)
            jobs.append(Job(len(jobs), p, request, echo=text if echo else ""))
    model = body.model or backend.config.model_id
    completion = Completion(tokenizer, model, kind, sum(len(ids) for ids, _ in prompts), top_logprobs, answer_format)
    choices = {job.index: completion.choice_for(job) for job in jobs}
    stops = body.stop_strings()
    # Queued before the answer starts: past --max-concurrent-requests this is a 429, never a 200 and then an error.
    generations = backend.scheduler.generate_all([job.request for job in jobs])
    events = merged({job.index: generate_text(g, tokenizer, stops, body.include_stop_str_in_output,
                                              body.skip_special_tokens) for job, g in zip(jobs, generations)})
    if body.stream:
        options = body.stream_options
        include_usage = bool(options and options.include_usage)
        return sse_response(_stream(completion, choices, events, include_usage,
                                    include_usage and options.continuous_usage_stats))
    try:
        return JSONResponse(await _run_to_end(completion, choices, events, body.n if best_of else None))
    except GenerationFailed as e:
        raise _failure(e) from None


async def chat_completions(request: Request):
    backend = _backend(request)
    body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
    backend.check_choices(body.n, "n")
    adapter, tokenizer = await backend.resolve_model(body.model, merged=body.merged_adapters,
                                                     scale=body.adapter_scale)
    tools = body.tool_dicts
    prompt = await render_prompt(backend, adapter, tokenizer, template_messages(body), tools, body)
    grammar, param = body.grammar()
    grammar = await backend.grammars.prepare(grammar, param) if grammar else ""
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    cfg = backend.config
    # A JSON answer (a forced call, a schema) starts at its first token; a regex, choice or grammar may think first.
    json_answer = bool(grammar) and not param.endswith(("regex", "choice", "grammar"))
    answer_format = AnswerFormat.of(body.chat_template or tokenizer.chat_template, prompt.text, tools, json_answer,
                                    cfg.tool_call_parser, cfg.reasoning_parser, body.parallel_tool_calls)
    # vLLM's chat echo: the answer continues the last message when it is the assistant's.
    last = body.messages[-1]
    echo = last.text() if body.echo and last.role == "assistant" else ""
    return await _respond(backend, adapter, tokenizer, body, "chat", [(prompt.input_ids, echo)], max_tokens, None,
                          "messages", top_logprobs, echo=bool(echo), grammar=grammar, answer_format=answer_format)


async def completions(request: Request):
    backend = _backend(request)
    body: CompletionRequest = await parse_body(request, CompletionRequest)
    backend.check_choices(len(body.prompts()) * (body.best_of or body.n), "best_of" if body.best_of else "n")
    adapter, tokenizer = await backend.resolve_model(body.model, merged=body.merged_adapters,
                                                     scale=body.adapter_scale)
    prompts = []
    for prompt in body.prompts():
        if isinstance(prompt, str):
            prompts.append((await backend.encode(tokenizer, prompt, "prompt", adapter=adapter), prompt))
            continue
        backend.check_input_length(len(prompt), "prompt")
        backend.check_token_ids(prompt, "prompt", adapter)
        prompts.append((prompt, tokenizer.decode(prompt)))
    grammar, param = body.constraint()
    grammar = await backend.grammars.prepare(grammar, param) if grammar else ""
    # OpenAI's legacy completions default to 16 new tokens.
    return await _respond(backend, adapter, tokenizer, body, "text", prompts, body.max_tokens, 16, "prompt",
                          body.logprobs, best_of=body.best_of if (body.best_of or 1) > 1 else None, echo=body.echo,
                          grammar=grammar)


async def models(request: Request):
    backend = _backend(request)
    base = backend.config.model_id
    data = [{"id": base, "object": "model", "created": backend.started, "owned_by": "loom", "parent": None}]
    data += backend.adapters.listed()
    return JSONResponse({"object": "list", "data": data})
