"""LoRAX's native API: /generate, /generate_stream, and the `POST /` route LoRAX's client calls."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from pydantic import Field, ValidationInfo, field_validator, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse

from common.limits import (
    MAX_CHOICES,
    MAX_NATIVE_TEMPERATURE,
    MAX_REPETITION_PENALTY,
    MAX_TOP_K,
    MAX_TOP_LOGPROBS,
    UINT32_MAX,
    UINT64_MAX,
)
from router.adapters import Adapter
from router.backend import Backend, ModelId, StopList, StrictModel, gather_all, parse_body, sampling_parameters
from router.errors import APIError
from router.generation import Generation, GenerationFailed
from router.merged_adapters import AdapterScale, MergedAdaptersSpec
from router.sse import sse_event, sse_response
from router.structured import response_format_grammar
from router.text_stream import TextChunk, generate_text
from router.tokenization import ModelTokenizer


class Parameters(StrictModel):
    # LoRAX's client sends every parameter, most of them null (accepted); unknown keys are a client bug.
    adapter_id: ModelId | None = None
    adapter_source: str | None = Field(None, max_length=16)
    adapter_parameters: dict | None = None
    merged_adapters: MergedAdaptersSpec | None = None
    adapter_scale: AdapterScale | None = None
    api_token: str | None = Field(None, max_length=1024)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    decoder_input_details: bool = False
    details: bool = True
    do_sample: bool = False
    max_new_tokens: int | None = 20
    ignore_eos_token: bool = False
    repetition_penalty: float | None = Field(None, gt=0, le=MAX_REPETITION_PENALTY)
    return_full_text: bool | None = False
    seed: int | None = Field(None, ge=0, le=UINT64_MAX)
    stop: StopList = Field(default_factory=list)
    temperature: float | None = Field(None, gt=0, le=MAX_NATIVE_TEMPERATURE)
    top_k: int | None = Field(None, gt=0, le=MAX_TOP_K)
    top_p: float | None = Field(None, gt=0, lt=1)
    truncate: int | None = Field(None, ge=1, le=UINT32_MAX)
    typical_p: float | None = Field(None, gt=0, lt=1)
    watermark: bool = False
    response_format: dict | None = None
    return_k_alternatives: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("adapter_parameters")
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


class GenerateRequest(StrictModel):
    inputs: str
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False

    @model_validator(mode="after")
    def _best_of(self) -> "GenerateRequest":
        if (self.parameters.best_of or 1) > 1:
            if not self.parameters.samples:
                raise ValueError("`parameters.best_of` > 1 needs sampling (do_sample, temperature, top_k, ...)")
            if self.stream:
                raise ValueError("`parameters.best_of` > 1 cannot be streamed")
        return self


def _token(tok: ModelTokenizer, token_id: int, logprob: float, text: str | None = None) -> dict:
    """A token's details; `text` defaults to the token's own decoded text."""
    if text is None:
        text = tok.decode_token(token_id)
    return {"id": token_id, "text": text, "logprob": logprob if math.isfinite(logprob) else None,
            "special": token_id in tok.special_ids}


class _Native:
    """One native request, prepared: validation done, ready to run or stream."""

    def __init__(self, backend: Backend, adapter: Adapter | None, tokenizer: ModelTokenizer, body: GenerateRequest,
                 input_ids: list[int], grammar: str):
        p = body.parameters
        self.backend = backend
        self.tokenizer = tokenizer
        self.body = body
        self.input_ids = input_ids
        seed, temperature = None, None
        if p.samples:  # like TGI, a sampled request without a seed gets a random one, reported in details
            seed = p.seed if p.seed is not None else random.getrandbits(63)
            temperature = p.temperature or 1.0
        max_new = backend.check_lengths(input_ids, p.max_new_tokens, None, "inputs", "parameters.max_new_tokens")
        # best_of candidates differ by seed: seed, seed + 1, ... (mod 2**64, the proto's range)
        self.seeds = [None] if seed is None else [(seed + i) % (UINT64_MAX + 1) for i in range(p.best_of or 1)]
        self.requests = [backend.generation_request(
            input_ids, max_new, adapter, tokenizer,
            sampling_parameters(temperature=temperature, top_k=p.top_k, top_p=p.top_p, typical_p=p.typical_p,
                                repetition_penalty=p.repetition_penalty, seed=seed),
            ignore_eos=p.ignore_eos_token, top_n_tokens=p.return_k_alternatives or 0,
            prefill_logprobs=p.decoder_input_details, grammar=grammar) for seed in self.seeds]
        self.generations: list[Generation] = []

    def start(self) -> "_Native":
        """Queues every candidate (all or none) before the answer starts: overload is a 429, never a 200 and
        then an error, and nothing is left running when it is refused."""
        self.generations = self.backend.scheduler.generate_all(self.requests)
        return self

    def chunks(self, candidate: int = 0):
        return generate_text(self.generations[candidate], self.tokenizer, self.body.parameters.stop)

    def full_text(self, generated: str) -> str:
        return self.body.inputs + generated if self.body.parameters.return_full_text else generated

    def token(self, chunk: TextChunk, text: str | None = None) -> dict:
        t = _token(self.tokenizer, chunk.token.token_id, chunk.token.logprob, text)
        if self.body.parameters.return_k_alternatives:
            t["alternative_tokens"] = [_token(self.tokenizer, i, lp) for i, lp in chunk.token.top_tokens]
        return t

    def prefill(self, first: TextChunk | None) -> list[dict]:
        if not self.body.parameters.decoder_input_details:
            return []
        logprobs = (first.token.prefill_logprobs if first else None) or [math.nan] * len(self.input_ids)
        return [_token(self.tokenizer, t, lp) for t, lp in zip(self.input_ids, logprobs)]

    def details(self, candidate: "_Candidate") -> dict:
        return {"finish_reason": candidate.finish, "prompt_tokens": len(self.input_ids),
                "generated_tokens": len(candidate.tokens), "seed": self.seeds[candidate.index],
                "prefill": self.prefill(candidate.first), "tokens": candidate.tokens}


@dataclass(slots=True)
class _Candidate:
    index: int
    texts: list[str] = field(default_factory=list)
    tokens: list[dict] = field(default_factory=list)
    first: TextChunk | None = None
    finish: str = "length"
    sum_logprob: float = 0.0


async def _collect(native: _Native, index: int) -> _Candidate:
    candidate = _Candidate(index)
    async for chunk in native.chunks(index):
        candidate.first = candidate.first or chunk
        candidate.texts.append(chunk.text)
        candidate.tokens.append(native.token(chunk))
        candidate.sum_logprob += chunk.token.logprob
        candidate.finish = chunk.finish_reason or candidate.finish
    return candidate


async def _prepare(request: Request, body: GenerateRequest | None = None) -> _Native:
    backend: Backend = request.app.state.backend
    if body is None:
        body = await parse_body(request, GenerateRequest)
    p = body.parameters
    backend.check_choices(p.best_of or 1, "parameters.best_of")
    adapter, tokenizer = await backend.resolve_model(p.adapter_id, p.adapter_source, p.api_token,
                                                     param="parameters.adapter_id", merged=p.merged_adapters,
                                                     merged_param="parameters.merged_adapters", scale=p.adapter_scale,
                                                     scale_param="parameters.adapter_scale")
    input_ids = await backend.encode(tokenizer, body.inputs, "inputs", adapter=adapter)
    if p.truncate is not None and len(input_ids) > p.truncate:
        input_ids = input_ids[-p.truncate:]
    grammar = response_format_grammar(p.response_format, "parameters.response_format")
    if grammar:
        grammar = await backend.grammars.prepare(grammar, "parameters.response_format")
    return _Native(backend, adapter, tokenizer, body, input_ids, grammar).start()


async def _generate_response(native: _Native) -> dict:
    """Runs every best_of candidate at once and answers with the most likely one (highest summed logprob)."""
    try:
        candidates = await gather_all(*(_collect(native, i) for i in range(len(native.requests))))
    except GenerationFailed as e:
        raise APIError(500 if e.server_error else 400, str(e)) from None
    best, *others = sorted(candidates, key=lambda c: c.sum_logprob, reverse=True)
    out = {"generated_text": native.full_text("".join(best.texts))}
    if native.body.parameters.details:
        out["details"] = native.details(best)
        if others:
            out["details"]["best_of_sequences"] = [
                {"generated_text": native.full_text("".join(c.texts)), **native.details(c)} for c in others]
    return out


async def token_texts(chunks, special_ids: frozenset[int]):
    """(chunk, the text its event carries). Events whose text is held back wait for the chunk that releases it,
    so that text held at the end (an incomplete character before a special EOS token) goes to the last token it
    belongs to, not to the special token, whose text clients drop: the texts of the non-special tokens join to
    exactly `generated_text`."""
    waiting: list[list] = []
    async for chunk in chunks:
        entry = [chunk, chunk.text]
        if chunk.finish_reason and chunk.text and chunk.token.token_id in special_ids:
            owner = next((w for w in reversed(waiting) if w[0].token.token_id not in special_ids), None)
            if owner is not None:
                owner[1], entry[1] = owner[1] + chunk.text, ""
        waiting.append(entry)
        if not chunk.held or chunk.finish_reason:
            for held_chunk, text in waiting:
                yield held_chunk, text
            waiting.clear()


async def _stream_events(native: _Native):
    texts, count = [], 0
    try:
        async for chunk, text in token_texts(native.chunks(), native.tokenizer.special_ids):
            count += 1
            texts.append(chunk.text)
            # LoRAX streams each token's own text; stop-string hold-back can shift text between tokens.
            event = {"token": native.token(chunk, text), "generated_text": None, "details": None}
            if chunk.finish_reason:
                event["generated_text"] = native.full_text("".join(texts))
                event["details"] = {"finish_reason": chunk.finish_reason, "prompt_tokens": len(native.input_ids),
                                    "generated_tokens": count, "seed": native.seeds[0]}
            yield sse_event(event)
    except GenerationFailed as e:
        yield sse_event(APIError(500 if e.server_error else 400, str(e)).lorax_body())


async def generate(request: Request):
    native = await _prepare(request)
    return JSONResponse(await _generate_response(native))


async def generate_stream(request: Request):
    return sse_response(_stream_events(await _prepare(request)))


async def compat_generate(request: Request):
    """`POST /`: LoRAX's Python client; a JSON list for stream=false, SSE events for stream=true."""
    body = await parse_body(request, GenerateRequest)
    native = await _prepare(request, body)
    if body.stream:
        return sse_response(_stream_events(native))
    return JSONResponse([await _generate_response(native)])
