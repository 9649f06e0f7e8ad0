"""Mixtures of experts (Qwen3-MoE, Qwen2-MoE, Mixtral, gpt-oss) against transformers (+ peft), token for token
(float32, CPU, greedy), as tests/test_families.py checks the dense families.

Per family: a tiny random model saved by the installed transformers (one module per expert, or fused for gpt-oss,
which never had another layout) and the same weights saved fused (the 3-D tensors transformers keeps in memory),
its norms randomised; PEFT adapters built by peft: attention-only, experts-only (`target_parameters` on the fused
expert tensors) and "all" (all-linear: attention, the router or the shared expert and its gate, plus the experts);
for Qwen3-MoE and Mixtral also an adapter as peft wrote it for transformers 4 models (one LoRA module per expert,
Mixtral's under block_sparse_moe), which peft converts on load. One continuous batch mixes the base model with every
adapter, requests joining mid-decode and prompts past the sliding windows, in-process at 1 rank (both layouts) and
at 2 gloo ranks; Qwen3-MoE also preempted under the router's scheduler and over HTTP.
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


def mxfp4_checkpoint(src: Path, dst: Path, seed: int) -> Path:
    """`src` (gpt-oss) with its experts replaced by random MXFP4 blocks and scales, as published gpt-oss checkpoints
    hold them."""
    shutil.copytree(src, dst)
    config = json.loads((src / "config.json").read_text())
    experts, hidden, inter = config["num_local_experts"], config["hidden_size"], config["intermediate_size"]
    tensors = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for layer in range(config["num_hidden_layers"]):
        for param, (out, fan_in) in {"gate_up_proj": (2 * inter, hidden), "down_proj": (hidden, inter)}.items():
            name = f"model.layers.{layer}.mlp.experts.{param}"
            del tensors[name]
            tensors[f"{name}_blocks"] = torch.randint(0, 256, (experts, out, fan_in // 32, 16), generator=g,
                                                      dtype=torch.uint8)
            tensors[f"{name}_scales"] = torch.randint(122, 126, (experts, out, fan_in // 32), generator=g,
                                                      dtype=torch.uint8)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(config))
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


def hf_greedy(base: Path, adapter: Path | None, prompts: list[list[int]], tokens: int = NEW_TOKENS
              ) -> list[list[int]]:
    """transformers (+ peft) greedy continuations of `prompts`, the model loaded once."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.inference_mode():
        outs = [model.eval().generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                      do_sample=False, max_new_tokens=tokens, eos_token_id=None) for p in prompts]
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
    found = {family: build_case(family, root, 10 * i) for i, family in enumerate(MOE_FAMILIES)}
    # gpt-oss with MXFP4 experts (dequantized on load by transformers and by Loom): the same jobs and adapters.
    gpt = found["gpt_oss"]
    path = mxfp4_checkpoint(gpt.layouts["fused"], root / "gpt_oss-mxfp4", 99)
    expected = [hf_greedy(path, gpt.adapters.get(kind), [p])[0] for (kind, _, _), p in zip(gpt.jobs, gpt.prompts)]
    found["gpt_oss-mxfp4"] = Case("gpt_oss-mxfp4", {"mxfp4": path}, gpt.adapters, gpt.jobs, gpt.prompts, expected)
    return found


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
LAYOUT_CASES.append(("gpt_oss-mxfp4", "mxfp4"))


@pytest.mark.parametrize("family,layout", LAYOUT_CASES)
def test_mixed_batch_matches_transformers_and_peft(cases, family, layout):
    case = cases[family]
    engine = make_engine(case.layouts[layout], case.adapters)
    got = run_jobs(engine, case.jobs, case.prompts)
    for (kind, n, join), g, want in zip(case.jobs, got, case.expected):
        assert g == want, f"{family} ({layout}): adapter {kind or 'base'!r}, prompt of {n} tokens joining at {join}"


def _two_rank_worker(rank: int, init_file: str, jobs: list[tuple[str, str, dict[str, str], list, list]],
                     out_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = {name: run_jobs(make_engine(Path(base), {k: Path(p) for k, p in adapters.items()}, rank, 2),
                              [tuple(j) for j in case_jobs], prompts)
               for name, base, adapters, case_jobs, prompts in jobs}
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))
    dist.destroy_process_group()


