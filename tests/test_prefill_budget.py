"""The step's prefill budget on Loom's defaults: the shards time a decode step and a prompt token at warmup
(shard/step_costs.py), the router sizes the budget from them within its bounds (router/prefill_budget.py), logs it
and reports it in /info; --max-batch-prefill-tokens overrides it. That chunked prompts give exactly transformers'
tokens is tests/test_chunked_prefill.py's; that the launcher hands the choice over, tests/test_launcher.py's."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from router.prefill_budget import measured_prefill_budget
from shard.engine import Engine, SequenceRequest
from shard.step_costs import PROBE_PROMPT_TOKENS, STEP_COST_PAIRS, measure_step_costs
from tests.conftest import LoomServer
from tests.engine_driver import EngineDriver


MS = 1e-3


# ---- sizing: a pure function of the measured costs ------------------------------------------------------


def test_a_chunk_costs_the_decode_steps_asked():
    """A 12 ms decode step and 0.1 ms prompt tokens: a step of 4 decode steps holds 3 × 12 / 0.1 prompt tokens."""
    assert measured_prefill_budget(0.1 * MS, 12 * MS, 4096, floor=64, step_decodes=4) == 360
    assert measured_prefill_budget(0.1 * MS, 12 * MS, 4096, floor=64, step_decodes=3) == 240
    assert measured_prefill_budget(0.1 * MS, 24 * MS, 4096, floor=64, step_decodes=3) == 480  # slower decode
    assert measured_prefill_budget(0.2 * MS, 12 * MS, 4096, floor=64, step_decodes=3) == 120  # dearer prompt


def test_the_budget_stays_within_its_bounds():
    # A CPU running a large model: a prompt token costs about a decode row, and the floor keeps chunks efficient.
    assert measured_prefill_budget(5 * MS, 10 * MS, 4096, floor=128, step_decodes=3) == 128
    # A GPU: a decode step costs thousands of prompt tokens; the ceiling is the old fixed budget.
    assert measured_prefill_budget(0.002 * MS, 15 * MS, 4096, floor=128, step_decodes=3) == 4096
    # Prompt tokens that cost nothing measurable (or less than nothing, in noise) get the ceiling.
    assert measured_prefill_budget(0.0, 15 * MS, 4096) == 4096
    assert measured_prefill_budget(-0.01 * MS, 15 * MS, 4096) == 4096
    assert measured_prefill_budget(1e-300, 1.0, 4096) == 4096  # no overflow on the way
    # A ceiling under the floor (a small --max-batch-total-tokens) wins.
    assert measured_prefill_budget(5 * MS, 10 * MS, 100, floor=128) == 100


# ---- measuring: on the engine ---------------------------------------------------------------------------


@pytest.fixture
def forwards(monkeypatch) -> list[tuple[int, list[int]]]:
    """(decode rows, prompt chunk lengths) of every engine forward."""
    calls = []
    forward = Engine._forward

    def recording(self, decodes, prefills):
        calls.append((len(decodes), [c.num_tokens for c in prefills]))
        return forward(self, decodes, prefills)

    monkeypatch.setattr(Engine, "_forward", recording)
    return calls


@pytest.fixture(scope="module")
def short_context_dir(tmp_path_factory) -> Path:
    from launcher.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("ctx100"), "llama", seed=5, max_position_embeddings=100)


def test_step_costs_time_a_decode_beside_a_probe_prompt_and_leave_no_trace(llama_dir, reference, forwards):
    """After the row's one-token prefill: an untimed pair, then STEP_COST_PAIRS pairs of a one-row decode alone
    and beside a probe prompt computed whole. The engine holds no sequence afterwards and generates as before."""
    engine = Engine(str(llama_dir))
    engine.warmup(256, 4096)
    forwards.clear()
    costs = measure_step_costs(engine, 4096)
    assert costs.decode_step_s > 0
    # The row's one-token prompt runs as a one-token chunk, as a decode does.
    assert forwards == [(1, [])] + [(1, []), (1, [PROBE_PROMPT_TOKENS])] * (STEP_COST_PAIRS + 1)
    assert not engine.sequences
    prompt = [5, 17, 3, 99, 42]
    tokens = EngineDriver(engine).generate([SequenceRequest(1, prompt)], 6)[1]
    assert tokens == reference.greedy(llama_dir, prompt, 6, stop_at_eos=False)


def test_the_probe_prompt_fits_the_budget_the_positions_and_the_cache(short_context_dir, forwards):
    engine = Engine(str(short_context_dir))
    engine.warmup(64, 4096, max_concurrent_requests=4)
    measure_step_costs(engine, 40)  # no more than the ceiling
    assert {tuple(p) for _, p in forwards[1:]} == {(), (40,)}
    forwards.clear()
    measure_step_costs(engine, 4096)  # no more than the model's 100 positions
    assert {tuple(p) for _, p in forwards[1:]} == {(), (100,)}
    engine.drop_kv_cache()
    engine.install_kv_cache(4)  # the row takes 2 blocks of 16 tokens, 2 are left
    forwards.clear()
    measure_step_costs(engine, 4096)
    assert {tuple(p) for _, p in forwards[1:]} == {(), (32,)}


# ---- serving: the router sizes, logs and reports it ------------------------------------------------------


# Loaded by every process of the launch through PYTHONPATH: each shard reports fixed step costs (a 10 ms decode
# step, 0.05 ms per prompt token) and notes that it was asked to measure them.
FIXED_STEP_COSTS = """
import os, sys
if "--rank" in sys.argv:
    import shard.step_costs
    def fixed(engine, max_prompt_tokens):
        with open(os.environ["STEP_COSTS_RECORD"], "a") as f:
            f.write(f"{max_prompt_tokens}\\n")
        return shard.step_costs.StepCosts(0.010, 0.00005)
    shard.step_costs.measure_step_costs = fixed
