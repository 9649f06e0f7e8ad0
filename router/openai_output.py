"""The JSON of OpenAI's chat and legacy completion responses: choices, logprobs (vLLM's `prompt_logprobs`
too), usage and the response envelope, built from generated chunks."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from router.chat_output import AnswerFormat, ChatAnswer
from router.generation import GenerationRequest, TokenEvent
from router.text_stream import TextChunk
from router.tokenization import ModelTokenizer

FINISH_REASONS = {"eos_token": "stop", "stop_token": "stop", "stop_sequence": "stop", "length": "length"}


def safe_logprob(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


@dataclass(slots=True)
class Job:
    """One choice to generate: `n` of them per prompt (or `best_of`, of which the best `n` are kept)."""

    index: int
    prompt_index: int
    request: GenerationRequest
    echo: str = ""  # text put before the generated text (completions' prompt, chat's last assistant message)


@dataclass(slots=True)
class Choice:
    job: Job
    answer: ChatAnswer | None = None  # chat: how the text splits into reasoning, content and tool calls
    texts: list[str] = field(default_factory=list)
    parts: list[tuple] = field(default_factory=list)  # chat: every part the answer gave so far
    logprobs: list[dict] = field(default_factory=list)
    tokens: int = 0
    chars: int = 0  # text emitted so far, for completions' text_offset
    sum_logprob: float = 0.0
    finish: str | None = None
    prompt_logprobs: list | None = None


class Completion:
    """Builds one OpenAI response (chat or legacy completions, stream or not) from generated chunks."""

    def __init__(self, tokenizer: ModelTokenizer, model: str, kind: str, prompt_tokens: int,
                 top_logprobs: int | None, answer_format: AnswerFormat | None = None):
        self.tokenizer = tokenizer
        self.kind = kind  # "chat" or "text"
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.top_logprobs = top_logprobs  # None: no logprobs asked
        self.answer_format = answer_format

    def choice_for(self, job: Job) -> Choice:
        return Choice(job, ChatAnswer(self.answer_format) if self.kind == "chat" else None)

    def add(self, choice: Choice, chunk: TextChunk) -> dict | None:
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

    def echo(self, choice: Choice, first: TextChunk, with_logprobs: bool) -> dict | None:
        """`echo`: the echoed text goes first; for completions, with logprobs, its prompt tokens' logprobs and
        top alternatives (the first token has none)."""
        choice.texts.append(choice.job.echo)
        lp = None
        if with_logprobs and self.top_logprobs is not None:
            ids = choice.job.request.input_ids
            prefill = first.token.prefill_logprobs or [math.nan] * len(ids)
            tops = first.token.prefill_top_tokens or [([], 0)] * len(ids)
            parts, offset = [], 0
            for i, (token_id, logprob, (top, _)) in enumerate(zip(ids, prefill, tops)):
                parts.append(self._token_logprobs(token_id, logprob, top, offset, first=i == 0))
                offset += len(self.tokenizer.decode_token(token_id))
            lp = merge_logprobs(parts)
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
                return {"token": text, "logprob": safe_logprob(lp), "bytes": list(text.encode())}
            item = entry(token_id, logprob)
            item["top_logprobs"] = [entry(t, lp) for t, lp in top]
            return {"content": [item]}
        text = tok.decode_token(token_id)
        alternatives = None
        if not first:  # the `logprobs` most likely tokens, and the token itself (vLLM's and OpenAI's answer)
            alternatives = {tok.decode_token(t): safe_logprob(lp) for t, lp in top}
            alternatives.setdefault(text, safe_logprob(logprob))
        return {"tokens": [text], "token_logprobs": [None if first else safe_logprob(logprob)],
                "top_logprobs": [alternatives], "text_offset": [offset]}

    def prompt_logprobs(self, input_ids: list[int], event: TokenEvent) -> list | None:
        """vLLM's `prompt_logprobs`: None for the first prompt token, then per token {id: {logprob, rank,
        decoded_token}} for the token and the asked number of most likely ones."""
        if event.prefill_logprobs is None:
            return None
        tops = event.prefill_top_tokens or [([], 0)] * len(input_ids)
        out: list = [None]
        for token_id, logprob, (top, rank) in list(zip(input_ids, event.prefill_logprobs, tops))[1:]:
            entries = {str(t): {"logprob": safe_logprob(lp), "rank": r + 1,
                                "decoded_token": self.tokenizer.decode_token(t)} for r, (t, lp) in enumerate(top)}
            entries.setdefault(str(token_id), {"logprob": safe_logprob(logprob), "rank": rank or None,
                                               "decoded_token": self.tokenizer.decode_token(token_id)})
            out.append(entries)
        return out

    def finish_reason(self, choice: Choice) -> str | None:
        if choice.finish is None:
            return None
        called = choice.answer is not None and choice.answer.calls and choice.finish != "length"
        return "tool_calls" if called else FINISH_REASONS[choice.finish]

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


def merge_logprobs(parts: list[dict]) -> dict | None:
    if not parts:
        return None
    merged: dict = {}
    for part in parts:
        for key, value in part.items():
            merged.setdefault(key, []).extend(value)
    return merged


def best(choices: list[Choice], n: int) -> list[Choice]:
    """`best_of`: per prompt, the `n` choices with the highest log-probability per token, renumbered."""
    kept = []
    for prompt in sorted({c.job.prompt_index for c in choices}):
        mine = [c for c in choices if c.job.prompt_index == prompt]
        mine.sort(key=lambda c: c.sum_logprob / max(c.tokens, 1), reverse=True)
        kept += mine[:n]
    for i, c in enumerate(kept):
        c.job.index = i
    return kept
