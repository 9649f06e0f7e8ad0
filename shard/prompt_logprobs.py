"""Prompt logprobs: what the model gave each prompt token, from the hidden states of a prefill chunk."""

from __future__ import annotations

from collections.abc import Callable

import torch

# Rows of prompt logits materialised at once (128 x a 128k vocabulary: 64 MB of float32).
PROMPT_LOGPROBS_CHUNK = 128

TopTokens = list[tuple[list[tuple[int, float]], int]]


def prompt_logprobs(logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, start: int,
                    prompt: list[int], top_n: int = 0) -> tuple[list[float], TopTokens]:
    """logprobs of the prompt tokens that the chunk's rows predict: row i (position start + i) predicts
    prompt[start + i + 1]; with `top_n`, also each position's `top_n` most likely tokens and the prompt token's
    rank there. `logits_of(rows)` is the LM head under the sequence's adapter. Logits are computed
    PROMPT_LOGPROBS_CHUNK rows at a time: a long prompt's float32 logits over a large vocabulary would be
    gigabytes."""
    count = min(hidden.shape[0], len(prompt) - 1 - start)
    if count <= 0:
        return [], []
    targets = torch.tensor(prompt[start + 1:start + 1 + count], device=hidden.device)
    parts, tops = [], []
    for lo in range(0, count, PROMPT_LOGPROBS_CHUNK):
        hi = min(lo + PROMPT_LOGPROBS_CHUNK, count)
        lp = logits_of(hidden[lo:hi]).log_softmax(-1)
        chosen = lp.gather(1, targets[lo:hi, None])
        parts.append(chosen[:, 0])
        if top_n:
            values, ids = lp.topk(min(top_n, lp.shape[1]), dim=-1)
            ranks = (lp > chosen).sum(-1) + 1
            for row_ids, row_values, rank in zip(ids.tolist(), values.tolist(), ranks.tolist()):
                tops.append((list(zip(row_ids, row_values)), rank))
    return torch.cat(parts).tolist(), tops
