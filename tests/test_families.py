"""Every model family against transformers (+ peft), token for token (float32, CPU, greedy).

Per family: a tiny random model saved by the installed transformers (its norm weights randomised, so that
Gemma's (1 + w) and every q/k norm matter) and three PEFT adapters: attention-only, MLP-only and all
projections, named as that family's PEFT adapters name them (Phi-3: the fused qkv_proj and gate_up_proj).
One continuous batch mixes the base model with all three, two requests joining mid-decode (one of them
bringing an adapter the batch has not seen yet), prompts past every sliding window (Mistral 48, Gemma 24)
and past Phi-3's longrope switch (32). The same batch runs in-process at 1 rank and on 2 gloo ranks, and
over HTTP for a couple of families.
"""

from __future__ import annotations

import asyncio
import json
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from launcher.tiny_model import FAMILIES, build_tiny_adapter, build_tiny_model
from shard.engine import Engine, SequenceRequest
from tests.conftest import LoomServer
from tests.engine_driver import EngineDriver

NEW_TOKENS = 12
LLAMA_TARGETS = (["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"])
FUSED_TARGETS = (["qkv_proj", "o_proj"], ["gate_up_proj", "down_proj"])  # what PEFT names on Phi-3
# (adapter kind, prompt length, the step the request joins at).
JOBS = [("", 53, 0), ("attn", 7, 0), ("mlp", 30, 0), ("all", 61, 3), ("attn", 12, 5)]
# Llama 3.x rope scaling on the tiny Llama: long wavelengths past 32 positions are stretched.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
CASES = list(FAMILIES) + ["llama3_rope"]


@dataclass
class Case:
    name: str
    base: Path
    adapters: dict[str, Path]  # kind -> PEFT dir
    prompts: list[list[int]]  # one per JOBS entry
    expected: list[list[int]]  # transformers / peft greedy tokens of each JOBS entry


