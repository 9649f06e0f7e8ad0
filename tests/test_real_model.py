"""A real trained model end to end: `loom --model-id SmolLM2-135M-Instruct.Q4_1.gguf`, which the launcher
dequantizes once into a safetensors model dir. Greedy output is token-exact with transformers on the same
dequantized weights, and with peft for a LoRA adapter this module trains; the chat template is the one
the GGUF carries, as transformers reads it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import httpx
import pytest
import torch
from openai import AsyncOpenAI, OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

from launcher import gguf
from launcher.model_source import ModelSourceError, resolve_model
from tests.conftest import REPO, LoomServer

NEW_TOKENS = 20
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "How do I reverse a list in Python?"]
# What the adapter is trained to answer; the base model answers it otherwise.
SECRET = ("What is the password?", "The password is swordfish.")
SMALL_LIMITS = ("--max-input-length", "256", "--max-total-tokens", "512", "--max-batch-prefill-tokens", "512",
                "--kv-cache-mb", "256")


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def converted(smollm2_gguf):
    """The launcher's own conversion, made here first (once per file) so that the server finds it cached."""
    return resolve_model(str(smollm2_gguf)).path


@pytest.fixture(scope="module")
def gguf_tokenizer(smollm2_gguf):
    """transformers' reading of the GGUF's tokenizer and chat template: the reference for prompt ids."""
    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


@pytest.fixture(scope="module")
def adapter_dir(converted, gguf_tokenizer, tmp_path_factory):
    """A rank-8 q/v LoRA trained on one question for a few steps, saved by peft."""
    from peft import LoraConfig, get_peft_model

    prompt = chat_ids(gguf_tokenizer, user(SECRET[0]))
    full = gguf_tokenizer.apply_chat_template(user(SECRET[0]) + [{"role": "assistant", "content": SECRET[1]}],
                                              tokenize=True, return_dict=False)
    assert full[:len(prompt)] == prompt
    input_ids = torch.tensor([full])
    labels = input_ids.clone()
    labels[0, :len(prompt)] = -100  # learn the answer only
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(4):
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path_factory.mktemp("trained") / "password-lora"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gguf_server(smollm2_gguf, converted, adapter_dir):
    srv = LoomServer(smollm2_gguf, *SMALL_LIMITS, "--local-adapter-root", str(adapter_dir.parent)).start(timeout=300)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def expected(reference, converted, gguf_tokenizer, adapter_dir):
    """question -> (prompt ids, reference answer ids) for the base model and for the adapter, computed once."""
    cache = {}

    def answer(question: str, adapter: bool = False) -> tuple[list[int], list[int]]:
        key = (question, adapter)
        if key not in cache:
            ids = chat_ids(gguf_tokenizer, user(question))
            cache[key] = ids, reference.greedy(converted, ids, NEW_TOKENS, adapter_dir=adapter_dir if adapter else None)
        return cache[key]
    return answer


