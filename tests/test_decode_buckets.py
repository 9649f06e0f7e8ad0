"""Decode steps padded to fixed buckets of batch size and adapter count (shard/decode_graphs.py): the shapes
that CUDA graphs capture and replay. On CPU the same padded step runs eagerly, and every token equals the
unpadded engine's, through the same schedule: sequences joining and leaving, batches between buckets, steps
larger than the biggest bucket or with an adapter wider than MAX_LORA_RANK (those run unpadded), base-model
rows beside adapters. The capture and replay themselves run on a GPU only (make gpu-check).

The LoRA of a padded step runs the Triton SGMV kernels, here through Triton's interpreter (conftest's
`interpreted`); base-model steps need only the paged decode kernel (the C one on CPU)."""

from __future__ import annotations

import pytest
import torch

from launcher.tiny_model import build_tiny_adapter
from shard.decode_graphs import BATCH_BUCKETS, bucket_keys, graphs_requested, smallest_bucket
from shard.engine import Engine, SequenceRequest
from tests.engine_driver import EngineDriver

MAX_BATCH, MAX_ADAPTERS = 8, 4


def test_buckets_hold_every_step_the_limits_allow():
    keys = bucket_keys(100, 12)
    assert keys == sorted(keys, reverse=True) and keys[0] == (128, 16) and len(keys) == len(set(keys))  # captured largest first
    for batch in range(1, 101):
        for adapters in range(min(batch, 12) + 1):
            b, a = smallest_bucket(keys, batch, adapters)
            assert b in BATCH_BUCKETS and batch <= b <= 1.5 * batch
            assert (a == 0) == (adapters == 0) and adapters <= a < 2 * max(adapters, 1)
    assert smallest_bucket(keys, 129, 0) is None and smallest_bucket(keys, 5, 17) is None


def test_cuda_graphs_are_opt_in_and_enforce_eager_wins(monkeypatch):
    cuda = torch.device("cuda")
    assert not graphs_requested(cuda, 1, False)
    monkeypatch.setenv("LOOM_CUDA_GRAPHS", "1")
    assert graphs_requested(cuda, 1, False)
    assert not graphs_requested(cuda, 1, True)  # --enforce-eager
    assert not graphs_requested(cuda, 2, False)  # not under tensor parallelism until verified there
    assert not graphs_requested(torch.device("cpu"), 1, False)


def test_enforce_eager_reaches_the_shards():
    from launcher.cli import build_parser, shard_flags
    from shard.__main__ import parse_args

    assert "--enforce-eager" in shard_flags(build_parser().parse_args(["--enforce-eager"]))
    assert "--enforce-eager" not in shard_flags(build_parser().parse_args([]))
    assert parse_args(["--model-dir", "m", "--uds", "s", "--enforce-eager"]).enforce_eager


def make_engine(model_dir, padded: bool) -> EngineDriver:
    # A small adapter pool and cache: Triton's interpreter copies every tensor argument at each launch.
    engine = Engine(str(model_dir), padded_decode=padded, adapter_pool_pages=24, kv_cache_bytes=8 << 20)
    engine.warmup(256, 4096, max_concurrent_requests=MAX_BATCH, max_active_adapters=MAX_ADAPTERS)
    return EngineDriver(engine)


def prompt(seq_id: int) -> list[int]:
    return [(7 * seq_id + 3 * k) % 300 + 3 for k in range(3 + (5 * seq_id) % 29)]


def run_schedule(engine: EngineDriver, schedule: list[tuple[list[tuple[int, str]], int]]) -> dict[int, list[int]]:
    """Each entry: sequences (id > 0, adapter) that join at its first step, beside a decode of everything
    live, then that many decode-only steps; a negative id releases that sequence at the first step."""
    out: dict[int, list[int]] = {}
    done: set[int] = set()
    for joining, decodes in schedule:
        release = [-i for i, _ in joining if i < 0]
        done.update(release)
        new = [SequenceRequest(i, prompt(i), adapter_id=a) for i, a in joining if i > 0]
        for step in range(1 + decodes):
            live = [i for i in out if i not in done]
            for r in engine.step(new if step == 0 else [], live, release if step == 0 else []):
                assert not r.error, r.error
                out.setdefault(r.request_id, []).append(r.token_id)
    return out


