"""The four workloads and the client that plays them: every request sent at once through the OpenAI SDK's
streaming completions, temperature 0, EOS ignored so that each request yields exactly its new tokens.

Prompts are token ids (the same ids reach every server, whatever each one's tokenizer would add): the start of
a seeded little story, cut at the workload's length; each (workload, repeat) draws its own, so no server's prefix cache carries a repeat's
prompts into the next one, and every server gets the same prompts for the same repeat.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path

from bench.stats import Timing

SUBJECTS = ("the old teacher", "a young engineer", "my neighbour", "the village baker", "a curious child",
            "the ship's captain", "an art student", "the night nurse", "a retired pilot", "the town librarian")
ACTIONS = ("found a letter under the door", "planted a garden by the river", "fixed the broken clock",
           "walked to the market before dawn", "wrote a song about the winter", "lost the key to the shop",
           "painted the bridge in bright colours", "read every book about the stars", "built a small wooden boat",
           "baked bread for the whole street")
AFTER = ("The next morning,", "Later that week,", "Nobody knew why, but", "Years afterwards,", "In the evening,")


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(AFTER)} {rng.choice(SUBJECTS)} {rng.choice(ACTIONS)}."


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    adapters: bool  # round-robin over every adapter, or the base model
    prompt_tokens: int
    new_tokens: int


WORKLOADS = (
    Workload("adapters-100-32", True, 100, 32),
    Workload("adapters-12-128", True, 12, 128),
    Workload("base-100-32", False, 100, 32),
    Workload("base-12-128", False, 12, 128),
)


@dataclass(frozen=True, slots=True)
class Request:
    prompt: list[int]
    new_tokens: int
    adapter: int  # -1: the base model


@dataclass(slots=True)
class Result:
    timing: Timing
    text: str
    tokens: int  # completion tokens the server reported (or the chunks seen, without a usage chunk)


def prompts(tokenizer, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` prompts of exactly `length` token ids each, every one starting differently."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        words = [f"Story {seed % 1000}-{i}: {rng.choice(SUBJECTS).capitalize()} {rng.choice(ACTIONS)}."]
        ids: list[int] = []
        while len(ids) < length:
            words.append(_sentence(rng))
            ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
        out.append(ids[:length])
    return out


def make_requests(workload: Workload, tokenizer, count: int, adapters: int, seed: int) -> list[Request]:
    ids = prompts(tokenizer, count, workload.prompt_tokens, seed)
    return [Request(p, workload.new_tokens, i % adapters if workload.adapters else -1) for i, p in enumerate(ids)]


async def one(client, server, req: Request, start: float) -> Result:
    """Streams one request; Timing counts from `start` (all requests are sent then) and stamps every chunk
    that carries text, so tokens[0] is the TTFT and the gaps are inter-token latencies."""
    model, extra = server.request(req.adapter)
    stamps: list[float] = []
    text, tokens = [], 0
    stream = await client.completions.create(
        model=model, prompt=req.prompt, max_tokens=req.new_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True} | extra)
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            stamps.append(now - start)
            text.append(chunk.choices[0].text)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return Result(Timing(0.0, stamps), "".join(text), tokens or len(stamps))


async def play(server, requests: list[Request]) -> tuple[list[Result], float]:
    """Every request sent at once; the results in request order and the wall time to the last token."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=3600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, server, r, start) for r in requests))
        return list(results), time.perf_counter() - start


def warm(server, tokenizer, adapters: int) -> None:
    """One short request per adapter and one on the base model before measuring, so that every server has
    read its adapters and run its first steps (lazy loading, compilation) outside the measured runs."""
    ids = prompts(tokenizer, adapters + 1, 16, seed=999_999)
    asyncio.run(play(server, [Request(p, 4, i - 1) for i, p in enumerate(ids)]))


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
