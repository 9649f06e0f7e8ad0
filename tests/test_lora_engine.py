"""Multi-LoRA in the engine, in-process, against peft: greedy outputs must match token for token.

Adapters are real PEFT dirs: most written by peft itself (build_tiny_adapter); the 200 of the paging test are
written straight with safetensors in the same format (launcher/tiny_model.write_lora_adapter), which is much faster.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from launcher.tiny_model import build_tiny_adapter, write_lora_adapter
from shard.engine import AdapterError, Engine, SequenceRequest
from tests.engine_driver import EngineDriver

NEW_TOKENS = 10
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ALL = ATTN + MLP
# (rank, alpha, target_modules, use_rslora): every rank, target set, regex and rslora appear.
SPECS = [
    (4, 8, ["q_proj", "v_proj"], False),
    (8, 16, ATTN, False),
    (16, 16, MLP, False),
    (8, 32, ALL, True),
    (16, 8, r".*\.(q_proj|down_proj)", False),
    (4, 4, ["o_proj", "up_proj"], True),
    (12, 24, ["k_proj", "gate_proj"], False),
    (16, 32, ALL, False),
]


def spec(i: int):
    rank, alpha, targets, rslora = SPECS[i % len(SPECS)]
    return rank, alpha, targets, rslora


# ---- references -------------------------------------------------------------------------------------------

_refs: dict[tuple, list[int]] = {}


def peft_greedy(base_dir: Path, adapter_dir: Path | None, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    """peft's (or, without adapter, transformers') greedy continuation; computed once per argument set."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    key = (str(base_dir), str(adapter_dir), tuple(prompt), n)
    if key not in _refs:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, adapter_dir).eval()
        model.generation_config.eos_token_id = None  # no early stop: lengths match the engine's
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=False, max_new_tokens=n)
        _refs[key] = out[0, len(prompt):].tolist()
    return _refs[key]


def make_engine(base_dir: Path, **kwargs) -> EngineDriver:
    engine = Engine(str(base_dir), **kwargs)
    engine.warmup(max_batch_prefill_tokens=512, max_batch_total_tokens=4096)
    return EngineDriver(engine)


# ---- fixtures ---------------------------------------------------------------------------------------------


class Family:
    def __init__(self, base: Path, adapters: list[Path], engine: Engine, prompts: list[list[int]]):
        self.base, self.adapters, self.engine, self.prompts = base, adapters, engine, prompts


def _family(name: str, count: int, model_dirs, tmp_path_factory) -> Family:
    base = model_dirs[name]
    root = tmp_path_factory.mktemp(f"{name}-adapters")
    adapters = []
    for i in range(count):
        rank, alpha, targets, rslora = spec(i)
        adapters.append(build_tiny_adapter(root / f"a{i}", base, rank, alpha, targets, use_rslora=rslora, seed=i))
    engine = make_engine(base)
    for i, path in enumerate(adapters):
        info = engine.load_adapter(f"a{i}", str(path))
        assert info.rank == spec(i)[0] and info.pages == -(-info.rank // engine.adapter_page_rank)
    rng = random.Random(name)
    vocab = engine.info.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 40))] for _ in range(count + 4)]
    return Family(base, adapters, engine, prompts)