def test_two_ranks_match_transformers_and_peft(cases, tmp_path):
    """Every family and layout at --num-shard 2 (gloo): each expert split by intermediate size (gpt-oss' interleaved
    gate/up columns too), one all-reduce per sparse block; expert LoRA B rows split like the base rows."""
    import torch.multiprocessing as mp

    jobs = [(f"{c.family}-{layout}", str(path), {k: str(p) for k, p in c.adapters.items()}, c.jobs, c.prompts)
            for c in cases.values() for layout, path in c.layouts.items()]
    out_file = tmp_path / "tokens.json"
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), jobs, str(out_file)), nprocs=2)
    results = json.loads(out_file.read_text())
    for c in cases.values():
        for layout in c.layouts:
            assert results[f"{c.family}-{layout}"] == c.expected, f"{c.family} ({layout})"


def test_preempted_requests_resume_exactly(cases, tmp_path):
    """Under the router's scheduler with a KV cache far too small, requests of every adapter kind are preempted
    and resumed by recompute; each output is still transformers' / peft's."""
    from tests.inprocess import request
    from tests.test_preemption import engine_with_blocks, serve

    case = cases["qwen3_moe"]
    engine = engine_with_blocks(case.layouts["fused"], 10)
    pages = {kind: engine.load_adapter(kind, str(path)).pages for kind, path in case.adapters.items()}
    kinds = ["", "attn", "experts", "all", "legacy", "", "experts", "all"]
    rng = random.Random(5)
    prompts = [[rng.randrange(300) for _ in range(rng.randint(12, 30))] for _ in kinds]
    tokens = 24
    requests = [request(p, tokens, kind, pages.get(kind, 0)) for p, kind in zip(prompts, kinds)]
    outputs, preemptions = serve(engine, requests, tmp_path)
    assert preemptions >= 2
    for kind in dict.fromkeys(kinds):
        mine = [i for i, k in enumerate(kinds) if k == kind]
        want = hf_greedy(case.layouts["modules"], case.adapters.get(kind), [prompts[i] for i in mine], tokens)
        assert [[e.token_id for e in outputs[i]] for i in mine] == want, kind


def test_http(cases):
    """Qwen3-MoE served over HTTP: prompts as text, adapters by path, requests arriving together."""
    from transformers import AutoTokenizer

    from tests.conftest import LoomServer
    from tests.test_families import _generate_all

    case = cases["qwen3_moe"]
    srv = LoomServer(case.layouts["fused"], "--local-adapter-root", str(case.adapters["attn"].parent),
                     "--max-batch-total-tokens", "4096")
    try:
        srv.start()
        tokenizer = AutoTokenizer.from_pretrained(case.layouts["fused"])
        jobs = [(f"ship {i} sails far " * (2 + 2 * i), kind) for i, kind in enumerate(["", "attn", "experts", "all"])]
        got = asyncio.run(_generate_all(srv.url, [(p, case.adapters.get(k)) for p, k in jobs]))
        for (prompt, kind), tokens in zip(jobs, got):
            want = hf_greedy(case.layouts["modules"], case.adapters.get(kind), [tokenizer(prompt)["input_ids"]], 12)
            assert tokens == want[0], f"adapter {kind or 'base'!r}"
    finally:
        srv.stop()


def test_adapter_pages_cover_experts_only_when_targeted(cases):
    """Attention-only adapters take the pages of their rank in the ordinary layout, whatever the experts; an
    adapter on the experts takes expert pages on top (every expert of every sparse layer at its rank)."""
    case = cases["qwen3_moe"]
    engine = Engine(str(case.layouts["fused"]))
    layout = engine.adapters.layout
    experts = layout.experts
    assert experts.layers == (0, 2) and experts.num_experts == 4  # layer 1 is dense (mlp_only_layers)
    assert not any(p.startswith("experts") for p in layout.shapes)
    assert engine.read_adapter("attn", str(case.adapters["attn"])).pages.shape[0] == layout.pages_for(8)
    host = engine.read_adapter("experts", str(case.adapters["experts"]))
    assert host.expert_pages == experts.pages_for(4) and host.pages.shape[0] == host.expert_pages
    assert host.targets == {"experts.gate_up_proj", "experts.down_proj"}


def test_unsupported_moe_variant_is_a_one_line_start_error(cases, tmp_path):
    """DeepSeek-V3 (multi-head latent attention) stops `loom` before any shard starts, in one line naming it."""
    from tests.conftest import hermetic_env, run_loom

    path = shutil.copytree(cases["qwen3_moe"].layouts["fused"], tmp_path / "deepseek")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"model_type": "deepseek_v3"}))
    result = run_loom("--model-id", str(path), env=hermetic_env(tmp_path))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "unsupported model_type 'deepseek_v3' (multi-head latent attention" in errors[0]
    assert "Traceback" not in result.stderr
    with pytest.raises(ValueError, match="deepseek_v3"):
        Engine(str(path))


