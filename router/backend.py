"""What every route handler works with: the tokenizer, the scheduler and the limits, plus the
checks and conversions that the OpenAI and LoRAX protocols share."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request

from common.limits import MAX_JSON_DEPTH, MAX_MODEL_ID_CHARS, MAX_STOP_CHARS, MAX_STOP_SEQUENCES
from proto import generate_pb2 as pb
from router.adapter_files import MAX_TEMPLATE_BYTES
from router.adapters import Adapter, AdapterRegistry
from router.config import RouterConfig
from router.errors import APIError, bad_request
from router.generation import GenerationRequest
from router.scheduler import Scheduler
from router.structured import GrammarChecker
from router.templates import TemplateRenderError, TemplateRenderer
from router.tokenization import ChatTemplateError, ModelTokenizer, continued

if TYPE_CHECKING:
    from router.merged_adapters import MergedAdapters, MergedAdaptersSpec


class StrictModel(BaseModel):
    """Request bodies: types as sent (no "1" for 1), unknown keys rejected (a typo is a 400 that names it),
    and every float finite."""
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


# Field types that several request bodies share, with their bounds (common/limits.py).
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)]
ModelId = Annotated[str, Field(max_length=MAX_MODEL_ID_CHARS)]


@dataclass(slots=True)
class Backend:
    config: RouterConfig
    tokenizer: ModelTokenizer
    scheduler: Scheduler
    max_supported_total_tokens: int
    vocab_size: int  # the model's (embedding rows), which can exceed the tokenizer's
    adapters: AdapterRegistry
    grammars: GrammarChecker
    templates: TemplateRenderer
    merges: MergedAdapters | None = None
    started: int = field(default_factory=lambda: int(time.time()))

    async def resolve_model(self, name: str | None, source: str | None = None, api_token: str | None = None,
                            param: str = "model", merged: MergedAdaptersSpec | None = None,
                            merged_param: str = "merged_adapters", scale: float | None = None,
                            scale_param: str = "adapter_scale") -> tuple[Adapter | None, ModelTokenizer]:
        """A request's model / adapter_id → (the adapter or None for the base model, the tokenizer to use);
        with `merged`, the merge of its adapters (router/merged_adapters.py), and `name` may only be the base;
        with a `scale`, the adapter (or merge) with its update scaled, a virtual adapter like merges."""
        scale = 1.0 if scale is None else scale
        if merged is not None:
            if name not in (None, "", self.config.model_id):
                raise bad_request(f"`{param}` names an adapter: with `{merged_param}` it must be the base model "
                                  "or omitted", param=param)
            adapter = await self.merges.resolve(merged, source, api_token, merged_param, scale)
        else:
            adapter = await self.adapters.resolve(name, source, api_token, param)
            if scale != 1.0:
                if adapter is None:
                    raise bad_request(f"`{scale_param}` scales an adapter's update: the base model has none",
                                      param=scale_param)
                adapter = await self.merges.scaled(name, adapter, scale, scale_param)
        return adapter, (adapter.tokenizer if adapter else self.tokenizer)

    def check_chars(self, text: str | list | dict, tokenizer: ModelTokenizer, param: str) -> None:
        """A cheap bound before tokenizing: no token covers more than `max_token_chars` characters, so a text
        longer than max_input_length of them cannot fit, and is refused without being tokenized (or rendered:
        `text` may be a JSON value such as a conversation, whose strings count)."""
        chars, stack = 0, [text]
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                chars += len(item)
            elif isinstance(item, (list, dict)):
                stack.extend(item.values() if isinstance(item, dict) else item)
        limit = self.config.max_input_length * tokenizer.max_token_chars
        if chars > limit:
            raise bad_request(f"`{param}` has {chars} characters, more than the {limit} that "
                              f"--max-input-length={self.config.max_input_length} tokens can hold", param=param)

    def vocab_of(self, adapter: Adapter | None) -> int:
        """The vocabulary of requests to `adapter`: the model's, or the adapter's own (added tokens)."""
        return adapter.vocab_size if adapter is not None and adapter.vocab_size else self.vocab_size

    async def encode(self, tokenizer: ModelTokenizer, text: str, param: str,
                     add_special_tokens: bool = True, adapter: Adapter | None = None) -> list[int]:
        """`text`'s token ids (checked against the character bound first), tokenized off the event loop.

        An adapter's own tokenizer can give ids the model (or the adapter's own vocabulary) has no row for: that
        is refused without naming the id, which would tell a caller something about text it did not write (a
        template's)."""
        self.check_chars(text, tokenizer, param)
        ids = await self.off_loop(tokenizer.encode, text, add_special_tokens)
        if ids and max(ids) >= self.vocab_of(adapter):
            whose = "the model's" if tokenizer is self.tokenizer else "the adapter's"
            raise bad_request(f"{whose} tokenizer turns `{param}` into token ids outside the model's vocabulary: "
                              "it does not fit this model", param=param)
        return ids

    async def render_chat(self, adapter: Adapter | None, tokenizer: ModelTokenizer, messages: list[dict],
                          tools: list[dict] | None = None, add_generation_prompt: bool = True,
                          chat_template: str | None = None, template_kwargs: dict | None = None,
                          continue_final_message: bool = False) -> str:
        """The prompt text of a conversation, rendered in the template sandbox's worker processes under its
        limits (router/templates.py): the adapter's template (else the base model's), or `chat_template`, a
        request's own (at most MAX_TEMPLATE_BYTES characters). Any failure is a 400 on `messages` that names the
        adapter (on `chat_template`, for a request's own) and never quotes the template."""
        self.check_chars(messages, tokenizer, "messages")
        if chat_template is not None and len(chat_template) > MAX_TEMPLATE_BYTES:
            raise bad_request(f"`chat_template` is longer than {MAX_TEMPLATE_BYTES} characters", param="chat_template")
        if chat_template is not None:
            owner, param = "`chat_template`: ", "chat_template"
        elif adapter is not None and tokenizer is not self.tokenizer:
            owner, param = f"adapter '{adapter.id}': ", "messages"
        else:
            owner, param = "", "messages"
        try:
            source, variables = tokenizer.chat_inputs(messages, tools, add_generation_prompt, chat_template,
                                                      template_kwargs, continue_final_message)
            limit = tokenizer.max_prompt_chars(self.config.max_input_length)
            text = await self.templates.render(source, variables, limit)
            return continued(text) if continue_final_message else text
        except (ChatTemplateError, TemplateRenderError) as e:
            raise APIError(400, f"{owner}{e}", param=param) from None

    def check_input_length(self, n: int, param: str) -> None:
        if n > self.config.max_input_length:
            raise bad_request(
                f"`{param}` has {n} tokens, over the limit --max-input-length={self.config.max_input_length}",
                param=param)

    def check_choices(self, count: int, param: str) -> None:
        """A request that asks for more generations than the server ever runs at once is a 400, not a 429."""
        limit = self.config.max_concurrent_requests
        if count > limit:
            raise bad_request(f"the request asks for {count} generations, more than "
                              f"--max-concurrent-requests={limit}", param=param)

    def check_lengths(self, input_ids: list[int], max_new_tokens: int | None, default_new_tokens: int | None,
                      input_param: str, tokens_param: str, min_new_tokens: int = 0,
                      min_tokens_param: str = "min_tokens") -> int:
        """Validates prompt and generation lengths against the limits; returns max_new_tokens."""
        n, cfg = len(input_ids), self.config
        if n == 0:
            raise bad_request(f"`{input_param}` is empty after tokenization", param=input_param)
        self.check_input_length(n, input_param)
        room = cfg.max_total_tokens - n
        if max_new_tokens is None:
            max_new_tokens = room if default_new_tokens is None else min(default_new_tokens, room)
            if max_new_tokens < 1:
                raise bad_request(f"`{input_param}` has {n} tokens, leaving no room to generate under "
                                  f"--max-total-tokens={cfg.max_total_tokens}", param=input_param)
        elif max_new_tokens < 1:
            raise bad_request(f"`{tokens_param}` must be at least 1, got {max_new_tokens}", param=tokens_param)
        elif max_new_tokens > room:
            raise bad_request(
                f"`{tokens_param}`={max_new_tokens} plus the {n} prompt tokens exceeds "
                f"--max-total-tokens={cfg.max_total_tokens}", param=tokens_param)
        if min_new_tokens > max_new_tokens:
            raise bad_request(f"`{min_tokens_param}`={min_new_tokens} exceeds the {max_new_tokens} tokens this "
                              "request may generate", param=min_tokens_param)
        return max_new_tokens

    def generation_request(self, input_ids: list[int], max_new_tokens: int, adapter: Adapter | None,
                           tokenizer: ModelTokenizer, sampling: pb.SamplingParameters, ignore_eos: bool = False,
                           top_n_tokens: int = 0, prefill_logprobs: bool = False,
                           min_new_tokens: int = 0, grammar: str = "", stop_token_ids: list[int] = (),
                           priority: int = 0, prefill_top_n: int = 0) -> GenerationRequest:
        return GenerationRequest(
            input_ids=input_ids,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            adapter_id=adapter.id if adapter else "",
            adapter_pages=adapter.pages if adapter else 0,
            cache_key=adapter.cache_key if adapter else "",
            stop_token_ids=tokenizer.eos_token_ids,
            ignore_eos=ignore_eos,
            top_n_tokens=top_n_tokens,
            prefill_logprobs=prefill_logprobs,
            prefill_top_n=prefill_top_n,
            min_new_tokens=min_new_tokens,
            grammar=grammar,
            extra_stop_ids=frozenset(stop_token_ids),
            priority=priority,
        )

    def check_token_ids(self, ids, param: str, adapter: Adapter | None = None) -> None:
        """Token ids a request names (a prompt, stop_token_ids, logit_bias keys) must be in the vocabulary (of
        `adapter`'s requests)."""
        vocab = self.vocab_of(adapter)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"`{param}` holds token id {bad}, outside the vocabulary [0, {vocab})", param=param)

    async def off_loop(self, fn, *args):
        """Tokenizers and grammar checks can take milliseconds: run them in a thread, off the event loop."""
        return await asyncio.to_thread(fn, *args)


