"""Adapters on the vocabulary against transformers + peft, token for token in float32: LoRA on embed_tokens and
on lm_head, added tokens saved with trainable_token_indices and with modules_to_save (a resized vocabulary and
the adapter's own tokenizer), alone and in one batch with plain LoRA and base-model requests; in-process on an
untied (Llama), a tied (Qwen2) and a Gemma 2 model, and over HTTP on two tensor-parallel ranks."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import torch

from launcher.tiny_model import build_tiny_adapter
from shard.engine import AdapterError, Engine, SequenceRequest
from shard.sampler import SamplingParams
from tests.conftest import LoomServer
from tests.engine_driver import EngineDriver

NEW_TOKENS = 8
ADDED = ["<tool>", "</tool>"]
KINDS = ("embed_lora", "head_lora", "trainable_tokens", "modules_to_save")
RESIZING = ("trainable_tokens", "modules_to_save")
FAMILIES = ("llama", "qwen2", "gemma2")


def _likely_tokens(base) -> list[int]:
    """The two tokens the base model predicts most often over a long sequence: added tokens whose lm_head rows
    are theirs, scaled up, get sampled where they would have been."""
    with torch.inference_mode():
        predicted = base(torch.arange(min(256, base.config.vocab_size))[None]).logits[0].argmax(-1)
    return torch.bincount(predicted).topk(2).indices.tolist()


def build_vocab_adapter(path: Path, base_dir: Path, kind: str, seed: int) -> Path:
    """A PEFT adapter of `kind` saved by peft itself, its trained tensors drawn at random. The kinds that add
    tokens save a tokenizer with ADDED (`</tool>` its EOS) and a resized vocabulary whose new lm_head rows make
    the added tokens likely."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    likely = _likely_tokens(base)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    extra = {}
    if kind in RESIZING:
        tokenizer.add_tokens(ADDED)
        tokenizer.eos_token = ADDED[1]
        old = base.config.vocab_size
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            head = base.get_output_embeddings().weight
            head[old:old + len(likely)] = 3 * head[likely]
        new_ids = tokenizer.convert_tokens_to_ids(ADDED)
        extra = ({"trainable_token_indices": {"embed_tokens": new_ids}} if kind == "trainable_tokens"
                 else {"modules_to_save": ["embed_tokens", "lm_head"]})
    targets = {"embed_lora": ["embed_tokens", "q_proj"], "head_lora": ["lm_head", "v_proj"]}.get(kind, ["q_proj"])
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, **extra))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:
                param.normal_(0.0, 0.1 if "lora_B" in name else 0.5)
            elif "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.05)
            elif "trainable_tokens_delta" in name:
                param.copy_(3 * model.get_input_embeddings().weight[likely] if base.config.tie_word_embeddings
                            else param + torch.randn_like(param) * 0.1)
    model.save_pretrained(path)
    if kind in RESIZING:
        tokenizer.save_pretrained(path)
    return path


_refs: dict[tuple, list[int]] = {}


def peft_greedy(base_dir: Path, adapter_dir: Path | None, prompt: list[int], n: int = NEW_TOKENS,
                eos: int | None = None) -> list[int]:
    """peft's greedy continuation; an adapter that resized the vocabulary loads into a base model resized
    alike, as its trainer had it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = (str(base_dir), str(adapter_dir), tuple(prompt), n, eos)
    if key not in _refs:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        if adapter_dir is not None:
            if (adapter_dir / "tokenizer_config.json").is_file():
                model.resize_token_embeddings(len(AutoTokenizer.from_pretrained(adapter_dir)), mean_resizing=False)
            model = PeftModel.from_pretrained(model, adapter_dir)
        with torch.inference_mode():
            out = model.eval().generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, eos_token_id=eos,
                                        attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        _refs[key] = out[0, len(prompt):].tolist()
    return _refs[key]


@pytest.fixture(scope="module")
def adapters(model_dirs, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per family (untied llama, tied qwen2, gemma2: scaled embeddings, soft-capped logits): every kind, plus a
    plain LoRA to batch them with."""
    root = tmp_path_factory.mktemp("vocab-adapters")
    out = {}
    for family in FAMILIES:
        base = model_dirs[family]
        out[family] = {kind: build_vocab_adapter(root / family / kind, base, kind, seed=i)
                       for i, kind in enumerate(KINDS)}
        out[family]["plain"] = build_tiny_adapter(root / family / "plain", base, rank=8, alpha=16,
                                                  target_modules=["q_proj", "o_proj", "down_proj"], seed=9)
    return out


