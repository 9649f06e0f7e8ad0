"""Each run's matmul roofline: the throughput the run's own matmuls would allow at this machine's measured
matmul rate, with nothing else in a step (attention, norms, sampling, serving) costing any time."""

from __future__ import annotations

import time

from bench.workload import ModelSpec

ROWS = 64  # a full decode batch: the matmul shape the steps of a saturated run are made of


def projection_shapes(spec: ModelSpec) -> list[tuple[int, int]]:
    """(in, out) of one layer's fused projections: qkv, o, gate_up, down."""
    head = spec.hidden_size // spec.num_attention_heads
    qkv = spec.hidden_size + 2 * spec.num_key_value_heads * head
    return [(spec.hidden_size, qkv), (spec.hidden_size, spec.hidden_size),
            (spec.hidden_size, 2 * spec.intermediate_size), (spec.intermediate_size, spec.hidden_size)]


def flops_per_token(spec: ModelSpec, lora: bool) -> float:
    """Matmul FLOPs of one token through the layers (with rank-`spec.rank` LoRA on all 7 projections)."""
    base = sum(2 * i * o for i, o in projection_shapes(spec))
    head = spec.hidden_size // spec.num_attention_heads
    kv = spec.num_key_value_heads * head
    seven = [(spec.hidden_size, spec.hidden_size), (spec.hidden_size, kv), (spec.hidden_size, kv),
             (spec.hidden_size, spec.hidden_size), (spec.hidden_size, spec.intermediate_size),
             (spec.hidden_size, spec.intermediate_size), (spec.intermediate_size, spec.hidden_size)]
    adapter = sum(2 * spec.rank * (i + o) for i, o in seven) if lora else 0
    return spec.num_hidden_layers * (base + adapter)


def matmul_rate(spec: ModelSpec, repeats: int = 10) -> float:
    """FLOP/s of a pass through every layer's projections at ROWS rows (float32, this process's threads), best
    of `repeats`: all layers' weights, so that they stream from memory as in a real step, not from cache."""
    import torch

    weights = [torch.randn(o, i) for _ in range(spec.num_hidden_layers) for i, o in projection_shapes(spec)]
    x = {i: torch.randn(ROWS, i) for i, _ in projection_shapes(spec)}
    flops = sum(2 * ROWS * w.shape[0] * w.shape[1] for w in weights)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for w in weights:
                x[w.shape[1]] @ w.T
            best = min(best, time.perf_counter() - start)
    return flops / best


def roofline_tok_s(prompt_tokens: int, output_tokens: int, spec: ModelSpec, lora: bool, rate: float) -> float:
    """Output tokens per second if the run took only its matmul time: every prompt and output token once
    through the layers (the last output token is sampled but never fed back; ignored)."""
    seconds = (prompt_tokens + output_tokens) * flops_per_token(spec, lora) / rate
    return output_tokens / seconds
