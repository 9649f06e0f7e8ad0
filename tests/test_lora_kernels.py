"""The Triton SGMV kernels (the CUDA LoRA path) equal the torch LoRA math, run on CPU through Triton's
interpreter: random segments, ranks, page tables (with zero-page padding), sliced outputs.

The interpreter must be on before triton is first imported, and other test modules import it (peft does), so
the Triton side of every test runs in one fresh spawned interpreter with TRITON_INTERPRET=1."""

from __future__ import annotations

import multiprocessing
import os
import random
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

pytest.importorskip("triton")

PAGE_RANK = 8


def reference(x, y, pool, a_offset, b_offset, in_size, out_size, table, segments):
    out = y.clone()
    for s, tokens in enumerate(segments):
        pages = pool[table[s]]
        a = pages[:, a_offset:a_offset + PAGE_RANK * in_size].reshape(-1, in_size)  # [W*R, in]
        bt = pages[:, b_offset:b_offset + PAGE_RANK * out_size].reshape(-1, out_size)  # [W*R, out]
        out[tokens] += (x[tokens] @ a.T) @ bt
    return out


@pytest.fixture(scope="module")
def interpreted():
    """A spawned process with Triton's interpreter on, which runs this module's functions."""
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            yield lambda fn, *args: pool.submit(fn, *args).result()
    finally:
        del os.environ["TRITON_INTERPRET"]


def check_sgmv(seed: int) -> None:
    from shard.kernels.sgmv import sgmv_lora

    rng = random.Random(seed)
    torch.manual_seed(seed)
    in_size, out_size = rng.choice([(40, 24), (64, 96), (33, 17)])
    num_pages = 7
    a_offset = 5  # the projection's place inside a page, as PageLayout puts it
    b_offset = a_offset + PAGE_RANK * in_size
    pool = torch.randn(num_pages + 1, b_offset + PAGE_RANK * out_size + 3)
    pool[0] = 0  # page 0 pads short page tables
    tokens = list(range(rng.randint(6, 40)))
    rng.shuffle(tokens)
    segments, table = [], []
    width = rng.randint(1, 3)
    while tokens and len(segments) < 5:
        take = rng.randint(1, min(len(tokens), 18))
        segments.append(sorted(tokens[:take]))
        tokens = tokens[take:]
        pages = rng.sample(range(1, num_pages + 1), rng.randint(1, width))
        table.append(pages + [0] * (width - len(pages)))
    total = max(max(s) for s in segments) + 1 + len(tokens)  # leftover tokens: base-model rows
    x = torch.randn(total, in_size)
    fused = torch.randn(total, out_size + 11)  # y is a column slice of a fused projection's output
    y = fused[:, 3:3 + out_size]
    want = reference(x, y, pool, a_offset, b_offset, in_size, out_size, torch.tensor(table), segments)

    lens = [len(s) for s in segments]
    starts = [sum(lens[:i]) for i in range(len(lens))]
    sgmv_lora(x, y, pool, a_offset, b_offset, PAGE_RANK, torch.tensor(table), torch.tensor([t for s in segments for t in s]),
              torch.tensor(starts), torch.tensor(lens), max(lens))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    untouched = sorted(set(range(total)) - {t for s in segments for t in s})
    torch.testing.assert_close(y[untouched], want[untouched])


@pytest.mark.parametrize("seed", range(4))
def test_sgmv_matches_torch(interpreted, seed):
    interpreted(check_sgmv, seed)
