"""What the CUDA deployment path depends on, exercised on CPU: no compiler needed at serving time, shard
counts checked before spawning, a failing tensor-parallel rank takes the group down, LoRA and attention
memory bounded by the same accounting the GPU path uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

NO_COMPILER_SCRIPT = """
import json, shutil, sys
import llguidance
from shard.engine import Engine, SequenceRequest
from shard.sampler import SamplingParams
from tests.engine_driver import EngineDriver
assert not any(shutil.which(c) for c in ("cc", "gcc", "g++", "clang", "clang++")), "a compiler is on PATH"
engine = Engine(sys.argv[1])
engine.warmup(64)
engine = EngineDriver(engine)
grammar = llguidance.LLMatcher.grammar_from_regex("(ahoy|avast) (matey|captain)!")
free = SequenceRequest(2, [5, 6, 7, 8])
results = engine.step([SequenceRequest(1, [5, 6, 7], SamplingParams(), grammar=grammar), free], [], [])
assert not any(r.error for r in results), results
ids = [[r.token_id] for r in results]
for _ in range(12):
    for r, out in zip(engine.step([], [1, 2], []), ids):
        assert not r.error, r
        out.append(r.token_id)
print(json.dumps(ids))
"""


def test_structured_output_needs_no_compiler(llama_dir, tmp_path, reference):
    """The Docker image has no C compiler: a grammar mask must not trigger torch.compile."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX")}
    env.update(PATH=str(empty_bin), PYTHONPATH=str(REPO), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    done = subprocess.run([sys.executable, "-c", NO_COMPILER_SCRIPT, str(llama_dir)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    constrained, free = json.loads(done.stdout.strip().splitlines()[-1])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    eos = tokenizer.eos_token_id  # a finished grammar allows only EOS
    text = tokenizer.decode(constrained[:constrained.index(eos)] if eos in constrained else constrained)
    assert text in {f"{a} {b}!" for a in ("ahoy", "avast") for b in ("matey", "captain")}, text
    assert free == reference.greedy(llama_dir, [5, 6, 7, 8], 13, stop_at_eos=False)


# ---- --num-shard ----------------------------------------------------------------------------------------


def config_dir(path: Path, **fields) -> Path:
    from launcher.tiny_model import model_config

    model_config("qwen2", 384, **fields).save_pretrained(path)
    return path


def test_num_shard_that_does_not_split_the_model_is_one_line_before_spawning(llama_dir):
    """The tiny llama has 4 heads: 3 ranks cannot split it; no shard may start."""
    done = subprocess.run([sys.executable, "-m", "launcher", "--model-id", str(llama_dir), "--num-shard", "3",
                           "--port", "1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "started shard" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "--num-shard 3" in line and line.endswith("valid values: 1, 2, 4"), line


def test_default_num_shard_is_the_largest_divisor_of_the_gpus_the_model_allows(tmp_path):
    from launcher.cli import FlagError, resolve_num_shard

    qwen7b = config_dir(tmp_path / "q7", hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                        intermediate_size=18944)
    assert resolve_num_shard(None, "cuda", 8, qwen7b) == 4
    assert resolve_num_shard(None, "cuda", 3, qwen7b) == 1
    assert resolve_num_shard(2, "cuda", 8, qwen7b) == 2
    assert resolve_num_shard(None, "cpu", 0, qwen7b) == 1
    with pytest.raises(FlagError, match=r"--num-shard 8 .*valid values on 8 GPU\(s\): 1, 2, 4$"):
        resolve_num_shard(8, "cuda", 8, qwen7b)


@pytest.mark.parametrize("heads, kv_heads, inter", [(6, 2, 96), (28, 4, 18944), (8, 8, 120), (12, 3, 64)])
def test_launcher_shard_counts_agree_with_the_parallel_layers(tmp_path, heads, kv_heads, inter):
    """The launcher's rule is exactly the set of tp sizes the model's layers can be built with."""
    import torch
    from transformers import AutoConfig

    from launcher.cli import tensor_parallel_sizes
    from shard.models import model_class

    path = config_dir(tmp_path / "m", hidden_size=heads * 8, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      intermediate_size=inter, num_hidden_layers=1)
    config = AutoConfig.from_pretrained(path)
    buildable = []
    for n in range(1, 9):
        try:
            model_class(config)(config, torch.float32, "meta", tp_rank=0, tp_size=n)
            buildable.append(n)
        except ValueError:
            pass
    assert tensor_parallel_sizes(path, 8) == buildable


# ---- a failing rank ---------------------------------------------------------------------------------------

# Loaded by every Python process of the launch through PYTHONPATH; only the named shard rank is changed: its
# Nth decode forward (a batch of one-token chunks) raises, as a device fault or a bug on one GPU would.
FAULT_SITECUSTOMIZE = """
import os, sys
if "--rank" in sys.argv and sys.argv[sys.argv.index("--rank") + 1] == os.environ["FAULT_RANK"]:
    import shard.engine
    forward, calls = shard.engine.Engine._forward, []
    def failing_forward(self, decodes, prefills):
        if decodes and not prefills:
            calls.append(1)
            if len(calls) == int(os.environ["FAULT_AT_DECODE"]):
                raise RuntimeError(os.environ["FAULT_MESSAGE"])
        return forward(self, decodes, prefills)
    shard.engine.Engine._forward = failing_forward
"""


def launch_with_fault(model_dir: Path, tmp_path: Path, rank: int, message: str, *args: str):
    from tests.conftest import LoomServer

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAULT_SITECUSTOMIZE)
    env = {"PYTHONPATH": str(site), "FAULT_RANK": str(rank), "FAULT_AT_DECODE": "5", "FAULT_MESSAGE": message}
    # A given prefill budget: the warmup then times no decode steps, so the fault counts served decodes only.
    return LoomServer(model_dir, "--max-batch-total-tokens", "2048", "--max-batch-prefill-tokens", "256", *args,
                      env=env).start()


def stream_until_loom_exits(srv, timeout_s: float = 30.0) -> tuple[list[str], int | None]:
    import time

    import httpx

    with httpx.stream("POST", f"{srv.url}/generate_stream", json={"inputs": "hello", "parameters": {
            "max_new_tokens": 200, "ignore_eos_token": True}}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    deadline = time.monotonic() + timeout_s
    while srv.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return lines, srv.proc.poll()


def test_a_step_failing_on_one_rank_takes_the_group_down(model_dirs, tmp_path):
    """Rank 1 fails a decode mid-forward while rank 0 waits in an all-reduce: the stream ends with an
    error after the tokens before the fault, and loom exits non-zero instead of hanging or stepping on."""
    srv = launch_with_fault(model_dirs["llama"], tmp_path, 1, "injected fault on rank 1", "--num-shard", "2")
    try:
        lines, code = stream_until_loom_exits(srv)
        tokens = [line for line in lines if '"token"' in line and '"error"' not in line]
        assert '"error"' in lines[-1] and 0 < len(tokens) < 200, lines[-3:]  # tokens before the fault, then the error
        assert code not in (None, 0)
    finally:
        srv.stop()


def test_a_sticky_device_error_stops_a_single_rank(model_dirs, tmp_path):
    srv = launch_with_fault(model_dirs["llama"], tmp_path, 0,
                            "CUDA error: an illegal memory access was encountered")
    try:
        lines, code = stream_until_loom_exits(srv)
        assert '"error"' in lines[-1], lines[-3:]
        assert code not in (None, 0)
    finally:
        srv.stop()


def test_device_errors_are_told_from_recoverable_ones():
    import torch

    from shard.server import is_sticky_device_error

    assert is_sticky_device_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_sticky_device_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not is_sticky_device_error(ValueError("token id 9999 is outside the vocabulary"))


# ---- attention kernels ------------------------------------------------------------------------------------


def test_masked_attention_keeps_kv_heads_unrepeated(model_dirs, reference, monkeypatch):
    """CUDA's flash and memory-efficient SDPA kernels take no enable_gqa together with a mask (they fall to
    the math kernel: fp32, K/V copied per query head). Which kernel CUDA would pick cannot run here, so the
    calls are recorded: every masked call (decode, Mistral's windowed prefill) has as many query as KV
    heads, and the tokens stay exact."""
    import torch.nn.functional as F

    from shard.engine import Engine, SequenceRequest
    from tests.engine_driver import EngineDriver

    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape[1], k.shape[1], attn_mask is not None, kw.get("enable_gqa", False)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    engine = Engine(str(model_dirs["mistral"]))  # window 48, 4 query heads on 2 KV heads
    engine.warmup(256)
    engine = EngineDriver(engine)
    prompt = [(7 * i) % 300 + 3 for i in range(70)]
    tokens = [engine.step([SequenceRequest(1, prompt)], [], [])[0].token_id]
    for _ in range(5):
        tokens.append(engine.step([], [1], [])[0].token_id)
    masked = [c for c in calls if c[2]]
    assert masked and all(q_heads == kv_heads and not gqa for q_heads, kv_heads, _, gqa in masked), set(masked)
    monkeypatch.undo()
    assert tokens == reference.greedy(model_dirs["mistral"], prompt, 6, stop_at_eos=False)


# ---- prompt logprobs ----------------------------------------------------------------------------


def test_prompt_logprobs_of_a_long_prompt_are_computed_in_chunks(llama_dir, reference):
    """A 300-token prompt spans three PROMPT_LOGPROBS_CHUNK-row chunks; every logprob equals transformers'."""
    import torch

    from shard.engine import Engine, SequenceRequest
    from shard.prompt_logprobs import PROMPT_LOGPROBS_CHUNK
    from tests.engine_driver import EngineDriver

    prompt = [(11 * i) % 380 + 3 for i in range(300)]
    assert len(prompt) > 2 * PROMPT_LOGPROBS_CHUNK
    engine = Engine(str(llama_dir))
    engine.warmup(512)
    engine = EngineDriver(engine)
    got = engine.step([SequenceRequest(1, prompt, prefill_logprobs=True)], [], [])[0].prefill_logprobs
    with torch.inference_mode():
        logits = reference.model(llama_dir)(torch.tensor([prompt])).logits[0].float()
    want = [0.0] + logits[:-1].log_softmax(-1).gather(1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist()
    assert got == pytest.approx(want, abs=1e-4)
