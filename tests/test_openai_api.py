"""The OpenAI API through the real OpenAI SDK against a launched server, token-exact with transformers."""

from __future__ import annotations

import pytest

PIRATE = [
    {"role": "system", "content": "You are a friendly chatbot who always responds in the style of a pirate"},
    {"role": "user", "content": "How many helicopters can a human eat in one sitting?"},
]


def chat_ids(tokenizer, messages) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def expected_text(reference, llama_dir, tokenizer, input_ids, max_new_tokens) -> tuple[str, list[int]]:
    ids = reference.greedy(llama_dir, input_ids, max_new_tokens)
    return tokenizer.decode(ids, skip_special_tokens=True), ids


def test_readme_chat_example_matches_transformers(openai_client, reference, llama_dir, tokenizer):
    resp = openai_client.chat.completions.create(model="", messages=PIRATE, max_tokens=100)
    text, ids = expected_text(reference, llama_dir, tokenizer, chat_ids(tokenizer, PIRATE), 100)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == text
    assert choice.finish_reason == ("stop" if ids[-1] == tokenizer.eos_token_id else "length")
    assert resp.usage.prompt_tokens == len(chat_ids(tokenizer, PIRATE))
    assert resp.usage.completion_tokens == len(ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")


def test_streaming_chat_equals_non_streaming(openai_client):
    full = openai_client.chat.completions.create(model="", messages=PIRATE, max_tokens=60)
    chunks = list(openai_client.chat.completions.create(model="", messages=PIRATE, max_tokens=60, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_stream_include_usage_sends_a_final_usage_chunk(openai_client):
    full = openai_client.chat.completions.create(model="", messages=PIRATE, max_tokens=12)
    chunks = list(openai_client.chat.completions.create(
        model="", messages=PIRATE, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("prompt", ["Instruct: Write a detailed analogy between mathematics and a lighthouse.\nOutput:",
                                    "Größe 東京 🙂", "a"])
def test_completions_match_transformers(openai_client, reference, llama_dir, tokenizer, prompt):
    resp = openai_client.completions.create(model="", prompt=prompt, max_tokens=40)
    text, ids = expected_text(reference, llama_dir, tokenizer, tokenizer(prompt)["input_ids"], 40)
    assert resp.choices[0].text == text
    assert resp.usage.completion_tokens == len(ids)
    assert resp.object == "text_completion"


def test_completions_default_to_16_tokens_like_openai(openai_client):
    resp = openai_client.completions.create(model="", prompt="Once upon a time")
    assert resp.usage.completion_tokens == 16 and resp.choices[0].finish_reason == "length"


def test_streaming_completions_equal_non_streaming(openai_client):
    prompt = "The quick brown fox"
    full = openai_client.completions.create(model="", prompt=prompt, max_tokens=50)
    stream = list(openai_client.completions.create(model="", prompt=prompt, max_tokens=50, stream=True))
    assert "".join(c.choices[0].text for c in stream) == full.choices[0].text
    assert stream[-1].choices[0].finish_reason == "length"


def test_token_id_prompt(openai_client, reference, llama_dir, tokenizer):
    ids = tokenizer("How many helicopters")["input_ids"]
    resp = openai_client.completions.create(model="", prompt=ids, max_tokens=20)
    assert resp.choices[0].text == expected_text(reference, llama_dir, tokenizer, ids, 20)[0]


def test_stop_string_truncates_output_and_reports_stop(openai_client):
    full = openai_client.completions.create(model="", prompt="The quick brown fox", max_tokens=40).choices[0].text
    stop = full[10:13]
    assert stop, "the model should produce some text"
    cut = openai_client.completions.create(model="", prompt="The quick brown fox", max_tokens=40, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = openai_client.completions.create(model="", prompt="The quick brown fox", max_tokens=40,
                                                stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[: full.index(stop)]


def test_models_lists_the_base_model(openai_client, llama_dir):
    models = openai_client.models.list().data
    assert models[0].id == str(llama_dir)
    assert models[0].object == "model"


def test_named_base_model_is_the_same_as_empty(openai_client, llama_dir):
    a = openai_client.completions.create(model="", prompt="hello", max_tokens=8).choices[0].text
    b = openai_client.completions.create(model=str(llama_dir), prompt="hello", max_tokens=8).choices[0].text
    assert a == b


def test_chat_logprobs_are_log_softmax_of_the_reference(openai_client, reference, llama_dir, tokenizer):
    import torch

    resp = openai_client.chat.completions.create(model="", messages=PIRATE, max_tokens=5, logprobs=True,
                                                 top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    ids = chat_ids(tokenizer, PIRATE)
    gen = reference.greedy(llama_dir, ids, 5, stop_at_eos=False)
    model = reference.model(llama_dir)
    with torch.inference_mode():
        logits = model(torch.tensor([ids + gen])).logits[0, len(ids) - 1: -1]
    logprobs = torch.log_softmax(logits.float(), -1)
    for pos, entry in enumerate(content):
        assert entry.logprob == pytest.approx(logprobs[pos, gen[pos]].item(), abs=1e-4)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(logprobs[pos].max().item(), abs=1e-4)


def test_a_conversation_built_the_sdk_way(openai_client):
    """The SDK's own message object appended to the history (its model_dump: refusal, annotations, audio and
    function_call as null) is accepted, and renders as the same conversation written by hand."""
    first = openai_client.chat.completions.create(messages=PIRATE, max_tokens=8, model="")
    message = first.choices[0].message
    by_sdk = PIRATE + [message.model_dump(), {"role": "user", "content": "And then?"}]
    by_hand = PIRATE + [{"role": "assistant", "content": message.content}, {"role": "user", "content": "And then?"}]
    a = openai_client.chat.completions.create(model="", messages=by_sdk, max_tokens=8)
    b = openai_client.chat.completions.create(model="", messages=by_hand, max_tokens=8)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
