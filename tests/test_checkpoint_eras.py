"""Checkpoints saved by current transformers/peft and by older releases (tests/eras.py) load and are
token-exact against transformers (+ peft) greedy decoding, float32 on CPU: model configs, rope variants,
tokenizers and chat templates, adapters and multi-id eos."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from launcher.tiny_model import CORPUS, build_tiny_adapter, build_tiny_model
from router.detokenizer import IncrementalDetokenizer
from router.tokenization import ModelTokenizer
from shard.engine import Engine, SequenceRequest
from shard.rope import RopeConfigError
from tests.conftest import LoomServer
from tests.engine_driver import EngineDriver
from tests.eras import (
    copy_dir,
    set_generation_eos,
    set_tokenizer_class,
    to_legacy_adapter,
    to_legacy_model,
    to_legacy_tokenizer,
)

NEW_TOKENS = 16
# One prompt inside longrope's original 32 positions that decodes across it, one past it from the start.
PROMPT_LENS = (20, 40)
ERAS = ("current", "legacy")
# The tokenizer class each family's legacy checkpoint names (Qwen2's current era names its own class too).
LEGACY_TOKENIZER_CLASS = {"llama": "PreTrainedTokenizerFast", "mistral": "LlamaTokenizerFast",
                          "qwen2": "Qwen2TokenizerFast"}
ROPES = {
    "linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "dynamic": dict(rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}),
    "yarn": dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                                  "rope_theta": 10000.0}),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                    "rope_theta": 10000.0}),
    # head_dim 16: 8 frequencies. max_position_embeddings / original = 4 gives the attention factor.
    "longrope": dict(max_position_embeddings=128, rope_parameters={
        "rope_type": "longrope", "original_max_position_embeddings": 32, "rope_theta": 10000.0,
        "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5],
        "long_factor": [1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0]}),
}
CHAT = [{"role": "system", "content": "You are a friendly chatbot."},
        {"role": "user", "content": "Größe, 東京 🙂 Привет . Isn't it ?"}]


def load_hf(path: Path, adapter: Path | None = None, **config_changes):
    config = AutoConfig.from_pretrained(path)
    for key, value in config_changes.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def hf_greedy(model, prompt: list[int], n: int = NEW_TOKENS, eos: list[int] | None = None, **kwargs) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


def engine_greedy(engine: Engine, requests: list[SequenceRequest], n: int = NEW_TOKENS) -> list[list[int]]:
    """Prefills `requests` in one step, decodes them together, returns each one's n tokens."""
    out = {r.request_id: [r.token_id] for r in engine.step(requests, [], [])}
    for _ in range(n - 1):
        for r in engine.step([], list(out), []):
            assert not r.error, r.error
            out[r.request_id].append(r.token_id)
    engine.step([], [], list(out))
    return [out[r.id] for r in requests]


def start_engine(path: Path) -> EngineDriver:
    engine = Engine(str(path))
    engine.warmup(max_batch_prefill_tokens=256, max_batch_total_tokens=2048)
    return EngineDriver(engine)


def engine_tokens(path: Path, prompt_list: list[list[int]]) -> list[list[int]]:
    """A fresh engine on `path`, all prompts in one batch."""
    return engine_greedy(start_engine(path), [SequenceRequest(i, p) for i, p in enumerate(prompt_list)])


def prompts(seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENS]


def both_eras(root: Path, name: str, family: str, tokenizer_class: str = "PreTrainedTokenizerFast",
              **config) -> dict[str, Path]:
    current = build_tiny_model(root / name, family, **config)
    return {"current": current, "legacy": to_legacy_model(copy_dir(current, root / f"{name}-legacy"),
                                                          tokenizer_class)}


# ---- model families: both eras, with an adapter --------------------------------------------------------


