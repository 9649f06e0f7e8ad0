"""The Triton kernels against their torch twins on random inputs, shared by the kernel tests (on CPU through
Triton's interpreter) and the GPU kit (bench/gpu_check, natively on CUDA).

Each check draws fresh inputs from its seed, asserts the kernel's output close to the torch path's and
returns the errors: {"rel_error": |got - want| / |want| (norms), "max_abs_error"}. In float32 the torch path
runs on the same inputs and the outputs must agree elementwise to a few ulps of the largest terms; in bfloat16
it runs in float32 on the same (rounded) inputs and the relative error must stay under BF16_REL_ERROR (bf16
operands land between 1e-3 and 1e-2).
"""

from __future__ import annotations

import random

import torch

PAGE_RANK = 8
BLOCK_SIZE = 16
BF16_REL_ERROR = 1e-2
# (seed, heads, kv heads, head_dim, sliding window, soft-cap) of the decode attention checks.
DECODE_CASES = [
    (0, 4, 4, 16, None, None),
    (1, 8, 2, 24, None, None),  # GQA, head_dim not a power of two
    (2, 4, 1, 16, 20, None),  # sliding window shorter than most contexts
    (3, 6, 3, 8, 40, None),
    (4, 8, 2, 16, None, 2.0),  # soft-capped scores (random q/k: many far past the cap)
    (5, 4, 2, 24, 20, 5.0),  # soft-cap with a sliding window
]


def compare(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4, atol: float = 5e-5) -> dict:
    """The errors of `got` against `want`; asserts them as the module docstring says (float32: rtol/atol)."""
    diff = (got.float() - want.float())
    errors = {"rel_error": float(diff.norm() / want.float().norm().clamp_min(1e-30)),
              "max_abs_error": float(diff.abs().max()) if diff.numel() else 0.0}
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want.to(got.dtype), rtol=rtol, atol=atol)
    else:
        assert errors["rel_error"] < BF16_REL_ERROR, errors
    return errors


def _sgmv_reference(x, y, pool, a_offset, b_offset, in_size, out_size, table, segments, pages):
    out = y.float().clone()
    for s, tokens in enumerate(segments):
        used = pool[table[s, :pages[s]]].float()
        a = used[:, a_offset:a_offset + PAGE_RANK * in_size].reshape(-1, in_size)  # [W*R, in]
        bt = used[:, b_offset:b_offset + PAGE_RANK * out_size].reshape(-1, out_size)  # [W*R, out]
        out[tokens] += (x[tokens].float() @ a.T) @ bt
    return out


def check_sgmv(seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32, padded: bool = False) -> dict:
    """sgmv_lora on random segments, ranks and page tables, y a column slice of a fused output. `padded`: the
    layout of a padded decode step: empty segments past the real ones, a grid for more rows than any segment
    has, and table entries past each segment's pages that hold other adapters' pages (never to be read)."""
    from shard.kernels.sgmv import sgmv_lora

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    in_size, out_size = rng.choice([(40, 24), (64, 96), (33, 17)])
    num_pages = 7
    a_offset = 5  # the projection's place inside a page, as PageLayout puts it
    b_offset = a_offset + PAGE_RANK * in_size
    pool = torch.randn(num_pages + 1, b_offset + PAGE_RANK * out_size + 3, generator=gen)
    pool[0] = 0  # page 0 pads short page tables
    tokens = list(range(rng.randint(6, 40)))
    rng.shuffle(tokens)
    segments, table, pages = [], [], []
    width = rng.randint(1, 3) + (2 if padded else 0)
    while tokens and len(segments) < 5:
        take = rng.randint(1, min(len(tokens), 18))
        segments.append(sorted(tokens[:take]))
        tokens = tokens[take:]
        own = rng.sample(range(1, num_pages + 1), rng.randint(1, width - (2 if padded else 0)))
        filler = [rng.randrange(1, num_pages + 1) if padded else 0 for _ in range(width - len(own))]
        table.append(own + filler)
        pages.append(len(own))
    total = max(max(s) for s in segments) + 1 + len(tokens)  # leftover tokens: base-model rows
    x = torch.randn(total, in_size, generator=gen)
    fused = torch.randn(total, out_size + 11, generator=gen)
    pool, x, fused = (t.to(device, dtype) for t in (pool, x, fused))
    y = fused[:, 3:3 + out_size]  # y is a column slice of a fused projection's output
    table_t = torch.tensor(table)
    want = _sgmv_reference(x, y, pool, a_offset, b_offset, in_size, out_size, table_t, segments, pages)
    lens = [len(s) for s in segments]
    starts = [sum(lens[:i]) for i in range(len(lens))]
    longest = max(lens)
    if padded:
        empty = rng.randint(1, 3)
        table += [[rng.randrange(1, num_pages + 1)] * width for _ in range(empty)]
        lens, starts, pages = lens + [0] * empty, starts + [sum(lens)] * empty, pages + [0] * empty
        longest = total
    as_tensor = lambda v: torch.tensor(v, device=device)  # noqa: E731
    before = y.clone()
    sgmv_lora(x, y, pool, a_offset, b_offset, PAGE_RANK, as_tensor(table), as_tensor([t for s in segments for t in s]),
              as_tensor(starts), as_tensor(lens), as_tensor(pages), longest)
    untouched = sorted(set(range(total)) - {t for s in segments for t in s})
    assert torch.equal(y[untouched], before[untouched]), "rows of no segment were written"
    # float32 sums in another order than the reference: a few ulps of the largest terms.
    return compare(y, want)


