"""Chunked prefill: a prompt longer than the step's prefill budget (--max-batch-prefill-tokens) is computed in
chunks over several steps, beside the running decodes, which keep streaming meanwhile. Outputs and prompt
logprobs equal an unchunked prefill's, for every family."""

from __future__ import annotations

import asyncio
import random

import pytest

from launcher.tiny_model import FAMILIES
from shard.engine import Engine
from tests.inprocess import Stack, idle_capacity, request, settle

BUDGET = 16


def warm(model_dir) -> Engine:
    engine = Engine(str(model_dir))
    engine.warmup(256, 8192)
    return engine


async def events_of(generation) -> list:
    async with generation:
        return [event async for event in generation]


def serve(engine: Engine, requests, tmp_path, **stack_args) -> list[list]:
    async def run():
        async with Stack(engine, tmp_path, **stack_args) as stack:
            outputs = await asyncio.gather(*(events_of(g) for g in stack.scheduler.generate_all(requests)))
            assert await settle(stack.scheduler, engine) == idle_capacity(engine)
            return outputs
    return asyncio.run(run())


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prompts_match_transformers(family, model_dirs, reference, tmp_path):
    """Prompts of 5-90 tokens in 16-token chunks, past the sliding windows (and Phi-3's longrope switch)."""
    model_dir = model_dirs[family]
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 300) for _ in range(n)] for n in (90, 5, 37, 64, 17)]
    outputs = serve(warm(model_dir), [request(p, 10) for p in prompts], tmp_path, max_batch_prefill_tokens=BUDGET,
                    prefix_caching=False)
    for prompt, events in zip(prompts, outputs):
        assert [e.token_id for e in events] == reference.greedy(model_dir, prompt, 10, stop_at_eos=False), len(prompt)


def test_chunked_prompt_logprobs_equal_whole_ones(llama_dir, tmp_path):
    engine = warm(llama_dir)
    prompt = [random.Random(2).randrange(3, 300) for _ in range(75)]
    asked = [request(prompt, 3, prefill_logprobs=True, top_n_tokens=2)]
    whole = serve(engine, asked, tmp_path)[0]
    chunked = serve(engine, asked, tmp_path, max_batch_prefill_tokens=BUDGET)[0]
    assert len(chunked[0].prefill_logprobs) == len(prompt)
    assert chunked[0].prefill_logprobs == pytest.approx(whole[0].prefill_logprobs, abs=1e-4)
    assert [e.token_id for e in chunked] == [e.token_id for e in whole]


def test_running_streams_keep_decoding_while_a_long_prompt_prefills(llama_dir, reference, tmp_path):
    engine = warm(llama_dir)
    long_prompt = [random.Random(4).randrange(3, 300) for _ in range(200)]

    async def run():
        async with Stack(engine, tmp_path, max_batch_prefill_tokens=BUDGET) as stack:
            stream = stack.scheduler.generate(request([5, 6, 7], 60))
            async with stream:
                first = [(await anext(stream)).token_id]
                long = asyncio.ensure_future(events_of(stack.scheduler.generate(request(long_prompt, 4))))
                while not long.done():
                    first.append((await anext(stream)).token_id)
                during = len(first) - 1
                first += [e.token_id async for e in stream]
            assert await settle(stack.scheduler, engine) == idle_capacity(engine)
            return first, during, await long
    first, during, long = asyncio.run(run())
    assert during >= 200 // BUDGET - 1  # one token per step while the prompt went through in chunks
    assert first == reference.greedy(llama_dir, [5, 6, 7], 60, stop_at_eos=False)
    assert [e.token_id for e in long] == reference.greedy(llama_dir, long_prompt, 4, stop_at_eos=False)