# The families whose checkpoints were written before transformers 5 (config eras differ for them).
@pytest.fixture(scope="module", params=sorted(LEGACY_TOKENIZER_CLASS))
def family_dirs(request, tmp_path_factory) -> dict[str, Path]:
    family = request.param
    root = tmp_path_factory.mktemp(f"eras-{family}")
    dirs = both_eras(root, family, family, LEGACY_TOKENIZER_CLASS[family])
    build_tiny_adapter(root / "adapter", dirs["current"], 4, 8, ["q_proj", "k_proj", "o_proj", "down_proj"],
                       use_rslora=True, seed=5)
    dirs["adapter"] = to_legacy_adapter(copy_dir(root / "adapter", root / "adapter-legacy"))
    return dirs


def test_config_eras_are_token_exact(family_dirs):
    legacy = json.loads((family_dirs["legacy"] / "config.json").read_text())
    assert "rope_parameters" not in legacy and "rope_theta" in legacy and legacy["transformers_version"] < "5"
    vocab = AutoConfig.from_pretrained(family_dirs["current"]).vocab_size
    ps = prompts(1, vocab)
    tokens = {}
    for era in ERAS:
        hf = load_hf(family_dirs[era])
        expected = [hf_greedy(hf, p) for p in ps]
        assert engine_tokens(family_dirs[era], ps) == expected, era
        tokens[era] = expected
    assert tokens["legacy"] == tokens["current"]


def test_legacy_adapter_is_token_exact(family_dirs):
    adapter = family_dirs["adapter"]
    assert "lora_bias" not in json.loads((adapter / "adapter_config.json").read_text())
    base = family_dirs["legacy"]
    ps = prompts(2, AutoConfig.from_pretrained(base).vocab_size)
    expected = [hf_greedy(load_hf(base, adapter), p) for p in ps]
    engine = start_engine(base)
    engine.load_adapter("legacy", str(adapter))
    requests = [SequenceRequest(i, p, adapter_id="legacy") for i, p in enumerate(ps)]
    assert engine_greedy(engine, requests + [SequenceRequest(9, ps[0])])[:2] == expected


# ---- rope variants -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rope_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ropes")


@pytest.mark.parametrize("era", ERAS)
@pytest.mark.parametrize("rope", sorted(ROPES))
def test_rope_variant_is_token_exact(rope_root, rope, era):
    if not (rope_root / rope).exists():
        both_eras(rope_root, rope, "llama", **ROPES[rope])
    path = rope_root / (rope if era == "current" else f"{rope}-legacy")
    assert AutoConfig.from_pretrained(path).rope_parameters["rope_type"] == rope
    hf = load_hf(path)
    ps = prompts(3, hf.config.vocab_size)
    expected = [hf_greedy(hf, p) for p in ps]
    # Both prompts in one batch: each token follows its own sequence's length (longrope's switch).
    assert engine_tokens(path, ps) == expected
    if rope == "longrope":  # the long factors matter: with short ones throughout the tokens differ
        params = {**hf.config.rope_parameters, "long_factor": hf.config.rope_parameters["short_factor"]}
        short_only = load_hf(path, rope_parameters=params)
        assert [hf_greedy(short_only, p) for p in ps] != expected


# ---- config fields Loom does not compute: start-up errors naming them -----------------------------------


def edit_config(src: Path, dst: Path, **changes) -> Path:
    path = copy_dir(src, dst)
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return path


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory) -> dict[str, Path]:
    return both_eras(tmp_path_factory.mktemp("llama-eras"), "llama", "llama")


@pytest.mark.parametrize("changes, field", [
    (dict(rope_parameters={"rope_type": "mrope", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}), "rope_type"),
    (dict(rope_parameters={"rope_type": "made_up", "rope_theta": 1e4}), "rope_type"),
    (dict(rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "made_up", "factor": 2.0}), "rope_type"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    (dict(rope_parameters=None, rope_theta=1e4, rope_scaling=None, partial_rotary_factor=0.5),
     "partial_rotary_factor"),
    (dict(hidden_act="made_up_act"), "hidden_act"),
])
def test_unsupported_config_fails_start_naming_the_field(llama_dirs, tmp_path, changes, field):
    path = edit_config(llama_dirs["current"], tmp_path / "model", **changes)
    with pytest.raises((RopeConfigError, ValueError), match=field):
        Engine(str(path))


