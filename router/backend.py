"""What every route handler works with: the tokenizer, the scheduler and the limits, plus the
checks and conversions that the OpenAI and LoRAX protocols share."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request

from proto import generate_pb2 as pb
from router.adapters import Adapter, AdapterRegistry
from router.config import RouterConfig
from router.errors import bad_request
from router.scheduler import GenerationRequest, Scheduler
from router.structured import GrammarChecker
from router.tokenization import ModelTokenizer


class StrictModel(BaseModel):
    """Request bodies: types as sent (no "1" for 1) and unknown keys rejected, so a typo is a 400 that names it."""
    model_config = ConfigDict(strict=True, extra="forbid")


@dataclass(slots=True)
class Backend:
    config: RouterConfig
    tokenizer: ModelTokenizer
    scheduler: Scheduler
    max_supported_total_tokens: int
    vocab_size: int  # the model's (embedding rows), which can exceed the tokenizer's
    adapters: AdapterRegistry
    grammars: GrammarChecker
    started: int = field(default_factory=lambda: int(time.time()))

    async def resolve_model(self, name: str | None, source: str | None = None, api_token: str | None = None,
                            param: str = "model") -> tuple[Adapter | None, ModelTokenizer]:
        """A request's model / adapter_id → (the adapter or None for the base model, the tokenizer to use)."""
        adapter = await self.adapters.resolve(name, source, api_token, param)
        return adapter, (adapter.tokenizer if adapter else self.tokenizer)

    def check_lengths(self, input_ids: list[int], max_new_tokens: int | None, default_new_tokens: int | None,
                      input_param: str, tokens_param: str) -> int:
        """Validates prompt and generation lengths against the limits; returns max_new_tokens."""
        n, cfg = len(input_ids), self.config
        if n == 0:
            raise bad_request(f"`{input_param}` is empty after tokenization", param=input_param)
        if n > cfg.max_input_length:
            raise bad_request(
                f"`{input_param}` has {n} tokens, over the limit --max-input-length={cfg.max_input_length}",
                param=input_param)
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
        return max_new_tokens

    def generation_request(self, input_ids: list[int], max_new_tokens: int, adapter: Adapter | None,
                           tokenizer: ModelTokenizer, sampling: pb.SamplingParameters, ignore_eos: bool = False,
                           top_n_tokens: int = 0, prefill_logprobs: bool = False,
                           min_new_tokens: int = 0, grammar: str = "") -> GenerationRequest:
        return GenerationRequest(
            input_ids=input_ids,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            adapter_id=adapter.id if adapter else "",
            adapter_pages=adapter.pages if adapter else 0,
            stop_token_ids=tokenizer.eos_token_ids,
            ignore_eos=ignore_eos,
            top_n_tokens=top_n_tokens,
            prefill_logprobs=prefill_logprobs,
            min_new_tokens=min_new_tokens,
            grammar=grammar,
        )

    async def off_loop(self, fn, *args):
        """Tokenizers and grammar checks can take milliseconds: run them in a thread, off the event loop."""
        return await asyncio.to_thread(fn, *args)


def sampling_parameters(temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                        min_p: float | None = None, typical_p: float | None = None,
                        repetition_penalty: float | None = None, frequency_penalty: float | None = None,
                        presence_penalty: float | None = None, seed: int | None = None) -> pb.SamplingParameters:
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
    )
    if seed is not None:
        p.seed = seed % (1 << 64)
    return p


async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """Reads a JSON body into `model`; any problem is a 400 that names the field."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field_path = ".".join(str(p) for p in first["loc"])
        extra = f" ({len(e.errors()) - 1} more problem(s))" if len(e.errors()) > 1 else ""
        raise bad_request(f"`{field_path}`: {first['msg']}{extra}", param=field_path or None) from None
