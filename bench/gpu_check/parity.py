"""Correctness stages: the test suite's parity cases on the kit's device, against transformers (+ peft) on the
same device.

`parity`, in float32, where every token must equal the reference's: each family alone and in a batch with
requests joining mid-decode (tests/engine_driver.py), a busy batch of many adapters beside base-model rows,
and through the router's scheduler (tests/inprocess.py): preempted for lack of KV blocks, from cached
prefixes, in prefill chunks. `bf16`: the same engine and reference in bfloat16, where kernels round
differently: the share of identical tokens and where they first diverge.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import torch

from bench.gpu_check.common import Recorder, Sizes, summarize_matches
from launcher.tiny_model import build_tiny_adapter, build_tiny_model
from shard.engine import Engine, SequenceRequest
from tests.conftest import Reference
from tests.engine_driver import EngineDriver
from tests.inprocess import Stack, collect, idle_capacity, request, settle

# Prompt lengths around block boundaries (16) and the Mistral and Gemma windows (48, 24).
PROMPT_LENS = (1, 17, 16, 60, 33, 49, 5, 24, 40, 15)
# (rank, alpha, targets, rslora) of the busy batch's adapters, cycled: every target set and rank appears.
ADAPTER_SPECS = [(4, 8, ["q_proj", "v_proj"], False), (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
                 (16, 16, ["gate_proj", "up_proj", "down_proj"], False), (8, 32, "all-linear", True),
                 (12, 24, ["k_proj", "gate_proj"], False), (16, 32, "all-linear", False)]


def make_engine(model_dir: Path, sizes: Sizes, dtype: torch.dtype, blocks: int = 1024, prefill: int = 256) -> Engine:
    """An engine for a stage's tiny models: a fixed cache, a pool for the busy batch's adapters, limits that
    keep the warmup's worst steps small."""
    engine = Engine(str(model_dir), device=sizes.device, dtype=dtype, adapter_pool_pages=64,
                    kv_cache_bytes=64 << 20)
    engine.warmup(prefill, blocks * engine.block_size, max_concurrent_requests=32, max_active_adapters=8)
    return engine


def prompts_for(vocab: int, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(PROMPT_LENS[i % len(PROMPT_LENS)])] for i in range(count)]


