"""What the machine is, and how fast Loom runs on it.

`machine`: GPU, memory, driver, torch/CUDA/Triton, the versions of Loom's packages that run there (and which
came from the carried wheels), whether Loom's modules import. `throughput`: a random-weight 1B-class Llama
(Llama-3.2-1B's shapes) in bf16 with rank-16 adapters on all 7 projections, built on the machine; decode
tok/s per batch size and number of distinct adapters, and prefill tok/s, each beside its roofline (decode:
the bytes a step must read over the measured copy bandwidth; prefill: its FLOPs over the measured matmul
rate, bench/roofline.py), and the peak memory against what the warmup measured and kept free. `graphs`: the
same decode runs on an engine with the padded decode (shard/decode_graphs.py): unpadded eager (the default
path), padded eager, and replayed CUDA graphs, with the tokens of each against the default's.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from bench.gpu_check.common import Recorder, Sizes, summarize_matches
from bench.gpu_check.wheels import read_lock
from bench.roofline import decode_bytes, device_rates, prefill_flops
from bench.step import decode, fill
from bench.workload import ModelSpec
from launcher.tiny_model import LORA_TARGETS, write_lora_adapter
from shard.engine import Engine

RANK = 16
PREFILL_LENGTH = 512  # prompt length of the prefill runs (at most the prefill budget)
# Modules the stages import: where one fails, the machine stage says which and why.
MODULES = ("shard.engine", "shard.server", "router.app", "launcher.cli", "tests.inprocess", "peft")


def machine(rec: Recorder, sizes: Sizes, work: Path) -> None:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": _version("triton"), "cpus": os.cpu_count()}
    if sizes.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_bytes": props.total_memory,
                 "multiprocessors": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
                 "cudnn": torch.backends.cudnn.version(), "nvidia_smi": _nvidia_smi()}
    rec.record("machine", info)
    site = os.environ.get("GPU_CHECK_SITE", "")
    rec.record("packages", {name: {"version": _version(name), "carried": bool(site) and _located_in(name, site)}
                            for name in read_lock()})
    for module in MODULES:
        with rec.case(f"import/{module}"):
            importlib.import_module(module)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _located_in(name: str, site: str) -> bool:
    try:
        return str(importlib.metadata.distribution(name).locate_file("")).startswith(site)
    except importlib.metadata.PackageNotFoundError:
        return False


def _nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable: {e}"


# ---- the bench model ---------------------------------------------------------------------------------------


def random_llama(path: Path, fields: dict, device: str, seed: int = 0) -> Path:
    """A Llama checkpoint (config.json, bf16 model.safetensors) of random weights drawn on `device`; reused when
    an earlier stage wrote it. The engine needs no tokenizer."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if path.is_dir():
        return path
    config = LlamaConfig(**fields)
    hidden, inter, head = config.hidden_size, config.intermediate_size, config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        shapes |= {f"{layer}.self_attn.q_proj.weight": (config.num_attention_heads * head, hidden),
                   f"{layer}.self_attn.k_proj.weight": (config.num_key_value_heads * head, hidden),
                   f"{layer}.self_attn.v_proj.weight": (config.num_key_value_heads * head, hidden),
                   f"{layer}.self_attn.o_proj.weight": (hidden, config.num_attention_heads * head),
                   f"{layer}.mlp.gate_proj.weight": (inter, hidden), f"{layer}.mlp.up_proj.weight": (inter, hidden),
                   f"{layer}.mlp.down_proj.weight": (hidden, inter),
                   f"{layer}.input_layernorm.weight": (hidden,), f"{layer}.post_attention_layernorm.weight": (hidden,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    gen = torch.Generator(device).manual_seed(seed)
    tensors = {name: (torch.ones(shape) if len(shape) == 1 else
                      (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu())
               for name, shape in shapes.items()}
    partial = path.with_name(path.name + ".partial")  # a stage cut while writing leaves no half checkpoint
    partial.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(partial)
    save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
    partial.rename(path)
    return path


def spec_of(fields: dict) -> ModelSpec:
    return ModelSpec(fields["hidden_size"], fields["num_hidden_layers"], fields["intermediate_size"],
                     fields["num_attention_heads"], fields["num_key_value_heads"], RANK)


def bench_engine(sizes: Sizes, work: Path, padded: bool) -> tuple[Engine, list[str], dict]:
    """The bench model on the device with `sizes.bench_adapters` adapters registered (ids cycling over
    `sizes.adapter_files` weight files: each id takes its own pool pages), warmed up for the largest batch;
    and what the setup took."""
    import json

    model = random_llama(work / "bench-model", sizes.bench_model, sizes.device)
    config = json.loads((model / "config.json").read_text())
    files = [work / f"bench-adapter{i}" for i in range(sizes.adapter_files)]
    for i, path in enumerate(files):
        if not path.is_dir():
            partial = write_lora_adapter(path.with_name(path.name + ".partial"), config, RANK, list(LORA_TARGETS),
                                         seed=i, alpha=2 * RANK, dtype=torch.bfloat16)
            partial.rename(path)
    cuda = sizes.device == "cuda"
    engine = Engine(str(model), device=sizes.device, dtype=torch.bfloat16 if cuda else torch.float32,
                    adapter_pool_pages=2 * sizes.bench_adapters + 8, adapter_host_cache_bytes=16 << 30,
                    padded_decode=padded)
    blocks = engine.blocks_for(sizes.context + sizes.warm_steps + sizes.decode_steps)
    tokens = max(max(sizes.batches) * blocks, 2 * engine.blocks_for(sizes.prefill_tokens)) * engine.block_size
    started = time.perf_counter()
    engine.warmup(sizes.prefill_tokens, tokens, max_concurrent_requests=max(sizes.batches),
                  max_active_adapters=max(sizes.adapter_mixes))
    setup = {"warmup_seconds": round(time.perf_counter() - started, 2), "kv_blocks": engine.num_blocks,
             "adapter_pages": engine.adapter_pages, "reserved_bytes": engine.reserved_bytes}
    started = time.perf_counter()
    ids = [f"adapter{i:03d}" for i in range(sizes.bench_adapters)]
    for i, adapter_id in enumerate(ids):
        engine.load_adapter(adapter_id, str(files[i % len(files)]))
    return engine, ids, setup | {"adapters": len(ids), "adapter_load_seconds": round(time.perf_counter() - started, 2)}


def synchronize(sizes: Sizes) -> None:
    if sizes.device == "cuda":
        torch.cuda.synchronize()


def decode_run(engine: Engine, ids: list[str], sizes: Sizes, batch: int, adapters: int,
               steps: int | None = None) -> tuple[float, list[list[int]]]:
    """(tok/s, each row's tokens) of `steps` timed decode steps of `batch` rows of `sizes.context` tokens,
    rows round-robin over `adapters` adapters (0: the base model)."""
    steps = steps or sizes.decode_steps
    engine.clear()
    chunks = fill(engine, ids[:adapters], batch, sizes.context, sizes.warm_steps + steps, sizes.prefill_tokens)
    for _ in range(sizes.warm_steps):
        decode(engine, chunks)
    synchronize(sizes)
    start = time.perf_counter()
    results = [decode(engine, chunks) for _ in range(steps)]
    seconds = time.perf_counter() - start
    engine.clear()
    if errors := [r.error for step in results for r in step if r.error]:
        raise RuntimeError(f"a decode step failed: {errors[0]}")
    tokens = [{r.request_id: r.token_id for r in step} for step in results]  # results come in adapter order
    return batch * steps / seconds, [[step[i] for step in tokens] for i in range(batch)]


def throughput(rec: Recorder, sizes: Sizes, work: Path) -> None:
    rates = device_rates(sizes.device)
    rec.record("rates", rates)
    engine, ids, setup = bench_engine(sizes, work, padded=False)
    rec.record("setup", setup)
    spec, vocab, itemsize = spec_of(sizes.bench_model), sizes.bench_model["vocab_size"], engine.dtype.itemsize
    cuda = sizes.device == "cuda"
    if cuda:
        resting = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    context = sizes.context + sizes.warm_steps + sizes.decode_steps / 2  # the average context of a timed step
    for adapters in sizes.adapter_mixes:
        for batch in sizes.batches:
            with rec.case(f"decode/batch{batch}/adapters{adapters}") as out:
                tok_s, _ = decode_run(engine, ids, sizes, batch, adapters)
                need = decode_bytes(spec, vocab, batch, int(context), adapters, itemsize)
                roof = batch * rates["copy_bytes_per_s"] / need
                out.update(tok_s=round(tok_s, 1), roofline_tok_s=round(roof, 1), of_roofline=round(tok_s / roof, 4),
                           bytes_per_step=need)
    length = min(PREFILL_LENGTH, sizes.prefill_tokens)
    prompts = sizes.prefill_tokens // length
    for adapters in sorted({0, min(16, max(sizes.adapter_mixes))}):
        with rec.case(f"prefill/adapters{adapters}") as out:
            seconds = []
            for _ in range(4):  # the first one warms up
                engine.clear()
                synchronize(sizes)
                start = time.perf_counter()
                fill(engine, ids[:adapters], prompts, length, 0, sizes.prefill_tokens)
                synchronize(sizes)
                seconds.append(time.perf_counter() - start)
            engine.clear()
            tok_s = prompts * length / min(seconds[1:])
            roof = prompts * length * rates["matmul_flops_per_s"] / prefill_flops(spec, vocab, prompts, length,
                                                                                  adapters > 0)
            out.update(tok_s=round(tok_s, 1), roofline_tok_s=round(roof, 1), of_roofline=round(tok_s / roof, 4),
                       prompts=prompts, length=length)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - resting
        rec.record("memory", {"resting_bytes": resting, "activation_peak_bytes": peak,
                              "warmup_reserved_bytes": engine.reserved_bytes,
                              "peak_over_reserved": round(peak / max(engine.reserved_bytes, 1), 3),
                              "device_total_bytes": torch.cuda.get_device_properties(0).total_memory})


@contextlib.contextmanager
def without_replay(engine: Engine):
    """The padded decode run eagerly: its graphs set aside for the block."""
    runner = engine.decode_runner
    graphs, runner.graphs = runner.graphs, {}
    try:
        yield
    finally:
        runner.graphs = graphs


def graphs(rec: Recorder, sizes: Sizes, work: Path) -> None:
    engine, ids, setup = bench_engine(sizes, work, padded=True)
    runner = engine.decode_runner
    rec.record("setup", setup | {"graphs": len(runner.graphs)})
    for adapters in sizes.adapter_mixes:
        for batch in sizes.graph_batches:
            with rec.case(f"decode/batch{batch}/adapters{adapters}") as out:
                runner.enabled = False
                default, want = decode_run(engine, ids, sizes, batch, adapters)
                runner.enabled = True
                with without_replay(engine):
                    padded, padded_tokens = decode_run(engine, ids, sizes, batch, adapters)
                out.update(default_tok_s=round(default, 1), padded_eager_tok_s=round(padded, 1),
                           padded_tokens=summarize_matches(list(zip(padded_tokens, want))))
                if runner.graphs:
                    before = runner.padded_steps
                    replayed, graph_tokens = decode_run(engine, ids, sizes, batch, adapters)
                    out.update(graphs_tok_s=round(replayed, 1), graphs_over_default=round(replayed / default, 3),
                               graphs_over_padded_eager=round(replayed / padded, 3),
                               padded_steps=runner.padded_steps - before,
                               graph_tokens=summarize_matches(list(zip(graph_tokens, want))))
