"""Mixtures of experts (Qwen3-MoE, Qwen2-MoE, Mixtral, gpt-oss) against transformers (+ peft), token for token
(float32, CPU, greedy), as tests/test_families.py checks the dense families.

Per family: a tiny random model saved by the installed transformers (one module per expert, or fused for gpt-oss,
which never had another layout) and the same weights saved fused (the 3-D tensors transformers keeps in memory),
its norms randomised; PEFT adapters built by peft: attention-only, experts-only (`target_parameters` on the fused
expert tensors) and "all" (all-linear: attention, the router or the shared expert and its gate, plus the experts);
for Qwen3-MoE and Mixtral also an adapter as peft wrote it for transformers 4 models (one LoRA module per expert,
Mixtral's under block_sparse_moe), which peft converts on load. One continuous batch mixes the base model with every
adapter, requests joining mid-decode and prompts past the sliding windows, in-process at 1 rank (both layouts) and
at 2 gloo ranks; Qwen3-MoE also preempted under the router's scheduler and over HTTP at 2 ranks.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from launcher.tiny_model import MOE_FAMILIES, build_tiny_adapter, build_tiny_model
from shard.engine import Engine, SequenceRequest
from shard.weights import CheckpointError
from tests.engine_driver import EngineDriver
from tests.eras import to_legacy_adapter
from tests.test_families import randomize_norms

NEW_TOKENS = 8
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
# (adapter kind, prompt length, the step the request joins at); the windows are 20 tokens.
JOBS = [("", 30, 0), ("attn", 7, 0), ("experts", 24, 0), ("all", 33, 2), ("attn", 12, 3), ("legacy", 26, 3)]
# The per-expert module names of transformers 4 checkpoints and the block holding them.
LEGACY_EXPERTS = {"qwen3_moe": ("mlp", ["gate_proj", "up_proj", "down_proj"]),
                  "mixtral": ("block_sparse_moe", ["w1", "w3", "w2"])}


@dataclass
class Case:
    family: str
    layouts: dict[str, Path]  # "modules" (one module per expert, when the family has that layout), "fused"
    adapters: dict[str, Path]
    jobs: list[tuple[str, int, int]]
    prompts: list[list[int]]
    expected: list[list[int]]


def save_fused(src: Path, dst: Path) -> Path:
    """`src` with its weights as transformers holds them in memory: the experts fused into 3-D tensors."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, dst / "model.safetensors",
              metadata={"format": "pt"})
    return dst


def legacy_expert_adapter(path: Path, base: Path, family: str, seed: int) -> Path:
    """An adapter as peft wrote it for the transformers 4 model: q/v and one LoRA module per expert projection."""
    block, modules = LEGACY_EXPERTS[family]
    build_tiny_adapter(path, base, 4, 8, ["q_proj", "v_proj"], seed=seed)
    config = json.loads((base / "config.json").read_text())
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(path / "adapter_model.safetensors")
    hidden = config["hidden_size"]
    inter = config.get("moe_intermediate_size") or config["intermediate_size"]
    sparse = [i for i in range(config["num_hidden_layers"]) if i not in config.get("mlp_only_layers", [])]
    for layer in sparse:
        for expert in range(config.get("num_experts") or config["num_local_experts"]):
            for module in modules:
                fan_in, fan_out = (inter, hidden) if module in ("down_proj", "w2") else (hidden, inter)
                key = f"base_model.model.model.layers.{layer}.{block}.experts.{expert}.{module}"
                tensors[f"{key}.lora_A.weight"] = 0.3 * torch.randn(4, fan_in, generator=g)
                tensors[f"{key}.lora_B.weight"] = 0.3 * torch.randn(fan_out, 4, generator=g)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    adapter_config = json.loads((path / "adapter_config.json").read_text())
    adapter_config["target_modules"] = ["q_proj", "v_proj", *modules]
    (path / "adapter_config.json").write_text(json.dumps(adapter_config))
    return to_legacy_adapter(path)


