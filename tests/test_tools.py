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
    calls = [tc for c in chunks for ch in c.choices for tc in (ch.delta.tool_calls or [])]
    assert len(calls) == 1 and chunks[-1].choices[0].finish_reason == "tool_calls"
    check_call(calls[0], WEATHER)


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