def padded_against_unpadded(model_dir: str, adapters: list[str], schedule) -> tuple[dict, dict, int]:
    outputs, padded_steps = [], 0
    for padded in (False, True):
        engine = make_engine(model_dir, padded)
        for i, path in enumerate(adapters):
            engine.load_adapter(f"a{i}", path)
        outputs.append(run_schedule(engine, schedule))
        if padded:
            padded_steps = engine.decode_runner.padded_steps
            blocks = engine.model.model.layers[0].self_attn.kv_cache.shape[1] // engine.block_size
            assert blocks == engine.num_blocks + 1  # the scratch block padding rows write to
    return outputs[0], outputs[1], padded_steps


BASE_SCHEDULE = [
    ([(1, ""), (2, ""), (3, "")], 3),  # batch 3 in bucket 4
    ([(4, ""), (5, ""), (6, "")], 2),  # 6 in 8
    ([(-2, "")], 2),  # 5 in 8
    ([(7, ""), (8, ""), (9, ""), (10, "")], 2),  # 9 rows: past the largest bucket, unpadded
    ([(-4, ""), (-5, "")], 3),  # back to 7 in 8
]


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "phi3"])
def test_padded_base_model_decode_is_token_exact(cpu_kernel, model_dirs, family):
    """Sliding windows (Mistral), soft-capped scores (Gemma 2), longrope's length switch (Phi-3) included."""
    unpadded, padded, steps = padded_against_unpadded(str(model_dirs[family]), [], BASE_SCHEDULE)
    assert padded == unpadded
    # Every decode-only step that fits a bucket: an entry's first step too when nothing joins there. Phi-3's
    # sequences run whole once at their longrope switch: those steps are not decode-only.
    fitting = 3 + 2 + (1 + 2) + 0 + (1 + 3)
    assert steps == fitting if family != "phi3" else 0 < steps < fitting
    assert sum(map(len, padded.values())) == sum(map(len, unpadded.values())) > 50


ADAPTER_SCHEDULE = [
    ([(1, "a0"), (2, ""), (3, "a1")], 2),  # 3 rows, 2 adapters: bucket (4, 2)
    ([(4, "a2"), (5, "a0"), (6, "a1"), (7, "")], 1),  # 7 rows, 3 adapters: (8, 4)
    ([(8, "a3")], 1),  # an adapter wider than MAX_LORA_RANK: unpadded
    ([(-8, ""), (-1, "")], 1),  # 6 rows again, a0 still there through sequence 5
]


def interpreted_adapters_case(model_dir: str, adapters: list[str]):
    return padded_against_unpadded(model_dir, adapters, ADAPTER_SCHEDULE)


def test_padded_decode_with_adapters_is_token_exact(interpreted, llama_dir, tmp_path):
    from shard.decode_graphs import MAX_LORA_RANK

    specs = [(8, "all-linear"), (16, ["q_proj", "v_proj"]), (4, ["o_proj", "down_proj"]),
             (MAX_LORA_RANK + 8, ["k_proj"])]
    adapters = [str(build_tiny_adapter(tmp_path / f"a{i}", llama_dir, rank=r, alpha=2 * r, target_modules=t,
                                       seed=40 + i)) for i, (r, t) in enumerate(specs)]
    unpadded, padded, steps = interpreted(interpreted_adapters_case, str(llama_dir), adapters)
    assert padded == unpadded
    assert steps == 2 + 1 + 0 + (1 + 1)  # the wide adapter's step ran unpadded
