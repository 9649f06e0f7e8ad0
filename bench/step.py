"""One saturated decode step, measured in isolation: `batch` sequences with LoRA adapters (round-robin) and
`context` tokens each in the KV cache, decoding one token each. Reports the step's wall time beside the time
its own matmuls (base and LoRA, with the shapes the profiler recorded) take run alone, and the ops that take
the rest (profiled self times, one step). `python -m bench.step` prints it;
`make bench` records it."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

WARM = 3  # decode steps before the timed ones
PACKED_LINEAR = "mkldnn::_linear_pointwise"  # base projections through packed weights (shard/packed_linear.py)
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::baddbmm_", PACKED_LINEAR)


def fill(engine, adapters: list[str], batch: int, context: int, steps: int, prefill_tokens: int = 0) -> list:
    """Prefills `batch` sequences of `context` tokens (adapters round-robin), as many per step as
    `prefill_tokens` holds (0: one), each with blocks for `steps` more; returns their first decode chunks."""
    from shard.engine import Chunk, SequenceRequest

    blocks = -(-(context + steps) // engine.block_size)
    if batch * blocks > engine.num_blocks:
        raise ValueError(f"{batch} rows of {context + steps} tokens need {batch * blocks} KV blocks; the engine "
                         f"has {engine.num_blocks}")
    per_step = max(1, prefill_tokens // context)
    for first in range(0, batch, per_step):
        rows = range(first, min(batch, first + per_step))
        requests = [SequenceRequest(i, [(7 * i + j) % 200 + 3 for j in range(context)],
                                    adapter_id=adapters[i % len(adapters)] if adapters else "") for i in rows]
        chunks = [Chunk(i, 0, context, list(range(i * blocks, (i + 1) * blocks))) for i in rows]
        if any(r.error for r in engine.step(requests, chunks, [])):
            raise RuntimeError("a prefill step failed")
    return [Chunk(i, context, 1) for i in range(batch)]


def decode(engine, chunks: list) -> list:
    """One decode step of `chunks`, which move on to the next position; returns its results."""
    from shard.engine import Chunk

    results = engine.step([], chunks, [])
    chunks[:] = [Chunk(c.id, c.start + 1, 1) for c in chunks]
    return results


def _operands(op: str, shapes: list[list[int]]):
    """A fresh call of a recorded matmul (its inputs: [a, b, (out)], or [bias/self, a, b] for the adding ones,
    or [x, packed weight, ...]); base weights as F.linear passes them, a transposed view, or packed as the
    engine packs them."""
    import torch

    from shard import packed_linear

    if op == PACKED_LINEAR:
        x, w = torch.randn(*shapes[0]), torch.randn(*shapes[1])
        packed = packed_linear.pack(w)
        return lambda: packed_linear.linear(x, w, packed)
    a, b = shapes[1:3] if op in ("aten::addmm", "aten::baddbmm", "aten::baddbmm_") else shapes[:2]
    if len(a) == 2:
        x, w = torch.randn(*a), torch.randn(b[1], b[0]).t()
    else:
        x, w = torch.randn(*a), torch.randn(*b)  # bmm: LoRA's batched A and B
    return lambda: torch.matmul(x, w)


def matmuls_alone(calls: list[tuple[str, list[list[int]], int]], repeats: int = 10) -> float:
    """Seconds the recorded matmuls take on their own (best of `repeats`): each call gets its own operands,
    so weights stream from memory as they do in a step, not from cache."""
    import torch

    work = [_operands(op, shapes) for op, shapes, count in calls for _ in range(count)]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for call in work:
                call()
            best = min(best, time.perf_counter() - start)
    return best


def measure(engine, adapters: list[str], batch: int = 64, context: int = 76, rounds: int = 7,
            steps: int = 4) -> dict:
    """The step's wall time beside the time its own matmuls (recorded by the profiler, with their shapes) take
    alone, and the profiled self time of everything else. This machine's speed drifts within seconds, so each
    of `rounds` times `steps` steps (their median) right beside the matmuls (best of 3), and the figures are the
    median round's."""
    from torch.profiler import ProfilerActivity, profile

    engine.clear()
    chunks = fill(engine, adapters, batch, context, WARM + 1 + rounds * steps)
    for _ in range(WARM):
        decode(engine, chunks)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        decode(engine, chunks)
    events = prof.key_averages(group_by_input_shape=True)
    calls = [(e.key, e.input_shapes, e.count) for e in events if e.key in MATMUL_OPS]
    pairs = []
    for _ in range(rounds):
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            decode(engine, chunks)
            times.append(time.perf_counter() - start)
        pairs.append((statistics.median(times) * 1e3, matmuls_alone(calls, repeats=3) * 1e3))
    engine.clear()
    step_ms, matmul_ms = sorted(pairs, key=lambda p: p[0] / p[1])[rounds // 2]
    self_ms: dict[str, float] = {}
    for e in events:
        if e.key not in MATMUL_OPS:
            self_ms[e.key] = self_ms.get(e.key, 0.0) + e.self_cpu_time_total / 1e3
    others = sorted(self_ms.items(), key=lambda kv: -kv[1])[:12]
    return {"batch": batch, "context": context, "adapters": len(adapters), "step_ms": round(step_ms, 2),
            "matmul_ms": round(matmul_ms, 2), "ratio": round(step_ms / matmul_ms, 3),
            "ratio_rounds": [round(s / m, 3) for s, m in pairs], "matmul_calls": sum(c for _, _, c in calls),
            "top_other_ops_ms": {k: round(v, 3) for k, v in others}}


def main(argv=None) -> None:
    from bench.inprocess import make_engine
    from bench.workload import ModelSpec, build_adapters, build_model

    p = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=76)
    p.add_argument("--adapters", type=int, default=16, help="0: base model only")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "loom-bench")
    args = p.parse_args(argv)
    spec = ModelSpec()
    model_dir = build_model(args.cache_dir, spec)
    paths = build_adapters(model_dir, spec, max(args.adapters, 1))[:args.adapters]
    engine = make_engine(model_dir, paths, set(range(len(paths))), 4096, 256, 1 << 30)
    result = measure(engine, [str(p) for p in paths], args.batch, args.context, args.rounds)
    print(f"decode step: batch {result['batch']}, context {result['context']}, {result['adapters']} adapters: "
          f"{result['step_ms']} ms, matmuls {result['matmul_ms']} ms -> {result['ratio']}x its matmuls")
    for op, ms in result["top_other_ops_ms"].items():
        print(f"  {op:<40}{ms:>8.3f} ms")


if __name__ == "__main__":
    main()
