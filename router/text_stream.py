"""Tokens → text: incremental detokenization and stop strings on top of a scheduler Generation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from router.detokenizer import IncrementalDetokenizer
from router.generation import Generation, TokenEvent
from router.stops import StopMatcher
from router.tokenization import ModelTokenizer


@dataclass(slots=True)
class TextChunk:
    text: str  # new text, safe to show (never part of a stop string)
    token: TokenEvent
    finish_reason: str | None = None  # "length" | "eos_token" | "stop_token" | "stop_sequence"
    held: bool = False  # text of this or earlier tokens is still held back (it comes with a later chunk)


async def generate_text(generation: Generation, tokenizer: ModelTokenizer, stop: list[str],
                        include_stop: bool = False, skip_special_tokens: bool = True) -> AsyncIterator[TextChunk]:
    """Yields one TextChunk per generated token of a queued generation; the last one carries the finish reason.

    A stop string, and a token of the request's stop_token_ids, end the text right before them unless
    `include_stop` (vLLM's include_stop_str_in_output)."""
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    stops = StopMatcher(stop, include_stop)
    async with generation as tokens:
        async for event in tokens:
            dropped = event.finish_reason == "stop_token" and not include_stop
            piece = "" if dropped else detokenizer.push(event.token_id)
            if event.finish_reason:
                piece += detokenizer.flush()
            text, hit = stops.feed(piece)
            if hit:
                yield TextChunk(text, event, "stop_sequence")
                return
            if event.finish_reason:
                yield TextChunk(text + stops.flush(), event, event.finish_reason)
                return
            yield TextChunk(text, event, held=detokenizer.holding or stops.holding)
