"""LoRA memory on the torch path, measured from the tensors themselves: the adapter pool and the running
adapters' stacks stay inside --adapter-memory-fraction, stacks hold only targeted projections and keep one
layout across steps of different rank widths, and prefill never pads segments to the longest prompt. Outputs
stay token-exact against peft on every path."""

from __future__ import annotations

import json
import random
from pathlib import Path

import psutil
import pytest
import torch

from launcher.tiny_model import write_lora_adapter
from shard.engine import Engine, SequenceRequest
from tests.engine_driver import EngineDriver
from tests.test_lora_engine import ALL, peft_greedy

KV_BYTES = 32 << 20
FRACTION = 0.1


def storages_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.fixture(scope="module")
def setup(llama_dir, tmp_path_factory):
    config = json.loads((llama_dir / "config.json").read_text())
    root = tmp_path_factory.mktemp("mem-adapters")
    specs = [(16, ["q_proj", "v_proj"]), (4, ["q_proj"]), (8, ["v_proj"]), (2, ["q_proj", "v_proj"])]
    paths = [write_lora_adapter(root / f"m{i}", config, rank, targets, seed=500 + i)
             for i, (rank, targets) in enumerate(specs)]
    engine = Engine(str(llama_dir), kv_cache_bytes=KV_BYTES, adapter_memory_fraction=FRACTION)
    engine.warmup(max_batch_prefill_tokens=512, max_batch_total_tokens=4096)
    engine = EngineDriver(engine)
    for i, path in enumerate(paths):
        engine.load_adapter(f"m{i}", str(path))
    rng = random.Random(11)
    prompts = [[rng.randrange(engine.info.vocab_size) for _ in range(n)] for n in (90, 3, 5, 2, 7)]
    return llama_dir, engine, paths, prompts


def check_against_peft(base: Path, engine: Engine, paths: list[Path], prompts: list[list[int]]) -> None:
    requests = [SequenceRequest(i, p, adapter_id=f"m{i % len(paths)}") for i, p in enumerate(prompts)]
    out = engine.generate(requests, 6)
    for i, prompt in enumerate(prompts):
        assert out[i] == peft_greedy(base, paths[i % len(paths)], prompt, n=6), f"request {i}"


def test_adapter_memory_stays_inside_its_budget_and_stacks_hold_only_targets(setup):
    """On CPU the budget is a share of the host memory available, up to what --max-active-adapters (the default
    128) adapters of rank 64 take: 8 pages each."""
    from shard.warmup import POOL_RANK_PER_ADAPTER

    base, engine, paths, prompts = setup
    check_against_peft(base, engine, paths, prompts)
    assert engine.adapter_pages == 128 * POOL_RANK_PER_ADAPTER // engine.adapter_page_rank
    stacks = engine.adapters.stacks
    held = storages_bytes([engine.adapters.pool, *stacks.a.values(), *stacks.b.values()])
    assert held <= FRACTION * psutil.virtual_memory().total, held
    assert held <= (engine.adapter_pages + 1) * engine.adapters.page_bytes * 4 / 3 + 64, held
    assert {proj for _, proj in stacks.a} == {"q_proj", "v_proj"}  # what these adapters target, nothing else


def test_steps_of_different_rank_widths_share_one_stacks_layout(setup):
    """A rank-16 adapter decodes while rank-2 and rank-4 ones prefill: the stacks are laid out once (the
    widest), and later steps neither re-lay them out nor copy rows of adapters already in them."""
    base, engine, paths, prompts = setup
    stacks = engine.adapters.stacks
    out = {r.request_id: [r.token_id] for r in engine.step([SequenceRequest(0, prompts[0], adapter_id="m0")], [], [])}
    layout = stacks.a
    joined = [SequenceRequest(k, prompts[k], adapter_id=f"m{k}") for k in (1, 3)]
    for step in range(5):
        results = engine.step(joined if step == 1 else [], list(out), [])
        for r in results:
            assert not r.error, r.error
            out.setdefault(r.request_id, []).append(r.token_id)
        assert stacks.a is layout and stacks.width == 2
    engine.step([], [], list(out))
    assert out[0] == peft_greedy(base, paths[0], prompts[0], n=6)
    assert out[1] == peft_greedy(base, paths[1], prompts[1], n=4)
    assert out[3] == peft_greedy(base, paths[3], prompts[3], n=4)


def test_adapters_that_do_not_fit_the_stacks_are_gathered_from_the_pool(setup):
    base, engine, paths, prompts = setup
    engine.adapters.allocate(engine.adapter_pages, stacks_bytes=0)
    try:
        check_against_peft(base, engine, paths, prompts)
        assert engine.adapters.stacks.capacity == 0
    finally:
        engine.warmup(max_batch_prefill_tokens=512, max_batch_total_tokens=4096)


