"""What a step carries per sequence: the new sequences it registers, the chunks it computes, the tokens it
returns, and the state the engine keeps for each live sequence between steps."""

from __future__ import annotations

from dataclasses import dataclass, field

from shard.sampler import SamplerRow, SamplingParams


@dataclass(slots=True)
class SequenceRequest:
    """A new sequence to prefill."""

    id: int
    input_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter_id: str = ""  # "" = base model
    top_n_tokens: int = 0
    prefill_logprobs: bool = False
    prefill_top_n: int = 0  # with prefill_logprobs: alternatives per prompt position
    grammar: str = ""  # llguidance grammar the output must follow; "" = free
    min_new_tokens: int = 0  # stop_token_ids are masked until this many tokens were generated
    stop_token_ids: list[int] = field(default_factory=list)
    # A sequence resumed after preemption: the tokens it had generated, replayed into its sampling state.
    generated_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Chunk:
    """Tokens [start, start + num_tokens) of a sequence to compute this step; positions before `start` are in
    the KV cache already. `new_blocks` extend the sequence's block table (the router's allocation)."""

    id: int
    start: int
    num_tokens: int
    new_blocks: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Sequence:
    row: SamplerRow  # its tokens and sampling state
    table: list[int]  # its KV blocks, as the router allocated them
    adapter_id: str
    prompt_logprobs: list[float] | None  # while its prompt is prefilled, when asked (the first token gets 0.0)
    prompt_top_n: int = 0
    # With prompt_top_n: per prompt position, its top alternatives and the prompt token's rank (first: [], 0).
    prompt_top: list[tuple[list[tuple[int, float]], int]] = field(default_factory=list)


@dataclass(slots=True)
class TokenResult:
    request_id: int
    token_id: int
    logprob: float
    top_tokens: list[tuple[int, float]] = field(default_factory=list)
    # Only on the prefill result when asked: one per prompt token, the first is 0.0.
    prefill_logprobs: list[float] = field(default_factory=list)
    error: str = ""
    prefill_top_tokens: list[tuple[list[tuple[int, float]], int]] = field(default_factory=list)


def accept(row: SamplerRow, token_id: int) -> None:
    """Appends a sampled token to its sequence and advances the sequence's grammar."""
    row.token_ids.append(token_id)
    if row.matcher is not None:
        row.matcher.consume_token(token_id)
    if row.json_keys is not None:
        row.json_keys.consume(token_id)


def error_result(request_id: int, message: str) -> TokenResult:
    return TokenResult(request_id, 0, 0.0, error=message)
