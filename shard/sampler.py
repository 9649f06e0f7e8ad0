"""Batched next-token selection for one step's rows.

Order of logits processors: grammar masks and min_tokens, logit_bias, repetition penalty (HF semantics, over prompt + generated tokens), frequency and
presence penalties (OpenAI semantics, over generated tokens), temperature; the returned logprobs are
log_softmax at this point; then top_k, top_p, min_p, typical_p truncate, and a token is drawn by an
exponential race (argmax p / E with E ~ Exp(1)), which equals sampling from p. A seeded row draws E from a
generator seeded by (seed, position of the token drawn), so its tokens depend neither on what else is in the
batch nor on the sequence's history of steps: a sequence preempted and recomputed draws exactly the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shard.grammar import mask_constrained


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (after grammar masks)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


@dataclass(slots=True)
class SamplerRow:
    """What the sampler needs from one sequence."""

    params: SamplingParams
    token_ids: list[int]  # prompt + generated so far
    num_prompt: int
    top_n: int = 0
    matcher: object | None = None  # llguidance matcher of a constrained sequence
    json_keys: object | None = None  # a JSON grammar's duplicate-key guard (shard/grammar.py JsonKeys)
    min_new_tokens: int = 0  # stop_token_ids are masked until this many tokens were generated
    stop_token_ids: list[int] = field(default_factory=list)

    @property
    def holds_stop(self) -> bool:
        return bool(self.stop_token_ids) and len(self.token_ids) - self.num_prompt < self.min_new_tokens


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]
    top_tokens: list[list[tuple[int, float]]] = field(default_factory=list)


def _column(rows: list[SamplerRow], name: str, device: torch.device) -> torch.Tensor:
    return torch.tensor([getattr(r.params, name) for r in rows], dtype=torch.float32, device=device)[:, None]


def _token_counts(ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, vocab] occurrence counts of each row's token ids."""
    width = max(1, max(len(i) for i in ids))
    # Pad with an extra column `vocab` that is dropped afterwards.
    padded = torch.tensor([i + [vocab] * (width - len(i)) for i in ids], device=device)
    counts = torch.zeros(len(ids), vocab + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    """Penalised copy of logits [R, V]."""
    vocab, device = logits.shape[1], logits.device
    # Feature checks read the Python params: testing a device tensor would sync the GPU.
    if any(r.params.repetition_penalty != 1.0 for r in rows):
        rep = _column(rows, "repetition_penalty", device)
        seen = _token_counts([r.token_ids for r in rows], vocab, device) > 0
        logits = torch.where(seen, torch.where(logits < 0, logits * rep, logits / rep), logits)
    if any(r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0 for r in rows):
        freq, presence = _column(rows, "frequency_penalty", device), _column(rows, "presence_penalty", device)
        counts = _token_counts([r.token_ids[r.num_prompt:] for r in rows], vocab, device)
        logits = logits - freq * counts - presence * (counts > 0).to(logits.dtype)
    return logits


def truncate(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    """Applies top_k, top_p, min_p and typical_p (each only to rows that set it); removed entries -> -inf."""
    device, vocab = logits.device, logits.shape[1]
    params = [r.params for r in rows]
    if any(0 < p.top_k < vocab or p.top_p < 1.0 for p in params):
        top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
        top_p = _column(rows, "top_p", device)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=device)[None, :]
        remove = rank >= top_k[:, None]
        probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does.
        mass_before = probs.cumsum(-1) - probs
        remove |= (top_p < 1.0) & (mass_before >= top_p) & (rank > 0)
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    if any(p.min_p > 0.0 for p in params):
        min_p = _column(rows, "min_p", device)
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    if any(p.typical_p < 1.0 for p in params):
        typical_p = _column(rows, "typical_p", device)
        logits = _typical(logits, typical_p, typical_p < 1.0)
    return logits


def _typical(logits: torch.Tensor, mass: torch.Tensor, rows_on: torch.Tensor) -> torch.Tensor:
    """Typical decoding (HF): keep the tokens whose surprisal is closest to the entropy, up to `mass`."""
    logp = logits.log_softmax(-1)
    p = logp.exp()
    entropy = -(logp * p).nansum(-1, keepdim=True)
    shifted = (-logp - entropy).abs()
    sorted_shift, order = shifted.sort(-1)
    cum = p.gather(-1, order).cumsum(-1)
    last = (cum < mass).sum(-1, keepdim=True).clamp(max=logits.shape[1] - 1)
    remove_sorted = sorted_shift > sorted_shift.gather(-1, last)
    remove = remove_sorted.scatter(1, order, remove_sorted) & rows_on
    return logits.masked_fill(remove, float("-inf"))


def position_seed(seed: int, position: int) -> int:
    """The generator seed for drawing the token at `position` of a seeded sequence (a 64-bit mix, so that nearby
    seeds and positions give unrelated streams)."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 29)


def _race_noise(probs: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    noise = torch.empty_like(probs).exponential_()
    for i, row in enumerate(rows):
        if row.params.seed is not None:
            generator = torch.Generator(probs.device)
            generator.manual_seed(position_seed(row.params.seed, len(row.token_ids)))
            noise[i] = torch.empty_like(probs[i]).exponential_(generator=generator)
    # A zero draw would turn a removed token's 0 / 0 into nan, which argmax would pick.
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def _top_tokens(logits: torch.Tensor, lse: torch.Tensor, rows: list[SamplerRow]) -> list[list[tuple[int, float]]]:
    out: list[list[tuple[int, float]]] = [[] for _ in rows]
    wanted = [i for i, r in enumerate(rows) if r.top_n > 0]
    if wanted:
        n = min(max(rows[i].top_n for i in wanted), logits.shape[1])
        values, ids = logits[wanted].topk(n, dim=-1)
        # One device -> host copy for all rows (ids are exact in float64), not two per row.
        ids, values = torch.stack([ids.double(), (values - lse[wanted, None]).double()]).tolist()
        for j, i in enumerate(wanted):
            k = rows[i].top_n
            out[i] = [(int(t), lp) for t, lp in zip(ids[j][:k], values[j][:k])]
    return out


def apply_logit_bias(logits: torch.Tensor, rows: list[SamplerRow]) -> None:
    """Adds each row's logit_bias to its logits, in place (a forbidden token stays forbidden: -inf + b)."""
    for i, row in enumerate(rows):
        if row.params.logit_bias:
            ids = torch.tensor(list(row.params.logit_bias), device=logits.device)
            logits[i, ids] += torch.tensor(list(row.params.logit_bias.values()), dtype=logits.dtype,
                                           device=logits.device)


def mask_forbidden(logits: torch.Tensor, rows: list[SamplerRow], grammar_vocab: int | None = None) -> None:
    """Grammar masks and min_tokens: forbidden tokens get -inf, in place. `grammar_vocab`: the vocabulary the
    grammars were compiled for, when the logits are wider (an adapter's added tokens in the step: those
    columns are -inf in every constrained row already)."""
    constrained = [i for i, r in enumerate(rows) if r.matcher is not None]
    if constrained:
        mask_constrained(logits[:, :grammar_vocab], [rows[i].matcher for i in constrained], constrained)
    for i, row in enumerate(rows):
        if row.json_keys is not None:
            row.json_keys.mask(logits[i])
        if row.holds_stop:
            logits[i, row.stop_token_ids] = float("-inf")


def sample(logits: torch.Tensor, rows: list[SamplerRow], grammar_vocab: int | None = None) -> SamplerOutput:
    """logits: float32 [R, V], one row per entry of `rows`; logprobs are log_softmax(logits[row]) after
    grammar masks, logit_bias, penalties and temperature (greedy rows: no temperature), before truncation."""
    penalised = [i for i, r in enumerate(rows) if r.params.penalized]
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    masked = any(r.matcher is not None or r.holds_stop for r in rows)
    biased = any(r.params.logit_bias for r in rows)
    if penalised or sampled or masked or biased:
        logits = logits.clone()  # the caller's tensor stays untouched
    if masked:
        mask_forbidden(logits, rows, grammar_vocab)
    if biased:
        apply_logit_bias(logits, rows)
    if penalised:
        logits[penalised] = apply_penalties(logits[penalised], [rows[i] for i in penalised])
    if sampled:
        sub_rows = [rows[i] for i in sampled]
        logits[sampled] = logits[sampled] / _column(sub_rows, "temperature", logits.device)

    # Fast path: one argmax for the whole batch; sampled rows are overwritten below.
    token_ids = logits.argmax(-1)
    if sampled:
        probs = truncate(logits[sampled], sub_rows).softmax(-1)
        token_ids[sampled] = (probs / _race_noise(probs, sub_rows)).argmax(-1)
    lse = logits.logsumexp(-1)
    chosen = logits.gather(1, token_ids[:, None])[:, 0] - lse
    ids, logprobs = torch.stack([token_ids.double(), chosen.double()]).tolist()  # one device -> host copy
    return SamplerOutput([int(t) for t in ids], logprobs, _top_tokens(logits, lse, rows))
