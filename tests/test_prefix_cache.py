"""Adapter-aware prefix caching: full KV blocks computed for a prompt are reused by later requests with the
same prefix under the same adapter load, never across adapters, the base model or a re-bound name; prefill
computes only the uncached tail, and outputs stay exactly transformers' (+ peft's)."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from shard.engine import Engine
from tests.inprocess import Stack, idle_capacity, request, settle

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def engine(llama_dir, ops_adapters) -> Engine:
    engine = Engine(str(llama_dir), adapter_pool_pages=16)
    engine.warmup(256, 8192)
    for path in ops_adapters[:2]:
        engine.load_adapter(str(path), str(path))
    return engine


@pytest.fixture(scope="module")
def system() -> list[int]:
    rng = random.Random(3)
    return [rng.randrange(3, 300) for _ in range(70)]  # 4 full blocks and a part


def turn(system: list[int], i: int) -> list[int]:
    return system + [10 + i, 20 + i, 30 + i]


def adapted(engine: Engine, path, prompt: list[int], key: str | None = None):
    path = str(path)
    return request(prompt, NEW_TOKENS, path, engine.adapters.entries[path].num_pages,
                   cache_key=path + "#1" if key is None else key)


async def tokens(generation) -> list[int]:
    async with generation:
        return [event.token_id async for event in generation]


def one_by_one(engine: Engine, requests, tmp_path, **stack_args) -> tuple[list[list[int]], list[int]]:
    """Serves the requests in turn; returns their tokens and the prefix-cache hit tokens each one got."""
    async def run():
        async with Stack(engine, tmp_path, **stack_args) as stack:
            blocks, outputs, hits = stack.scheduler.blocks, [], []
            for r in requests:
                before = blocks.hit_tokens
                outputs.append(await tokens(stack.scheduler.generate(r)))
                hits.append(blocks.hit_tokens - before)
            assert await settle(stack.scheduler, engine) == idle_capacity(engine)
            return outputs, hits
    return asyncio.run(run())


def test_same_prefix_same_adapter_reuses_blocks(engine, llama_dir, ops_adapters, reference, system, tmp_path):
    requests = [adapted(engine, ops_adapters[0], turn(system, i)) for i in range(3)]
    requests += [request(turn(system, i), NEW_TOKENS) for i in range(2)]  # the base model: its own cache
    outputs, hits = one_by_one(engine, requests, tmp_path)
    assert hits == [0, 64, 64, 0, 64]  # the 4 full blocks of the shared system prompt
    for r, out in zip(requests, outputs):
        adapter_dir = ops_adapters[0] if r.adapter_id else None
        assert out == reference.greedy(llama_dir, r.input_ids, NEW_TOKENS, stop_at_eos=False, adapter_dir=adapter_dir)


def test_identical_prompt_recomputes_its_last_token(engine, llama_dir, reference, system, tmp_path):
    prompt = system[:64]  # exactly 4 blocks: the 4th is recomputed (its last token gives the first logits)
    outputs, hits = one_by_one(engine, [request(prompt, NEW_TOKENS)] * 3, tmp_path)
    assert hits == [0, 48, 48]
    assert outputs == [reference.greedy(llama_dir, prompt, NEW_TOKENS, stop_at_eos=False)] * 3


def test_other_adapters_and_rebound_names_never_share(engine, llama_dir, ops_adapters, reference, system, tmp_path):
    prompt = turn(system, 0)
    requests = [adapted(engine, ops_adapters[0], prompt), adapted(engine, ops_adapters[1], prompt),
                request(prompt, NEW_TOKENS),
                adapted(engine, ops_adapters[0], prompt, key=f"{ops_adapters[0]}#2")]  # the name loaded again
    outputs, hits = one_by_one(engine, requests, tmp_path)
    assert hits == [0, 0, 0, 0]
    for r, out, adapter_dir in zip(requests, outputs, [ops_adapters[0], ops_adapters[1], None, ops_adapters[0]]):
        assert out == reference.greedy(llama_dir, prompt, NEW_TOKENS, stop_at_eos=False, adapter_dir=adapter_dir)


def test_running_requests_share_blocks(engine, llama_dir, reference, system, tmp_path):
    """A request admitted while another with its prefix still runs holds the same blocks (reference count 2)."""
    async def run():
        async with Stack(engine, tmp_path) as stack:
            first = stack.scheduler.generate(request(turn(system, 0), 40))
            async with first:
                seen = [(await anext(first)).token_id for _ in range(3)]
                held = stack.scheduler.blocks.num_held
                second = await tokens(stack.scheduler.generate(request(turn(system, 1), NEW_TOKENS)))
                seen += [event.token_id async for event in first]
            assert stack.scheduler.blocks.hit_tokens == 64
            assert await settle(stack.scheduler, engine) == idle_capacity(engine)
            return seen, second, held
    first, second, held = asyncio.run(run())
    assert held == 5  # 73 prompt tokens + 3: five blocks, of which the second request shares four
    assert first == reference.greedy(llama_dir, turn(system, 0), 40, stop_at_eos=False)
    assert second == reference.greedy(llama_dir, turn(system, 1), NEW_TOKENS, stop_at_eos=False)


def test_prompt_logprobs_and_disabled_cache_compute_every_token(engine, system, tmp_path):
    prompt = turn(system, 0)
    with_logprobs = request(prompt, 2, prefill_logprobs=True)
    outputs, hits = one_by_one(engine, [request(prompt, 2), with_logprobs, request(prompt, 2)], tmp_path,
                               prefix_caching=False)
    assert hits == [0, 0, 0]
    _, hits = one_by_one(engine, [request(prompt, 2), with_logprobs], tmp_path)
    assert hits == [0, 0]  # prompt logprobs need every prompt position's logits


@pytest.mark.parametrize("family", ["mistral", "gemma2", "qwen3"])
def test_prefix_hits_match_transformers_for_windowed_and_other_families(family, model_dirs, reference, tmp_path):
    """Mistral's and Gemma 2's sliding windows cut the cached context too (prompts run past their windows)."""
    model_dir = model_dirs[family]
    engine = Engine(str(model_dir))
    engine.warmup(256, 8192)
    rng = random.Random(5)
    shared = [rng.randrange(3, 300) for _ in range(60)]
    prompts = [shared + [rng.randrange(3, 300) for _ in range(k)] for k in (3, 9, 1)]
    outputs, hits = one_by_one(engine, [request(p, 20) for p in prompts], tmp_path)
    assert hits[1:] == [48, 48]
    for prompt, out in zip(prompts, outputs):
        assert out == reference.greedy(model_dir, prompt, 20, stop_at_eos=False)


def test_served_prefix_cache_is_on_by_default_and_the_flag_turns_it_off(ops_server, llama_dir):
    """Over HTTP: a repeated prompt hits the cache (vLLM's counters say so); `--no-prefix-caching` serves the
    same tokens with no hit."""
    from tests.conftest import LoomServer
    from tests.operating import completion, scrape

    def hits_after_two(url: str) -> tuple[float, list]:
        texts = [httpx.post(f"{url}/v1/completions", json=completion(4, "the lighthouse keeper " * 12),
                            timeout=60).json()["choices"][0]["text"] for _ in range(2)]
        counters = {name: value for (name, _), value in scrape(url).items()}
        return counters["vllm:prefix_cache_hits_total"], texts

    before = {name: value for (name, _), value in scrape(ops_server.url).items()}["vllm:prefix_cache_hits_total"]
    hits, on = hits_after_two(ops_server.url)
    assert hits - before >= 16 and httpx.get(f"{ops_server.url}/info").json()["prefix_caching"] is True
    off_server = LoomServer(llama_dir, "--no-prefix-caching").start()
    try:
        hits, off = hits_after_two(off_server.url)
        assert hits == 0 and httpx.get(f"{off_server.url}/info").json()["prefix_caching"] is False
    finally:
        off_server.stop()
    assert on == off and on[0] == on[1]