def _prompt(kind: str | None, base_vocab: int) -> list[int]:
    """Prompts of the kinds that add tokens hold them."""
    if kind in RESIZING:
        return [base_vocab, 12, base_vocab + 1, 40, 7]
    return {"embed_lora": [7, 8, 9, 100, 200], "head_lora": [1, 2, 3], "plain": [9, 33, 4]}.get(kind, [5, 17, 99, 3])


@pytest.mark.parametrize("family", FAMILIES)
def test_each_kind_alone_and_all_in_one_batch_equal_peft(family, model_dirs, adapters):
    base = model_dirs[family]
    engine = Engine(str(base))
    engine.warmup(max_batch_prefill_tokens=512, max_batch_total_tokens=4096)
    driver = EngineDriver(engine)
    vocab = engine.vocab_size
    for kind, path in adapters[family].items():
        info = engine.load_adapter(kind, str(path))
        assert info.vocab_size == (vocab + len(ADDED) if kind in RESIZING else vocab)
    # Added tokens keep only their own rows (the resized base layers' added rows, the trained rows): no copy of
    # the base vocabulary's.
    hidden = engine.info.hidden_size
    assert engine.adapters.entries["trainable_tokens"].vocab.nbytes <= 4 * len(ADDED) * hidden * 4 + 64
    jobs = [None, *adapters[family]]
    want = {kind: peft_greedy(base, adapters[family].get(kind), _prompt(kind, vocab)) for kind in jobs}
    requests = [SequenceRequest(id=i, input_ids=_prompt(kind, vocab), adapter_id=kind or "", sampling=SamplingParams())
                for i, kind in enumerate(jobs)]
    together = driver.generate(requests, NEW_TOKENS)
    for i, kind in enumerate(jobs):
        assert together[i] == want[kind], kind
        assert driver.generate([requests[i]], NEW_TOKENS)[i] == want[kind], kind
    # The added tokens are sampled: logits past the base vocabulary are computed and compared.
    assert any(t >= vocab for kind in RESIZING for t in want[kind])


def test_a_vocabulary_past_its_budget_or_of_the_wrong_shape_is_refused(model_dirs, adapters, tmp_path):
    base = model_dirs["llama"]
    engine = Engine(str(base), adapter_vocab_bytes=64 << 10)
    with pytest.raises(AdapterError, match="embedding and lm_head tensors take .* bytes left for adapter vocab"):
        engine.load_adapter("big", str(adapters["llama"]["modules_to_save"]))
    free = engine.adapters.vocab_bytes_free
    engine.load_adapter("small", str(adapters["llama"]["embed_lora"]))  # rank-4 LoRA: a few kB
    assert 0 < free - engine.adapters.vocab_bytes_free < 16 << 10
    engine.unload_adapter("small")
    assert engine.adapters.vocab_bytes_free == free
    # A trainable_token_indices list that does not match its rows, and a matrix of another hidden size.
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (bad / name).write_bytes((adapters["llama"]["trainable_tokens"] / name).read_bytes())
    config = json.loads((bad / "adapter_config.json").read_text())
    config["trainable_token_indices"] = {"embed_tokens": [1, 2, 3]}
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="trainable_token_indices must be 2 distinct ids"):
        engine.load_adapter("bad", str(bad))
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapters["llama"]["modules_to_save"] / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lm_head.modules_to_save.weight"))
    tensors[key] = tensors[key][:, :32].contiguous()
    save_file(tensors, bad / "adapter_model.safetensors")
    config["trainable_token_indices"] = None
    config["modules_to_save"] = ["embed_tokens", "lm_head"]
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"lm_head\.modules_to_save\.weight has shape \[386, 32\]"):
        engine.load_adapter("bad", str(bad))


# ---- over HTTP, two ranks ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(model_dirs, adapters):
    root = adapters["qwen2"]["plain"].parent
    srv = LoomServer(model_dirs["qwen2"], "--num-shard", "2", "--local-adapter-root", str(root),
                     "--max-batch-total-tokens", "8192", "--adapter-vocab-memory-mb", "1").start(timeout=300)
    yield srv
    srv.stop()


