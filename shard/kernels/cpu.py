"""The CPU kernels, in C: paged_attention_cpu.c (the twin of the Triton decode kernel: it reads each sequence's
context straight from the paged KV cache, where the torch path first gathers it into a padded copy and then runs
SDPA over it) and fused_cpu.c (RMSNorm, the rotary embedding and SiLU(gate) * up, one pass each where torch
runs several ops). On a 2-core CPU the gathered copy was half of a batch-64 decode step; fusing the norms and
rotations took ~5% off the rest, and SiLU * up 8% off a prefill step.

The sources are built once per process, into one library, when the engine starts, with the C compiler on
PATH ($CC, else cc or gcc; -march=native is safe because it is built where it runs), and called through ctypes,
which releases the GIL. Without a compiler (a slim image), when the build fails, or with LOOM_CPU_KERNELS=0,
`load()` returns None and every op stays on its torch path, which is also the reference the kernels are tested
against. Nothing is compiled while requests are served. Float32 only.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("loom.shard")

SOURCES = tuple(Path(__file__).with_name(name) for name in ("paged_attention_cpu.c", "fused_cpu.c"))
# -ffp-contract=off: no fused multiply-adds, so that element-wise results round as torch's own ops do.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-ffp-contract=off")
ENABLED = os.environ.get("LOOM_CPU_KERNELS", "1") != "0"
_i64, _ptr, _f32, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "paged_decode": [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _f32, _i64, _f32, _int,
                     _ptr],
    "rms_norm": [_ptr, _i64, _i64, _i64, _ptr, _f32, _ptr, _int],
    "rotary": [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _i64, _ptr, _int],
    "silu_mul": [_ptr, _i64, _i64, _i64, _ptr, _int],
}


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.cache
def load() -> ctypes.CDLL | None:
    """The built kernel library, or None (logged once) where it is off or cannot be built here."""
    if not ENABLED:
        return None
    cc = _compiler()
    if cc is None:
        log.info("no C compiler on PATH: the CPU kernels are off (decode attention gathers the context and "
                 "runs SDPA)")
        return None
    with tempfile.TemporaryDirectory(prefix="loom-kernels-") as tmp:
        library = Path(tmp) / "loom_cpu_kernels.so"
        try:
            built = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", str(library), "-lm"],
                                   capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            built = subprocess.CompletedProcess([], 1, "", str(e))
        if built.returncode != 0:
            reason = (built.stderr.strip().splitlines() or ["no output"])[-1]
            log.warning("cannot build the CPU kernels (%s): using the torch ops", reason)
            return None
        lib = ctypes.CDLL(str(library))  # mapped now; the file can go
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
    lib.paged_decode.restype = ctypes.c_int
    return lib


def runs_on(x: torch.Tensor) -> bool:
    """Whether the fused kernels take `x` (a CPU float32 tensor, where the library is built)."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and load() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' float32 RMSNorm over the last dimension; x's rows must each be contiguous (a 2-D view
    with unit column stride, or any contiguous tensor)."""
    n = x.shape[-1]
    rows = x if x.dim() == 2 else x.reshape(-1, n)
    out = torch.empty(x.shape, dtype=x.dtype)
    load().rms_norm(rows.data_ptr(), rows.shape[0], n, rows.stride(0), weight.data_ptr(), eps, out.data_ptr(),
                    torch.get_num_threads())
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """shard.rope.apply_rotary on x [T, heads, head_dim] whose heads are contiguous (a view of a fused qkv
    output); cos, sin: contiguous [T, 1, rotary_dim]."""
    tokens, heads, dim = x.shape
    out = torch.empty(x.shape, dtype=x.dtype)
    load().rotary(x.data_ptr(), tokens, heads, dim, x.stride(0), cos.data_ptr(), sin.data_ptr(), cos.shape[-1],
                  out.data_ptr(), torch.get_num_threads())
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2 * n] = [gate | up] whose rows are contiguous -> [T, n]."""
    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, n, dtype=gate_up.dtype)
    load().silu_mul(gate_up.data_ptr(), rows, n, gate_up.stride(0), out.data_ptr(), torch.get_num_threads())
    return out


def paged_decode_attention_cpu(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                               context_lens: torch.Tensor, block_size: int, scale: float,
                               sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """paged_decode_attention's contract (shard/kernels/paged_attention.py) on CPU float32 tensors: q [B, heads,
    head_dim] -> [B, heads, head_dim]; kv_cache [2, num_slots, kv_heads, head_dim]; block_tables [B, max_blocks];
    context_lens [B], counting the new token. Only call it when load() returned a library."""
    batch, num_heads, head_dim = q.shape
    assert q.dtype == kv_cache.dtype == torch.float32 and kv_cache.is_contiguous()
    q = q.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = context_lens.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    failed = load().paged_decode(
        q.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), tables.data_ptr(), lens.data_ptr(), batch,
        tables.shape[1], num_heads, kv_cache.shape[2], head_dim, block_size, scale, sliding_window or 0,
        softcap or 0.0, torch.get_num_threads(), out.data_ptr())
    if failed:
        raise MemoryError("CPU decode attention: out of memory for a context's scores")
    return out