def hf_greedy(base: Path, adapter: Path | None, prompts: list[list[int]]) -> list[list[int]]:
    """transformers (+ peft) greedy continuations of `prompts`, the model loaded once."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.inference_mode():
        outs = [model.eval().generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                      do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None) for p in prompts]
    return [out[0, len(p):].tolist() for out, p in zip(outs, prompts)]


def build_case(family: str, root: Path, seed: int) -> Case:
    base = build_tiny_model(root / family, family, seed=seed)
    randomize_norms(base, seed)
    fused = save_fused(base, root / f"{family}-fused")
    layouts = {"fused": base} if family == "gpt_oss" else {"modules": base, "fused": fused}
    all_linear = EXPERTS if family == "gpt_oss" else []  # gpt-oss' experts are no Linear: name them
    adapters = {
        "attn": build_tiny_adapter(root / f"{family}-attn", base, 8, 16, ATTN, seed=seed + 1),
        "experts": build_tiny_adapter(root / f"{family}-experts", base, 4, 8, [], seed=seed + 2,
                                      target_parameters=EXPERTS),
        "all": build_tiny_adapter(root / f"{family}-all", base, 8, 16, "all-linear", use_rslora=True, seed=seed + 3,
                                  target_parameters=all_linear),
    }
    if family in LEGACY_EXPERTS:
        adapters["legacy"] = legacy_expert_adapter(root / f"{family}-legacy", base, family, seed + 4)
    jobs = [job for job in JOBS if job[0] in adapters or not job[0]]
    rng = random.Random(seed)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    prompts = [[rng.randrange(vocab) for _ in range(n)] for _, n, _ in jobs]
    expected = [hf_greedy(base, adapters.get(kind), [p])[0] for (kind, _, _), p in zip(jobs, prompts)]
    # Each adapter changes the output: matching peft then proves something about its LoRA.
    for (kind, _, _), want, base_tokens in zip(jobs, expected, hf_greedy(base, None, prompts)):
        assert not kind or want != base_tokens, f"{family}: the {kind} adapter changes nothing"
    return Case(family, layouts, adapters, jobs, prompts, expected)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run on one thread: on a busy 2-core machine, two threads' synchronisation costs more than the
    arithmetic of these matrices."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cases(tmp_path_factory, one_thread) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("moe")
    return {family: build_case(family, root, 10 * i) for i, family in enumerate(MOE_FAMILIES)}


def make_engine(model_dir: Path, adapters: dict[str, Path], tp_rank: int = 0, tp_size: int = 1) -> EngineDriver:
    engine = Engine(str(model_dir), tp_rank=tp_rank, tp_size=tp_size)
    engine.warmup(max_batch_prefill_tokens=128, max_batch_total_tokens=1024)
    engine = EngineDriver(engine)
    for kind, path in adapters.items():
        engine.load_adapter(kind, str(path))
    return engine


def run_jobs(engine: EngineDriver, jobs: list[tuple[str, int, int]], prompts: list[list[int]]) -> list[list[int]]:
    """`jobs` as one continuous batch: each joins at its step and decodes until it has NEW_TOKENS tokens."""
    out: dict[int, list[int]] = {}
    step = 0
    while len(out) < len(jobs) or any(len(t) < NEW_TOKENS for t in out.values()):
        prefill = [SequenceRequest(i, prompts[i], adapter_id=kind) for i, (kind, _, join) in enumerate(jobs)
                   if join == step]
        decode = [i for i, t in out.items() if len(t) < NEW_TOKENS]
        for r in engine.step(prefill, decode, []):
            assert not r.error, r.error
            out.setdefault(r.request_id, []).append(r.token_id)
        step += 1
    engine.step([], [], list(out))
    assert engine.free_blocks == engine.num_blocks and not engine.sequences
    return [out[i] for i in range(len(jobs))]


LAYOUT_CASES = [(f, layout) for f in MOE_FAMILIES for layout in ("modules", "fused") if (f, layout) != ("gpt_oss", "modules")]


@pytest.mark.parametrize("family,layout", LAYOUT_CASES)
def test_mixed_batch_matches_transformers_and_peft(cases, family, layout):
    case = cases[family]
    engine = make_engine(case.layouts[layout], case.adapters)
    got = run_jobs(engine, case.jobs, case.prompts)
    for (kind, n, join), g, want in zip(case.jobs, got, case.expected):
        assert g == want, f"{family} ({layout}): adapter {kind or 'base'!r}, prompt of {n} tokens joining at {join}"
