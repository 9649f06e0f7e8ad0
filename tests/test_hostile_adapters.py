"""Adapters whose files are hostile: refused at load with an error that names the field or tensor, quickly and
before anything large is allocated, leaving nothing behind; KV that a diverged sequence leaves in freed blocks
never reaches another tenant's attention; over HTTP, a poisoned adapter is a 400 and the next tenant's output
is exact."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from launcher.tiny_model import build_tiny_adapter
from shard.engine import Engine, SequenceRequest
from shard.lora import AdapterError
from tests.conftest import LoomServer
from tests.engine_driver import EngineDriver

NEW_TOKENS = 8
# Lengths around block boundaries (16), so that decode rows span width groups and end mid-block.
PROMPT_LENS = [1, 5, 15, 17, 33, 47]


@pytest.fixture(scope="module")
def engine(llama_dir) -> EngineDriver:
    engine = Engine(str(llama_dir), adapter_pool_pages=8)
    engine.warmup(max_batch_prefill_tokens=256, max_batch_total_tokens=4096)
    return EngineDriver(engine)


@pytest.fixture(scope="module")
def good(llama_dir, tmp_path_factory) -> Path:
    return build_tiny_adapter(tmp_path_factory.mktemp("hostile") / "good", llama_dir, rank=8, alpha=16,
                              target_modules=["q_proj", "v_proj"], seed=3)


def variant(good: Path, dest: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of the good adapter with its config fields replaced and its tensors passed through `tensors`."""
    dest.mkdir(parents=True)
    base = json.loads((good / "adapter_config.json").read_text())
    (dest / "adapter_config.json").write_text(json.dumps({**base, **(config or {})}))
    weights = load_file(good / "adapter_model.safetensors")
    save_file(tensors(weights) if tensors else weights, dest / "adapter_model.safetensors")
    return dest


def poisoned(weights: dict, value: float, which: str = "lora_B") -> dict:
    key = next(k for k in sorted(weights) if which in k)
    weights[key][0, 0] = value
    return weights


def huge_rank(weights: dict, rank: int = 32768) -> dict:
    """One target of rank `rank`: consistent shapes, a file of a few MB, pages enough for gigabytes."""
    a = next(k for k in sorted(weights) if "lora_A" in k)
    b = a.replace("lora_A", "lora_B")
    return {a: torch.zeros(rank, weights[a].shape[1]), b: torch.zeros(weights[b].shape[0], rank)}