def test_prefill_segments_are_not_padded_to_the_longest_prompt():
    """One 400-token prompt beside three 1-token ones: the LoRA transient stays within the real rows, and the
    deltas equal x A^T B per token."""
    from shard.lora import PageLayout, ProjShape
    from shard.lora_batch import AdapterStacks, LoraBatch

    layout = PageLayout.build(1, 4, {p: ProjShape(8, 6, 0, 8, 0, 6) for p in ALL})
    pool = torch.randn(6, layout.page_numel)
    pool[0] = 0
    stacks = AdapterStacks(layout, layout.views(pool), 1 << 20)
    tables = {"a": [1, 2], "b": [3], "c": [4], "d": [5]}
    order = stacks.arrange(tables, {"q_proj"})
    segments = {"a": list(range(3, 403)), "b": [0], "c": [1], "d": [403]}
    hook = LoraBatch(stacks, [segments[a] for a in order], {"q_proj"}, 405, torch.device("cpu"))
    assert hook.packed_rows <= 2 * 403
    x, y = torch.randn(405, 8), torch.randn(405, 6)
    got = hook.apply(0, "q_proj", x, y.clone())
    want = y.clone()
    a_pages, b_pages = layout.views(pool)[0]["q_proj"]
    for adapter_id, rows in segments.items():
        a = a_pages[tables[adapter_id]].reshape(-1, 8)
        b = b_pages[tables[adapter_id]].reshape(-1, 6)
        want[rows] += x[rows] @ a.t() @ b
    torch.testing.assert_close(got, want)


def test_prompts_side_by_side_run_on_slices_of_rows():
    """A step as the engine lays it out: each adapter's decode row first, then its prompts side by side. Each
    segment is two runs of rows, so LoRA computes on slices of x and of y (here a column slice of a fused output,
    as q is of qkv), gathering nothing, and the deltas equal x A^T B per token."""
    from shard.lora import PageLayout, ProjShape
    from shard.lora_batch import AdapterStacks, LoraBatch

    layout = PageLayout.build(1, 4, {p: ProjShape(8, 6, 0, 8, 0, 6) for p in ALL})
    pool = torch.randn(4, layout.page_numel)
    pool[0] = 0
    stacks = AdapterStacks(layout, layout.views(pool), 1 << 20)
    tables = {"a": [1, 2], "b": [3]}
    order = stacks.arrange(tables, {"q_proj"})
    segments = {"a": [0, *range(3, 53)], "b": [1, *range(53, 120)]}  # row 2: a base-model decode
    hook = LoraBatch(stacks, [segments[a] for a in order], {"q_proj"}, 120, torch.device("cpu"))
    assert all(isinstance(rows, list) and len(rows) == 2 for rows in hook.segment_rows)
    x, fused = torch.randn(120, 8), torch.randn(120, 10)
    want = fused.clone()
    got = hook.apply(0, "q_proj", x, fused[:, 2:8])
    a_pages, b_pages = layout.views(pool)[0]["q_proj"]
    for adapter_id, rows in segments.items():
        pages = tables[adapter_id]
        want[rows, 2:8] += x[rows] @ a_pages[pages].reshape(-1, 8).t() @ b_pages[pages].reshape(-1, 6)
    torch.testing.assert_close(fused, want)
    assert got.data_ptr() == fused[:, 2:8].data_ptr()  # added in place


def test_adapters_of_very_different_ranks_are_gathered_at_their_own_width():
    """One 4-page adapter beside four 1-page ones, gathered from an 8-page pool: padded to the widest they would
    copy 20 pages per projection, more than the pool (what the warmup measures); each is read at its own width
    instead, and the deltas equal x A^T B per token."""
    from shard.lora import PageLayout, ProjShape
    from shard.lora_batch import LoraBatch, PageGather

    layout = PageLayout.build(1, 4, {p: ProjShape(8, 6, 0, 8, 0, 6) for p in ALL})
    pool = torch.randn(9, layout.page_numel)
    pool[0] = 0
    tables = {"wide": [1, 2, 3, 4], "b": [5], "c": [6], "d": [7], "e": [8]}
    gather = PageGather(layout.views(pool), layout.page_rank, list(tables.values()), torch.device("cpu"), max_pages=8)
    assert gather.ragged
    a, b = gather.weights(0, "q_proj", len(tables))
    assert sum(t.shape[0] for t in a) == 8 * layout.page_rank  # the real pages, no padding
    segments = [[i] for i in range(len(tables))]  # decode rows, in adapter order
    hook = LoraBatch(gather, segments, {"q_proj"}, len(tables), torch.device("cpu"))
    x, y = torch.randn(len(tables), 8), torch.randn(len(tables), 6)
    got = hook.apply(0, "q_proj", x, y.clone())
    want = y.clone()
    a_pages, b_pages = layout.views(pool)[0]["q_proj"]
    for i, pages in enumerate(tables.values()):
        want[i] += x[i] @ a_pages[pages].reshape(-1, 8).t() @ b_pages[pages].reshape(-1, 6)
    torch.testing.assert_close(got, want)
    assert not PageGather(layout.views(pool), layout.page_rank, [[1, 2], [3, 4]], torch.device("cpu"), 8).ragged