def test_llama_ignores_a_sliding_window_as_transformers_does(llama_dirs, tmp_path):
    """transformers' Llama attends to the whole context whatever `sliding_window` says. (Its generate with a
    KV cache does not agree: the cache it builds from the config keeps only the window. The reference is
    the model itself, decoding without a cache.)"""
    path = edit_config(llama_dirs["current"], tmp_path / "model", sliding_window=8)
    hf = load_hf(path)
    ps = prompts(4, hf.config.vocab_size)
    assert engine_tokens(path, ps) == [hf_greedy(hf, p, use_cache=False) for p in ps]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_explicit_head_dim(tmp_path, family):
    """head_dim larger than hidden_size / num_attention_heads, written in both eras' config.json."""
    dirs = both_eras(tmp_path, family, family, head_dim=32)
    assert json.loads((dirs["legacy"] / "config.json").read_text())["head_dim"] == 32
    ps = prompts(5, AutoConfig.from_pretrained(dirs["current"]).vocab_size)
    for era in ERAS:
        hf = load_hf(dirs[era])
        assert engine_tokens(dirs[era], ps) == [hf_greedy(hf, p) for p in ps], era


# ---- router side: tokenizers and chat templates of both eras ----------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    """One tokenizer per layout users meet, for a llama and a qwen2 model dir."""
    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {}
    for family in ("llama", "qwen2"):
        current = build_tiny_model(root / family, family)
        assert json.loads((current / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
        assert (current / "chat_template.jinja").is_file()
        dirs[f"{family}/current"] = current
        dirs[f"{family}/current-Qwen2TokenizerFast"] = set_tokenizer_class(copy_dir(current, root / f"{family}-q"),
                                                                           "Qwen2TokenizerFast")
        for cls in ("PreTrainedTokenizerFast", "LlamaTokenizerFast"):
            dirs[f"{family}/legacy-{cls}"] = to_legacy_tokenizer(copy_dir(current, root / f"{family}-{cls}"), cls)
        # Many older checkpoints ask for clean_up_tokenization_spaces; transformers 5 skips it for BPE.
        cleanup = copy_dir(dirs[f"{family}/legacy-PreTrainedTokenizerFast"], root / f"{family}-cleanup")
        config = json.loads((cleanup / "tokenizer_config.json").read_text())
        (cleanup / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
        dirs[f"{family}/legacy-cleanup"] = cleanup
    return dirs


TOKENIZER_VARIANTS = ["current", "current-Qwen2TokenizerFast", "legacy-PreTrainedTokenizerFast",
                      "legacy-LlamaTokenizerFast", "legacy-cleanup"]
TEXTS = [*CORPUS, "Hello . World , isn't it ? Yes ! 12345 678", "<|im_start|>user\nhi<|im_end|>"]


@pytest.mark.parametrize("variant", TOKENIZER_VARIANTS)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tokenizer_eras_match_transformers(tokenizer_dirs, family, variant):
    path = tokenizer_dirs[f"{family}/{variant}"]
    if variant.startswith("legacy"):
        assert not (path / "chat_template.jinja").exists()
        assert "chat_template" in json.loads((path / "tokenizer_config.json").read_text())
    tok, hf = ModelTokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)
    current = AutoTokenizer.from_pretrained(tokenizer_dirs[f"{family}/current"])
    for add_generation_prompt in (True, False):
        expected = hf.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, return_dict=False)
        assert tok.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt) == expected
        assert expected == current.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt,
                                                       return_dict=False)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf(text)["input_ids"] == current(text)["input_ids"]
        stream = IncrementalDetokenizer(tok)
        streamed = "".join(stream.push(i) for i in ids) + stream.flush()
        assert streamed == tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    assert tok.eos_token_ids == {hf.eos_token_id}


