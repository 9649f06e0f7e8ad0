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


def lora_shapes(spec: ModelSpec) -> list[tuple[int, int]]:
    """(in, out) of the 7 projections PEFT targets: q, k, v, o, gate, up, down."""
    kv = spec.num_key_value_heads * (spec.hidden_size // spec.num_attention_heads)
    return [(spec.hidden_size, spec.hidden_size), (spec.hidden_size, kv), (spec.hidden_size, kv),
            (spec.hidden_size, spec.hidden_size), (spec.hidden_size, spec.intermediate_size),
            (spec.hidden_size, spec.intermediate_size), (spec.intermediate_size, spec.hidden_size)]


def flops_per_token(spec: ModelSpec, lora: bool) -> float:
    """Matmul FLOPs of one token through the layers (with rank-`spec.rank` LoRA on all 7 projections)."""
    base = sum(2 * i * o for i, o in projection_shapes(spec))
    adapter = sum(2 * spec.rank * (i + o) for i, o in lora_shapes(spec)) if lora else 0
    return spec.num_hidden_layers * (base + adapter)


# ---- the GPU kit's rooflines (bench/gpu_check): bytes over the measured copy bandwidth, FLOPs over the
# measured matmul rate ----------------------------------------------------------------------------------


def decode_bytes(spec: ModelSpec, vocab: int, batch: int, context: int, adapters: int, itemsize: int) -> int:
    """Bytes a decode step must read at least: every layer's weights and the LM head's [vocab, hidden] once,
    each row's context K/V, and the rank-`spec.rank` rows (all 7 projections) of each distinct adapter."""
    weights = spec.num_hidden_layers * sum(i * o for i, o in projection_shapes(spec)) + vocab * spec.hidden_size
    kv = 2 * spec.num_hidden_layers * spec.num_key_value_heads * (spec.hidden_size // spec.num_attention_heads)
    adapter = spec.num_hidden_layers * spec.rank * sum(i + o for i, o in lora_shapes(spec))
    return itemsize * (weights + batch * context * kv + min(adapters, batch) * adapter)


def prefill_flops(spec: ModelSpec, vocab: int, prompts: int, length: int, lora: bool) -> float:
    """FLOPs of prefilling `prompts` prompts of `length` tokens: the matmuls of every token, causal attention
    (scores and values over the lower triangle) and the logits of each prompt's last token."""
    attention = 4 * spec.hidden_size * length * (length + 1) / 2 * spec.num_hidden_layers
    return prompts * (length * flops_per_token(spec, lora) + attention + 2 * spec.hidden_size * vocab)


def device_rates(device: str, repeats: int = 10) -> dict:
    """The measured ceilings: copy bandwidth (bytes read + written per second, a large device-to-device copy)
    and matmul rate (bf16 on CUDA, float32 on CPU), each the best of `repeats` after a warm-up."""
    import torch

    cuda = device == "cuda"
    size, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    src = torch.empty(1 << (30 if cuda else 26), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times)

    return {"copy_bytes_per_s": 2 * src.numel() / best(lambda: dst.copy_(src)),
            "matmul_flops_per_s": 2 * size ** 3 / best(lambda: a @ b), "matmul_dtype": str(dtype)}


def matmul_rate(spec: ModelSpec, repeats: int = 10) -> float:
    """FLOP/s of a pass through every layer's projections at ROWS rows (float32, this process's threads), best
    of `repeats`: all layers' weights, so that they stream from memory as in a real step, not from cache. The
    matmuls run as the engine runs them: through weights packed for oneDNN where it packs them
    (shard/packed_linear.py), else torch's."""
    import torch

    from shard import packed_linear

    weights = [torch.randn(o, i) for _ in range(spec.num_hidden_layers) for i, o in projection_shapes(spec)]
    packed = [packed_linear.pack(w) for w in weights]
    x = {i: torch.randn(ROWS, i) for i, _ in projection_shapes(spec)}
    flops = sum(2 * ROWS * w.shape[0] * w.shape[1] for w in weights)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for w, p in zip(weights, packed):
                packed_linear.linear(x[w.shape[1]], w, p)
            best = min(best, time.perf_counter() - start)
    return flops / best


def roofline_tok_s(prompt_tokens: int, output_tokens: int, spec: ModelSpec, lora: bool, rate: float) -> float:
    """Output tokens per second if the run took only its matmul time: every prompt and output token once
    through the layers (the last output token is sampled but never fed back; ignored)."""
    seconds = (prompt_tokens + output_tokens) * flops_per_token(spec, lora) / rate
    return output_tokens / seconds