def staggered(driver: EngineDriver, requests: list[SequenceRequest], n: int) -> dict[int, list[int]]:
    """Half the requests join at the first step, the rest 2 steps later, while the first ones decode; each runs
    to n tokens and is released (continuous batching)."""
    joins = {r.id: 2 * (2 * i // len(requests)) for i, r in enumerate(requests)}
    out: dict[int, list[int]] = {}
    released: set[int] = set()
    step = 0
    while len(released) < len(requests):
        done = [i for i, t in out.items() if len(t) == n and i not in released]
        decode = [i for i, t in out.items() if len(t) < n]
        for r in driver.step([r for r in requests if joins[r.id] == step], decode, done):
            if r.error:
                raise RuntimeError(f"sequence {r.request_id}: {r.error}")
            out.setdefault(r.request_id, []).append(r.token_id)
        released.update(done)
        step += 1
    return out


def families(rec: Recorder, sizes: Sizes, work: Path, dtype: str = "float32") -> None:
    """Each family alone (one request at a time) and batched, against the reference in `dtype`."""
    reference = Reference(sizes.device, dtype)
    for seed, family in enumerate(sizes.families):
        with rec.case(f"{family}") as out:
            path = build_tiny_model(work / f"{family}-{dtype}", family, seed=seed)
            prompts = prompts_for(reference.model(path).config.vocab_size, sizes.prompts, seed)
            want = [reference.greedy(path, p, sizes.new_tokens, stop_at_eos=False) for p in prompts]
            driver = EngineDriver(make_engine(path, sizes, getattr(torch, dtype)))
            alone = [driver.generate([SequenceRequest(1, p)], sizes.new_tokens)[1] for p in prompts]
            batched = staggered(driver, [SequenceRequest(i, p) for i, p in enumerate(prompts)], sizes.new_tokens)
            out["alone"] = summarize_matches(list(zip(alone, want)))
            out["batched"] = summarize_matches([(batched[i], w) for i, w in enumerate(want)])


def busy_adapters(rec: Recorder, sizes: Sizes, work: Path) -> None:
    """`sizes.adapters` adapters of every rank and target set and base-model rows in one continuous batch."""
    with rec.case("busy_adapters") as out:
        base = build_tiny_model(work / "llama-adapters", "llama", seed=7)
        paths = []
        for i in range(sizes.adapters):
            rank, alpha, targets, rslora = ADAPTER_SPECS[i % len(ADAPTER_SPECS)]
            paths.append(build_tiny_adapter(work / f"adapter{i}", base, rank, alpha, targets, use_rslora=rslora,
                                            seed=i))
        driver = EngineDriver(make_engine(base, sizes, torch.float32))
        for i, path in enumerate(paths):
            driver.load_adapter(f"a{i}", str(path))
        prompts = prompts_for(driver.info.vocab_size, sizes.adapters + 2, 3)
        requests = [SequenceRequest(i, p, adapter_id=f"a{i}" if i < len(paths) else "")
                    for i, p in enumerate(prompts)]
        got = staggered(driver, requests, sizes.new_tokens)
        reference = Reference(sizes.device)
        pairs = []
        for i, prompt in enumerate(prompts):
            adapter = paths[i] if i < len(paths) else None
            pairs.append((got[i], reference.greedy(base, prompt, sizes.new_tokens, stop_at_eos=False,
                                                   adapter_dir=adapter)))
        out.update(summarize_matches(pairs), adapters=len(paths))


def scheduled(rec: Recorder, sizes: Sizes, work: Path) -> None:
    """Through the router's scheduler and the shard's gRPC service: preempted, prefix-cached, chunked."""
    model = build_tiny_model(work / "llama-scheduled", "llama", seed=11)
    reference = Reference(sizes.device)
    rng = random.Random(5)
    n = max(sizes.new_tokens, 16)  # long enough that 8 requests outgrow a 16-block cache

    def check(out: dict, prompts: list[list[int]], outputs: list[list[int]]) -> None:
        want = [reference.greedy(model, p, n, stop_at_eos=False) for p in prompts]
        out.update(summarize_matches(list(zip(outputs, want))))

    with rec.case("preempted") as out:
        prompts = [[rng.randrange(3, 300) for _ in range(rng.randint(12, 40))] for _ in range(8)]
        engine = make_engine(model, sizes, torch.float32, blocks=16, prefill=64)
        outputs, stack = serve(engine, work, [request(p, n) for p in prompts])
        out["preemptions"] = stack.scheduler.num_preemptions
        check(out, prompts, outputs)
    with rec.case("prefix_cached") as out:
        system = [rng.randrange(3, 300) for _ in range(70)]
        prompts = [system + [10 + i, 20 + i] for i in range(4)]
        engine = make_engine(model, sizes, torch.float32)
        outputs, stack = serve(engine, work, [request(p, n) for p in prompts], one_by_one=True)
        out["hit_tokens"] = stack.scheduler.blocks.hit_tokens
        check(out, prompts, outputs)
    with rec.case("chunked") as out:
        prompts = [[rng.randrange(3, 300) for _ in range(k)] for k in (90, 5, 37, 64, 17)]
        engine = make_engine(model, sizes, torch.float32)
        outputs, _ = serve(engine, work, [request(p, n) for p in prompts], max_batch_prefill_tokens=16,
                           prefix_caching=False)
        check(out, prompts, outputs)


def serve(engine: Engine, work: Path, requests, one_by_one: bool = False, **stack_args):
    """Every request's tokens through a Stack (all at once, or each after the one before), and the stack;
    raises when capacity is not all handed back."""
    async def run():
        async with Stack(engine, work, **stack_args) as stack:
            if one_by_one:
                outputs = [await collect(stack.scheduler.generate(r)) for r in requests]
            else:
                outputs = await asyncio.gather(*(collect(g) for g in stack.scheduler.generate_all(requests)))
            held = await settle(stack.scheduler, engine)
            if held != idle_capacity(engine):
                raise RuntimeError(f"capacity not handed back: {held}")
            return list(outputs), stack
    return asyncio.run(run())


def parity(rec: Recorder, sizes: Sizes, work: Path) -> None:
    families(rec, sizes, work)
    busy_adapters(rec, sizes, work)
    scheduled(rec, sizes, work)


def bf16(rec: Recorder, sizes: Sizes, work: Path) -> None:
    families(rec, sizes, work, dtype="bfloat16")
