"""Generated text → reasoning, content and tool calls (router/reasoning.py, router/tool_parsers.py): each
family's format, streamed in pieces of any size, gives exactly what the whole text gives."""

from __future__ import annotations

import json

import pytest

from router.chat_output import AnswerFormat, ChatAnswer
from router.reasoning import prompt_opens_thinking, thinks
from router.tool_parsers import parser_for

TOOLS = frozenset({"get_weather", "get_time"})


def read(text: str, family: str = "hermes", step: int = 1, thinking: bool = False, opens: bool = False,
         parallel: bool = True) -> tuple[str, str, list[tuple[str, dict]]]:
    answer = ChatAnswer(AnswerFormat(thinking, opens, family, TOOLS, parallel))
    parts = []
    for i in range(0, len(text), step):
        parts += answer.feed(text[i:i + step])
    parts += answer.finish()
    calls: dict[int, list] = {}
    for part in parts:
        if part[0] == "tool":
            call = calls.setdefault(part[1], [None, ""])
            if part[3] is not None:
                assert call[0] is None, "a call's name comes once"
                call[0] = part[3]
            call[1] += part[4]
    assert [c.arguments for c in answer.calls] == [calls[i][1] for i in sorted(calls)]
    return ("".join(p[1] for p in parts if p[0] == "reasoning"), "".join(p[1] for p in parts if p[0] == "content"),
            [(calls[i][0], json.loads(calls[i][1])) for i in sorted(calls)])


CASES = [
    ("hermes", 'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Sure. ", [("get_weather", {"city": "Paris"})]),
    ("hermes", '<tool_call>{"arguments": {"zone": "CET"}, "name": "get_time"}</tool_call>\n<tool_call>'
     '{"name": "get_weather", "arguments": {"city": "Oslo", "n": [1, {"a": "}"}]}}</tool_call>', "",
     [("get_time", {"zone": "CET"}), ("get_weather", {"city": "Oslo", "n": [1, {"a": "}"}]})]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Rome"}}', "",
     [("get_weather", {"city": "Rome"})]),
    ("llama3_json", '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}; '
     '{"name": "get_weather", "parameters": {}}', "", [("get_time", {"zone": "UTC"}), ("get_weather", {})]),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lyon"}}, '
     '{"name": "get_time", "arguments": {"zone": "CET"}}]', "",
     [("get_weather", {"city": "Lyon"}), ("get_time", {"zone": "CET"})]),
    ("mistral", 'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Nice"}[TOOL_CALLS]get_time[ARGS]{"zone": "UTC"}',
     "Checking.", [("get_weather", {"city": "Nice"}), ("get_time", {"zone": "UTC"})]),
    ("hermes", '[{"name": "get_time", "arguments": {"zone": "UTC"}}]', "", [("get_time", {"zone": "UTC"})]),
    ("hermes", "Plain text with {braces} and <tool_ words.", "Plain text with {braces} and <tool_ words.", []),
    ("hermes", '{"city": "Paris"}', '{"city": "Paris"}', []),
    ("hermes", '{"name": "launch_rockets", "arguments": {}}', '{"name": "launch_rockets", "arguments": {}}', []),
    ("mistral", "[1] first point", "[1] first point", []),
]


@pytest.mark.parametrize("family,text,content,calls", CASES)
@pytest.mark.parametrize("step", [1, 2, 7, 10_000])
def test_tool_calls_of_each_family(family, text, content, calls, step):
    assert read(text, family, step) == ("", content, calls)


def test_one_call_without_parallel_tool_calls():
    text = CASES[1][1]
    assert read(text, parallel=False)[2] == [("get_time", {"zone": "CET"})]


@pytest.mark.parametrize("step", [1, 3, 10_000])
def test_reasoning_is_split_from_content(step):
    assert read("<think>\nLet me see </thi </think>\n\nIt is 4.", step=step, thinking=True) == \
        ("\nLet me see </thi ", "It is 4.", [])
    # DeepSeek-R1's template opens the block in the prompt: the answer starts in its reasoning.
    assert read("adding up</think>4", step=step, thinking=True, opens=True) == ("adding up", "4", [])
    # Qwen3 with enable_thinking=false: no block, all content.
    assert read("Just 4.", step=step, thinking=True) == ("", "Just 4.", [])
    assert read('<think>x</think><tool_call>{"name": "get_time", "arguments": {}}</tool_call>', step=step,
                thinking=True) == ("x", "", [("get_time", {})])


def test_family_and_thinking_come_from_the_template():
    assert parser_for("{{ '[TOOL_CALLS]' }}", None) == "mistral"
    assert parser_for("<|python_tag|>{{ x }}", None) == "llama3_json"
    assert parser_for("<tool_call>", None) == "hermes" and parser_for("plain", "mistral") == "mistral"
    assert thinks("{{ '<think>' }}", None) and not thinks("plain", None) and not thinks("<think>", "none")
    assert prompt_opens_thinking("<|assistant|><think>\n")
    assert not prompt_opens_thinking("<|assistant|><think>\n\n</think>\n\n")
