"""DoRA adapters (PEFT `use_dora`) against peft, token for token in float32: alone, beside plain LoRA and base
requests in one batch, on a family with q/k/v biases, and at 2 tensor-parallel ranks (where the row-parallel
targets' weight norms span both ranks)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from launcher.tiny_model import build_tiny_adapter
from shard.engine import AdapterError, SequenceRequest
from tests.conftest import LoomServer
from tests.test_lora_engine import NEW_TOKENS, make_engine, peft_greedy
from tests.test_tensor_parallel import run_batch

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# (name, rank, alpha, targets, use_dora)
KINDS = [("dora-all", 8, 16, ATTN + MLP, True), ("dora-rows", 4, 8, ["o_proj", "down_proj"], True),
         ("dora-qv", 4, 8, ["q_proj", "v_proj", "up_proj"], True), ("lora", 8, 16, ATTN + MLP, False)]


def _adapters(base: Path, root: Path) -> dict[str, Path]:
    return {name: build_tiny_adapter(root / name, base, rank, alpha, targets, seed=40 + i, use_dora=dora)
            for i, (name, rank, alpha, targets, dora) in enumerate(KINDS)}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family(request, model_dirs, tmp_path_factory):
    base = model_dirs[request.param]
    adapters = _adapters(base, tmp_path_factory.mktemp(f"dora-{request.param}"))
    engine = make_engine(base)
    for name, path in adapters.items():
        engine.load_adapter(name, str(path))
    rng = random.Random(request.param)
    prompts = [[rng.randrange(engine.info.vocab_size) for _ in range(rng.randrange(3, 30))] for _ in range(8)]
    return base, adapters, engine, prompts


def test_dora_alone_and_batched_with_lora_and_base(family):
    base, adapters, engine, prompts = family
    names = list(adapters)
    for i, name in enumerate(names):  # alone
        got = engine.generate([SequenceRequest(1, prompts[i], adapter_id=name)], NEW_TOKENS)[1]
        assert got == peft_greedy(base, adapters[name], prompts[i]), name
    jobs = [(names[i % len(names)] if i < 6 else "", prompts[i]) for i in range(len(prompts))]
    out = engine.generate([SequenceRequest(k, p, adapter_id=a) for k, (a, p) in enumerate(jobs)], NEW_TOKENS)
    for k, (name, prompt) in enumerate(jobs):
        assert out[k] == peft_greedy(base, adapters[name] if name else None, prompt), (k, name)
    assert out[0] != peft_greedy(base, None, prompts[0])


def test_dora_files_are_checked(family, tmp_path):
    base, adapters, engine, _ = family
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "no-magnitude"
    shutil.copytree(adapters["dora-qv"], broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    dropped = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
    save_file({k: v for k, v in tensors.items() if k != dropped}, broken / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="has no lora_magnitude_vector"):
        engine.load_adapter("broken", str(broken))
    unflagged = tmp_path / "unflagged"
    shutil.copytree(adapters["dora-qv"], unflagged)
    config = json.loads((unflagged / "adapter_config.json").read_text())
    (unflagged / "adapter_config.json").write_text(json.dumps(config | {"use_dora": False}))
    with pytest.raises(AdapterError, match="does not set use_dora"):
        engine.load_adapter("unflagged", str(unflagged))
    (unflagged / "adapter_config.json").write_text(json.dumps(config | {"use_dora": "yes"}))
    with pytest.raises(AdapterError, match="use_dora must be true or false"):
        engine.load_adapter("unflagged", str(unflagged))
    huge = tmp_path / "huge-magnitude"
    shutil.copytree(adapters["dora-qv"], huge)
    tensors = load_file(huge / "adapter_model.safetensors")
    save_file({k: v * 1e9 if k.endswith("lora_magnitude_vector") else v for k, v in tensors.items()},
              huge / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="past the bound"):
        engine.load_adapter("huge", str(huge))


def test_dora_at_two_ranks(model_dirs, tmp_path_factory, reference):
    base = model_dirs["qwen2"]
    root = tmp_path_factory.mktemp("dora-tp")
    adapters = _adapters(base, root)
    srv = LoomServer(base, "--num-shard", "2", "--local-adapter-root", str(root),
                     "--max-batch-total-tokens", "8192").start()
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
        paths = [str(p) for p in adapters.values()] + [None]
        jobs = [(f"ship {i} sails " * (1 + i % 3), paths[i % len(paths)], 6 + i) for i in range(10)]
        for (prompt, adapter, n), got in zip(jobs, run_batch(srv.url, jobs)):
            want = reference.greedy(base, tokenizer(prompt)["input_ids"], n, adapter_dir=adapter)
            assert got == want, (prompt, adapter)
    finally:
        srv.stop()


@pytest.mark.parametrize("family_name, targets", [("phi3", ["qkv_proj", "gate_up_proj", "down_proj"]),
                                                  ("gemma2", ["q_proj", "o_proj", "up_proj"])])
def test_dora_on_fused_projections_and_gemma(family_name, targets, model_dirs, tmp_path):
    """Phi-3's fused qkv_proj / gate_up_proj (one magnitude vector over the fused outputs) and Gemma 2."""
    base = model_dirs[family_name]
    dora = build_tiny_adapter(tmp_path / "dora", base, 8, 16, targets, seed=50, use_dora=True)
    engine = make_engine(base)
    engine.load_adapter("dora", str(dora))
    prompts = [[5, 17, 99, 3, 42, 8], [11, 12, 13, 14]]
    out = engine.generate([SequenceRequest(0, prompts[0], adapter_id="dora"), SequenceRequest(1, prompts[1])],
                          NEW_TOKENS)
    assert out[0] == peft_greedy(base, dora, prompts[0])
    assert out[1] == peft_greedy(base, None, prompts[1])
