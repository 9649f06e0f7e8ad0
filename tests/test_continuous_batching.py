"""Many concurrent requests of different lengths, joining mid-decode, each token-exact with transformers."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from transformers import AutoTokenizer

from tests.conftest import LoomServer

WORDS = "the quick brown fox jumps over lazy dog pirate ship captain lighthouse mathematics model".split()


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(n)]


async def run_staggered(url: str, jobs: list[tuple[str, int]]) -> list[list[int]]:
    """Starts the requests a few milliseconds apart so later ones join a batch that is already decoding."""
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(i: int, prompt: str, max_new: int) -> list[int]:
            await asyncio.sleep(0.03 * i)
            r = await client.post(f"{url}/generate", json={"inputs": prompt, "parameters": {
                "max_new_tokens": max_new, "details": True}})
            assert r.status_code == 200, r.text
            return [t["id"] for t in r.json()["details"]["tokens"]]

        return await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(jobs)))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_concurrent_requests_are_token_exact(family, model_dirs, reference):
    model_dir = model_dirs[family]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(family)
    jobs = [(p, rng.randint(4, 60)) for p in prompts(20, seed=len(family))]
    srv = LoomServer(model_dir).start()
    try:
        outputs = asyncio.run(run_staggered(srv.url, jobs))
        metrics = httpx.get(f"{srv.url}/metrics", timeout=10).text
    finally:
        srv.stop()
    for (prompt, max_new), got in zip(jobs, outputs):
        assert got == reference.greedy(model_dir, tokenizer(prompt)["input_ids"], max_new), prompt
    assert "loom_kv_blocks_used 0.0" in metrics
