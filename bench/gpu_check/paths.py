"""The opt-in CUDA paths. `kernels`: each Triton kernel against its torch twin on random inputs
(tests/kernel_checks.py), natively on the GPU, in float32 and bfloat16. `switches`: each opt-in path on
against off on one workload (adapters of several ranks and targets beside base-model rows, prompts joining
while others decode), in float32 (every token must match) and bfloat16 (the share that does).

A switch is turned on as its environment variable does (read where the engine is built): LOOM_TRITON_LORA
sets Engine.triton_lora, LOOM_TRITON_ATTENTION its decode kernel, LOOM_VARLEN_PREFILL the attention module's
VARLEN_PREFILL, LOOM_CUDA_GRAPHS the padded decode with its graphs. In the dry run (CPU) the Triton paths run
through Triton's interpreter and the graphs' padded steps eagerly; varlen has no CPU kernel.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from bench.gpu_check.common import Recorder, Sizes, summarize_matches
from bench.gpu_check.parity import ADAPTER_SPECS, prompts_for, staggered
from launcher.tiny_model import build_tiny_adapter, build_tiny_model
from shard import attention
from shard.engine import Engine, SequenceRequest
from tests.engine_driver import EngineDriver
from tests.kernel_checks import DECODE_CASES, check_decode, check_sgmv, check_triton_lora_batch

SWITCHES = ("triton_lora", "triton_attention", "varlen_prefill", "cuda_graphs")
TRITON_DECODE = "shard.kernels.paged_attention.paged_decode_attention"


def kernels(rec: Recorder, sizes: Sizes, work: Path) -> None:
    # Triton's interpreter computes with numpy, which has no bfloat16: the dry run checks float32 only.
    dtypes = (torch.float32,) if sizes.dry else (torch.float32, torch.bfloat16)
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        for seed in range(sizes.checks):
            with rec.case(f"sgmv/{name}/{seed}") as out:
                out.update(check_sgmv(seed, sizes.device, dtype))
            with rec.case(f"sgmv_padded/{name}/{seed}") as out:
                out.update(check_sgmv(10 + seed, sizes.device, dtype, padded=True))
            with rec.case(f"triton_lora_batch/{name}/{seed}") as out:
                out.update(check_triton_lora_batch(seed, sizes.device, dtype))
        for seed, heads, kv_heads, head_dim, window, softcap in DECODE_CASES[::1 if sizes.checks > 1 else 3]:
            with rec.case(f"paged_decode/{name}/{seed}") as out:
                out.update(check_decode(TRITON_DECODE, seed, heads, kv_heads, head_dim, window, softcap,
                                        sizes.device, dtype))


@contextlib.contextmanager
def varlen(on: bool):
    """LOOM_VARLEN_PREFILL for the block: read by every prefill step's metadata."""
    before = attention.VARLEN_PREFILL
    attention.VARLEN_PREFILL = on and attention.varlen_supported()
    try:
        yield
    finally:
        attention.VARLEN_PREFILL = before


def switched_engine(model_dir: Path, sizes: Sizes, dtype: torch.dtype, switch: str | None) -> Engine:
    engine = Engine(str(model_dir), device=sizes.device, dtype=dtype, adapter_pool_pages=16,
                    kv_cache_bytes=64 << 20, padded_decode=switch == "cuda_graphs")
    if switch == "triton_lora":
        engine.triton_lora = True  # before the warmup: the adapter pool then keeps no stacks share
    if switch == "triton_attention":
        from shard.kernels.paged_attention import paged_decode_attention

        engine.decode_kernel = paged_decode_attention
    engine.warmup(64, 4096, max_concurrent_requests=8, max_active_adapters=4)
    return engine


def run_workload(model_dir: Path, adapters: list[Path], sizes: Sizes, dtype: torch.dtype,
                 switch: str | None) -> tuple[dict[int, list[int]], dict]:
    with varlen(switch == "varlen_prefill"):
        engine = switched_engine(model_dir, sizes, dtype, switch)
        driver = EngineDriver(engine)
        for i, path in enumerate(adapters):
            driver.load_adapter(f"a{i}", str(path))
        prompts = prompts_for(engine.info.vocab_size, 2 * len(adapters) + 2, 17)
        requests = [SequenceRequest(i, p, adapter_id=f"a{i % len(adapters)}" if i % 3 else "")
                    for i, p in enumerate(prompts)]
        tokens = staggered(driver, requests, sizes.new_tokens)
    facts = {"varlen_active": attention.VARLEN_PREFILL} if switch == "varlen_prefill" else {}
    if engine.decode_runner is not None:
        facts |= {"padded_steps": engine.decode_runner.padded_steps, "graphs": len(engine.decode_runner.graphs)}
    return tokens, facts


def switches(rec: Recorder, sizes: Sizes, work: Path) -> None:
    # One layer in the dry run: Triton's interpreter runs every LoRA projection of every step.
    layers = {"num_hidden_layers": 1} if sizes.dry else {}
    model = build_tiny_model(work / "llama-switches", "llama", seed=21, **layers)
    adapters = [build_tiny_adapter(work / f"switch-adapter{i}", model, *ADAPTER_SPECS[i][:3], seed=50 + i)
                for i in range(sizes.switch_adapters)]
    dtypes = (torch.float32,) if sizes.dry else (torch.float32, torch.bfloat16)
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        off, _ = run_workload(model, adapters, sizes, dtype, None)
        for switch in SWITCHES:
            if switch == "varlen_prefill" and (sizes.dry or dtype == torch.float32):
                continue  # a flash kernel: CUDA, half precision only
            with rec.case(f"{switch}/{name}") as out:
                on, facts = run_workload(model, adapters, sizes, dtype, switch)
                out.update(summarize_matches([(on[i], off[i]) for i in sorted(off)]), **facts)
