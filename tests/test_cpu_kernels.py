"""The fused CPU kernels (shard/kernels/fused_cpu.c) against the torch ops they replace: the rotary embedding
bit for bit, RMSNorm and SiLU(gate) * up to rounding (another summation order, another exp); the layers take
them for the shapes the model passes, and fall back to torch for others. Without a compiler, or with
LOOM_CPU_KERNELS=0, nothing is built and the engine, every op on its torch path, stays token-exact."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from shard.layers import RMSNorm
from shard.rope import apply_rotary


@pytest.fixture
def torch_ops(monkeypatch):
    """Runs the layers' torch paths (the reference) while the kernels stay built."""
    from shard.kernels import cpu

    def reference(fn, *args):
        with monkeypatch.context() as m:
            m.setattr(cpu, "runs_on", lambda x: False)
            return fn(*args)
    return reference


def _norm(n: int, seed: int) -> RMSNorm:
    torch.manual_seed(seed)
    norm = RMSNorm(n, 1e-6, torch.float32, "cpu")
    norm.weight.data.normal_()
    return norm


@pytest.mark.parametrize("rows,n", [(64, 512), (1, 512), (7, 24), (300, 96)])
def test_rms_norm_kernel_matches_torch(cpu_kernel, torch_ops, rows, n):
    norm = _norm(n, rows)
    x = torch.randn(rows, n) * 3
    got = cpu_kernel.rms_norm(x, norm.weight, norm.eps)
    torch.testing.assert_close(got, torch_ops(norm, x), rtol=2e-6, atol=1e-6)
    assert torch.equal(norm(x), got)  # the layer takes the kernel for a 2-D batch


def test_rms_norm_kernel_reads_strided_rows(cpu_kernel, torch_ops):
    """A column slice of a wider output (rows apart by its width) and a contiguous 3-D tensor."""
    norm = _norm(64, 1)
    wide = torch.randn(10, 192)
    torch.testing.assert_close(norm(wide[:, 64:128]), torch_ops(norm, wide[:, 64:128].clone()), rtol=2e-6,
                               atol=1e-6)
    x = torch.randn(4, 5, 64)
    torch.testing.assert_close(norm(x), torch_ops(norm, x), rtol=2e-6, atol=1e-6)


def test_rms_norm_falls_back_for_scattered_rows(cpu_kernel, monkeypatch):
    """Qwen3's per-head q/k norm reads heads out of the fused qkv output: not rows one stride apart."""
    norm = _norm(16, 2)
    heads = torch.randn(6, 96)[:, :64].reshape(6, 4, 16)
    assert not heads.is_contiguous()
    monkeypatch.setattr(cpu_kernel, "rms_norm", lambda *a: pytest.fail("the kernel took scattered rows"))
    h = heads.float()
    want = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps))
    assert torch.equal(norm(heads), want)


@pytest.mark.parametrize("heads,head_dim,rotary_dim", [(8, 64, 64), (4, 24, 24), (6, 32, 16), (2, 96, 48)])
def test_rotary_kernel_is_bit_identical(cpu_kernel, torch_ops, heads, head_dim, rotary_dim):
    """q as the model passes it: a view of the fused qkv output, heads contiguous, tokens a qkv row apart;
    partial rotary (Phi-3's partial_rotary_factor) copies the features past rotary_dim."""
    torch.manual_seed(heads)
    tokens = 37
    qkv = torch.randn(tokens, 3 * heads * head_dim)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    positions = torch.tensor([random.Random(i).randrange(4096) for i in range(tokens)]).float()
    freqs = positions[:, None] / 10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)
    got = apply_rotary(q, cos, sin)
    assert torch.equal(got, cpu_kernel.rotary(q, cos, sin))  # the kernel ran
    assert torch.equal(got, torch_ops(apply_rotary, q, cos, sin))


@pytest.mark.parametrize("rows,n", [(64, 1376), (1, 24), (300, 96)])
def test_silu_mul_kernel_matches_torch(cpu_kernel, rows, n):
    """gate_up rows a wider output's width apart, values out to where e^-x overflows."""
    torch.manual_seed(n)
    gate_up = (torch.randn(rows, 2 * n + 8) * 4)[:, :2 * n]
    gate_up[0, :6] = torch.tensor([-200.0, -88.5, -87.0, 0.0, 87.0, 300.0])
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_kernel.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-6, atol=1e-6)


def _mlp(act: str):
    from transformers import LlamaConfig

    from shard.models.base import MLP, CausalLM, Placement

    config = LlamaConfig(hidden_size=32, intermediate_size=48, hidden_act=act)
    return MLP(CausalLM, config, 0, Placement(torch.float32, "cpu", 0, 1))


def test_mlp_takes_the_kernel_for_silu_only(cpu_kernel, torch_ops, monkeypatch):
    gate_up = torch.randn(9, 96)
    silu = _mlp("silu")
    assert torch.equal(silu.activate(gate_up), cpu_kernel.silu_mul(gate_up))
    torch.testing.assert_close(torch_ops(silu.activate, gate_up), F.silu(gate_up[:, :48]) * gate_up[:, 48:],
                               rtol=0, atol=0)
    monkeypatch.setattr(cpu_kernel, "silu_mul", lambda *a: pytest.fail("the kernel took another activation"))
    gelu = _mlp("gelu_pytorch_tanh")
    assert torch.equal(gelu.activate(gate_up), gelu.act(gate_up[:, :48]) * gate_up[:, 48:])


@pytest.fixture
def no_compiler(monkeypatch):
    """A machine without a C compiler; the kernels are built again for the tests after this one."""
    from shard.kernels import cpu

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CC", raising=False)
    cpu.load.cache_clear()
    yield cpu
    cpu.load.cache_clear()


def test_no_compiler_runs_every_op_on_torch_token_exact(no_compiler, llama_dir, reference):
    """No compiler on PATH (a slim image): the engine decodes through gather + SDPA and torch's norms and
    rotations, token-exact, a batch of contexts in different width groups."""
    from shard.engine import Engine, SequenceRequest
    from tests.engine_driver import EngineDriver

    engine = Engine(str(llama_dir))
    assert engine.decode_kernel is None and not no_compiler.runs_on(torch.zeros(1))
    engine.warmup(max_batch_prefill_tokens=256, max_batch_total_tokens=2048)
    driver = EngineDriver(engine)
    rng = random.Random(7)
    prompts = [[rng.randrange(engine.vocab_size) for _ in range(n)] for n in (1, 17, 70)]
    out = {r.request_id: [r.token_id] for r in driver.step([SequenceRequest(i, p) for i, p in enumerate(prompts)],
                                                           [], [])}
    for _ in range(29):
        for r in driver.step([], list(out), []):
            out[r.request_id].append(r.token_id)
    for i, prompt in enumerate(prompts):
        assert out[i] == reference.greedy(llama_dir, prompt, 30, stop_at_eos=False)


def test_switch_turns_the_kernels_off(cpu_kernel):
    code = "from shard.kernels import cpu; assert cpu.load() is None; print('off')"
    done = subprocess.run([sys.executable, "-c", code], env=os.environ | {"LOOM_CPU_KERNELS": "0"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "off", done.stderr
