"""The engine in-process against transformers: greedy outputs must match token for token (float32, CPU)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from launcher.tiny_model import FAMILIES, build_tiny_adapter, build_tiny_model
from shard.engine import Engine, SamplingParams, SequenceRequest
from tests.engine_driver import EngineDriver

NEW_TOKENS = 32
# Around block boundaries (16) and the Mistral window (48); prompt + NEW_TOKENS runs well past the window.
PROMPT_LENS = [1, 5, 15, 16, 17, 23, 31, 33, 40, 47, 48, 49, 60, 7, 12, 3]


@dataclass
class Case:
    family: str
    path: Path
    hf: torch.nn.Module
    engine: Engine
    prompts: list[list[int]]
    refs: list[list[int]]  # HF greedy continuation of each prompt


def hf_greedy(hf, prompt: list[int], n: int, **kwargs) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      do_sample=False, max_new_tokens=n, **kwargs)
    return out[0, len(prompt):].tolist()


def load_hf(path: Path):
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # No EOS: generate neither stops early nor (through min_new_tokens) masks the EOS logit.
    hf.generation_config.eos_token_id = None
    return hf


def make_engine(path: Path) -> EngineDriver:
    engine = Engine(str(path))
    engine.warmup(max_batch_prefill_tokens=256, max_batch_total_tokens=4096)
    return EngineDriver(engine)


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory) -> Case:
    path = build_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    hf = load_hf(path)
    rng = random.Random(0)
    vocab = hf.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in PROMPT_LENS]
    with torch.inference_mode():
        refs = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    return Case(request.param, path, hf, make_engine(path), prompts, refs)


@pytest.fixture
def engine(case: Case) -> Engine:
    case.engine.clear()
    return case.engine


def test_single_requests(case: Case, engine: Engine):
    for i in (0, 2, 3, 4, 12):  # lengths 1, 15, 16, 17, 60
        out = engine.generate([SequenceRequest(i, case.prompts[i])], NEW_TOKENS)
        assert out[i] == case.refs[i], f"{case.family} prompt of {len(case.prompts[i])} tokens"
    assert engine.free_blocks == engine.num_blocks


def test_continuous_batching_matches_hf(case: Case, engine: Engine):
    n = len(case.prompts)
    join_step = {i: 0 if i < 6 else 4 if i < 12 else 11 for i in range(n)}
    limit = {i: 9 if i % 4 == 1 else NEW_TOKENS for i in range(n)}  # some are released early
    out: dict[int, list[int]] = {}
    step = 0
    while len(out) < n or any(len(out[i]) < limit[i] for i in out) or engine.free_blocks < engine.num_blocks:
        joining = [i for i in range(n) if join_step[i] == step]
        done = [i for i in out if len(out[i]) == limit[i]]
        decode = [i for i in out if len(out[i]) < limit[i]]
        prefill = [SequenceRequest(i, case.prompts[i]) for i in joining]
        results = engine.step(prefill, decode, done)
        assert [r.request_id for r in results] == joining + decode
        for r in results:
            assert not r.error
            out.setdefault(r.request_id, []).append(r.token_id)
        for i in done:
            limit[i] = -1  # released: no more steps for it
        step += 1
    for i in range(n):
        assert out[i] == case.refs[i][:len(out[i])], f"{case.family} request {i}"
        assert len(out[i]) in (9, NEW_TOKENS)
    assert engine.free_blocks == engine.num_blocks


def test_logprobs_match_hf(case: Case, engine: Engine):
    prompt = case.prompts[5]
    steps = 4
    req = SequenceRequest(1, prompt, top_n_tokens=5, prefill_logprobs=True)
    results = [engine.step([req], [], [])[0]] + [engine.step([], [1], [])[0] for _ in range(steps - 1)]
    with torch.inference_mode():
        g = case.hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=steps, output_logits=True,
                             return_dict_in_generate=True)
        prompt_logits = case.hf(torch.tensor([prompt])).logits[0].float()
    for r, logits in zip(results, g.logits):
        expected = torch.log_softmax(logits[0].float(), -1)
        assert r.token_id == int(expected.argmax())
        assert r.logprob == pytest.approx(float(expected[r.token_id]), abs=1e-4)
        values, ids = expected.topk(5)
        assert [t for t, _ in r.top_tokens] == ids.tolist()
        assert torch.allclose(torch.tensor([lp for _, lp in r.top_tokens]), values, atol=1e-4)
    expected_prompt = torch.log_softmax(prompt_logits[:-1], -1).gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert results[0].prefill_logprobs[0] == 0.0
    assert torch.allclose(torch.tensor(results[0].prefill_logprobs[1:]), expected_prompt, atol=1e-4)
    assert results[1].prefill_logprobs == []


def test_error_requests_do_not_affect_others(case: Case, engine: Engine):
    vocab = engine.info.vocab_size
    bad = [
        SequenceRequest(2, []),
        SequenceRequest(3, [1, vocab]),
        SequenceRequest(4, [1, 2], adapter_id="some/adapter"),
    ]
    results = engine.step([SequenceRequest(0, case.prompts[1])] + bad, [], [])
    assert not results[0].error
    assert "empty prompt" in results[1].error
    assert f"token id {vocab}" in results[2].error
    assert "adapter" in results[3].error
    tokens = [results[0].token_id]
    for step in range(NEW_TOKENS - 1):
        again = [SequenceRequest(0, [5])] if step == 0 else []  # the id of a live sequence
        decoded = engine.step(again, [0, 3], [])
        if again:
            assert "already active" in decoded.pop(0).error
        assert "not active" in decoded[1].error
        tokens.append(decoded[0].token_id)
    assert tokens == case.refs[1]
    engine.step([], [], [0])
    assert engine.free_blocks == engine.num_blocks


def test_seeded_sampling_ignores_batch_composition(case: Case, engine: Engine):
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    alone = engine.generate([SequenceRequest(100, case.prompts[6], params)], 20)[100]
    assert engine.generate([SequenceRequest(100, case.prompts[6], params)], 20)[100] == alone
    assert alone != case.refs[6][:20]  # it did sample

    others = [
        SamplingParams(),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, min_p=0.05, seed=7),
        SamplingParams(temperature=1.2, typical_p=0.9, repetition_penalty=1.2, frequency_penalty=0.5),
        SamplingParams(presence_penalty=1.0),
    ]
    ids = list(range(len(others)))
    engine.step([SequenceRequest(i, case.prompts[i], p) for i, p in zip(ids, others)], [], [])
    busy = [engine.step([SequenceRequest(100, case.prompts[6], params)], ids, [])[0].token_id]
    for _ in range(19):
        busy.append(engine.step([], [100] + ids, [])[0].token_id)
    assert busy == alone


def test_repetition_penalty_matches_hf(case: Case, engine: Engine):
    prompt = case.prompts[8]
    with torch.inference_mode():
        expected = hf_greedy(case.hf, prompt, 20, repetition_penalty=1.5)
    params = SamplingParams(repetition_penalty=1.5)
    assert engine.generate([SequenceRequest(1, prompt, params)], 20)[1] == expected


def test_sharded_checkpoint_loads(tmp_path: Path):
    path = build_tiny_model(tmp_path / "sharded", "llama", max_shard_size="50KB")
    assert (path / "model.safetensors.index.json").exists()
    hf = load_hf(path)
    prompt = list(range(3, 40))
    with torch.inference_mode():
        expected = hf_greedy(hf, prompt, 24)
    assert make_engine(path).generate([SequenceRequest(1, prompt)], 24)[1] == expected


def test_missing_tensor_is_named(tmp_path: Path):
    from safetensors.torch import load_file, save_file

    from shard.weights import CheckpointError

    path = build_tiny_model(tmp_path / "broken", "qwen2")
    tensors = load_file(path / "model.safetensors")
    up = tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file({**tensors, "model.layers.0.mlp.extra.weight": up}, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.extra\.weight'"):
        Engine(str(path))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks tensors: model\.layers\.1\.mlp\.up_proj\.weight$"):
        Engine(str(path))


def _tp_worker(rank: int, world: int, init_file: str, path: str, prompt: list[int], n: int, out_file: str,
               adapters: list[str]):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    engine = Engine(path, tp_rank=rank, tp_size=world)
    engine.warmup(64, 1024)
    engine = EngineDriver(engine)
    for i, adapter in enumerate(adapters):
        engine.load_adapter(f"a{i}", adapter)
    # Unseeded sampling in the batch: ranks must still agree on every token.
    requests = [SequenceRequest(1, prompt), SequenceRequest(2, prompt, SamplingParams(temperature=1.0))]
    requests += [SequenceRequest(10 + i, prompt[i:], adapter_id=f"a{i}") for i in range(len(adapters))]
    tokens = engine.generate(requests, n)
    if rank == 0:
        Path(out_file).write_text(json.dumps([tokens[1]] + [tokens[10 + i] for i in range(len(adapters))]))
    dist.destroy_process_group()


def test_tensor_parallel_gloo(tmp_path: Path):
    """Two gloo ranks, each holding half the heads, MLP and vocab of a qwen2 model (qkv bias, tied
    vocab-parallel embeddings), match transformers; with LoRA adapters in the same batch (column-parallel
    targets split lora_B, row-parallel ones lora_A), match peft."""
    import torch.multiprocessing as mp
    from peft import PeftModel

    path = build_tiny_model(tmp_path / "qwen2", "qwen2")
    adapters = [
        build_tiny_adapter(tmp_path / "all", path, 8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"], seed=1),
        build_tiny_adapter(tmp_path / "attn", path, 4, 8, ["k_proj", "o_proj"], use_rslora=True, seed=2),
        build_tiny_adapter(tmp_path / "mlp", path, 16, 16, ["up_proj", "down_proj"], seed=3),
    ]
    prompt = list(range(3, 60))
    with torch.inference_mode():
        expected = [hf_greedy(load_hf(path), prompt, 20)]
        for i, adapter in enumerate(adapters):
            expected.append(hf_greedy(PeftModel.from_pretrained(load_hf(path), adapter), prompt[i:], 20))
    out_file = tmp_path / "tokens"
    mp.spawn(_tp_worker, args=(2, str(tmp_path / "init"), str(path), prompt, 20, str(out_file),
                               [str(a) for a in adapters]), nprocs=2)
    assert json.loads(out_file.read_text()) == expected


def test_sampler_truncation_and_penalties():
    from shard.sampler import SamplerRow, sample

    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [0.0, 1.0, 4.0, 3.9]])
    for params in (SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=0.01),
                   SamplingParams(temperature=1.0, min_p=0.999)):
        rows = [SamplerRow(params, [0], 1), SamplerRow(params, [0], 1)]
        assert sample(logits, rows).token_ids == [1, 2]
    rows = [SamplerRow(SamplingParams(), [0], 1, top_n=2), SamplerRow(SamplingParams(), [0], 1)]
    out = sample(logits, rows)
    assert out.token_ids == [1, 2]
    assert [t for t, _ in out.top_tokens[0]] == [1, 2] and out.top_tokens[1] == []
    assert out.logprobs[1] == pytest.approx(float(torch.log_softmax(logits[1], -1)[2]))
    # OpenAI penalties count generated tokens only: token 2 was generated twice, token 3 is in the prompt.
    row = SamplerRow(SamplingParams(frequency_penalty=0.1, presence_penalty=0.05), [3, 2, 2], 1)
    out = sample(logits[1:], [row])
    assert out.token_ids == [3]
    expected = logits[1].clone()
    expected[2] -= 0.1 * 2 + 0.05
    assert out.logprobs[0] == pytest.approx(float(torch.log_softmax(expected, -1)[3]))
