"""Chat messages as OpenAI's SDK sends them, and the dicts chat templates render.

A conversation built the SDK's way appends `resp.choices[0].message` (its `model_dump()`), which carries every
field of OpenAI's assistant message (`refusal`, `annotations`, `audio`, `function_call`, mostly null) and Loom's
own `reasoning_content`: all are accepted, bounded like every field, and dropped where they carry nothing a
template can show. Fields OpenAI's schema does not have stay 400s.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import Field

from common.limits import MAX_ANNOTATIONS, MAX_NAME_CHARS
from router.backend import StrictModel

Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class RefusalPart(StrictModel):
    """An assistant's refusal as a content part (OpenAI's assistant content parts)."""

    type: Literal["refusal"]
    refusal: str


class FunctionCall(StrictModel):
    name: Name
    arguments: str


class ToolCall(StrictModel):
    id: Name
    type: Literal["function"] = "function"
    function: FunctionCall


class UrlCitation(StrictModel):
    end_index: int
    start_index: int
    title: str
    url: str


class MessageAnnotation(StrictModel):
    type: Literal["url_citation"]
    url_citation: UrlCitation


class AudioRef(StrictModel):
    """A previous audio answer (request form: just `id`; response form: with its data). Loom produces no audio,
    so it carries nothing a text template can show."""

    id: Name
    data: str | None = None
    expires_at: int | None = None
    transcript: str | None = None


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart | RefusalPart] | None = None
    name: Name | None = None
    tool_call_id: Name | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None
    annotations: list[MessageAnnotation] | None = Field(None, max_length=MAX_ANNOTATIONS)
    audio: AudioRef | None = None
    function_call: FunctionCall | None = None  # OpenAI's deprecated form of one tool call
    reasoning_content: str | None = None  # what Loom (and vLLM) answer a reasoning model's thinking in

    def text(self) -> str:
        """The message's text: its text parts joined; an assistant's refusal when it has no other text."""
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text if isinstance(p, TextPart) else p.refusal for p in content)
        return content or self.refusal or ""

    def as_template_input(self) -> dict:
        # The deprecated `function` role is a tool result by another name.
        message = {"role": "tool" if self.role == "function" else self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        calls = self.tool_calls or ([ToolCall(id="call_0", function=self.function_call)] if self.function_call else [])
        if calls:
            # Chat templates render arguments with `tojson`: hand them the object, not its JSON text.
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": json_or_text(c.function.arguments)}} for c in calls]
        if self.reasoning_content:  # templates of reasoning models (Qwen3) read it
            message["reasoning_content"] = self.reasoning_content
        return message


def json_or_text(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