# ---- a real server on a legacy checkpoint: chat template, eos list ------------------------------------


def pick_stop_ids(continuations: Iterable[list[int]], taken: set[int], count: int) -> dict[int, int]:
    """{prompt index: a token its greedy continuation reaches after a few steps}, chosen so that no chosen
    token (nor one of `taken`) occurs earlier in a chosen continuation: each prompt stops at its own token.
    Reads `continuations` only as far as it needs."""
    seen: list[list[int]] = []
    chosen: dict[int, tuple[int, int]] = {}  # prompt index -> (stop token, its position)
    for i, cont in enumerate(continuations):
        seen.append(cont)
        for k in range(2, 6):
            stop = cont[k]
            stops = taken | {s for s, _ in chosen.values()} | {stop}
            if stop in taken or stops & set(cont[:k]):
                continue
            if any(stop in seen[j][:at + 1] for j, (_, at) in chosen.items()):
                continue
            chosen[i] = (stop, k)
            break
        if len(chosen) == count:
            return {i: stop for i, (stop, _) in chosen.items()}
    raise AssertionError("no prompts found whose greedy continuations stop at distinct tokens")


@pytest.fixture(scope="module")
def legacy_server(tmp_path_factory):
    """A legacy llama dir (LlamaTokenizerFast, template in tokenizer_config.json) whose generation_config.json
    lists three eos ids: the tokenizer's and two tokens greedy decoding reaches for two of the prompts."""
    root = tmp_path_factory.mktemp("legacy-server")
    path = to_legacy_model(build_tiny_model(root / "llama", "llama", seed=7), "LlamaTokenizerFast")
    hf_tok = AutoTokenizer.from_pretrained(path)
    texts = [f"{line} {i}" for i, line in enumerate(CORPUS * 3)]
    hf = load_hf(path)
    continuations = (hf_greedy(hf, hf_tok(t)["input_ids"], 6) for t in texts)
    stops = pick_stop_ids(continuations, {hf_tok.eos_token_id}, 2)
    eos = [hf_tok.eos_token_id, *stops.values()]
    set_generation_eos(path, eos)
    srv = LoomServer(path).start()
    yield srv, path, [texts[i] for i in stops], eos
    srv.stop()


def test_server_legacy_chat_template_and_eos_list(legacy_server):
    srv, path, stop_texts, eos = legacy_server
    hf_tok, hf = AutoTokenizer.from_pretrained(path), load_hf(path)
    assert hf.generation_config.eos_token_id == eos
    # Each listed eos id ends its prompt's generation, with the eos token as the last one.
    for text, stop in zip(stop_texts, eos[1:]):
        expected = hf_greedy(hf, hf_tok(text)["input_ids"], 16, eos)
        assert expected[-1] == stop and len(expected) < 16
        body = {"inputs": text, "parameters": {"max_new_tokens": 16, "details": True}}
        details = httpx.post(f"{srv.url}/generate", json=body, timeout=60).json()["details"]
        assert [t["id"] for t in details["tokens"]] == expected
        assert details["finish_reason"] == "eos_token"
    # The chat template from tokenizer_config.json gives transformers' prompt ids.
    prompt = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    expected = hf_greedy(hf, prompt, 12, eos)
    resp = httpx.post(f"{srv.url}/v1/chat/completions", timeout=60, json={
        "model": "", "messages": CHAT, "max_tokens": 12, "temperature": 0}).json()
    assert resp["usage"]["prompt_tokens"] == len(prompt)
    assert resp["usage"]["completion_tokens"] == len(expected)
    assert resp["choices"][0]["message"]["content"] == hf_tok.decode(expected, skip_special_tokens=True)