def check_triton_lora_batch(seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """The engine's two LoRA hooks agree on every projection: TritonLoraBatch (CUDA, opt-in) reading pool
    pages against LoraBatch (the default) over AdapterStacks. Returns the worst errors over projections."""
    from shard.lora import TARGETS, PageLayout, ProjShape
    from shard.lora_batch import AdapterStacks, LoraBatch, TritonLoraBatch

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    shapes = {p: ProjShape(i, o, 0, i, 0, o) for p, (i, o) in zip(TARGETS, [(24, 24), (24, 8), (24, 8), (24, 24),
                                                                             (24, 40), (24, 40), (40, 24)])}
    layout = PageLayout.build(2, PAGE_RANK, shapes)
    pool = torch.randn(9, layout.page_numel, generator=gen).to(device, dtype)
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
    by_id = dict(zip(ids, segments))

    def torch_hook(pages: torch.Tensor) -> LoraBatch:
        stacks = AdapterStacks(layout, layout.views(pages), 1 << 20)
        order = stacks.arrange(dict(zip(ids, tables)), targets)
        return LoraBatch(stacks, [by_id[a] for a in order], targets, num_tokens, torch.device(device))

    reference = torch_hook(pool.float())  # float32 (in float32: the same pool)
    triton_hook = TritonLoraBatch.from_segments(pool, layout, segments, tables, targets, torch.device(device))
    worst = {"rel_error": 0.0, "max_abs_error": 0.0}
    for layer in range(2):
        for proj in TARGETS:
            x = torch.randn(num_tokens, shapes[proj].in_size, generator=gen).to(device, dtype)
            y = torch.randn(num_tokens, shapes[proj].out_size, generator=gen).to(device, dtype)
            want = reference.apply(layer, proj, x.float(), y.clone().float())
            errors = compare(triton_hook.apply(layer, proj, x, y.clone()), want, rtol=1e-5, atol=1e-5)
            worst = {k: max(worst[k], errors[k]) for k in worst}
    return worst


def check_decode(kernel: str, seed: int, num_heads: int, num_kv_heads: int, head_dim: int, window: int | None,
                 softcap: float | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """A paged decode kernel (`kernel`: "module.function") against the torch decode path (gather + SDPA per
    width group) over random block tables and context lengths. Every cache row no sequence owns holds NaN (a
    freed block keeps what its last owner wrote, a diverged adapter's NaN included): both paths mask by
    selection, so the output stays finite."""
    import importlib

    from shard.attention import PagedAttention, decode_metadata

    module, name = kernel.rsplit(".", 1)
    kernel_fn = getattr(importlib.import_module(module), name)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_blocks, batch = 24, rng.randint(1, 6)
    cache = torch.randn(2, num_blocks * BLOCK_SIZE, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    lens = [rng.randint(1, 5 * BLOCK_SIZE) for _ in range(batch)]
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // BLOCK_SIZE))] for n in lens]
    owned = torch.zeros(num_blocks * BLOCK_SIZE, dtype=torch.bool)
    for table, n in zip(tables, lens):
        for pos in range(n):
            owned[table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE] = True
    cache[:, ~owned.to(cache.device)] = float("nan")
    q = torch.randn(batch, num_heads, head_dim, generator=gen).to(device, dtype)
    attention = PagedAttention(num_heads, num_kv_heads, head_dim, window, softcap=softcap)

    slots = torch.zeros(batch, dtype=torch.long, device=device)
    want = attention._decode(q.float(), decode_metadata(tables, lens, slots, BLOCK_SIZE, window), cache.float())
    meta = decode_metadata(tables, lens, slots, BLOCK_SIZE, window, kernel=kernel_fn)
    assert meta.decode_groups == []  # the kernel reads the cache in place: no gathered groups are built
    assert torch.isfinite(want).all()
    return compare(attention._decode(q, meta, cache), want, rtol=1e-5, atol=1e-5)
