"""The Triton SGMV kernels (the CUDA LoRA path) equal the torch LoRA math, run on CPU through Triton's
interpreter: random segments, ranks, page tables (with zero-page padding), sliced outputs.

The Triton side runs in a spawned process with the interpreter on (conftest's `interpreted`)."""

from __future__ import annotations

import random

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
    # float32 sums in another order than the reference: a few ulps of the largest terms.
    torch.testing.assert_close(y, want, rtol=1e-4, atol=5e-5)
    untouched = sorted(set(range(total)) - {t for s in segments for t in s})
    torch.testing.assert_close(y[untouched], want[untouched])


@pytest.mark.parametrize("seed", range(4))
def test_sgmv_matches_torch(interpreted, seed):
    interpreted(check_sgmv, seed)


def check_triton_lora_batch(seed: int) -> None:
    """The engine's two LoRA hooks agree on every projection: TritonLoraBatch (CUDA, opt-in) reading pool
    pages against LoraBatch (the tested default) over AdapterStacks."""
    from shard.lora import TARGETS, PageLayout, ProjShape
    from shard.lora_batch import AdapterStacks, LoraBatch, TritonLoraBatch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    shapes = {p: ProjShape(i, o, 0, i, 0, o) for p, (i, o) in zip(TARGETS, [(24, 24), (24, 8), (24, 8), (24, 24),
                                                                             (24, 40), (24, 40), (40, 24)])}
    layout = PageLayout.build(2, PAGE_RANK, shapes)
    pool = torch.randn(9, layout.page_numel)
    pool[0] = 0
    tokens = list(range(rng.randint(8, 30)))
    rng.shuffle(tokens)
    segments, tables, free = [], [], list(range(1, 9))
    rng.shuffle(free)
    while len(tokens) > 2 and len(segments) < 4:
        take = rng.randint(1, len(tokens) - 1)
        segments.append(sorted(tokens[:take]))
        tokens = tokens[take:]
        tables.append([free.pop() for _ in range(rng.randint(1, 2))])
    num_tokens = max(max(s) for s in segments + [tokens]) + 1  # leftover tokens: base-model rows
    ids = [f"a{i}" for i in range(len(segments))]
    targets = set(rng.sample(TARGETS, 4))
    stacks = AdapterStacks(layout, layout.views(pool), 1 << 20)
    order = stacks.arrange(dict(zip(ids, tables)), targets)
    by_id = dict(zip(ids, segments))
    torch_hook = LoraBatch(stacks, [by_id[a] for a in order], targets, num_tokens, torch.device("cpu"))
    triton_hook = TritonLoraBatch(pool, layout, segments, tables, targets, torch.device("cpu"))
    for layer in range(2):
        for proj in TARGETS:
            x = torch.randn(num_tokens, shapes[proj].in_size)
            y = torch.randn(num_tokens, shapes[proj].out_size)
            want = torch_hook.apply(layer, proj, x, y.clone())
            torch.testing.assert_close(triton_hook.apply(layer, proj, x, y.clone()), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_triton_lora_batch_matches_torch_lora_batch(interpreted, seed):
    interpreted(check_triton_lora_batch, seed)
