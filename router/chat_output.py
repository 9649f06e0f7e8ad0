"""One chat answer's text → what OpenAI's chat API sends: `reasoning_content` (router/reasoning.py), `content`
and `tool_calls` (router/tool_parsers.py), as stream deltas and as the final message; the Responses API reads
the same parts."""

from __future__ import annotations

from dataclasses import dataclass

from router.reasoning import ReasoningSplitter, prompt_opens_thinking, thinks
from router.tool_parsers import ToolCallStream, parser_for


@dataclass(slots=True)
class AnswerFormat:
    """How a request's answers are read, decided once per request."""

    thinking: bool  # split <think> reasoning off
    starts_in_reasoning: bool  # the prompt left a think block open
    tool_family: str | None  # None: no tools (every answer is content)
    tool_names: frozenset[str] = frozenset()
    parallel_tool_calls: bool = True

    @classmethod
    def of(cls, template, prompt: str, tools: list[dict], constrained: bool, tool_call_parser: str | None,
           reasoning_parser: str | None, parallel_tool_calls: bool | None) -> "AnswerFormat":
        """`template`: the chat template the prompt was rendered with; `constrained`: a JSON grammar shapes the
        answer from its first token (it cannot think first)."""
        thinking = not constrained and thinks(template, reasoning_parser)
        names = frozenset(t["function"]["name"] for t in tools)
        return cls(thinking, thinking and prompt_opens_thinking(prompt),
                   parser_for(template, tool_call_parser) if tools else None, names, parallel_tool_calls is not False)


class ChatAnswer:
    """Feed an answer's text pieces; each call returns parts in order: ("reasoning", text), ("content", text) or
    ("tool", index, id | None, name | None, arguments fragment)."""

    __slots__ = ("_reasoning", "_tools")

    def __init__(self, fmt: AnswerFormat):
        self._reasoning = ReasoningSplitter(fmt.starts_in_reasoning) if fmt.thinking else None
        self._tools = ToolCallStream(fmt.tool_family, fmt.tool_names, fmt.parallel_tool_calls) \
            if fmt.tool_family else None

    @property
    def calls(self) -> list:
        return self._tools.calls if self._tools else []

    def feed(self, text: str) -> list[tuple]:
        parts = self._reasoning.feed(text) if self._reasoning else [("content", text)]
        return self._route(parts)

    def finish(self) -> list[tuple]:
        out = self._route(self._reasoning.flush()) if self._reasoning else []
        return out + (self._tools.finish() if self._tools else [])

    def _route(self, parts: list[tuple[str, str]]) -> list[tuple]:
        out = []
        for kind, text in parts:
            if kind == "content" and self._tools:
                out += self._tools.feed(text)
            elif text:
                out.append((kind, text))
        return out


def chat_delta(parts: list[tuple]) -> dict:
    """Stream parts as one chat delta (`reasoning_content`, `content`, `tool_calls` with their `index`)."""
    delta: dict = {}
    calls: dict[int, dict] = {}
    for part in parts:
        if part[0] == "tool":
            _, index, call_id, name, fragment = part
            call = calls.setdefault(index, {"index": index})
            if call_id is not None:
                call.update(id=call_id, type="function", function={"name": name, "arguments": ""})
            call.setdefault("function", {}).setdefault("arguments", "")
            call["function"]["arguments"] += fragment
        else:
            key = "reasoning_content" if part[0] == "reasoning" else "content"
            delta[key] = delta.get(key, "") + part[1]
    if calls:
        delta["tool_calls"] = list(calls.values())
    return delta


def chat_message(parts: list[tuple], calls: list, with_reasoning: bool) -> dict:
    """The whole answer as a chat message."""
    content = "".join(p[1] for p in parts if p[0] == "content")
    message = {"role": "assistant", "content": content if content or not calls else None}
    if with_reasoning:
        message["reasoning_content"] = "".join(p[1] for p in parts if p[0] == "reasoning") or None
    if calls:
        message["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name,
                                                                             "arguments": c.arguments}}
                                 for c in calls]
    return message
