"""The OpenAI / LoRAX sampling surface through the real SDKs: n, best_of, echo, prompt lists, penalties,
seeds, logprobs — each checked against a transformers reference or against itself where sampling is random."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

PROMPT = "The quick brown fox"


def penalized_greedy(model, input_ids, n, frequency=0.0, presence=0.0):
    """OpenAI's frequency/presence penalties over generated tokens, applied to transformers' logits."""
    ids, generated = list(input_ids), []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            if generated:
                counts = torch.bincount(torch.tensor(generated), minlength=logits.numel()).float()
                logits = logits - frequency * counts - presence * (counts > 0).float()
            token = int(logits.argmax())
            generated.append(token)
            ids.append(token)
    return generated


def test_n_greedy_choices_all_equal_the_reference(openai_client, reference, llama_dir, tokenizer):
    resp = openai_client.completions.create(model="", prompt=PROMPT, max_tokens=12, n=3)
    want = tokenizer.decode(reference.greedy(llama_dir, tokenizer(PROMPT)["input_ids"], 12), skip_special_tokens=True)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert all(c.text == want for c in resp.choices)
    assert resp.usage.completion_tokens == 3 * 12


def test_n_sampled_choices_are_seeded_and_distinct(openai_client):
    kwargs = dict(model="", messages=[{"role": "user", "content": "hi"}], max_tokens=16, n=3, temperature=1.5,
                  seed=11)
    a = openai_client.chat.completions.create(**kwargs)
    b = openai_client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1


def test_streamed_n_choices_equal_non_streamed(openai_client):
    kwargs = dict(model="", prompt=PROMPT, max_tokens=10, n=2, temperature=1.0, seed=3)
    full = openai_client.completions.create(**kwargs)
    pieces = {0: "", 1: ""}
    for chunk in openai_client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            pieces[c.index] += c.text
    assert pieces == {c.index: c.text for c in full.choices}


def test_prompt_lists_give_one_choice_each(openai_client, reference, llama_dir, tokenizer):
    prompts = ["alpha", "The quick brown fox jumps", "Größe"]
    resp = openai_client.completions.create(model="", prompt=prompts, max_tokens=8)
    for c, prompt in zip(resp.choices, prompts):
        ids = reference.greedy(llama_dir, tokenizer(prompt)["input_ids"], 8)
        assert c.text == tokenizer.decode(ids, skip_special_tokens=True)
    token_prompts = [tokenizer(p)["input_ids"] for p in prompts]
    by_ids = openai_client.completions.create(model="", prompt=token_prompts, max_tokens=8)
    assert [c.text for c in by_ids.choices] == [c.text for c in resp.choices]
    assert resp.usage.prompt_tokens == sum(len(t) for t in token_prompts)


def test_echo_with_logprobs(openai_client, reference, llama_dir, tokenizer):
    resp = openai_client.completions.create(model="", prompt=PROMPT, max_tokens=4, echo=True, logprobs=2)
    choice = resp.choices[0]
    assert choice.text.startswith(PROMPT)
    ids = tokenizer(PROMPT)["input_ids"]
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 4
    assert lp.token_logprobs[0] is None
    model = reference.model(llama_dir)
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    for pos in range(1, len(ids)):
        assert lp.token_logprobs[pos] == pytest.approx(logprobs[pos - 1, ids[pos]].item(), abs=1e-4)
    assert lp.text_offset[: len(ids)] == sorted(lp.text_offset[: len(ids)])


def test_best_of_returns_the_most_likely_of_its_candidates(openai_client):
    kwargs = dict(model="", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5, logprobs=0)
    best = openai_client.completions.create(best_of=4, **kwargs)
    assert len(best.choices) == 1 and best.usage.completion_tokens == 4 * 8
    candidates = [openai_client.completions.create(**{**kwargs, "seed": 5 + i}) for i in range(4)]
    mean = [sum(c.choices[0].logprobs.token_logprobs) / 8 for c in candidates]
    assert best.choices[0].text == candidates[mean.index(max(mean))].choices[0].text


def test_frequency_and_presence_penalties_match_openai_semantics(openai_client, reference, llama_dir, tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    resp = openai_client.completions.create(model="", prompt=ids, max_tokens=20, frequency_penalty=1.5,
                                            presence_penalty=0.5)
    want = penalized_greedy(reference.model(llama_dir), ids, 20, frequency=1.5, presence=0.5)
    assert resp.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)


def test_repetition_penalty_matches_transformers(server, reference, llama_dir, tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    r = httpx.post(f"{server.url}/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 20, "repetition_penalty": 1.8, "details": True}}, timeout=60).json()
    model = reference.model(llama_dir)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, repetition_penalty=1.8,
                             eos_token_id=model.generation_config.eos_token_id,
                             pad_token_id=model.generation_config.pad_token_id)
    assert [t["id"] for t in r["details"]["tokens"]] == out[0, len(ids):].tolist()


def test_top_k_one_is_greedy(openai_client, reference, llama_dir, tokenizer):
    resp = openai_client.completions.create(model="", prompt=PROMPT, max_tokens=10, temperature=1.3,
                                            extra_body={"top_k": 1}, seed=1)
    want = reference.greedy(llama_dir, tokenizer(PROMPT)["input_ids"], 10)
    assert resp.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)


def test_seeded_sampling_repeats_inside_a_busy_batch(server):
    seeded = {"inputs": "Once upon", "parameters": {"max_new_tokens": 24, "temperature": 0.8, "top_p": 0.9,
                                                    "seed": 42, "details": True}}
    alone = httpx.post(f"{server.url}/generate", json=seeded, timeout=60).json()["details"]["tokens"]

    async def busy():
        async with httpx.AsyncClient(timeout=120) as client:
            noise = [client.post(f"{server.url}/generate", json={"inputs": f"noise {i} " * (i + 1), "parameters": {
                "max_new_tokens": 30, "temperature": 1.0, "seed": i}}) for i in range(10)]
            results = await asyncio.gather(client.post(f"{server.url}/generate", json=seeded), *noise)
            return results[0].json()["details"]["tokens"]

    assert [t["id"] for t in asyncio.run(busy())] == [t["id"] for t in alone]


def test_lorax_best_of_reports_the_other_sequences(server):
    r = httpx.post(f"{server.url}/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 6, "best_of": 3, "do_sample": True, "seed": 9, "details": True}}, timeout=60)
    assert r.status_code == 200, r.text
    details = r.json()["details"]
    assert len(details["best_of_sequences"]) == 2
    best = sum(t["logprob"] for t in details["tokens"])
    assert all(best >= sum(t["logprob"] for t in s["tokens"]) for s in details["best_of_sequences"])


def test_lorax_decoder_input_details(server, reference, llama_dir, tokenizer):
    r = httpx.post(f"{server.url}/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 2, "decoder_input_details": True, "return_k_alternatives": 3}}, timeout=60).json()
    ids = tokenizer(PROMPT)["input_ids"]
    prefill = r["details"]["prefill"]
    assert [t["id"] for t in prefill] == ids
    model = reference.model(llama_dir)
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    for pos in range(1, len(ids)):
        assert prefill[pos]["logprob"] == pytest.approx(logprobs[pos - 1, ids[pos]].item(), abs=1e-4)
    assert all(len(t["alternative_tokens"]) == 3 for t in r["details"]["tokens"])


def test_min_tokens_holds_back_eos_like_transformers(openai_client, reference, llama_dir, tokenizer):
    """"quick quick" makes the tiny llama emit EOS after 8 tokens; min_tokens=20 must mask it until then."""
    ids = tokenizer("quick quick")["input_ids"]
    natural = reference.greedy(llama_dir, ids, 30)
    assert natural[-1] == tokenizer.eos_token_id and len(natural) < 20
    resp = openai_client.completions.create(model="", prompt=ids, max_tokens=30, extra_body={"min_tokens": 20})
    model = reference.model(llama_dir)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=30, min_new_tokens=20, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=model.generation_config.pad_token_id)
    want = out[0, len(ids):].tolist()
    assert resp.usage.completion_tokens == len(want) >= 20
    assert resp.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)


def test_truncate_keeps_the_last_prompt_tokens(server, reference, llama_dir, tokenizer):
    prompt = "The quick brown fox jumps over the lazy dog again and again"
    ids = tokenizer(prompt)["input_ids"]
    r = httpx.post(f"{server.url}/generate", json={"inputs": prompt, "parameters": {
        "max_new_tokens": 8, "truncate": 5, "details": True}}, timeout=60).json()
    assert r["details"]["prompt_tokens"] == 5
    assert [t["id"] for t in r["details"]["tokens"]] == reference.greedy(llama_dir, ids[-5:], 8)


@pytest.mark.parametrize("extra", [{"min_p": 0.2}, {"top_p": 0.5}, {"top_k": 3}])
def test_truncating_samplers_are_seeded_and_stay_in_their_set(openai_client, extra):
    kwargs = dict(model="", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=8, logprobs=5)
    a = openai_client.completions.create(extra_body=extra, **kwargs)
    b = openai_client.completions.create(extra_body=extra, **kwargs)
    assert a.choices[0].text == b.choices[0].text
    if "top_k" in extra:  # every sampled token is among the 3 most likely
        lp = a.choices[0].logprobs
        for token, top in zip(lp.tokens, lp.top_logprobs):
            assert token in list(top)[:3]
