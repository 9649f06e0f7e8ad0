"""Tool calling through the OpenAI SDK: forced calls are valid by construction, streamed too, multi-turn."""

from __future__ import annotations

import json

import jsonschema
import pytest

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                          "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


def check_call(call, tool):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_named_tool_choice_gives_a_valid_call(openai_client):
    resp = openai_client.chat.completions.create(
        model="", messages=ASK, tools=[WEATHER, TIME], max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    check_call(choice.message.tool_calls[0], WEATHER)


def test_required_tool_choice_calls_one_of_the_tools(openai_client):
    resp = openai_client.chat.completions.create(model="", messages=ASK, tools=[WEATHER, TIME], max_tokens=80,
                                                 tool_choice="required", temperature=1.0, seed=4)
    call = resp.choices[0].message.tool_calls[0]
    check_call(call, WEATHER if call.function.name == "get_weather" else TIME)


def test_streamed_tool_call(openai_client):
    chunks = list(openai_client.chat.completions.create(
        model="", messages=ASK, tools=[WEATHER], max_tokens=80, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    deltas = [tc for c in chunks for ch in c.choices for tc in (ch.delta.tool_calls or [])]
    assert {d.index for d in deltas} == {0} and deltas[0].id and deltas[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and chunks[-1].choices[0].delta.tool_calls is None
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


def test_multi_turn_with_tool_results(openai_client):
    first = openai_client.chat.completions.create(
        model="", messages=ASK, tools=[WEATHER], max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21})},
    ]
    follow = openai_client.chat.completions.create(model="", messages=messages, tools=[WEATHER], max_tokens=10)
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_auto_tool_choice_returns_text_or_a_valid_call(openai_client):
    resp = openai_client.chat.completions.create(model="", messages=ASK, tools=[WEATHER], max_tokens=20)
    message = resp.choices[0].message
    if message.tool_calls:
        check_call(message.tool_calls[0], WEATHER)
    else:
        assert isinstance(message.content, str)


@pytest.mark.parametrize("kwargs,needle", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]}, "nope"),
    ({"tool_choice": "required"}, "tools"),
])
def test_bad_tool_requests_are_400(openai_client, kwargs, needle):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model="", messages=ASK, max_tokens=5, **kwargs)
    assert needle in str(e.value)


# LangChain's and the SDK's pydantic schemas do not close their objects (no additionalProperties: false).
OPEN_WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                               "required": ["city"]}}}
HERMES_ANSWER = ('Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
                 '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')


def no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate keys {keys}"
    return dict(pairs)


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_calls_with_open_schemas_end_with_declared_keys_only(openai_client, choice):
    for seed in range(3):
        resp = openai_client.chat.completions.create(model="", messages=ASK, tools=[OPEN_WEATHER], max_tokens=60,
                                                     tool_choice=choice, temperature=1.0, seed=seed)
        assert resp.choices[0].finish_reason == "tool_calls"
        arguments = json.loads(resp.choices[0].message.tool_calls[0].function.arguments,
                               object_pairs_hook=no_duplicate_keys)
        assert set(arguments) == {"city"}


def assert_distinct_keys(text: str) -> None:
    """Every JSON object in `text` (complete or cut off by the length limit) has distinct keys."""
    stack: list[set | None] = []
    expect_key, i = False, 0
    while i < len(text):
        c = text[i]
        if c == '"':
            j = i + 1
            while j < len(text) and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            if expect_key and j < len(text):
                assert text[i + 1:j] not in stack[-1], f"key {text[i + 1:j]!r} repeated in {text!r}"
                stack[-1].add(text[i + 1:j])
            expect_key, i = False, j + 1
            continue
        if c == "{":
            stack.append(set())
            expect_key = True
        elif c == "[":
            stack.append(None)
        elif c in "}]" and stack:
            stack.pop()
        elif c == ",":
            expect_key = bool(stack) and stack[-1] is not None
        i += 1


def test_json_objects_never_repeat_a_key(openai_client):
    """json_object lets the grammar write any key; the shard's key guard keeps each object's keys distinct."""
    for seed in range(4):
        resp = openai_client.chat.completions.create(model="", messages=ASK, max_tokens=80, temperature=1.5,
                                                     seed=seed, response_format={"type": "json_object"})
        text = resp.choices[0].message.content
        assert text.startswith("{")
        assert_distinct_keys(text)
        if resp.choices[0].finish_reason == "stop":
            json.loads(text, object_pairs_hook=no_duplicate_keys)


def test_parallel_required_calls(openai_client):
    resp = openai_client.chat.completions.create(model="", messages=ASK, tools=[WEATHER, TIME], max_tokens=120,
                                                 tool_choice="required", parallel_tool_calls=True)
    calls, finish = resp.choices[0].message.tool_calls, resp.choices[0].finish_reason
    assert calls and finish in ("tool_calls", "length")  # a random model may run out of tokens in a later call
    for call in calls[:-1] if finish == "length" else calls:
        check_call(call, WEATHER if call.function.name == "get_weather" else TIME)


def stream_answer(openai_client, **kwargs):
    chunks = list(openai_client.chat.completions.create(model="", messages=ASK, max_tokens=200, stream=True,
                                                        **kwargs))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls: dict[int, dict] = {}
    for c in chunks:
        for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id:
                assert call["id"] is None and d.function.name, "id and name come once, together"
                call.update(id=d.id, name=d.function.name)
            call["arguments"] += d.function.arguments or ""
    return chunks, content, calls


@pytest.mark.parametrize("parallel", [True, False])
def test_auto_tool_calls_stream_as_openai_streams_them(openai_client, parallel):
    """The model's text streams as text until it starts a call; each call's id and name come in one delta, its
    arguments in fragments, with its index; finish_reason comes alone in the last chunk."""
    kwargs = dict(tools=[WEATHER, TIME], extra_body={"guided_choice": [HERMES_ANSWER]}, parallel_tool_calls=parallel)
    chunks, content, calls = stream_answer(openai_client, **kwargs)
    assert content == "Let me look. "
    expected = [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {"zone": "CET"})][:2 if parallel else 1]
    assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)] == expected
    assert sum(1 for c in chunks for ch in c.choices for d in ch.delta.tool_calls or [] if not d.id) > 2
    last = chunks[-1].choices[0]
    assert last.finish_reason == "tool_calls" and not last.delta.content and not last.delta.tool_calls
    whole = openai_client.chat.completions.create(model="", messages=ASK, max_tokens=200, **kwargs).choices[0]
    assert whole.message.content == content and whole.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls] == \
        [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]


def test_text_with_tools_streams_as_it_comes(openai_client):
    text = "Paris is sunny today, with a light breeze from the west and no rain expected."
    chunks, content, calls = stream_answer(openai_client, tools=[WEATHER], extra_body={"guided_choice": [text]})
    assert content == text and not calls
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 5
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_streamed_forced_call_ends_before_its_finish_chunk(openai_client):
    """The SDK's stream helper emits `tool_calls.function.arguments.done` only when the arguments and the
    finish_reason come in different chunks."""
    with openai_client.chat.completions.stream(
            model="", messages=ASK, tools=[WEATHER], max_tokens=80,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
    assert len(done) == 1 and done[0].name == "get_weather"
    jsonschema.validate(json.loads(done[0].arguments), WEATHER["function"]["parameters"])