def test_checkpoint_expert_errors_are_named(cases, tmp_path):
    """A per-expert checkpoint missing one expert's tensor, or holding an expert fused and per module, fails
    naming it."""
    base = cases["mixtral"].layouts["modules"]
    path = shutil.copytree(base, tmp_path / "missing")
    tensors = load_file(path / "model.safetensors")
    tensors.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks tensors: model\.layers\.1\.mlp\.experts\.down_proj$"):
        Engine(str(path))
    fused = load_file(cases["mixtral"].layouts["fused"] / "model.safetensors")
    tensors = load_file(base / "model.safetensors") | {"model.layers.0.mlp.experts.down_proj":
                                                       fused["model.layers.0.mlp.experts.down_proj"]}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"experts\.\d\.w2\.weight'|experts\.down_proj'"):
        Engine(str(path))


@pytest.mark.parametrize("family, sizes", [("qwen2_moe", {"moe_intermediate_size": 30}),
                                           ("qwen2_moe", {"shared_expert_intermediate_size": 20}),
                                           ("mixtral", {"intermediate_size": 36})])
def test_launcher_shard_counts_agree_with_the_experts(tmp_path, family, sizes):
    """The launcher's --num-shard rule splits the experts' and the shared expert's sizes too, exactly as the
    model's layers can be built."""
    from transformers import AutoConfig

    from launcher.cli import tensor_parallel_sizes
    from launcher.tiny_model import model_config
    from shard.models import model_class

    model_config(family, 384, num_attention_heads=8, num_key_value_heads=8, **sizes).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    buildable = []
    for n in range(1, 9):
        try:
            model_class(config)(config, torch.float32, "meta", tp_rank=0, tp_size=n)
            buildable.append(n)
        except ValueError:
            pass
    assert tensor_parallel_sizes(tmp_path, 8) == buildable and buildable != [1, 2, 4, 8]


def test_moe_demo_model(tmp_path, monkeypatch):
    """`loom --model-id demo-moe` serves a small random Qwen3-MoE, built once into the user cache."""
    from launcher.model_source import DEMO_MOE_DIR_NAME, resolve_model

    monkeypatch.setenv("LOOM_CACHE", str(tmp_path))
    model = resolve_model("demo-moe")
    assert model.name == "demo-moe" and model.path == tmp_path / DEMO_MOE_DIR_NAME
    assert json.loads((model.path / "config.json").read_text())["model_type"] == "qwen3_moe"
    prompt = list(range(5, 30))
    engine = make_engine(model.path, {})
    got = run_jobs(engine, [("", len(prompt), 0)], [prompt])
    assert got == hf_greedy(model.path, None, [prompt])


def test_bad_expert_adapters_are_refused_naming_the_field(cases, tmp_path):
    """Expert tensors get every check other adapter tensors get: shapes and targets from the header, finite weights
    within bounds; the error names the tensor or field."""
    from shard.lora import AdapterError

    engine = Engine(str(cases["gpt_oss"].layouts["fused"]))

    def variant(name: str, config_changes: dict | None = None, tensor_change=None) -> str:
        path = shutil.copytree(cases["gpt_oss"].adapters["experts"], tmp_path / name)
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps(config | (config_changes or {})))
        if tensor_change is not None:
            tensors = load_file(path / "adapter_model.safetensors")
            tensor_change(tensors)
            save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
        return str(path)

    key = "base_model.model.model.layers.1.mlp.experts.lora_A.weight"  # down_proj's (the outer wrapper)
    with pytest.raises(AdapterError, match="unsupported target parameter 'mlp.router.weight'"):
        engine.read_adapter("router", variant("router", {"target_parameters": ["mlp.router.weight"]}))
    with pytest.raises(AdapterError, match=r"layers\.1\.mlp\.experts\.down_proj has lora_A \[16, 16\]"):
        engine.read_adapter("shape", variant("shape", tensor_change=lambda t: t.update({key: t[key][:, :16].contiguous()})))
    with pytest.raises(AdapterError, match=r"layers\.1\.mlp\.experts\.down_proj.*not finite"):
        engine.read_adapter("nan", variant("nan", tensor_change=lambda t: t[key].view(-1).__setitem__(3, float("nan"))))
    with pytest.raises(AdapterError, match="target_parameters does not name"):
        engine.read_adapter("unnamed", variant("unnamed", {"target_parameters": ["experts.gate_up_proj"]}))