@pytest.fixture(scope="module")
def llama(model_dirs, tmp_path_factory) -> Family:
    return _family("llama", 24, model_dirs, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen2(model_dirs, tmp_path_factory) -> Family:
    return _family("qwen2", len(SPECS), model_dirs, tmp_path_factory)


# ---- tests ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_each_adapter_alone_matches_peft(family: str, request):
    fam: Family = request.getfixturevalue(family)
    for i in range(len(SPECS)):
        prompt = fam.prompts[i]
        out = fam.engine.generate([SequenceRequest(1, prompt, adapter_id=f"a{i}")], NEW_TOKENS)[1]
        assert out == peft_greedy(fam.base, fam.adapters[i], prompt), f"{family} adapter {i} {spec(i)}"
    assert out != peft_greedy(fam.base, None, prompt)  # adapters do change the output


def test_24_adapters_and_base_in_one_batch(llama: Family):
    """24 distinct adapters plus base requests in one continuous batch; some join mid-decode."""
    engine, n = llama.engine, len(llama.adapters)
    jobs = [(f"a{i}", llama.adapters[i], llama.prompts[i]) for i in range(n)]
    jobs += [("", None, llama.prompts[n + j]) for j in range(3)]
    jobs.append(("a3", llama.adapters[3], llama.prompts[n + 3]))  # a second sequence on one adapter
    join = {k: 0 if k % 3 else 3 for k in range(len(jobs))}
    out: dict[int, list[int]] = {}
    step = 0
    while step == 0 or any(len(t) < NEW_TOKENS for t in out.values()):
        prefill = [SequenceRequest(k, jobs[k][2], adapter_id=jobs[k][0]) for k in join if join[k] == step]
        decode = [k for k in out if len(out[k]) < NEW_TOKENS]
        for r in engine.step(prefill, decode, []):
            assert not r.error, r.error
            out.setdefault(r.request_id, []).append(r.token_id)
        step += 1
    engine.step([], [], list(out))
    for k, (adapter_id, path, prompt) in enumerate(jobs):
        assert out[k] == peft_greedy(llama.base, path, prompt), f"request {k} adapter {adapter_id!r}"
    assert engine.free_blocks == engine.num_blocks and not engine.sequences
    assert all(e.pins == 0 for e in engine.adapters.entries.values())


def test_qwen2_mixed_batch(qwen2: Family):
    requests = [SequenceRequest(i, qwen2.prompts[i], adapter_id=f"a{i}") for i in range(len(SPECS))]
    requests.append(SequenceRequest(99, qwen2.prompts[-1]))
    out = qwen2.engine.generate(requests, NEW_TOKENS)
    for i in range(len(SPECS)):
        assert out[i] == peft_greedy(qwen2.base, qwen2.adapters[i], qwen2.prompts[i]), f"adapter {i}"
    assert out[99] == peft_greedy(qwen2.base, None, qwen2.prompts[-1])


def test_small_pool_cycles_through_200_adapters(llama: Family, tmp_path: Path):
    """A 4-page pool (rank <= 8: one page each) serves 200 adapters 3 at a time, with a host cache that holds
    only a few of them: the pool tensor is never reallocated, host memory stays bounded, adapters evicted from
    both are read back from the shard's spill file, and every output equals the big-pool engine's (itself
    checked against peft)."""
    config = json.loads((llama.base / "config.json").read_text())
    rng = random.Random(7)
    paths = [write_lora_adapter(tmp_path / f"c{i}", config, rng.choice([2, 4, 8]), rng.sample(ALL, 2), seed=1000 + i)
             for i in range(200)]
    big = llama.engine
    host_bound = 6 * big.adapters.page_bytes
    small = make_engine(llama.base, adapter_pool_pages=4, adapter_host_cache_bytes=host_bound)
    for i, path in enumerate(paths):
        assert small.load_adapter(f"c{i}", str(path)).pages == 1
        big.load_adapter(f"c{i}", str(path))
        assert small.adapters.host_bytes <= host_bound
    pool_ptr = small.adapters.pool.data_ptr()
    prompts = [llama.prompts[i % len(llama.prompts)] for i in range(200)]
    n = 6
    expected: dict[int, list[int]] = {}
    for start in range(0, 200, 25):
        ids = range(start, min(start + 25, 200))
        expected |= big.generate([SequenceRequest(i, prompts[i], adapter_id=f"c{i}") for i in ids], n)
    for i in (0, 57, 123, 199):
        assert expected[i] == peft_greedy(llama.base, paths[i], prompts[i], n), f"adapter c{i}"
    for start in range(0, 200, 3):
        ids = list(range(start, min(start + 3, 200)))
        requests = [SequenceRequest(i, prompts[i], adapter_id=f"c{i}") for i in ids] + [SequenceRequest(-1, prompts[0])]
        out = small.generate(requests, n)
        for i in ids:
            assert out[i] == expected[i], f"adapter c{i}"
        assert small.adapters.pool.data_ptr() == pool_ptr
        assert small.adapters.host_bytes <= host_bound
    # A second pass reads early adapters, long evicted from pool and host cache, back from the spill file.
    assert "c0" not in small.adapters.host and small.adapters.entries["c0"].pages is None
    assert small.adapters.entries["c0"].spilled.is_file()
    assert small.generate([SequenceRequest(0, prompts[0], adapter_id="c0")], n)[0] == expected[0]


def test_pool_overflow_fails_only_the_adapters_that_do_not_fit(llama: Family):
    """A 5-page pool: rank-16 adapters take 2 pages, so a step with three of them fails the third alone,
    and an adapter pinned by live sequences is never evicted."""
    engine = make_engine(llama.base, adapter_pool_pages=5)
    big = [i for i in range(len(llama.adapters)) if spec(i)[0] == 16][:3]
    for i in big:
        assert engine.load_adapter(f"a{i}", str(llama.adapters[i])).pages == 2
    requests = [SequenceRequest(i, llama.prompts[i], adapter_id=f"a{i}") for i in big] + [SequenceRequest(99, llama.prompts[0])]
    results = engine.step(requests, [], [])
    assert [bool(r.error) for r in results] == [False, False, True, False]
    assert "pool pages" in results[2].error
    out = {r.request_id: [r.token_id] for r in results if not r.error}
    for _ in range(NEW_TOKENS - 1):
        for r in engine.step([], list(out), []):
            out[r.request_id].append(r.token_id)
    for i in big[:2]:
        assert out[i] == peft_greedy(llama.base, llama.adapters[i], llama.prompts[i])
    engine.step([], [], [big[0]])  # frees a[big[0]]'s pins: now it may be evicted for the third
    i = big[2]
    late = engine.generate([SequenceRequest(i, llama.prompts[i], adapter_id=f"a{i}")], NEW_TOKENS)
    assert late[i] == peft_greedy(llama.base, llama.adapters[i], llama.prompts[i])
    assert engine.adapters.entries[f"a{big[1]}"].pages is not None  # still pinned, still resident
    engine.clear()
    assert all(e.pins == 0 for e in engine.adapters.entries.values())


def test_broken_adapters(llama: Family, tmp_path: Path):
    engine, base = llama.engine, llama.base
    config = json.loads((base / "config.json").read_text())

    missing_weights = build_tiny_adapter(tmp_path / "noweights", base, 4, 8, ["q_proj"])
    (missing_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"adapter bad1: no weights \(expected adapter_model\.safetensors"):
        engine.load_adapter("bad1", str(missing_weights))

    wrong_shape = write_lora_adapter(tmp_path / "wide", config, 4, ["q_proj"], 0, hidden_size=2 * config["hidden_size"])
    with pytest.raises(AdapterError, match=r"adapter bad2: lora_A of layers\.0\.self_attn\.q_proj has shape "
                                           r"\[4, 128\], the base model needs \[r, 64\]"):
        engine.load_adapter("bad2", str(wrong_shape))

    # The final norm is no LoRA target (embed_tokens and lm_head are: tests/test_vocab_adapters.py).
    norm = write_lora_adapter(tmp_path / "norm", config, 4, ["q_proj"], 0)
    for name, targets, shown in (("bad3", ["q_proj", "norm"], "norm"), ("bad4", r".*norm", "model\\.norm")):
        (norm / "adapter_config.json").write_text(json.dumps({
            **json.loads((norm / "adapter_config.json").read_text()), "target_modules": targets}))
        with pytest.raises(AdapterError, match=rf"unsupported target module '{shown}'"):
            engine.load_adapter(name, str(norm))

    with pytest.raises(AdapterError, match=r"adapter bad5: /nonexistent/adapter is not a directory"):
        engine.load_adapter("bad5", "/nonexistent/adapter")

    # Requests naming an adapter that never loaded fail alone; the others in the step are exact.
    requests = [SequenceRequest(1, llama.prompts[1], adapter_id="a1"), SequenceRequest(2, llama.prompts[2], adapter_id="bad2"),
                SequenceRequest(3, llama.prompts[3]), SequenceRequest(4, llama.prompts[4], adapter_id="never-loaded")]
    results = engine.step(requests, [], [])
    assert [bool(r.error) for r in results] == [False, True, False, True]
    assert "'bad2' is not loaded" in results[1].error and "'never-loaded' is not loaded" in results[3].error
    out = {r.request_id: [r.token_id] for r in results if not r.error}
    for _ in range(NEW_TOKENS - 1):
        for r in engine.step([], list(out), []):
            out[r.request_id].append(r.token_id)
    engine.step([], [], list(out))
    assert out[1] == peft_greedy(base, llama.adapters[1], llama.prompts[1])
    assert out[3] == peft_greedy(base, None, llama.prompts[3])


def test_adapter_files_are_read_once(llama: Family, tmp_path: Path):
    """An adapter's directory is read at registration only: deleted, rewritten with a bad config or swapped for
    another adapter afterwards, the adapter still pages in (here from the spill file: no host cache) exactly
    as it was, and the requests beside it are untouched."""
    config = json.loads((llama.base / "config.json").read_text())
    engine = make_engine(llama.base, adapter_pool_pages=2, adapter_host_cache_bytes=0)
    kept = write_lora_adapter(tmp_path / "kept", config, 4, ["q_proj"], 1)
    reference = write_lora_adapter(tmp_path / "reference", config, 4, ["q_proj"], 1)
    engine.load_adapter("kept", str(kept))
    engine.load_adapter("a0", str(llama.adapters[0]))
    (kept / "adapter_model.safetensors").unlink()
    (kept / "adapter_model.safetensors").symlink_to(llama.adapters[1] / "adapter_model.safetensors")
    (kept / "adapter_config.json").write_text(json.dumps({**json.loads((reference / "adapter_config.json")
                                                                       .read_text()), "rank_pattern": {"(": 4}}))
    for _ in range(2):  # a0 then kept, then again: each is evicted and paged back in
        out = engine.generate([SequenceRequest(1, llama.prompts[0], adapter_id="a0"),
                               SequenceRequest(2, llama.prompts[1], adapter_id="kept"),
                               SequenceRequest(3, llama.prompts[2])], NEW_TOKENS)
        assert out[1] == peft_greedy(llama.base, llama.adapters[0], llama.prompts[0])
        assert out[2] == peft_greedy(llama.base, reference, llama.prompts[1])
        assert out[3] == peft_greedy(llama.base, None, llama.prompts[2])
        engine.load_adapter("c", str(llama.adapters[2]))  # takes the pool's pages: the next round pages in again
        engine.generate([SequenceRequest(4, llama.prompts[3], adapter_id="c")], NEW_TOKENS)
        engine.unload_adapter("c")


def test_adapter_stacks_hold_each_steps_adapters_in_slots_0_to_n():
    """Random steps of adapters joining, leaving, changing rank and targets and being evicted: after each
    arrange, slot i holds exactly the i-th returned adapter's pool pages on every targeted projection (zero
    rows past its rank), inside the one buffer the stacks were given."""
    from shard.lora import PageLayout, ProjShape
    from shard.lora_batch import AdapterStacks

    shapes = {p: ProjShape(6, 5, 0, 6, 0, 5) for p in ALL}
    layout = PageLayout.build(2, 2, shapes)
    pool = torch.randn(40, layout.page_numel)
    pool[0] = 0
    views = layout.views(pool)
    stacks = AdapterStacks(layout, views, 4 * layout.rows_numel(3, ALL) * 4)  # 4 slots of width 3, float32
    buffer = stacks.buffer.data_ptr()
    rng = random.Random(3)
    tables = {f"x{i}": rng.sample(range(1, 40), rng.choice([1, 1, 2, 3])) for i in range(12)}
    for step in range(60):
        wanted = {a: tables[a] for a in rng.sample(sorted(tables), rng.randint(1, 8))}
        targets = set(rng.sample(ALL, rng.randint(1, 7)))
        if step % 7 == 3:
            stacks.drop(rng.choice(sorted(tables)))
        order = stacks.arrange(wanted, targets)
        width = max(len(t) for t in wanted.values())
        if order is None:  # more than the buffer holds even at this step's own width and targets
            assert len(wanted) * layout.rows_numel(width, targets) * 4 > stacks.nbytes
            continue
        assert sorted(order) == sorted(wanted)
        assert targets <= {proj for _, proj in stacks.a} and stacks.width >= width
        for slot, adapter_id in enumerate(order):
            pages = torch.tensor(wanted[adapter_id] + [0] * (stacks.width - len(wanted[adapter_id])))
            for (layer, proj), a in stacks.a.items():
                a_pages, b_pages = views[layer][proj]
                assert a.untyped_storage().data_ptr() == buffer  # views of the one buffer, never reallocated
                assert torch.equal(a[slot], a_pages[pages].reshape(stacks.width * 2, -1)), (step, adapter_id, proj)
                assert torch.equal(stacks.b[layer, proj][slot], b_pages[pages].reshape(stacks.width * 2, -1))
