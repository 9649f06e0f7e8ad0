"""`python -m bench.kv` (`make bench-kv`): what owning the KV cache buys, each scenario side by side on the same
KV budget, on the router's scheduler driving the engine in this process (bench/inprocess.py).

- chats: chats without max_tokens under --max-total-tokens 4096, on a cache of 16 such reservations: reserving
  prompt + max_tokens at admission (what Loom did before; emulated exactly, since every reservation is 4,096
  tokens, by admitting at most 16 at once) against on-demand blocks with preemption.
- prefix: a 512-token system prompt per adapter (4 adapters), short user turns arriving over time: TTFT and prompt
  tokens computed with and without the prefix cache.
- chunked: the prefill budget on Loom's defaults (measured at warmup, router/prefill_budget.py) against the old
  fixed 4,096 (--max-input-length 1000, so no prompt was ever chunked): 8 streams decoding when two ~870-token
  prompts arrive at once, the streams' largest inter-token gap against their median; and a lone long prompt's
  TTFT (the median of a few runs, the two budgets taking turns).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import replace
from pathlib import Path

from bench.inprocess import make_engine, make_scheduler, serve
from bench.stats import percentile, summarize
from bench.workload import BenchRequest, ModelSpec, build_adapters, build_model
from common.defaults import DEFAULT_MAX_BATCH_PREFILL_TOKENS
from router.prefill_budget import measured_prefill_budget
from shard.step_costs import measure_step_costs

HERE = Path(__file__).resolve().parent
MAX_TOTAL = 4096


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 380) for _ in range(n)]  # inside the bench model's 384-token vocabulary


def _observe(scheduler) -> dict:
    """Peak running batch and prompt tokens computed, from the scheduler's step observer."""
    seen = {"peak_running": 0}

    def on_step(batch, reply, seconds):
        seen["peak_running"] = max(seen["peak_running"], scheduler.num_running)
    scheduler.on_step = on_step
    return seen


def run(engine, requests, adapters, budget: int, prefix_caching: bool = True, max_total: int | None = None,
        gate: int | None = None) -> dict:
    scheduler = make_scheduler(engine, budget, prefix_caching)
    seen = _observe(scheduler)

    async def go():
        return await serve(scheduler, engine, requests, adapters, max_total,
                           asyncio.Semaphore(gate) if gate else None)
    try:
        timings, wall = asyncio.run(go())
    finally:
        scheduler.client.close()
    prompt_tokens = sum(len(r.input_ids) for r in requests)
    return summarize(timings, wall) | seen | {
        "preemptions": scheduler.num_preemptions,
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_computed": prompt_tokens - scheduler.blocks.hit_tokens,
        "gap_p50_ms": _gap_ms(timings, 0.5),
        "gap_p99_ms": _gap_ms(timings, 0.99),
        "timings": timings,
    }


def chats(args, model_dir: Path) -> dict:
    rng = random.Random(args.seed)
    requests = [BenchRequest(0.0, _ids(rng, rng.randint(90, 110)), "", rng.randint(32, 128), -1)
                for _ in range(args.chats)]
    engine = make_engine(model_dir, [], set(), 4096, 8, 1 << 26, max_batch_total_tokens=16 * MAX_TOTAL,
                         kv_cache_bytes=8 << 30)  # capped at 16 reservations by max_batch_total_tokens
    slots = engine.num_blocks // (MAX_TOTAL // engine.block_size)
    reserve = run(engine, requests, [], 4096, max_total=MAX_TOTAL, gate=slots)
    on_demand = run(engine, requests, [], 4096, max_total=MAX_TOTAL)
    return {"reservation": reserve, "on_demand": on_demand, "reservations_held": slots,
            "batch_ratio": on_demand["peak_running"] / reserve["peak_running"],
            "throughput_ratio": on_demand["throughput_tok_s"] / reserve["throughput_tok_s"]}


def prefix(args, model_dir: Path, adapters: list[Path]) -> dict:
    rng = random.Random(args.seed + 1)
    systems = [_ids(rng, 512) for _ in adapters]
    t, requests = 0.0, []
    for i in range(args.turns):
        requests.append(BenchRequest(t, systems[i % len(adapters)] + _ids(rng, rng.randint(8, 24)), "", 8,
                                     i % len(adapters)))
        t += rng.expovariate(args.turn_rate)
    engine = make_engine(model_dir, adapters, set(range(len(adapters))), 4096, 64, 1 << 28)
    cold = run(engine, requests, adapters, 4096, prefix_caching=False)
    cached = run(engine, requests, adapters, 4096)
    return {"no_prefix_cache": cold, "prefix_cache": cached,
            "ttft_ratio": cached["ttft_p50_ms"] / cold["ttft_p50_ms"],
            "prefill_saved": 1 - cached["prompt_tokens_computed"] / cold["prompt_tokens_computed"]}


