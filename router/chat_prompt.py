"""A conversation → its prompt: the chat-template fields every chat body shares (chat completions, vLLM's chat
`/tokenize`, the Responses API) and the one path that renders and tokenizes them.

The template is the adapter's or the base model's, or the request's own `chat_template`: every one goes through
`Backend.render_chat`, so a request's template is rendered in the same sandbox, worker processes and limits as
an adapter's (router/templates.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import Field, field_validator, model_validator

from common.limits import MAX_CHAT_TEMPLATE_CHARS, MAX_TEMPLATE_KWARGS
from router.adapters import Adapter
from router.backend import Backend, StrictModel
from router.chat_messages import ChatMessage
from router.tokenization import ModelTokenizer

# Names transformers' apply_chat_template takes itself: as template variables they would change how it runs.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class ChatTemplateFields(StrictModel):
    """vLLM's chat-template fields, with vLLM's meanings."""

    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the answer continues the last (assistant) message
    chat_template: str | None = Field(None, min_length=1, max_length=MAX_CHAT_TEMPLATE_CHARS)
    chat_template_kwargs: dict | None = Field(None, max_length=MAX_TEMPLATE_KWARGS)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _kwargs(cls, value: dict | None) -> dict | None:
        for key in value or {}:
            if not _IDENTIFIER.match(key) or key in RESERVED_TEMPLATE_KWARGS:
                raise ValueError(f"{key[:64]!r} cannot be a template variable (an identifier, not one of "
                                 "apply_chat_template's own arguments)")
        return value

    @model_validator(mode="after")
    def _continue(self) -> "ChatTemplateFields":
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("`continue_final_message` and `add_generation_prompt` cannot both be true "
                             "(set add_generation_prompt to false)")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("`continue_final_message` needs the last message to be the assistant's")
        return self


@dataclass(slots=True)
class ChatPrompt:
    text: str  # what the template rendered
    input_ids: list[int]


async def render_prompt(backend: Backend, adapter: Adapter | None, tokenizer: ModelTokenizer, messages: list[dict],
                        tools: list[dict] | None, options: ChatTemplateFields | None = None) -> ChatPrompt:
    """Renders template `messages` with the body's template fields (`options`; None: the defaults), then
    tokenizes the text, off the event loop; a template that fails is a 400 naming `messages` (or
    `chat_template` when it is the request's)."""
    own = options.chat_template if options else None
    if own is not None:
        backend.check_chars(own, tokenizer, "chat_template")
    text = await backend.render_chat(
        adapter, tokenizer, messages, tools or None, options.add_generation_prompt if options else True, own,
        options.chat_template_kwargs if options else None, options.continue_final_message if options else False)
    # The rendered text holds every special token the template wants: no BOS/EOS added again.
    return ChatPrompt(text, await backend.encode(tokenizer, text, "messages", add_special_tokens=False,
                                                 adapter=adapter))


def template_messages(body: ChatTemplateFields) -> list[dict]:
    return [m.as_template_input() for m in body.messages]