def sampling_parameters(temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                        min_p: float | None = None, typical_p: float | None = None,
                        repetition_penalty: float | None = None, frequency_penalty: float | None = None,
                        presence_penalty: float | None = None, seed: int | None = None,
                        logit_bias: dict[int, float] | None = None) -> pb.SamplingParameters:
    """Unset fields take their neutral value; temperature 0 (or unset) means greedy."""
    p = pb.SamplingParameters(
        temperature=temperature or 0.0,
        top_k=max(top_k or 0, 0),
        top_p=1.0 if top_p is None else top_p,
        min_p=min_p or 0.0,
        typical_p=1.0 if typical_p is None else typical_p,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        frequency_penalty=frequency_penalty or 0.0,
        presence_penalty=presence_penalty or 0.0,
        logit_bias=logit_bias or {},
    )
    if seed is not None:
        p.seed = seed % (1 << 64)
    return p


async def gather_all(*aws: Awaitable) -> list:
    """asyncio.gather that cancels the others when one fails: a failed request leaves nothing running."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:24]} is out of range")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def decode_json(raw: bytes):
    """JSON as RFC 8259 has it (no NaN / Infinity, finite numbers), nested at most MAX_JSON_DEPTH deep,
    every string valid Unicode (no lone surrogates); anything else is a 400."""
    try:
        data = json.loads(raw, parse_float=_finite_float, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise bad_request(f"request body is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise bad_request("request body is not valid UTF-8") from None
    except RecursionError:
        raise bad_request(f"request body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as e:  # a number too long to convert, or not finite
        message = str(e) if "out of range" in str(e) or "JSON value" in str(e) else "a number is too long"
        raise bad_request(f"request body is not valid JSON: {message}") from None
    _check_values(data)
    return data


def _check_values(data) -> None:
    stack = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise bad_request("request body holds a string with a lone surrogate (invalid Unicode)") from None
        elif isinstance(value, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise bad_request(f"request body is nested more than {MAX_JSON_DEPTH} levels deep")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                stack.append((key, depth + 1))
                stack.append((item, depth + 1))


async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """Reads a JSON body into `model`; any problem is a 400 that names the field."""
    return validate(decode_json(await request.body()), model)


def validate(data, model: type[BaseModel]) -> BaseModel:
    """A decoded JSON body as `model`; any problem is a 400 that names the field."""
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field_path = ".".join(str(p) for p in first["loc"])
        extra = f" ({len(e.errors()) - 1} more problem(s))" if len(e.errors()) > 1 else ""
        raise bad_request(f"`{field_path}`: {first['msg']}{extra}", param=field_path or None) from None