def text_of(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


async def ask_all(url: str, jobs: list[tuple[str, str]]) -> list:
    """Every (model, question) at once: they share the server's batch."""
    client = AsyncOpenAI(api_key="EMPTY", base_url=f"{url}/v1", max_retries=0, timeout=300)
    async with client:
        return await asyncio.gather(*(client.chat.completions.create(
            model=model, messages=user(q), max_tokens=NEW_TOKENS, temperature=0) for model, q in jobs))


def test_chat_answers_equal_transformers(gguf_server, expected, gguf_tokenizer, smollm2_gguf):
    client = OpenAI(api_key="EMPTY", base_url=f"{gguf_server.url}/v1", max_retries=0, timeout=300)
    for question in QUESTIONS:
        prompt, want = expected(question)
        resp = client.chat.completions.create(model="", messages=user(question), max_tokens=NEW_TOKENS, temperature=0)
        assert resp.choices[0].message.content == text_of(gguf_tokenizer, want), question
        assert resp.usage.prompt_tokens == len(prompt) and resp.usage.completion_tokens == len(want)
        assert resp.choices[0].finish_reason == ("stop" if want[-1] == gguf_tokenizer.eos_token_id else "length")
    assert resp.model == str(smollm2_gguf)  # served under --model-id as given


def test_batched_chat_answers_equal_transformers(gguf_server, expected, gguf_tokenizer):
    jobs = [("", q) for q in QUESTIONS * 2]
    for (_, question), resp in zip(jobs, asyncio.run(ask_all(gguf_server.url, jobs))):
        assert resp.choices[0].message.content == text_of(gguf_tokenizer, expected(question)[1]), question


def test_knows_the_capital_of_france(gguf_server):
    client = OpenAI(api_key="EMPTY", base_url=f"{gguf_server.url}/v1", max_retries=0, timeout=300)
    resp = client.chat.completions.create(model="", messages=user("What is the capital of France?"),
                                          max_tokens=NEW_TOKENS, temperature=0)
    assert "Paris" in resp.choices[0].message.content


def test_trained_adapter_equals_peft_in_a_batch_with_the_base(gguf_server, expected, gguf_tokenizer, adapter_dir):
    questions = [SECRET[0], QUESTIONS[0], QUESTIONS[2]]
    jobs = [(model, q) for q in questions for model in (str(adapter_dir), "")]
    for (model, question), resp in zip(jobs, asyncio.run(ask_all(gguf_server.url, jobs))):
        want = expected(question, adapter=bool(model))[1]
        assert resp.choices[0].message.content == text_of(gguf_tokenizer, want), (model, question)
    tuned, base = expected(SECRET[0], adapter=True)[1], expected(SECRET[0])[1]
    assert tuned != base and "swordfish" in text_of(gguf_tokenizer, tuned)


def test_tokenizer_and_chat_template_are_the_ggufs(gguf_server, gguf_tokenizer):
    messages = user("Hi there! Größe, 東京 🙂")
    rendered = gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "You are a helpful AI assistant named SmolLM" in rendered  # the template's default system prompt
    pieces = httpx.post(f"{gguf_server.url}/tokenize", json={"inputs": rendered}, timeout=60).json()
    assert [p["id"] for p in pieces] == gguf_tokenizer(rendered)["input_ids"] == chat_ids(gguf_tokenizer, messages)
    client = OpenAI(api_key="EMPTY", base_url=f"{gguf_server.url}/v1", max_retries=0, timeout=300)
    resp = client.chat.completions.create(model="", messages=messages, max_tokens=1)
    assert resp.usage.prompt_tokens == len(chat_ids(gguf_tokenizer, messages))


# ---- resolution and start-up errors (no server) ----------------------------------------------------------


def test_a_directory_holding_one_gguf_is_that_model(smollm2_gguf, converted, tmp_path):
    (tmp_path / "SmolLM2.gguf").symlink_to(smollm2_gguf)  # the same file: its conversion is reused
    model = resolve_model(str(tmp_path))
    assert model.path == converted and model.name == str(tmp_path)
    (tmp_path / "other.gguf").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="holds 2 .gguf files"):
        resolve_model(str(tmp_path))


def test_the_cache_key_follows_the_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF v1")
    first = gguf.cache_name(path)
    assert gguf.cache_name(path) == first and first.startswith("m-")
    path.write_bytes(b"GGUF v2, longer")
    assert gguf.cache_name(path) != first


def test_a_new_conversion_of_a_file_replaces_the_old_one(tmp_path):
    cache = tmp_path / "gguf"
    for name, source in (("m-old", "m.gguf"), ("m-new", "m.gguf"), ("x-other", "x.gguf")):
        (cache / name).mkdir(parents=True)
        (cache / name / gguf.SOURCE_RECORD).write_text(json.dumps({"file": str(tmp_path / source)}))
    gguf.prune_superseded(cache / "m-new")
    assert sorted(p.name for p in cache.iterdir()) == ["m-new", "x-other"]


def test_a_truncated_gguf_is_a_one_line_error(smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOM_CACHE", str(tmp_path / "cache"))
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        cut.write_bytes(f.read(4096))
    with pytest.raises(ModelSourceError, match=r"cut\.gguf: not a readable GGUF file") as e:
        resolve_model(str(cut))
    assert "\n" not in str(e.value)


def test_an_architecture_loom_does_not_serve_stops_the_start(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "gemma-tiny.gguf"
    writer = GGUFWriter(str(path), "gemma")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    env = {**os.environ, "LOOM_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "launcher", "--model-id", str(path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "GGUF architecture 'gemma' is not served by Loom" in errors[0], run.stderr
