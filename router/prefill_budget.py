"""The step's prefill budget when --max-batch-prefill-tokens is not given: sized from what a step costs on this
machine and model, as the shards measured it at warmup (shard/step_costs.py), the way Sarathi-Serve sizes its
chunks from a latency target.

A step that computes a prompt chunk beside the running decodes delays each of their next tokens by the chunk's
cost, and a long prompt's first token waits for one step per chunk, each paying a step's fixed cost again. With a
one-row decode step D (about that fixed cost) and a prompt token p:

- the budget (PREFILL_STEP_DECODES - 1) * D / p keeps a step with a chunk within PREFILL_STEP_DECODES decode
  steps, so the streams' gaps grow by at most that factor while a long prompt goes through;
- the same budget keeps a lone long prompt's TTFT within about 1 + 1 / (PREFILL_STEP_DECODES - 1) of its
  unchunked TTFT (each chunk's step pays D beside (PREFILL_STEP_DECODES - 1) * D of prompt tokens);
- MIN_MEASURED_PREFILL_BUDGET is the floor where a prompt token costs about what a decode row costs (a large
  model on a CPU): chunks of a few tokens would run the matmuls at a fraction of their speed and stretch a
  long prompt over hundreds of steps;
- the old fixed default, max(--max-input-length, 4096), is the ceiling: on a GPU a decode step costs hundreds of
  prompt tokens, and the warmup sizes memory for that ceiling.
"""

from __future__ import annotations

from common.defaults import MIN_MEASURED_PREFILL_BUDGET, PREFILL_STEP_DECODES


def measured_prefill_budget(prompt_token_s: float, decode_step_s: float, ceiling: int,
                            floor: int = MIN_MEASURED_PREFILL_BUDGET,
                            step_decodes: float = PREFILL_STEP_DECODES) -> int:
    """Prompt tokens per step: (step_decodes - 1) decode steps' worth of them, within [floor, ceiling] (a
    ceiling below the floor wins). Prompt tokens that cost nothing measurable (prompt_token_s <= 0) get the
    ceiling."""
    floor = min(floor, ceiling)
    if prompt_token_s <= 0:
        return ceiling
    return max(floor, round(min(ceiling, (step_decodes - 1) * decode_step_s / prompt_token_s)))
