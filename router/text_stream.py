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
    finish_reason: str | None = None  # "length" | "eos_token" | "stop_sequence"


async def generate_text(generation: Generation, tokenizer: ModelTokenizer, stop: list[str]) -> AsyncIterator[TextChunk]:
    """Yields one TextChunk per generated token of a queued generation; the last one carries the finish reason."""
    detokenizer = IncrementalDetokenizer(tokenizer)
    stops = StopMatcher(stop)
    async with generation as tokens:
        async for event in tokens:
            piece = detokenizer.push(event.token_id)
            if event.finish_reason:
                piece += detokenizer.flush()
            text, hit = stops.feed(piece)
            if hit:
                yield TextChunk(text, event, "stop_sequence")
                return
            if event.finish_reason:
                yield TextChunk(text + stops.flush(), event, event.finish_reason)
                return
            yield TextChunk(text, event)
