"""Request body of the OpenAI Responses API (`POST /v1/responses`), every field bounded, and its input items →
the chat messages a template renders.

Input items are what OpenAI's SDK and the Agents SDK send: messages (text parts), the function calls of an
earlier answer and their outputs, reasoning items (their text goes back to the template as the next assistant
turn's `reasoning_content`). Other item kinds (images, files, hosted tools) are 400s naming them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from common.limits import MAX_NAME_CHARS, MAX_PARALLEL_TOOL_CALLS, MAX_RESPONSE_ID_CHARS, PRIORITY_BOUND
from router.backend import ModelId, StrictModel
from router.chat_messages import MessageAnnotation, Name, json_or_text
from router.openai_schema import Sampling
from router.structured import response_format_grammar, tool_choice_grammar

Status = Literal["in_progress", "completed", "incomplete"] | None


class InputText(StrictModel):
    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list[MessageAnnotation] | None = None
    logprobs: list[dict] | None = Field(None, max_length=0)  # what Loom answers: always empty


class Refusal(StrictModel):
    type: Literal["refusal"]
    refusal: str


class MessageItem(StrictModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Annotated[InputText | Refusal, Field(discriminator="type")]]
    id: Name | None = None
    status: Status = None
    phase: str | None = Field(None, max_length=64)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text if isinstance(p, InputText) else p.refusal for p in self.content)


class FunctionCallItem(StrictModel):
    type: Literal["function_call"]
    call_id: Name
    name: Name
    arguments: str
    id: Name | None = None
    status: Status = None
    # Fields of OpenAI's item that Loom never sets, as the SDK's model_dump() sends them back (null).
    namespace: None = None
    caller: None = None
    async_: None = None
    async_alias: None = Field(None, alias="async")


class FunctionCallOutputItem(StrictModel):
    type: Literal["function_call_output"]
    call_id: Name
    output: str | list[InputText]
    id: Name | None = None
    status: Status = None


class ReasoningText(StrictModel):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(StrictModel):
    type: Literal["reasoning"]
    id: Name | None = None
    summary: list[ReasoningText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: None = None  # Loom never writes one
    status: Status = None


def _item_kind(value) -> str:
    """An item's `type`; a message may leave it out (OpenAI's "easy" input message)."""
    return value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")


InputItem = Annotated[Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
                      | Annotated[ReasoningItem, Tag("reasoning")], Discriminator(_item_kind)]


class FunctionTool(StrictModel):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None

    def as_chat_tool(self) -> dict:
        function = {"name": self.name, "parameters": self.parameters or {"type": "object", "properties": {}}}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


class NamedTool(StrictModel):
    type: Literal["function"]
    name: Name


class TextFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    name: Name | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(StrictModel):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # the only one a model without the notion answers with


class ResponsesRequest(Sampling):
    model: ModelId | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = Field(None, max_length=MAX_RESPONSE_ID_CHARS)
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    user: str | None = Field(None, max_length=MAX_NAME_CHARS)
    include: list[str] | None = Field(None, max_length=0)  # no extra output Loom could include
    truncation: Literal["disabled"] | None = None
    max_tool_calls: int | None = Field(None, ge=1, le=MAX_PARALLEL_TOOL_CALLS)
    priority: int = Field(0, ge=-PRIORITY_BOUND, le=PRIORITY_BOUND)

    @model_validator(mode="after")
    def _check(self) -> "ResponsesRequest":
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("`tool_choice` other than 'none'/'auto' needs `tools`")
        if isinstance(self.input, list) and not self.input and not self.previous_response_id:
            raise ValueError("`input` must not be empty")
        return self

    @property
    def chat_tools(self) -> list[dict]:
        if not self.tools or self.tool_choice == "none":
            return []
        return [t.as_chat_tool() for t in self.tools]

    def grammar(self) -> tuple[str, str]:
        """(grammar, the field it comes from): a forced tool call's, else `text.format`'s; "" if neither."""
        choice = self.tool_choice
        if choice == "required" or isinstance(choice, NamedTool):
            named = choice if choice == "required" else {"type": "function", "function": {"name": choice.name}}
            return tool_choice_grammar(self.chat_tools, named, self.parallel_tool_calls is True), "tool_choice"
        fmt = self.text.format if self.text else None
        if fmt is None or fmt.type == "text":
            return "", "text.format"
        spec = {"type": "json_object"} if fmt.type == "json_object" else \
            {"type": "json_schema", "json_schema": {"schema": fmt.schema_ or {}, "strict": fmt.strict}}
        return response_format_grammar(spec, "text.format"), "text.format"

    def messages(self) -> list[dict]:
        """The input items as template messages (without `instructions`)."""
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        return items_to_messages(items)


def items_to_messages(items: list) -> list[dict]:
    """Responses items → chat-template messages: consecutive function calls join one assistant turn (with its
    text and reasoning, when they came with it); their outputs become tool messages."""
    messages: list[dict] = []
    reasoning = ""
    for item in items:
        if isinstance(item, ReasoningItem):
            reasoning += "".join(p.text for p in item.content or item.summary)
            continue
        if isinstance(item, MessageItem):
            message = {"role": item.role, "content": item.text()}
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output if isinstance(item.output, str) else "".join(p.text for p in item.output)
            message = {"role": "tool", "tool_call_id": item.call_id, "content": output}
        else:
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": json_or_text(item.arguments)}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and not reasoning:
                last.setdefault("tool_calls", []).append(call)
                continue
            message = {"role": "assistant", "content": "", "tool_calls": [call]}
        if message["role"] == "assistant" and reasoning:
            message["reasoning_content"], reasoning = reasoning, ""
        messages.append(message)
    return messages

