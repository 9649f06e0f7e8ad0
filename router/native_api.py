"""LoRAX's native API: /generate, /generate_stream, and the `POST /` route LoRAX's client calls."""

from __future__ import annotations

import math
import random

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse

from router.adapters import Adapter
from router.backend import Backend, parse_body, sampling_parameters
from router.errors import APIError, bad_request
from router.scheduler import GenerationFailed
from router.sse import sse_event, sse_response
from router.text_stream import TextChunk, generate_text
from router.tokenization import ModelTokenizer


class _Lax(BaseModel):
    # LoRAX's client sends every parameter, most of them null; unknown keys are a client bug: reject.
    model_config = ConfigDict(strict=True, extra="forbid")


class Parameters(_Lax):
    adapter_id: str | None = None
    adapter_source: str | None = None
    adapter_parameters: dict | None = None
    merged_adapters: dict | None = None
    api_token: str | None = None
    best_of: int | None = Field(None, ge=1)
    decoder_input_details: bool = False
    details: bool = True
    do_sample: bool = False
    max_new_tokens: int | None = 20
    ignore_eos_token: bool = False
    repetition_penalty: float | None = Field(None, gt=0)
    return_full_text: bool | None = False
    seed: int | None = Field(None, ge=0)
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, lt=1)
    truncate: int | None = Field(None, ge=1)
    typical_p: float | None = Field(None, gt=0, lt=1)
    watermark: bool = False
    response_format: dict | None = None
    return_k_alternatives: int | None = Field(None, ge=0)

    @field_validator("best_of", "adapter_parameters", "merged_adapters", "response_format")
    @classmethod
    def _not_yet(cls, value, info: ValidationInfo):
        if value not in (None, 1):
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value

    @field_validator("watermark")
    @classmethod
    def _no_watermark(cls, value: bool) -> bool:
        if value:
            raise ValueError("watermarking is not supported")
        return value

    @property
    def samples(self) -> bool:
        """TGI/LoRAX semantics: any warper turns sampling on, as does do_sample."""
        return self.do_sample or any(
            v is not None and v != neutral
            for v, neutral in ((self.temperature, 1.0), (self.top_k, 0), (self.top_p, 1.0), (self.typical_p, 1.0))
        )


class GenerateRequest(_Lax):
    inputs: str
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False


def _token(tok: ModelTokenizer, token_id: int, logprob: float) -> dict:
    return {"id": token_id, "text": tok.decode_token(token_id), "logprob": logprob if math.isfinite(logprob) else None,
            "special": token_id in tok.special_ids}


class _Native:
    """One native request, prepared: validation done, ready to run or stream."""

    def __init__(self, backend: Backend, adapter: Adapter | None, tokenizer: ModelTokenizer, body: GenerateRequest,
                 input_ids: list[int]):
        p = body.parameters
        self.backend = backend
        self.tokenizer = tokenizer
        self.body = body
        self.input_ids = input_ids
        self.seed = None
        temperature = None
        if p.samples:
            self.seed = p.seed if p.seed is not None else random.getrandbits(63)
            temperature = p.temperature or 1.0
        max_new = backend.check_lengths(input_ids, p.max_new_tokens, None, "inputs", "parameters.max_new_tokens")
        sampling = sampling_parameters(temperature=temperature, top_k=p.top_k, top_p=p.top_p, typical_p=p.typical_p,
                                       repetition_penalty=p.repetition_penalty, seed=self.seed)
        self.request = backend.generation_request(
            input_ids, max_new, adapter, tokenizer, sampling, ignore_eos=p.ignore_eos_token,
            top_n_tokens=p.return_k_alternatives or 0, prefill_logprobs=p.decoder_input_details)

    def chunks(self):
        return generate_text(self.backend.scheduler, self.tokenizer, self.request, self.body.parameters.stop)

    def full_text(self, generated: str) -> str:
        return self.body.inputs + generated if self.body.parameters.return_full_text else generated

    def token(self, chunk: TextChunk) -> dict:
        t = _token(self.tokenizer, chunk.token.token_id, chunk.token.logprob)
        if self.body.parameters.return_k_alternatives:
            t["alternative_tokens"] = [_token(self.tokenizer, i, lp) for i, lp in chunk.token.top_tokens]
        return t

    def prefill(self, first: TextChunk | None) -> list[dict]:
        if not self.body.parameters.decoder_input_details:
            return []
        logprobs = (first.token.prefill_logprobs if first else None) or [math.nan] * len(self.input_ids)
        return [_token(self.tokenizer, t, lp) for t, lp in zip(self.input_ids, logprobs)]

    def details(self, finish_reason: str, tokens: list[dict], first: TextChunk | None) -> dict:
        return {"finish_reason": finish_reason, "prompt_tokens": len(self.input_ids),
                "generated_tokens": len(tokens), "seed": self.seed,
                "prefill": self.prefill(first), "tokens": tokens}


async def _prepare(request: Request, body: GenerateRequest | None = None) -> _Native:
    backend: Backend = request.app.state.backend
    if body is None:
        body = await parse_body(request, GenerateRequest)
    p = body.parameters
    adapter, tokenizer = await backend.resolve_model(p.adapter_id, p.adapter_source, p.api_token,
                                                     param="parameters.adapter_id")
    input_ids = await backend.tokenize(tokenizer.encode, body.inputs)
    if p.truncate is not None and len(input_ids) > p.truncate:
        input_ids = input_ids[-p.truncate:]
    return _Native(backend, adapter, tokenizer, body, input_ids)


async def _generate_response(native: _Native) -> dict:
    texts, tokens, first, finish = [], [], None, "length"
    try:
        async for chunk in native.chunks():
            first = first or chunk
            texts.append(chunk.text)
            tokens.append(native.token(chunk))
            finish = chunk.finish_reason or finish
    except GenerationFailed as e:
        raise APIError(500 if e.server_error else 400, str(e)) from None
    out = {"generated_text": native.full_text("".join(texts))}
    if native.body.parameters.details:
        out["details"] = native.details(finish, tokens, first)
    return out


async def _stream_events(native: _Native):
    texts, count = [], 0
    try:
        async for chunk in native.chunks():
            count += 1
            texts.append(chunk.text)
            event = {"token": native.token(chunk), "generated_text": None, "details": None}
            if chunk.finish_reason:
                event["generated_text"] = native.full_text("".join(texts))
                event["details"] = {"finish_reason": chunk.finish_reason, "prompt_tokens": len(native.input_ids),
                                    "generated_tokens": count, "seed": native.seed}
            # LoRAX streams each token's own text; stop-string hold-back can shift text between tokens.
            event["token"]["text"] = chunk.text
            yield sse_event(event)
    except GenerationFailed as e:
        yield sse_event(APIError(500 if e.server_error else 400, str(e)).lorax_body())


async def generate(request: Request):
    native = await _prepare(request)
    return JSONResponse(await _generate_response(native))


async def generate_stream(request: Request):
    native = await _prepare(request)
    return sse_response(_stream_events(native))


async def compat_generate(request: Request):
    """`POST /`: LoRAX's Python client; a JSON list for stream=false, SSE events for stream=true."""
    body = await parse_body(request, GenerateRequest)
    native = await _prepare(request, body)
    if body.stream:
        return sse_response(_stream_events(native))
    return JSONResponse([await _generate_response(native)])
