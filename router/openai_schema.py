"""Request bodies of the OpenAI routes (/v1/chat/completions, /v1/completions): every field bounded, with
messages that name the field (common/limits.py holds the bounds)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.limits import (
    INT64_MIN,
    MAX_CHOICES,
    MAX_COMPLETION_LOGPROBS,
    MAX_REPETITION_PENALTY,
    MAX_TOP_K,
    MAX_TOP_LOGPROBS,
    UINT32_MAX,
    UINT64_MAX,
)
from router.backend import ModelId, StopList, StopString, StrictModel, sampling_parameters
from router.chat_messages import ChatMessage
from router.structured import response_format_grammar, tool_choice_grammar


class FunctionDefinition(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingFields(StrictModel):
    """Fields chat and legacy completions share (OpenAI's, plus vLLM's common extensions)."""

    model: ModelId | None = None  # omitted, "" or the base model's id: the base model (as vLLM)
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=MAX_REPETITION_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=INT64_MIN, le=UINT64_MAX)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    min_tokens: int = Field(0, ge=0, le=UINT32_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | StopList | None = None
    ignore_eos: bool = False
    user: str | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    def sampling(self):
        return sampling_parameters(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty, seed=self.seed,
        )


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("`top_logprobs` requires `logprobs` to be true")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("`tool_choice` other than 'none'/'auto' needs `tools`")
        if self.response_format and self.forced_tool_call:
            raise ValueError("`response_format` cannot be combined with a required or named `tool_choice`")
        return self

    @property
    def tool_dicts(self) -> list[dict]:
        """The tools the model may call (none when tool_choice is 'none')."""
        if not self.tools or self.tool_choice == "none":
            return []
        return [t.model_dump(exclude_none=True) for t in self.tools]

    @property
    def forced_tool_call(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    def grammar(self) -> tuple[str, str]:
        """(grammar, the field it comes from) for constrained decoding; "" when unconstrained."""
        if self.forced_tool_call:
            choice = self.tool_choice if self.tool_choice == "required" else self.tool_choice.model_dump()
            return tool_choice_grammar(self.tool_dicts, choice), "tools"
        return response_format_grammar(self.response_format), "response_format"


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)

    @model_validator(mode="after")
    def _check(self) -> "CompletionRequest":
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("`prompt` must not be empty")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"`best_of` ({self.best_of}) must be at least `n` ({self.n})")
        if self.best_of is not None and self.best_of > 1 and self.stream:
            raise ValueError("`best_of` cannot be used with `stream`")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Every prompt of the request: a string, a list of strings, token ids, or lists of token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)