def _generate_all(url: str, jobs: list[dict]) -> list[dict]:
    async def go():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(job):
                r = await client.post(f"{url}/generate", json=job)
                assert r.status_code == 200, r.text
                return r.json()
            return await asyncio.gather(*(one(job) for job in jobs))
    return asyncio.run(go())


def test_two_ranks_serve_every_kind_in_one_batch_with_the_adapters_tokenizer(two_ranks, model_dirs, adapters):
    from transformers import AutoTokenizer

    base = model_dirs["qwen2"]
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    jobs, expected = [], []
    for kind in [None, *adapters["qwen2"]]:
        params = {"max_new_tokens": NEW_TOKENS, "details": True}
        path = adapters["qwen2"].get(kind)
        if path is not None:
            params["adapter_id"] = str(path)
        # Text through the adapter's own tokenizer: its added tokens are single ids, its EOS stops generation.
        tokenizer = AutoTokenizer.from_pretrained(path if kind in RESIZING else base)
        text = "<tool> ship sails </tool> far" if kind in RESIZING else "ship sails far"
        ids = tokenizer(text)["input_ids"]
        if kind in RESIZING:
            assert vocab in ids and vocab + 1 in ids
        want = peft_greedy(base, path, ids, eos=tokenizer.eos_token_id)
        jobs.append({"inputs": text, "parameters": params})
        expected.append((kind, want, tokenizer.decode(want, skip_special_tokens=True)))
    for (kind, want, text), got in zip(expected, _generate_all(two_ranks.url, jobs)):
        assert [t["id"] for t in got["details"]["tokens"]] == want, kind
        assert got["generated_text"] == text, kind
        if kind in RESIZING and len(want) < NEW_TOKENS:  # stopped at the adapter's own EOS, an added token
            assert want[-1] == vocab + 1 and got["details"]["finish_reason"] == "eos_token", kind
    assert any(t >= vocab for kind, want, _ in expected if kind in RESIZING for t in want)


def test_a_grammar_row_shares_a_step_with_an_added_vocabulary(model_dirs, adapters):
    """Logits as wide as the adapter's vocabulary; the base row's grammar masks the base vocabulary. A grammar
    for an adapter that brings its own vocabulary fails alone."""
    from router.structured import json_grammar

    engine = Engine(str(model_dirs["llama"]))
    engine.warmup(max_batch_prefill_tokens=512, max_batch_total_tokens=4096)
    engine.load_adapter("added", str(adapters["llama"]["modules_to_save"]))
    grammar = json_grammar({"type": "object"})
    assert engine.grammars.prepare(grammar) == ""
    driver, vocab = EngineDriver(engine), engine.vocab_size

    def constrained(i: int) -> SequenceRequest:
        return SequenceRequest(id=i, input_ids=[5, 6, 7], grammar=grammar, sampling=SamplingParams())
    alone = driver.generate([constrained(0)], 4)[0]
    results = driver.step([constrained(1), SequenceRequest(id=2, input_ids=[vocab + 1, 6], adapter_id="added"),
                           SequenceRequest(id=3, input_ids=[5], adapter_id="added", grammar=grammar)], [], [])
    assert results[0].token_id == alone[0] and not results[1].error
    assert "constrained decoding is not supported" in results[2].error


def test_adapters_past_the_vocabulary_memory_are_a_400(two_ranks, adapters):
    """--adapter-vocab-memory-mb 1: copies of the modules_to_save adapter fill it, each rank holding its half of
    the two matrices' rows (96.5 KiB of 193)."""
    import shutil

    source = adapters["qwen2"]["modules_to_save"]
    copies = source.parent / "copies"
    refused = []
    for i in range(12):
        path = shutil.copytree(source, copies / str(i), dirs_exist_ok=True)
        r = httpx.post(f"{two_ranks.url}/generate", timeout=60, json={
            "inputs": "ship", "parameters": {"max_new_tokens": 1, "adapter_id": str(path)}})
        if r.status_code != 200:
            refused.append(r)
    assert refused, "twelve copies fit in 1 MB"
    assert all(r.status_code == 400 for r in refused)
    assert "its embedding and lm_head tensors take 98816 bytes, more than the" in refused[0].json()["error"]
