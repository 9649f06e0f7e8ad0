"""The CPU twin of the Triton decode kernel: paged_attention_cpu.c reads each sequence's context straight from
the paged KV cache, where the torch path first gathers it into a padded copy and then runs SDPA over it (on a
2-core CPU that copy and the second read were half of a batch-64 decode step).

The C source is built once per process, when the engine starts, with the C compiler on PATH ($CC, else cc or
gcc; -march=native is safe because it is built where it runs), and called through ctypes, which releases the
GIL. Without a compiler (a slim image), or when the build fails, `load()` returns None and decode attention
stays on the torch path; nothing is compiled while requests are served. Float32 only.
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

SOURCE = Path(__file__).with_name("paged_attention_cpu.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, ctypes.c_float, _i64,
             ctypes.c_float, ctypes.c_int, _ptr]


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.cache
def load() -> ctypes.CDLL | None:
    """The built kernel library, or None (logged once) where it cannot be built here."""
    cc = _compiler()
    if cc is None:
        log.info("no C compiler on PATH: CPU decode attention gathers the context and runs SDPA")
        return None
    with tempfile.TemporaryDirectory(prefix="loom-kernel-") as tmp:
        library = Path(tmp) / "paged_attention_cpu.so"
        try:
            built = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(library), "-lm"], capture_output=True,
                                   text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            built = subprocess.CompletedProcess([], 1, "", str(e))
        if built.returncode != 0:
            reason = (built.stderr.strip().splitlines() or ["no output"])[-1]
            log.warning("cannot build the CPU decode attention kernel (%s): using gather + SDPA", reason)
            return None
        lib = ctypes.CDLL(str(library))  # mapped now; the file can go
    lib.paged_decode.argtypes = _ARGTYPES
    lib.paged_decode.restype = ctypes.c_int
    return lib


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
