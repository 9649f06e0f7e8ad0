"""What the kit's stages share: their sizes (full on a GPU, tiny in the dry run), the recorder each writes its
results through, and the token comparisons."""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

# Llama-3.2-1B's shapes (and rope): the 1B-class model the throughput stage builds with random weights.
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                tie_word_embeddings=True, rope_parameters={
                    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
TINY_BENCH = dict(hidden_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  intermediate_size=256, vocab_size=512, max_position_embeddings=2048, rms_norm_eps=1e-5,
                  tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


@dataclass(frozen=True, slots=True)
class Sizes:
    device: str  # "cuda", or "cpu" in the dry run
    families: tuple[str, ...]  # parity: the engine alone and batched, per family
    prompts: int  # prompts per family
    new_tokens: int
    adapters: int  # parity: adapters in one busy batch
    switch_adapters: int = 3  # switches: adapters beside base-model rows
    bench_model: dict = field(default_factory=lambda: LLAMA_1B)  # config of the throughput model
    bench_adapters: int = 100  # rank-16 adapters on all 7 projections
    adapter_files: int = 8  # distinct weight files among them (each id is paged in on its own)
    batches: tuple[int, ...] = (1, 16, 64, 256)
    graph_batches: tuple[int, ...] = (1, 16, 64, 256)  # graphs: batches decoded three ways each
    adapter_mixes: tuple[int, ...] = (0, 16, 100)  # distinct adapters in a decode batch (0: base model)
    context: int = 128  # tokens in each sequence's cache while decode is timed
    decode_steps: int = 12  # timed decode steps per configuration
    warm_steps: int = 2  # decode steps before the timed ones
    prefill_tokens: int = 8192  # prompt tokens per prefill step
    checks: int = 3  # random inputs per kernel check
    stage_budget_s: float = 120.0
    total_budget_s: float = 480.0

    @property
    def dry(self) -> bool:
        return self.device != "cuda"

    def to_json(self) -> dict:
        return asdict(self)


FULL = Sizes("cuda", families=("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"), prompts=8,
             new_tokens=24, adapters=24)
# The dry run: every code path of every stage at the least work; its deadlines only catch a hang (a loaded
# 2-core machine runs it several times slower than an idle one).
DRY = replace(FULL, device="cpu", families=("llama",), prompts=2, new_tokens=5, adapters=3, switch_adapters=1,
              bench_model=TINY_BENCH, bench_adapters=3, adapter_files=2, batches=(1, 3), graph_batches=(3,),
              adapter_mixes=(0, 3), context=16, decode_steps=2, warm_steps=1, prefill_tokens=64, checks=1,
              stage_budget_s=240.0, total_budget_s=900.0)


class Recorder:
    """A stage's results, rewritten to its file after every record, so that a stage cut at its deadline keeps
    what it finished. `case` runs one part: an exception there is recorded as that part's error (traceback in
    the log) and the stage goes on; `failed` says whether any part failed."""

    def __init__(self, path: Path):
        self.path, self.results, self.failed = path, {}, False

    def record(self, key: str, value) -> None:
        self.results[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def case(self, key: str):
        """Yields a dict to fill; records it (with its seconds), or the error that ended it."""
        out: dict = {}
        start = time.perf_counter()
        try:
            yield out
        except Exception as e:  # one part's failure is that part's result
            traceback.print_exc()
            self.failed = True
            out["error"] = f"{type(e).__name__}: {e}"[:2000]
        out["seconds"] = round(time.perf_counter() - start, 2)
        self.record(key, out)


def token_match(got: list[int], want: list[int]) -> dict:
    """Share of identical tokens position by position and the first position that differs (None: none)."""
    n = max(len(got), len(want), 1)
    same = sum(a == b for a, b in zip(got, want))
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if first is None and len(got) != len(want):
        first = min(len(got), len(want))
    return {"identical": same / n, "first_divergence": first}


def summarize_matches(pairs: list[tuple[list[int], list[int]]]) -> dict:
    """Over several generations: exact (all equal), the share of identical tokens, the earliest divergence."""
    matches = [token_match(got, want) for got, want in pairs]
    firsts = [m["first_divergence"] for m in matches if m["first_divergence"] is not None]
    tokens = sum(max(len(g), len(w)) for g, w in pairs)
    same = sum(m["identical"] * max(len(g), len(w)) for m, (g, w) in zip(matches, pairs))
    return {"exact": not firsts, "generations": len(pairs), "identical_tokens": round(same / max(tokens, 1), 4),
            "diverged": len(firsts), "first_divergence": min(firsts) if firsts else None}