def chunked(args, model_dir: Path) -> dict:
    rng = random.Random(args.seed + 2)
    streams = [BenchRequest(0.0, _ids(rng, 16), "", args.stream_tokens, -1) for _ in range(args.streams)]
    longs = [BenchRequest(args.long_arrival, _ids(rng, args.long_tokens), "", 4, -1) for _ in range(2)]
    lone = [BenchRequest(0.0, _ids(rng, args.long_tokens), "", 1, -1) for _ in range(args.ttft_runs)]
    # The launcher's limits for --max-input-length 1000 on this model: the old fixed budget is also the ceiling
    # the warmup sizes memory for and the measured budget stays under.
    fixed = max(1000, DEFAULT_MAX_BATCH_PREFILL_TOKENS)
    engine = make_engine(model_dir, [], set(), fixed, 8, 1 << 26)
    costs = measure_step_costs(engine, fixed)
    budgets = {"measured": measured_prefill_budget(costs.prompt_token_s, costs.decode_step_s, fixed),
               "fixed": fixed}
    out = {"decode_step_ms": round(costs.decode_step_s * 1000, 2),
           "prompt_token_ms": round(costs.prompt_token_s * 1000, 4)}
    # The streams alone: how far their largest gap strays from the median with no prompt arriving (noise).
    out["steady"] = _stream_gaps(run(engine, streams, [], fixed, prefix_caching=False)["timings"])
    for name, budget in budgets.items():
        busy = run(engine, streams + longs, [], budget, prefix_caching=False)["timings"]
        out[name] = {"budget": budget, **_stream_gaps(busy[:args.streams]),
                     "long_ttft_ms": [round(t.ttft * 1000, 1) for t in busy[args.streams:]]}
    ttfts = {name: [] for name in budgets}
    for request in lone:  # the budgets take turns, so that load from elsewhere falls on both alike
        for name, budget in budgets.items():
            ttfts[name].append(run(engine, [request], [], budget, prefix_caching=False)["timings"][0].ttft)
    for name, values in ttfts.items():
        out[name]["lone_ttft_ms"] = round(percentile(values, 0.5) * 1000, 1)
    out["lone_ttft_ratio"] = round(out["measured"]["lone_ttft_ms"] / out["fixed"]["lone_ttft_ms"], 2)
    return out


def _stream_gaps(timings) -> dict:
    """The streams' median and largest inter-token gaps, and their ratio."""
    p50, largest = _gap_ms(timings, 0.5), _gap_ms(timings, 1.0)
    return {"gap_p50_ms": p50, "gap_max_ms": largest, "gap_max_vs_p50": round(largest / p50, 2) if p50 else 0.0}


def _gap_ms(timings, q: float) -> float:
    """The q-quantile of the gaps between consecutive tokens of the same request, in ms (0 without any)."""
    gaps = [b - a for t in timings for a, b in zip(t.tokens, t.tokens[1:])]
    return round(percentile(gaps, q) * 1000, 2) if gaps else 0.0


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.kv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chats", type=int, default=96)
    p.add_argument("--turns", type=int, default=48)
    p.add_argument("--turn-rate", type=float, default=6.0, help="user turns per second")
    p.add_argument("--streams", type=int, default=8, help="streams decoding when the long prompts arrive")
    p.add_argument("--stream-tokens", type=int, default=192)
    p.add_argument("--long-tokens", type=int, default=870, help="tokens of each long prompt")
    p.add_argument("--long-arrival", type=float, default=1.0, help="seconds into the streams the long prompts arrive")
    p.add_argument("--ttft-runs", type=int, default=5, help="runs of the lone long prompt per budget")
    p.add_argument("--scenarios", nargs="+", default=["chats", "prefix", "chunked"])
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "loom-bench")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _printable(result: dict) -> dict:
    return {k: _printable(v) if isinstance(v, dict) else v for k, v in result.items() if k != "timings"}


def main(argv=None) -> None:
    args = parse_args(argv)
    spec = replace(ModelSpec(), max_position_embeddings=MAX_TOTAL)
    model_dir = build_model(args.cache_dir, spec)
    started = time.perf_counter()
    results = {}
    if "chats" in args.scenarios:
        results["chats"] = chats(args, model_dir)
    if "prefix" in args.scenarios:
        results["prefix"] = prefix(args, model_dir, build_adapters(model_dir, spec, 4))
    if "chunked" in args.scenarios:
        results["chunked"] = chunked(args, model_dir)
    results = _printable(results) | {"wall_s": round(time.perf_counter() - started, 1)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "kv.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