"""


@pytest.fixture
def fixed_costs_env(tmp_path) -> tuple[dict, Path]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FIXED_STEP_COSTS)
    record = tmp_path / "measured.txt"
    return {"PYTHONPATH": str(site), "STEP_COSTS_RECORD": str(record)}, record


def info_and_log(srv: LoomServer, log_path: Path) -> tuple[dict, str]:
    try:
        info = httpx.get(f"{srv.url}/info", timeout=30).json()
    finally:
        srv.stop()
    return info, log_path.read_text()


def test_without_the_flag_the_budget_is_sized_from_the_shards_costs(llama_dir, tmp_path, fixed_costs_env):
    env, record = fixed_costs_env
    log_path = tmp_path / "loom.log"
    with open(log_path, "w") as log_file:
        srv = LoomServer(llama_dir, "--max-input-length", "300", env=env, stderr=log_file).start()
        info, log = info_and_log(srv, log_path)
    expected = measured_prefill_budget(0.00005, 0.010, 4096)
    assert record.read_text().split() == ["4096"]  # asked once, with the ceiling: max(300, 4096)
    assert info["max_batch_prefill_tokens"] == expected
    assert re.search(rf"prefill budget: {expected} prompt tokens per step, sized from a one-row decode step of "
                     r"10\.00 ms and 0\.0500 ms per prompt token \(at most 4096", log), log


def test_the_flag_overrides_the_measured_budget(llama_dir, tmp_path, fixed_costs_env):
    env, record = fixed_costs_env
    log_path = tmp_path / "loom.log"
    with open(log_path, "w") as log_file:
        srv = LoomServer(llama_dir, "--max-batch-prefill-tokens", "48", env=env, stderr=log_file).start()
        info, log = info_and_log(srv, log_path)
    assert not record.exists()  # nothing measured
    assert info["max_batch_prefill_tokens"] == 48
    assert "prefill budget: 48 prompt tokens per step (--max-batch-prefill-tokens)" in log