def randomize_norms(model_dir: Path, seed: int) -> None:
    """Adds noise to every norm weight of the checkpoint (transformers initialises them to 1, or 0 for (1 + w))."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    g = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if name.endswith("norm.weight"):
            tensors[name] = t + 0.3 * torch.randn(t.shape, generator=g)
    save_file(tensors, path, metadata={"format": "pt"})


def hf_greedy(base: Path, adapter: Path | None, prompt: list[int]) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # no early stop: lengths match the engine's
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.inference_mode():
        out = model.eval().generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    do_sample=False, max_new_tokens=NEW_TOKENS)
    return out[0, len(prompt):].tolist()


def build_case(name: str, root: Path, seed: int) -> Case:
    family, overrides = ("llama", {"rope_parameters": LLAMA3_ROPE}) if name == "llama3_rope" else (name, {})
    base = build_tiny_model(root / name, family, seed=seed, **overrides)
    randomize_norms(base, seed)
    attn, mlp = FUSED_TARGETS if family == "phi3" else LLAMA_TARGETS
    adapters = {
        "attn": build_tiny_adapter(root / f"{name}-attn", base, 8, 16, attn, seed=seed + 1),
        "mlp": build_tiny_adapter(root / f"{name}-mlp", base, 4, 8, mlp, use_rslora=True, seed=seed + 2),
        "all": build_tiny_adapter(root / f"{name}-all", base, 16, 16, attn + mlp, seed=seed + 3),
    }
    rng = random.Random(seed)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    prompts = [[rng.randrange(vocab) for _ in range(n)] for _, n, _ in JOBS]
    expected = [hf_greedy(base, adapters.get(kind), p) for (kind, _, _), p in zip(JOBS, prompts)]
    # The adapters do change the outputs (else matching peft would prove nothing about LoRA).
    for (kind, _, _), p, want in zip(JOBS[1:4], prompts[1:4], expected[1:4]):
        assert want != hf_greedy(base, None, p), f"{name}: the {kind} adapter does not change the output"
    return Case(name, base, adapters, prompts, expected)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("families")
    return {name: build_case(name, root, 10 * i) for i, name in enumerate(CASES)}


def run_jobs(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    """JOBS as one continuous batch: each joins at its step and decodes until it has NEW_TOKENS tokens."""
    out: dict[int, list[int]] = {}
    step = 0
    while len(out) < len(JOBS) or any(len(t) < NEW_TOKENS for t in out.values()):
        prefill = [SequenceRequest(i, prompts[i], adapter_id=kind) for i, (kind, _, join) in enumerate(JOBS)
                   if join == step]
        decode = [i for i, t in out.items() if len(t) < NEW_TOKENS]
        for r in engine.step(prefill, decode, []):
            assert not r.error, r.error
            out.setdefault(r.request_id, []).append(r.token_id)
        step += 1
    engine.step([], [], list(out))
    assert engine.free_blocks == engine.num_blocks and not engine.sequences
    return [out[i] for i in range(len(JOBS))]


def make_engine(case_base: str, adapters: dict[str, str], tp_rank: int = 0, tp_size: int = 1) -> EngineDriver:
    engine = Engine(case_base, tp_rank=tp_rank, tp_size=tp_size)
    engine.warmup(max_batch_prefill_tokens=128, max_batch_total_tokens=1024)
    engine = EngineDriver(engine)
    for kind, path in adapters.items():
        engine.load_adapter(kind, path)
    return engine


@pytest.mark.parametrize("name", CASES)
def test_mixed_batch_matches_transformers_and_peft(cases, name):
    case = cases[name]
    engine = make_engine(str(case.base), {k: str(p) for k, p in case.adapters.items()})
    got = run_jobs(engine, case.prompts)
    for (kind, n, join), g, want in zip(JOBS, got, case.expected):
        assert g == want, f"{name}: adapter {kind or 'base'!r}, prompt of {n} tokens joining at step {join}"


def _two_rank_worker(rank: int, init_file: str, jobs: list[tuple[str, str, dict[str, str], list[list[int]]]],
                     out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = {name: run_jobs(make_engine(base, adapters, rank, 2), prompts) for name, base, adapters, prompts in jobs}
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))
    dist.destroy_process_group()


def test_two_ranks_match_transformers_and_peft(cases, tmp_path):
    """Each family at --num-shard 2 (gloo): heads, MLP and vocab split across ranks; LoRA B split per part
    of a fused target, A for the row-parallel ones."""
    import torch.multiprocessing as mp

    tp_cases = [cases[name] for name in FAMILIES]  # rope scaling does not depend on the split
    jobs = [(c.name, str(c.base), {k: str(p) for k, p in c.adapters.items()}, c.prompts) for c in tp_cases]
    out_file = tmp_path / "tokens.json"
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), jobs, str(out_file)), nprocs=2)
    results = json.loads(out_file.read_text())
    for case in tp_cases:
        assert results[case.name] == case.expected, case.name


def test_http_two_families(cases):
    """Phi-3 (fused LoRA targets) on 2 ranks and Gemma 2 (soft-capping) on one, served side by side: prompts
    as text, adapters by path, requests arriving together."""
    from transformers import AutoTokenizer

    served = {"phi3": ("--num-shard", "2"), "gemma2": ()}
    servers = {name: LoomServer(cases[name].base, *args, "--local-adapter-root", str(cases[name].base.parent),
                                "--max-batch-total-tokens", "4096") for name, args in served.items()}
    try:
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(lambda s: s.start(), servers.values()))
        for name, srv in servers.items():
            case = cases[name]
            tokenizer = AutoTokenizer.from_pretrained(case.base)
            jobs = [(f"ship {i} sails far " * (2 + 3 * i), kind) for i, kind in enumerate(["", "attn", "mlp", "all"])]
            got = asyncio.run(_generate_all(srv.url, [(p, case.adapters.get(k)) for p, k in jobs]))
            for (prompt, kind), tokens in zip(jobs, got):
                want = hf_greedy(case.base, case.adapters.get(kind), tokenizer(prompt)["input_ids"])
                assert tokens == want, f"{name} over HTTP, adapter {kind or 'base'!r}"
    finally:
        for srv in servers.values():
            srv.stop()


async def _generate_all(url: str, jobs: list[tuple[str, Path | None]]) -> list[list[int]]:
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(prompt: str, adapter: Path | None) -> list[int]:
            params = {"max_new_tokens": NEW_TOKENS, "details": True, "ignore_eos_token": True}
            if adapter is not None:
                params["adapter_id"] = str(adapter)
            r = await client.post(f"{url}/generate", json={"inputs": prompt, "parameters": params})
            assert r.status_code == 200, r.text
            return [t["id"] for t in r.json()["details"]["tokens"]]
        return await asyncio.gather(*(one(p, a) for p, a in jobs))
