"""`--num-shard 2` on CPU (gloo): the same tokens as one rank and as transformers / peft, base and mixed
adapters in one batch; a dead rank is a clear failure, never a hang."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import psutil
import pytest
from transformers import AutoTokenizer

from launcher.tiny_model import build_tiny_adapter
from tests.conftest import LoomServer

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def qwen_adapters(tmp_path_factory, model_dirs):
    root = tmp_path_factory.mktemp("tp-adapters")
    base = model_dirs["qwen2"]
    return [build_tiny_adapter(root / "all", base, rank=8, alpha=16, target_modules=ATTN + MLP, seed=1),
            build_tiny_adapter(root / "rows", base, rank=4, alpha=8, target_modules=["o_proj", "down_proj"],
                               use_rslora=True, seed=2),
            build_tiny_adapter(root / "mlp", base, rank=16, alpha=16, target_modules=MLP, seed=3)]


@pytest.fixture(scope="module")
def two_ranks(model_dirs, qwen_adapters):
    root = str(qwen_adapters[0].parent)
    srv = LoomServer(model_dirs["qwen2"], "--num-shard", "2", "--local-adapter-root", root,
                     "--max-batch-total-tokens", "8192").start()
    yield srv
    srv.stop()


def run_batch(url: str, jobs: list[tuple[str, str | None, int]]) -> list[list[int]]:
    async def go():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i, prompt, adapter, n):
                await asyncio.sleep(0.02 * i)
                params = {"max_new_tokens": n, "details": True}
                if adapter:
                    params["adapter_id"] = adapter
                r = await client.post(f"{url}/generate", json={"inputs": prompt, "parameters": params})
                assert r.status_code == 200, r.text
                return [t["id"] for t in r.json()["details"]["tokens"]]
            return await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)))
    return asyncio.run(go())


def test_two_ranks_equal_transformers_and_peft(two_ranks, model_dirs, qwen_adapters, reference):
    base = model_dirs["qwen2"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    adapters = [None] + [str(a) for a in qwen_adapters]
    jobs = [(f"ship {i} sails " * (1 + i % 4), adapters[i % 4], 6 + i) for i in range(12)]
    info = httpx.get(f"{two_ranks.url}/info", timeout=10).json()
    assert info["num_shard"] == 2
    for (prompt, adapter, n), got in zip(jobs, run_batch(two_ranks.url, jobs)):
        want = reference.greedy(base, tokenizer(prompt)["input_ids"], n, adapter_dir=adapter)
        assert got == want, (prompt, adapter)


def test_a_killed_rank_fails_requests_and_stops_loom(model_dirs):
    srv = LoomServer(model_dirs["llama"], "--num-shard", "2", "--max-batch-total-tokens", "4096").start()
    try:
        shards = [p for p in psutil.Process(srv.proc.pid).children(recursive=True)
                  if "shard" in " ".join(p.cmdline()) and "--rank" in p.cmdline()]
        victim = next(p for p in shards if p.cmdline()[p.cmdline().index("--rank") + 1] == "1")
        with httpx.stream("POST", f"{srv.url}/generate_stream", json={"inputs": "hello", "parameters": {
                "max_new_tokens": 400, "ignore_eos_token": True}}, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            victim.send_signal(signal.SIGKILL)
            rest = list(lines)
        assert any('"error"' in line for line in rest), rest[-3:]
        deadline = time.monotonic() + 20
        while srv.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert srv.proc.returncode not in (None, 0)
    finally:
        srv.stop()


def test_two_ranks_preempt_chunk_and_share_prefixes_exactly(model_dirs, qwen_adapters, reference):
    """A KV cache of 24 blocks for 16 concurrent requests, prompts prefilled 16 tokens a step, a system prompt
    shared per adapter: preemption, chunking and prefix hits all happen at 2 ranks, and every output is still
    transformers' / peft's."""
    from tests.operating import kv_idle, scrape, wait_until

    base = model_dirs["qwen2"]
    srv = LoomServer(base, "--num-shard", "2", "--local-adapter-root", str(qwen_adapters[0].parent),
                     "--max-batch-total-tokens", "384", "--max-total-tokens", "384", "--max-input-length", "256",
                     "--max-batch-prefill-tokens", "16").start()
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
        adapters = [None, str(qwen_adapters[0]), str(qwen_adapters[1])]
        system = "the harbor master wrote in the log that every ship " * 3
        jobs = [(system + f"and ship {i} sails", adapters[i % 3], 24 + i % 5) for i in range(16)]
        for (prompt, adapter, n), got in zip(jobs, run_batch(srv.url, jobs)):
            want = reference.greedy(base, tokenizer(prompt)["input_ids"], n, adapter_dir=adapter)
            assert got == want, (prompt, adapter)
        counters = {name: value for (name, _), value in scrape(srv.url).items()}
        assert counters["vllm:num_preemptions_total"] > 0
        assert counters["vllm:prefix_cache_hits_total"] > 0
        assert wait_until(lambda: kv_idle(srv.url), 10)
    finally:
        srv.stop()
