"""The OpenAI Responses API (`POST /v1/responses`) through the real OpenAI SDK: text and item input,
instructions, function tools (forced calls valid by construction), `text.format`, the streamed event sequence,
function-call outputs fed back, and `previous_response_id` over the bounded store."""

from __future__ import annotations

import json

import jsonschema
import pytest

from router.responses_api import ResponseStore

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                          "required": ["city"]}}


def test_text_input_and_instructions(openai_client, tokenizer):
    r = openai_client.responses.create(model="", input="Hello there", instructions="Be brief.",
                                       max_output_tokens=8, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.output[0].type == "message"
    chat = openai_client.chat.completions.create(model="", max_tokens=8, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")


def test_forced_function_call_and_its_output_fed_back(openai_client):
    r = openai_client.responses.create(model="", input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
                                       max_output_tokens=60)
    call = r.output[-1]
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    follow = openai_client.responses.create(model="", max_output_tokens=4, input=[
        {"role": "user", "content": "Weather in Paris?"}, call.model_dump(),
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert follow.output[0].type == "message"


def test_text_format_json_schema(openai_client):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"]}
    r = openai_client.responses.create(model="", input="A number?", max_output_tokens=20, text={
        "format": {"type": "json_schema", "name": "number", "schema": schema, "strict": True}})
    assert set(json.loads(r.output_text)) == {"n"}


def test_streamed_events(openai_client):
    with openai_client.responses.stream(model="", input="Weather?", tools=[WEATHER], max_output_tokens=60,
                                        tool_choice={"type": "function", "name": "get_weather"}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert arguments == final.output[0].arguments
    with openai_client.responses.stream(model="", input="Hi", max_output_tokens=6) as stream:
        events = list(stream)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].type in ("response.completed", "response.incomplete")  # incomplete: cut at 6 tokens
    assert text == events[-1].response.output_text


def test_previous_response_id_continues_the_conversation(openai_client):
    first = openai_client.responses.create(model="", input="Hello there", max_output_tokens=6)
    second = openai_client.responses.create(model="", input="And then?", previous_response_id=first.id,
                                            max_output_tokens=6)
    by_hand = openai_client.responses.create(model="", max_output_tokens=6, store=False, input=[
        {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"}])
    assert second.previous_response_id == first.id and second.output_text == by_hand.output_text
    assert second.usage.input_tokens == by_hand.usage.input_tokens
    assert openai_client.responses.retrieve(second.id).output_text == second.output_text
    import openai

    with pytest.raises(openai.NotFoundError):
        openai_client.responses.create(model="", input="x", previous_response_id=by_hand.id)  # store=False


def test_the_store_is_bounded_in_entries_characters_and_age(monkeypatch):
    import router.responses_api as api

    store = ResponseStore(max_entries=2, max_chars=2000, ttl_s=60)
    for i in range(3):
        store.put({"id": f"r{i}"}, [{"role": "user", "content": "x"}])
    with pytest.raises(Exception):
        store.get("r0", "previous_response_id")
    assert store.get("r2", "previous_response_id").messages
    store.put({"id": "big"}, [{"role": "user", "content": "y" * 1500}])
    with pytest.raises(Exception):
        store.get("r1", "previous_response_id")
    now = api.time.monotonic()
    monkeypatch.setattr(api.time, "monotonic", lambda: now + 61)
    with pytest.raises(Exception):
        store.get("big", "previous_response_id")


@pytest.mark.parametrize("body,needle", [
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "temperature": 3}, "temperature"),
    ({"input": "x", "previous_response_id": "r" * 200}, "previous_response_id"),
    ({"input": "x", "frobnicate": 1}, "frobnicate"),
])
def test_bad_requests_are_400(server, body, needle):
    import httpx

    r = httpx.post(f"{server.url}/v1/responses", json=body, timeout=30)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