HOSTILE = {
    "nan-weight": ({}, lambda w: poisoned(w, math.nan), r"layers\.\d+\.self_attn\.\w+ holds weights that are not finite"),
    "inf-weight": ({}, lambda w: poisoned(w, math.inf, "lora_A"), r"not finite"),
    "alpha-1e30": ({"lora_alpha": 1e30}, None, r"update to the base weights reaches .*past the bound.*lora_alpha"),
    "alpha-1e300": ({"lora_alpha": 1e300}, None, r"not finite \(after lora_alpha scaling"),
    "alpha-string": ({"lora_alpha": "16"}, None, r"lora_alpha must be a finite number"),
    # The probe's pattern (Python's re: 13-20 s of backtracking): `regex` rules it out at once.
    "probe-regex": ({"target_modules": ".{7}(?:.|.)*Z"}, None, r"target_modules matches no supported target"),
    "backtracking-regex": ({"target_modules": r"(?:.|.)*\d\d\d"}, None, r"target_modules .*took over .*s: use a simpler"),
    "bad-rank-pattern": ({"rank_pattern": {"(": 4}}, None, r"a rank_pattern key is not a valid regular expression"),
    "backtracking-rank-pattern": ({"rank_pattern": {r"(.|.|.)*\d\d": 4}}, None, r"matching rank_pattern .*took over"),
    "rank-pattern-value": ({"rank_pattern": {"q_proj": -1}}, None, r"rank_pattern must map patterns to positive"),
    "targets-not-strings": ({"target_modules": [1, 2]}, None, r"target_modules must be a string or a list"),
    "huge-rank": ({"r": 32768}, huge_rank, r"adapter_model\.safetensors is larger than an adapter the pool can hold"),
    "rank-past-pool": ({"r": 72}, lambda w: huge_rank(w, 72), r"rank 72 needs 9 adapter-pool pages, the pool has 8"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_adapter_is_refused_at_load_leaving_nothing(engine, good, tmp_path, case):
    config, tensors, message = HOSTILE[case]
    path = variant(good, tmp_path / case, config, tensors)
    cache = engine.adapters
    before = (dict(cache.entries), cache.host_bytes, list(cache.free_pages))
    started = time.monotonic()
    with pytest.raises(AdapterError, match=message):
        engine.load_adapter(case, str(path))
    assert time.monotonic() - started < 5  # refused, not computed through (a 2-core machine: generous)
    assert (dict(cache.entries), cache.host_bytes, list(cache.free_pages)) == before


def test_malformed_configs_are_adapter_errors(engine, good, tmp_path):
    """What json.loads or a type check would otherwise raise (a 500 over HTTP) is this adapter's 400."""
    for name, text, message in [
        ("nested", "[" * 100_000 + "]" * 100_000, r"adapter_config\.json is not valid JSON"),
        ("list", "[1, 2]", r"must hold a JSON object"),
        ("nan-alpha", '{"r": 8, "lora_alpha": NaN, "target_modules": ["q_proj"]}', r"lora_alpha must be a finite"),
        ("huge", " " * (2 << 20), r"larger than \d+ bytes"),
    ]:
        path = variant(good, tmp_path / name)
        (path / "adapter_config.json").write_text(text)
        with pytest.raises(AdapterError, match=message):
            engine.load_adapter(name, str(path))


def test_weights_file_larger_than_the_pool_is_refused_unread(engine, good, tmp_path):
    path = variant(good, tmp_path / "sparse")
    (path / "adapter_model.safetensors").unlink()
    with open(path / "adapter_model.bin", "wb") as f:  # sparse: 10 GB on paper, nothing on disk
        f.truncate(10 << 30)
    with pytest.raises(AdapterError, match=r"adapter_model\.bin is larger than an adapter the pool can hold"):
        engine.load_adapter("sparse", str(path))


@pytest.mark.parametrize("decode", ["torch", "kernel"])
def test_nan_in_freed_kv_blocks_never_reaches_another_sequence(engine, llama_dir, good, reference, decode,
                                                              monkeypatch):
    """Every KV block is full of NaN, as a diverged sequence would leave its freed blocks: base and adapter
    requests batched together, ending mid-block and in several width groups, decode exactly on the torch path
    (gather + SDPA) and the paged kernel."""
    engine.clear()
    if decode == "torch":
        monkeypatch.setattr(engine.engine, "decode_kernel", None)
    engine.load_adapter("good", str(good))
    for layer in engine.model.model.layers:
        with torch.inference_mode():
            layer.self_attn.kv_cache.fill_(float("nan"))
    vocab = engine.info.vocab_size
    prompts = [[(7 * i + 3 * n) % vocab for i in range(n)] for n in PROMPT_LENS]
    adapters = ["good" if i % 2 else "" for i in range(len(prompts))]
    out = {r.request_id: [r.token_id] for r in engine.step(
        [SequenceRequest(i, p, adapter_id=a) for i, (p, a) in enumerate(zip(prompts, adapters))], [], [])}
    for _ in range(NEW_TOKENS - 1):
        for r in engine.step([], list(out), []):
            assert math.isfinite(r.logprob)
            out[r.request_id].append(r.token_id)
    engine.step([], [], list(out))
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        want = reference.greedy(llama_dir, prompt, NEW_TOKENS, stop_at_eos=False,
                                adapter_dir=good if adapter else None)
        assert out[i] == want, f"prompt of {len(prompt)} tokens, adapter {adapter!r}"


@pytest.fixture(scope="module")
def server(llama_dir, good, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-root")
    for case in ("nan-weight", "alpha-1e30"):
        config, tensors, _ = HOSTILE[case]
        variant(good, root / case, config, tensors)
    srv = LoomServer(llama_dir, "--local-adapter-root", str(root)).start()
    srv.root = root
    yield srv
    assert srv.stop() == 0


def test_poisoned_adapter_is_a_400_and_the_next_tenant_is_exact(server, llama_dir, tokenizer, reference):
    """The critical probe: a request through an adapter with NaN weights (or lora_alpha 1e30), then another
    tenant's base-model request, three times: refusals are fast 400s naming the adapter, and the base output
    equals transformers' with finite logprobs."""
    prompt = "The quick brown fox"
    ids = tokenizer(prompt)["input_ids"]
    want = reference.greedy(llama_dir, ids, 12, stop_at_eos=False)
    for _ in range(3):
        for case in ("nan-weight", "alpha-1e30"):
            started = time.monotonic()
            r = httpx.post(f"{server.url}/v1/completions", json={"model": str(server.root / case), "prompt": prompt,
                                                                  "max_tokens": 12, "temperature": 0}, timeout=60)
            assert r.status_code == 400 and time.monotonic() - started < 5, r.text
            error = r.json()["error"]
            assert error["code"] == "invalid_adapter" and error["param"] == "model"
            assert "q_proj" in error["message"] and "adapter_model" not in error["message"]
        r = httpx.post(f"{server.url}/generate", json={"inputs": prompt, "parameters": {
            "max_new_tokens": 12, "details": True, "ignore_eos_token": True}}, timeout=60)
        assert r.status_code == 200, r.text
        tokens = r.json()["details"]["tokens"]
        assert [t["id"] for t in tokens] == want
        assert all(math.isfinite(t["logprob"]) for t in tokens)
