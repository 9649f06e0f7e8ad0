"""What a step costs on this machine and model, timed at warmup (Engine.measure_step_costs): a decode step of one
row, the cheapest step the server runs, and what each prompt token computed beside it adds. The router sizes its
prefill budget from them (router/prefill_budget.py).

The two are timed in pairs, back to back (the decode step alone, then the same decode beside a probe prompt), and
each is the median over the pairs: a burst of load from another process slows a pair or two, not the median, and
a slowdown that lasts the whole measurement slows both alike, which leaves their ratio (all the budget reads) about
right.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass

import torch

from shard.engine import Chunk, Engine, SequenceRequest

PROBE_PROMPT_TOKENS = 256  # a prompt chunk of the size prefill budgets come out at
STEP_COST_PAIRS = 7  # timed pairs (after one untimed pair that warms their shapes)


@dataclass(frozen=True, slots=True)
class StepCosts:
    decode_step_s: float  # a step that decodes one short row
    prompt_token_s: float  # each prompt token computed beside it; 0 or less: prompt tokens cost nothing measurable


@torch.inference_mode()
def measure_step_costs(engine: Engine, max_prompt_tokens: int, pairs: int = STEP_COST_PAIRS) -> StepCosts:
    """Times `pairs` pairs of steps on the installed KV cache: a one-row decode, then that row's next decode beside
    a probe prompt of up to PROBE_PROMPT_TOKENS tokens (no more than max_prompt_tokens, the model's positions or
    the cache's blocks allow) computed whole. Drops every sequence."""
    row_blocks = engine.blocks_for(2 * pairs + 3)  # the row's one-token prompt and a decode per step
    spare_tokens = (engine.num_blocks - row_blocks) * engine.block_size
    probe = min(PROBE_PROMPT_TOKENS, max_prompt_tokens, engine.info.max_position_embeddings, spare_tokens)
    if probe < 1:
        raise RuntimeError(f"a KV cache of {engine.num_blocks} blocks leaves none to time a prompt step in")
    probe_blocks = list(range(row_blocks, row_blocks + engine.blocks_for(probe)))
    row, ids = -1, itertools.count(-2, -1)
    decodes, prompts = [], []
    try:
        _run(engine, [SequenceRequest(row, [0])], [Chunk(row, 0, 1, list(range(row_blocks)))], [])
        position, last_probe = 1, []
        for i in range(pairs + 1):
            decode = _timed(engine, [], [Chunk(row, position, 1)], last_probe)
            probe_id = next(ids)
            both = _timed(engine, [SequenceRequest(probe_id, [0] * probe)],
                          [Chunk(row, position + 1, 1), Chunk(probe_id, 0, probe, probe_blocks)], [])
            position, last_probe = position + 2, [probe_id]
            if i:  # the first pair ran shapes for the first time
                decodes.append(decode)
                prompts.append((both - decode) / probe)
    finally:
        engine.clear()
    return StepCosts(statistics.median(decodes), statistics.median(prompts))


def _timed(engine: Engine, new: list[SequenceRequest], chunks: list[Chunk], release: list[int]) -> float:
    """Seconds one step takes, to its sampled tokens on the host (which waits for the device)."""
    started = time.perf_counter()
    _run(engine, new, chunks, release)
    return time.perf_counter() - started


def _run(engine: Engine, new: list[SequenceRequest], chunks: list[Chunk], release: list[int]) -> None:
    for result in engine.step(new, chunks, release):
        if result.error:
            raise RuntimeError(f"step cost measurement failed: {result.error}")
