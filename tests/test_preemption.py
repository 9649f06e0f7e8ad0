"""On-demand KV blocks and preemption: with a cache far smaller than the load, running requests grow block by
block, the newest are preempted when blocks run out and resume by recompute. Every request's output is what it
is without preemption — greedy tokens equal transformers', and seeded sampling, penalties, min_tokens,
logprobs and grammars give identical tokens — and the capacity comes back to exactly the start."""

from __future__ import annotations

import asyncio
import random

import pytest

from router.backend import sampling_parameters
from router.structured import json_grammar
from shard.engine import Engine
from tests.inprocess import Stack, idle_capacity, request, settle

NEW_TOKENS = 40
SMALL_CACHE_BLOCKS = 16  # 256 tokens for 8 requests of ~70 tokens each


def engine_with_blocks(model_dir, blocks: int, **engine_args) -> Engine:
    engine = Engine(str(model_dir), **engine_args)
    engine.warmup(64, blocks * engine.block_size)
    assert engine.num_blocks == blocks
    return engine


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, 300) for _ in range(rng.randint(12, 40))] for _ in range(8)]


async def events_of(generation) -> list:
    async with generation:
        return [event async for event in generation]


def serve(engine: Engine, requests, tmp_path, **stack_args) -> tuple[list[list], int]:
    """Every request's TokenEvents, all queued at once, and the preemptions it took; checks that nothing is
    held afterwards."""
    async def run():
        async with Stack(engine, tmp_path, **stack_args) as stack:
            outputs = await asyncio.gather(*(events_of(g) for g in stack.scheduler.generate_all(requests)))
            assert await settle(stack.scheduler, engine) == idle_capacity(engine)
            return outputs, stack.scheduler.num_preemptions
    return asyncio.run(run())


def test_greedy_outputs_survive_preemption(llama_dir, reference, prompts, tmp_path):
    engine = engine_with_blocks(llama_dir, SMALL_CACHE_BLOCKS)
    outputs, preemptions = serve(engine, [request(p, NEW_TOKENS) for p in prompts], tmp_path)
    assert preemptions >= 4  # the test is only worth something if the cache was far too small
    for prompt, events in zip(prompts, outputs):
        assert [e.token_id for e in events] == reference.greedy(llama_dir, prompt, NEW_TOKENS, stop_at_eos=False)


def stateful_requests(prompts: list[list[int]]) -> list:
    """Requests whose next token depends on state a resumed sequence must rebuild exactly: seeded draws,
    penalties over generated tokens, min_tokens masks, top logprobs, prompt logprobs and a grammar."""
    grammar = json_grammar({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    out = []
    for i, prompt in enumerate(prompts):
        sampling = sampling_parameters(temperature=0.9, top_p=0.95, seed=100 + i,
                                       repetition_penalty=1.3 if i % 2 else None,
                                       frequency_penalty=0.4 if i % 3 == 0 else None)
        fields = {"top_n_tokens": 3, "prefill_logprobs": i == 1}
        if i == 2:
            fields |= {"min_new_tokens": 20, "stop_token_ids": frozenset({0, 1, 2})}
        if i == 3:
            fields |= {"grammar": grammar}
        out.append(request(prompt, NEW_TOKENS, sampling=sampling, **fields))
    return out


def test_seeded_sampling_and_sequence_state_survive_preemption(llama_dir, prompts, tmp_path):
    requests = stateful_requests(prompts)
    roomy, none = serve(engine_with_blocks(llama_dir, 256), requests, tmp_path)
    tight, preemptions = serve(engine_with_blocks(llama_dir, SMALL_CACHE_BLOCKS), requests, tmp_path)
    assert none == 0 and preemptions >= 4
    for a, b in zip(roomy, tight):
        assert [e.token_id for e in a] == [e.token_id for e in b]
        assert [e.logprob for e in a] == pytest.approx([e.logprob for e in b], abs=1e-4)
        assert [[t for t, _ in e.top_tokens] for e in a] == [[t for t, _ in e.top_tokens] for e in b]
    assert roomy[1][0].prefill_logprobs == pytest.approx(tight[1][0].prefill_logprobs, abs=1e-4)
    assert all(e.prefill_logprobs is None for e in tight[1][1:])
    assert len({tuple(e.token_id for e in out) for out in roomy}) == len(roomy)  # they did sample


def test_a_request_that_outgrows_the_cache_fails_alone(llama_dir, reference, prompts, tmp_path):
    from router.generation import GenerationFailed

    engine = engine_with_blocks(llama_dir, 8)

    async def run():
        async with Stack(engine, tmp_path) as stack:
            small = stack.scheduler.generate(request(prompts[0], 8))
            huge = stack.scheduler.generate(request(prompts[1], 8 * engine.block_size))
            results = await asyncio.gather(events_of(small), events_of(huge), return_exceptions=True)
            assert await settle(stack.scheduler, engine) == idle_capacity(engine)
            return results
    small, huge = asyncio.run(run())
    assert [e.token_id for e in small] == reference.greedy(llama_dir, prompts[0], 8, stop_at_eos=False)
    assert isinstance(huge, GenerationFailed) and "cannot hold" in str(huge)


def test_aborts_while_prefilling_decoding_or_preempted_leave_nothing(llama_dir, reference, prompts, tmp_path):
    """Requests cancelled at every stage — mid-chunked-prefill, mid-decode, while queued again after a
    preemption — hand back every block; the requests that run on are unchanged."""
    engine = engine_with_blocks(llama_dir, SMALL_CACHE_BLOCKS)

    async def run():
        async with Stack(engine, tmp_path, max_batch_prefill_tokens=8) as stack:
            generations = stack.scheduler.generate_all([request(p, NEW_TOKENS) for p in prompts])
            keep = [asyncio.ensure_future(events_of(g)) for g in generations[::2]]
            for k, generation in enumerate(generations[1::2]):
                async with generation:
                    for _ in range(k * 6):  # the first leaves before its first token
                        await anext(generation)
            outputs = await asyncio.gather(*keep)
            assert stack.scheduler.num_preemptions > 0
            assert await settle(stack.scheduler, engine) == idle_capacity(engine)
            return outputs
    outputs = asyncio.run(run())
    for prompt, events in zip(prompts[::2], outputs):
        assert [e.token_id for e in events] == reference.greedy(llama_dir, prompt, NEW_TOKENS, stop_at_eos=False)
