"""The warmup's worst steps (shard/warmup.py): what they run, measured from the engine's own LoRA and forward
calls on CPU (only the CUDA peak reading cannot run here), and that they leave no trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.tiny_model import build_tiny_adapter
from shard.engine import Engine, SequenceRequest
from shard.lora_batch import AdapterStacks, PageGather
from shard.warmup import WarmupLimits, prefill_blocks, warmup_blocks
from tests.conftest import LoomServer
from tests.engine_driver import EngineDriver
from tests.test_lora_engine import ALL, peft_greedy


@pytest.fixture
def forwards(monkeypatch) -> list[tuple[int, int]]:
    """(decode rows, prefill chunks) of every engine forward."""
    calls = []
    forward = Engine._forward

    def recording(self, decodes, prefills):
        calls.append((len(decodes), len(prefills)))
        return forward(self, decodes, prefills)

    monkeypatch.setattr(Engine, "_forward", recording)
    return calls


@pytest.fixture
def lora_reads(monkeypatch) -> list[tuple[str, str, int, int]]:
    """(source, projection, adapters, rank rows) of every LoRA weight read, from the stacks or the pool."""
    calls = []
    for source in (AdapterStacks, PageGather):
        def recording(self, layer_idx, proj, n, weights=source.weights, name=source.__name__):
            a, b = weights(self, layer_idx, proj, n)
            calls.append((name, proj, a.shape[0], a.shape[1]))
            return a, b

        monkeypatch.setattr(source, "weights", recording)
    return calls


@pytest.fixture(scope="module")
def short_context_dir(tmp_path_factory) -> Path:
    from launcher.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("ctx100"), "llama", seed=5, max_position_embeddings=100)


def test_warmup_lora_fills_the_pool_on_every_projection(llama_dir, lora_reads):
    """A 12-page pool and --max-active-adapters 3: every step's LoRA reads 3 adapters of 4 pages of rank each
    (the pool filled) on every projection the layout has; they overflow the stacks' share, so the pool is
    gathered from, as for real adapters that do not fit."""
    engine = Engine(str(llama_dir), adapter_pool_pages=12)
    engine.warmup(64, 4096, max_concurrent_requests=8, max_active_adapters=3)
    rows = 4 * engine.adapter_page_rank
    assert {proj for _, proj, _, _ in lora_reads} == set(engine.adapters.layout.shapes) == set(ALL)
    assert {(source, n, r) for source, _, n, r in lora_reads} == {("PageGather", 3, rows)}


def test_warmup_lora_segments_stop_at_the_pools_pages(llama_dir, lora_reads):
    """More adapters allowed than the pool has pages: one page each, as many as there are pages."""
    engine = Engine(str(llama_dir), adapter_pool_pages=2)
    engine.warmup(64, 4096, max_concurrent_requests=8, max_active_adapters=5)
    assert {(n, r) for _, _, n, r in lora_reads} == {(2, engine.adapter_page_rank)}


def test_warmup_decodes_the_largest_batch_the_limits_allow(llama_dir, forwards):
    """Beside its prefill the warmup runs one-token rows up to --max-concurrent-requests, then decodes all of
    them; a KV cache that holds fewer rows decodes as many as it holds."""
    engine = Engine(str(llama_dir))
    engine.warmup(64)  # 128 concurrent requests by default
    assert forwards == [(127, 1), (128, 0)]

    forwards.clear()
    # 8 blocks: the 64-token prompt's 4, one for its decode (it ends on a block boundary), 3 one-token rows.
    engine.warmup(64, 8 * engine.block_size, max_concurrent_requests=32)
    assert forwards == [(3, 1), (4, 0)]


def test_warmup_runs_on_a_cache_sized_to_the_prefill_exactly(short_context_dir, forwards):
    """Context 100 with 16-token blocks: a 200-token prefill is two 100-token prompts of 7 blocks each, one
    more than ceil(200 / 16). A cache of exactly those 14 blocks runs the prefill and the prompts' decodes
    (100 is not a block boundary), with no block for a one-token row; the measuring pass's cache holds every row."""
    from shard.kv_cache import bytes_per_block
    from shard.warmup import measure_activation_peak

    engine = Engine(str(short_context_dir))
    limits = WarmupLimits(200, 0, max_concurrent_requests=5, max_active_adapters=2)
    assert prefill_blocks(engine, limits) == 14 and warmup_blocks(engine, limits) == 16 + 3
    assert measure_activation_peak(engine, limits) == 0  # no CUDA allocator here; the steps themselves ran
    assert forwards == [(3, 2), (5, 0)]
    info = engine.info
    engine.kv_cache_bytes = 14 * bytes_per_block(info.num_layers, engine.model.local_kv_heads, info.head_dim,
                                                 info.block_size, engine.dtype)
    forwards.clear()
    assert engine.warmup(200, max_concurrent_requests=5) == 14
    assert forwards == [(0, 2), (2, 0)]


def test_warmup_adapters_leave_no_trace(llama_dir, tmp_path):
    """The worst steps run again while real adapters are resident: afterwards the registry, the pool's pages
    (theirs and the free ones, in order), the host cache and the pins are as before, and the adapters still
    give peft's tokens."""
    from shard.warmup import run_worst_steps

    paths = [build_tiny_adapter(tmp_path / f"a{i}", llama_dir, rank, 8, targets, seed=40 + i)
             for i, (rank, targets) in enumerate([(16, ["q_proj", "v_proj"]), (4, ["down_proj"])])]
    engine = Engine(str(llama_dir), adapter_pool_pages=9)
    engine.warmup(64, 4096)
    engine = EngineDriver(engine)
    for i, path in enumerate(paths):
        engine.load_adapter(f"a{i}", str(path))
    prompt = [5, 17, 3, 99, 42]
    requests = [SequenceRequest(i, prompt, adapter_id=f"a{i}") for i in range(2)]
    before = engine.generate(requests, 6)
    cache = engine.adapters
    def state():
        return ({a: (tuple(e.pages), e.pins) for a, e in cache.entries.items()}, list(cache.free_pages),
                list(cache.host), cache.host_bytes, list(cache.resident))

    before_state = state()
    run_worst_steps(engine.engine, WarmupLimits(64, 0, max_concurrent_requests=6, max_active_adapters=3))
    assert state() == before_state
    assert cache.stacks.width == 0 and not cache.stacks.slots  # laid out again by the next step, for its own
    after = engine.generate(requests, 6)
    assert after == before
    for i, path in enumerate(paths):
        assert after[i] == peft_greedy(llama_dir, path, prompt, n=6)


# Loaded by every process of the launch through PYTHONPATH: each shard writes the limits its warmup got.
RECORD_WARMUP = """
import json, os, sys
if "--rank" in sys.argv:
    import shard.engine
    warmup = shard.engine.Engine.warmup
    def recording(self, *args):
        with open(os.environ["WARMUP_RECORD"], "w") as f:
            json.dump(args, f)
        return warmup(self, *args)
    shard.engine.Engine.warmup = recording
"""


def test_the_router_warms_the_shards_up_under_its_limits(llama_dir, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(RECORD_WARMUP)
    record = tmp_path / "warmup.json"
    env = {"PYTHONPATH": str(site), "WARMUP_RECORD": str(record)}
    srv = LoomServer(llama_dir, "--max-batch-prefill-tokens", "512", "--max-batch-total-tokens", "2048",
                     "--max-concurrent-requests", "7", "--max-active-adapters", "3", env=env).start()
    try:
        assert json.loads(record.read_text()) == [512, 2048, 7, 3]
    finally:
        srv.stop()
