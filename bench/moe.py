"""A small mixture of experts beside a dense model of equal active parameters: `python -m bench.moe`.

Random-weight Qwen3 (MLP intermediate 1024) and Qwen3-MoE (16 experts of intermediate 512, top-2: the same
active MLP parameters per token), hidden 512, 8 layers, float32 on this machine's threads. Reports a batch-64
decode step (median of 20) and the prefill rate of 64 prompts of 64 tokens, through the engine."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

COMMON = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
              vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def _models() -> dict:
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    return {
        "qwen3 dense (MLP 1024)": (Qwen3Config(intermediate_size=1024, **COMMON), Qwen3ForCausalLM),
        "qwen3_moe (16 experts of 512, top-2)": (
            Qwen3MoeConfig(num_experts=16, num_experts_per_tok=2, moe_intermediate_size=512, intermediate_size=1024,
                           norm_topk_prob=True, **COMMON), Qwen3MoeForCausalLM),
    }


def measure(model_dir: Path, batch: int = 64, prompt: int = 64, steps: int = 20) -> dict:
    from bench.step import decode, fill
    from shard.engine import Engine

    engine = Engine(str(model_dir), kv_cache_bytes=1 << 29)
    engine.warmup(512)
    start = time.perf_counter()
    chunks = fill(engine, [], batch, prompt, steps + 3, 512)
    prefill_s = time.perf_counter() - start
    for _ in range(3):
        decode(engine, chunks)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        decode(engine, chunks)
        times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {"decode_step_ms": round(step * 1e3, 1), "decode_tok_s": round(batch / step),
            "prefill_tok_s": round(batch * prompt / prefill_s)}


def main(argv=None) -> None:
    import torch

    p = argparse.ArgumentParser(prog="python -m bench.moe", description=__doc__)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "loom-bench" / "moe")
    args = p.parse_args(argv)
    results = {}
    for name, (config, cls) in _models().items():
        model_dir = args.cache_dir / config.model_type
        if not (model_dir / "config.json").exists():
            torch.manual_seed(0)
            cls(config).eval().save_pretrained(model_dir)
        results[name] = measure(model_dir)
        print(name, results[name], flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
