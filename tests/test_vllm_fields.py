"""vLLM's extra request fields, with vLLM's meanings, through real HTTP and the OpenAI SDK's `extra_body`:
guided decoding onto the grammar path, chat-template fields, special tokens, stop strings kept, echo, prompt
logprobs (and echo's real top alternatives, which evaluation harnesses read), logit_bias, per-chunk usage."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest
import torch

USER = [{"role": "user", "content": "Tell me about ships."}]
GREETING_TEMPLATE = ("{{ greeting | default('hello') }}:{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                     "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")


def chat(server, **body) -> dict:
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": USER, "max_tokens": 24, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def tokenize_chat(server, **body) -> list[int]:
    r = httpx.post(f"{server.url}/tokenize", json={"messages": USER, **body}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_guided_choice_regex_grammar_and_json(server):
    assert chat(server, guided_choice=["yes", "no", "a \"quoted\" maybe"])["choices"][0]["message"]["content"] in \
        ("yes", "no", "a \"quoted\" maybe")
    text = chat(server, guided_regex="[a-z]{3}-[0-9]{2}")["choices"][0]["message"]["content"]
    assert re.fullmatch("[a-z]{3}-[0-9]{2}", text)
    assert chat(server, guided_grammar='root ::= "ab" | "cd"')["choices"][0]["message"]["content"] in ("ab", "cd")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    for field in ({"guided_json": schema}, {"guided_json": json.dumps(schema)},
                  {"structured_outputs": {"json": schema}}):
        jsonschema.validate(json.loads(chat(server, **field)["choices"][0]["message"]["content"]), schema)
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 8,
                                                         "structured_outputs": {"choice": ["up", "down"]}}, timeout=60)
    assert r.json()["choices"][0]["text"] in ("up", "down")


def test_chat_template_fields_render_as_transformers_does(server, tokenizer):
    messages = USER + [{"role": "assistant", "content": "Ships sail"}]
    assert tokenize_chat(server, add_generation_prompt=False) == tokenizer.apply_chat_template(
        USER, add_generation_prompt=False, tokenize=True, return_dict=False)
    assert tokenize_chat(server, messages=messages, add_generation_prompt=False, continue_final_message=True) == \
        tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=True, return_dict=False)
    own = tokenize_chat(server, chat_template=GREETING_TEMPLATE, chat_template_kwargs={"greeting": "ahoy"})
    assert own == tokenizer.apply_chat_template(USER, chat_template=GREETING_TEMPLATE, greeting="ahoy",
                                                add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tokenizer.decode(own).startswith("ahoy:")


def test_chat_echo_continues_the_last_assistant_message(server):
    messages = USER + [{"role": "assistant", "content": "Ships sail"}]
    body = dict(messages=messages, add_generation_prompt=False, continue_final_message=True)
    plain = chat(server, **body)["choices"][0]["message"]["content"]
    echoed = chat(server, echo=True, **body)["choices"][0]["message"]["content"]
    assert echoed == "Ships sail" + plain


def test_logit_bias_and_special_tokens(server, tokenizer):
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    kept = chat(server, logit_bias={str(special): 100}, max_tokens=3, skip_special_tokens=False,
                spaces_between_special_tokens=True)
    assert kept["choices"][0]["message"]["content"] == "<|im_start|>" * 3
    dropped = chat(server, logit_bias={str(special): 100}, max_tokens=3)
    assert dropped["choices"][0]["message"]["content"] == ""
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 1, "details": True}}
    greedy = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()["details"]["tokens"][0]["id"]
    for token, bias, chosen in ((greedy, -100, False), (100, 100, True)):
        r = httpx.post(f"{server.url}/v1/completions", json={
            "prompt": "Once upon a time", "max_tokens": 1, "logprobs": 0, "logit_bias": {str(token): bias}},
            timeout=60).json()
        assert (r["choices"][0]["logprobs"]["tokens"][0] == tokenizer.decode([token])) == chosen


def test_stop_string_kept_with_include_stop_str_in_output(server):
    full = httpx.post(f"{server.url}/v1/completions", json={"prompt": "The quick brown fox", "max_tokens": 30},
                      timeout=60).json()["choices"][0]["text"]
    stop = full[8:11]
    kept = httpx.post(f"{server.url}/v1/completions", json={
        "prompt": "The quick brown fox", "max_tokens": 30, "stop": [stop], "include_stop_str_in_output": True},
        timeout=60).json()["choices"][0]
    assert kept["text"] == full[:full.index(stop) + len(stop)] and kept["finish_reason"] == "stop"


def reference_logprobs(reference, llama_dir, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(reference.model(llama_dir)(torch.tensor([ids])).logits[0].float(), -1)


def test_prompt_logprobs_equal_the_reference(server, reference, llama_dir, tokenizer):
    prompt = "How many helicopters can a human eat"
    ids = tokenizer(prompt)["input_ids"]
    out = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2},
                     timeout=60).json()["choices"][0]["prompt_logprobs"]
    logprobs = reference_logprobs(reference, llama_dir, ids)
    assert out[0] is None and len(out) == len(ids)
    for pos in range(1, len(ids)):
        entry = out[pos][str(ids[pos])]
        assert entry["logprob"] == pytest.approx(logprobs[pos - 1, ids[pos]].item(), abs=1e-4)
        assert entry["rank"] == int((logprobs[pos - 1] > logprobs[pos - 1, ids[pos]]).sum()) + 1
        best = int(logprobs[pos - 1].argmax())
        assert out[pos][str(best)]["rank"] == 1
    chat_out = chat(server, max_tokens=1, prompt_logprobs=0)
    assert chat_out["prompt_logprobs"][0] is None and len(chat_out["prompt_logprobs"]) == chat_out["usage"][
        "prompt_tokens"]


def test_echo_logprobs_carry_the_real_alternatives(server, reference, llama_dir, tokenizer):
    """lm-eval's loglikelihood reads echo's prompt logprobs; whether a continuation is greedy comes from each
    position's top alternatives, which must be the model's, not just the prompt token."""
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = tokenizer(prompt)["input_ids"]
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 1, "echo": True,
                                                         "logprobs": 1, "temperature": 0}, timeout=60).json()
    lp = r["choices"][0]["logprobs"]
    logprobs = reference_logprobs(reference, llama_dir, ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for pos in range(1, len(ids)):
        greedy = int(logprobs[pos - 1].argmax()) == ids[pos]
        top = lp["top_logprobs"][pos]
        assert (max(top, key=top.get) == lp["tokens"][pos]) == greedy
        assert lp["token_logprobs"][pos] == pytest.approx(logprobs[pos - 1, ids[pos]].item(), abs=1e-4)


def test_continuous_usage_stats(openai_client):
    chunks = list(openai_client.chat.completions.create(
        model="", messages=USER, max_tokens=6, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 6 and all(c.usage.prompt_tokens for c in chunks)


THINKING_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
                     "enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def test_reasoning_content_for_a_thinking_template(server, openai_client):
    """A template that writes <think> splits the answer: thinking as reasoning_content, streamed as deltas too."""
    answer = "<think>\nThe user asks about ships.\n</think>\n\nShips float."
    body = {"chat_template": THINKING_TEMPLATE, "guided_choice": [answer]}
    message = chat(server, max_tokens=60, **body)["choices"][0]["message"]
    assert message["reasoning_content"] == "\nThe user asks about ships.\n" and message["content"] == "Ships float."
    chunks = list(openai_client.chat.completions.create(model="", messages=USER, max_tokens=60, stream=True,
                                                        extra_body=body))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message["reasoning_content"]
    assert "".join(d.content or "" for d in deltas) == "Ships float."
    off = tokenize_chat(server, chat_template=THINKING_TEMPLATE, chat_template_kwargs={"enable_thinking": False})
    assert off[-8:] != tokenize_chat(server, chat_template=THINKING_TEMPLATE)[-8:]
