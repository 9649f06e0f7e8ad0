"""Request bodies of the OpenAI routes (/v1/chat/completions, /v1/completions): every field bounded, with
messages that name the field (common/limits.py holds the bounds)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from common.limits import (
    INT64_MIN,
    MAX_CHOICES,
    MAX_COMPLETION_LOGPROBS,
    MAX_GUIDED_GRAMMAR_CHARS,
    MAX_GUIDED_CHOICE_CHARS,
    MAX_GUIDED_CHOICES,
    MAX_LOGIT_BIAS,
    MAX_REPETITION_PENALTY,
    MAX_STOP_TOKEN_IDS,
    MAX_TOP_K,
    MAX_TOP_LOGPROBS,
    PRIORITY_BOUND,
    UINT32_MAX,
    UINT64_MAX,
)
from router.backend import ModelId, StopList, StopString, StrictModel, sampling_parameters
from router.chat_prompt import ChatTemplateFields
from router.errors import bad_request
from router.merged_adapters import AdapterScale, MergedAdaptersSpec
from router.structured import guided_grammar, response_format_grammar, tool_choice_grammar

GrammarText = Annotated[str, Field(min_length=1, max_length=MAX_GUIDED_GRAMMAR_CHARS)]
ChoiceList = Annotated[list[Annotated[str, Field(max_length=MAX_GUIDED_CHOICE_CHARS)]],
                       Field(min_length=1, max_length=MAX_GUIDED_CHOICES)]


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
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the usage so far


class StructuredOutputs(StrictModel):
    """vLLM's `structured_outputs`: one constraint, onto the same grammar path as `response_format`."""

    json_schema: dict | str | None = Field(None, alias="json")
    regex: GrammarText | None = None
    choice: ChoiceList | None = None
    grammar: GrammarText | None = None
    json_object: bool | None = None


class Sampling(StrictModel):
    """The sampling fields of every OpenAI route (chat, legacy completions, Responses), declared once: OpenAI's
    plus vLLM's extensions, each bounded."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=MAX_REPETITION_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=INT64_MIN, le=UINT64_MAX)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=MAX_LOGIT_BIAS)

    @field_validator("logit_bias")
    @classmethod
    def _token_keys(cls, value: dict | None) -> dict | None:
        for key in value or {}:
            if not key.isdigit() or len(key) > 10:
                raise ValueError(f"keys must be token ids, got {key[:16]!r}")
        return value

    def logit_bias_ids(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    def sampling(self):
        return sampling_parameters(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty, seed=self.seed, logit_bias=self.logit_bias_ids(),
        )


class SamplingFields(Sampling):
    """Fields chat and legacy completions share (OpenAI's, plus vLLM's common extensions)."""

    model: ModelId | None = None  # omitted, "" or the base model's id: the base model (as vLLM)
    max_tokens: int | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    min_tokens: int = Field(0, ge=0, le=UINT32_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | StopList | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    priority: int = Field(0, ge=-PRIORITY_BOUND, le=PRIORITY_BOUND)
    user: str | None = None
    skip_special_tokens: bool = True
    # Loom's tokenizers are fast tokenizers, whose decode has no such option (in vLLM and transformers alike).
    spaces_between_special_tokens: bool = True
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: GrammarText | None = None
    guided_choice: ChoiceList | None = None
    guided_grammar: GrammarText | None = None
    structured_outputs: StructuredOutputs | None = None
    # LoRAX's merged_adapters (an `extra_body` field for the OpenAI SDK): `model` is then the base model.
    merged_adapters: MergedAdaptersSpec | None = None
    adapter_scale: AdapterScale | None = None  # the adapter's (or merge's) update times this

    @model_validator(mode="after")
    def _no_streamed_prompt_logprobs(self) -> "SamplingFields":
        if self.stream and self.prompt_logprobs is not None:
            raise ValueError("`prompt_logprobs` is not available with `stream` (as in vLLM)")
        return self

    def constraint(self) -> tuple[str, str]:
        """(grammar, the field it comes from) of the one output constraint the request sets, "" if none."""
        so = self.structured_outputs
        given = {
            "response_format": self.response_format and response_format_grammar(self.response_format),
            "guided_json": self.guided_json is not None and ("json", self.guided_json),
            "guided_regex": self.guided_regex is not None and ("regex", self.guided_regex),
            "guided_choice": self.guided_choice is not None and ("choice", self.guided_choice),
            "guided_grammar": self.guided_grammar is not None and ("grammar", self.guided_grammar),
        }
        if so is not None:
            given.update({
                "structured_outputs.json": so.json_schema is not None and ("json", so.json_schema),
                "structured_outputs.regex": so.regex is not None and ("regex", so.regex),
                "structured_outputs.choice": so.choice is not None and ("choice", so.choice),
                "structured_outputs.grammar": so.grammar is not None and ("grammar", so.grammar),
                "structured_outputs.json_object": bool(so.json_object) and ("json", {"type": "object"}),
            })
        chosen = [(param, spec) for param, spec in given.items() if spec]
        if len(chosen) > 1:
            raise bad_request(f"set one output constraint, not {' and '.join(p for p, _ in chosen)}",
                              param=chosen[1][0])
        if not chosen:
            return "", "response_format"
        param, spec = chosen[0]
        return (spec if isinstance(spec, str) else guided_grammar(*spec, param=param)), param

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

class ChatCompletionRequest(SamplingFields, ChatTemplateFields):
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False  # vLLM's: the answer starts with the last message when it is the assistant's
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("`top_logprobs` requires `logprobs` to be true")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("`tool_choice` other than 'none'/'auto' needs `tools`")
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
        constraint = self.constraint()
        if self.forced_tool_call:
            if constraint[0]:
                raise bad_request(f"`{constraint[1]}` cannot be combined with a required or named `tool_choice`",
                                  param=constraint[1])
            choice = self.tool_choice if self.tool_choice == "required" else self.tool_choice.model_dump()
            return tool_choice_grammar(self.tool_dicts, choice, self.parallel_tool_calls is True), "tools"
        return constraint


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
