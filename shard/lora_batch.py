"""Batched heterogeneous LoRA: one step's adapters applied to one flattened batch.

Weights come from the adapter pool (shard/adapter_cache.py) either through AdapterStacks (the running
adapters' rows kept dense across steps in a buffer of fixed size) or, when they do not fit it, gathered from
the pool per projection (PageGather). LoraBatch runs the torch path on either; TritonLoraBatch (CUDA, opt-in)
reads pool pages directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shard.lora import PageLayout

# A padded batch (every segment as long as the longest) may hold at most this many times the real rows;
# past that each segment runs on its own (a long prompt beside short ones would otherwise pad them all).
MAX_PADDING_FACTOR = 2
# A segment whose tokens come in runs at least this long on average (an adapter's prompts, which the engine puts
# side by side) is computed on row slices of x and y: no gathering into segments and back.
RUN_ROWS = 16


class AdapterStacks:
    """Each targeted (layer, projection)'s LoRA rows of the adapters in the current step, adapter-major and
    dense: A as [slots, R, in], B as [slots, R, out], R = `width` pages of rank (narrower adapters read the
    pool's zero page past their own). A step's adapters hold slots 0..n-1, so bmm reads them as one batch.

    Memory: one buffer of `budget_bytes`, allocated once (at warmup, inside the adapter memory budget) and
    carved into views; steps never allocate. The layout (width, projections) only grows (until reset): a step
    needing a wider rank or another projection re-carves the buffer for the union, so prefill and decode steps
    with different widths share one layout. When even the step's own needs do not fit, arrange returns None and
    the caller gathers from the pool instead. Slots outlive the step: an adapter joining or leaving costs
    copying that adapter's rows (and moving one other into the hole it leaves). The adapter cache drops an
    adapter whose pool pages it frees."""

    __slots__ = ("layout", "views", "buffer", "width", "targets", "capacity", "slots", "a", "b")
    ragged = False  # weights() is always [n, R, ...]: every adapter padded to the layout's width

    def __init__(self, layout: PageLayout, views: list[dict[str, tuple[torch.Tensor, torch.Tensor]]],
                 budget_bytes: int):
        self.layout, self.views = layout, views
        like = next(iter(views[0].values()))[0] if views else torch.empty(0)
        self.buffer = torch.empty(budget_bytes // like.element_size(), dtype=like.dtype, device=like.device)
        self.reset()

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def drop(self, adapter_id: str) -> None:
        self.slots.pop(adapter_id, None)

    def reset(self) -> None:
        """Back to no layout and no slots, as allocated (the buffer stays): the next step lays it out for its
        own adapters only."""
        self.width, self.targets, self.capacity = 0, (), 0
        self.slots: dict[str, int] = {}
        self.a: dict[tuple[int, str], torch.Tensor] = {}
        self.b: dict[tuple[int, str], torch.Tensor] = {}

    def _fits(self, width: int, targets: tuple[str, ...], n: int) -> bool:
        return n * self.layout.rows_numel(width, targets) <= self.buffer.numel()

    def arrange(self, pages: dict[str, list[int]], targets: set[str]) -> list[str] | None:
        """Makes slots 0..n-1 hold exactly the adapters of `pages` (id -> its pool pages) for `targets`; returns
        the ids in slot order, or None when the buffer cannot hold them."""
        n, width = len(pages), max(len(p) for p in pages.values())
        wanted = tuple(p for p in self.layout.shapes if p in targets)
        if width > self.width or not set(wanted) <= set(self.targets) or n > self.capacity:
            union = tuple(p for p in self.layout.shapes if p in targets or p in self.targets)
            if self._fits(max(width, self.width), union, n):
                self._carve(max(width, self.width), union)
            elif self._fits(width, wanted, n):
                self._carve(width, wanted)
            else:
                return None
        for adapter_id in [a for a in self.slots if a not in pages]:
            del self.slots[adapter_id]
        holes = sorted(set(range(n)) - set(self.slots.values()))
        movers = [a for a, slot in self.slots.items() if slot >= n]
        if movers:
            src = [self.slots[a] for a in movers]
            for adapter_id, hole in zip(movers, holes):
                self.slots[adapter_id] = hole
            self._move(src, holes[:len(movers)])
        new = [a for a in pages if a not in self.slots]
        if new:
            self._copy_in([pages[a] for a in new], holes[len(movers):])
            self.slots.update(zip(new, holes[len(movers):]))
        return sorted(pages, key=self.slots.__getitem__)

    def _carve(self, width: int, targets: tuple[str, ...]) -> None:
        """Lays the buffer out for `width` pages of rank on `targets`, as many slots as fit; every adapter
        leaves its slot (its rows are copied in again from the pool)."""
        self.capacity = self.buffer.numel() // self.layout.rows_numel(width, targets)
        self.width, self.targets, self.slots = width, targets, {}
        self.a, self.b = {}, {}
        rows, offset = width * self.layout.page_rank, 0
        for layer in range(self.layout.num_layers):
            for proj in targets:
                s = self.layout.shapes[proj]
                for stacks, size in ((self.a, s.in_size), (self.b, s.out_size)):
                    numel = self.capacity * rows * size
                    stacks[layer, proj] = self.buffer[offset:offset + numel].view(self.capacity, rows, size)
                    offset += numel

    def _pool_views(self):
        """(stacks dict, (layer, projection), its pool pages view) for every A and B laid out."""
        for layer, proj in self.a:
            a_pages, b_pages = self.views[layer][proj]
            yield self.a, (layer, proj), a_pages
            yield self.b, (layer, proj), b_pages

    def _move(self, src: list[int], dst: list[int]) -> None:
        device = self.buffer.device
        src_t, dst_t = (torch.tensor(s, device=device) for s in (src, dst))
        for stacks in (self.a, self.b):
            for t in stacks.values():
                t.index_copy_(0, dst_t, t.index_select(0, src_t))

    def _copy_in(self, page_tables: list[list[int]], slots: list[int]) -> None:
        flat = _flat_pages(page_tables, self.width, self.buffer.device)
        slots_t = torch.tensor(slots, device=self.buffer.device)
        rows = self.width * self.layout.page_rank
        for stacks, key, pages in self._pool_views():
            stacks[key].index_copy_(0, slots_t, pages.index_select(0, flat).view(len(slots), rows, -1))

    def weights(self, layer_idx: int, proj: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a[layer_idx, proj][:n], self.b[layer_idx, proj][:n]


def _runs(tokens: list[int]) -> list[slice]:
    """`tokens` (ascending) as slices of consecutive rows."""
    runs, start = [], 0
    for j in range(1, len(tokens) + 1):
        if j == len(tokens) or tokens[j] != tokens[j - 1] + 1:
            runs.append(slice(tokens[start], tokens[j - 1] + 1))
            start = j
    return runs


def _flat_pages(page_tables: list[list[int]], width: int, device: torch.device) -> torch.Tensor:
    """Page ids, each table padded to `width` with the pool's zero page 0."""
    return torch.tensor([p for t in page_tables for p in t + [0] * (width - len(t))], device=device)


class PageGather:
    """AdapterStacks' weights() read straight from the pool, one projection at a time: no memory held across
    steps (a transient of one projection's stack), more copying per step. For steps whose adapters do not fit
    the stacks' buffer. Padding every adapter to the widest would copy more pages than the pool holds when
    ranks differ widely (one rank-64 adapter beside a hundred rank-8 ones), past what the warmup measured (a
    pool-full step): such a step is `ragged`, each adapter read at its own width and run as its own segment,
    so that a projection never copies more than `max_pages` pages."""

    def __init__(self, views: list[dict[str, tuple[torch.Tensor, torch.Tensor]]], page_rank: int,
                 page_tables: list[list[int]], device: torch.device, max_pages: int):
        self.views, self.n = views, len(page_tables)
        width = max(len(t) for t in page_tables)
        self.ragged = self.n * width > max_pages
        self.rows = width * page_rank
        if self.ragged:
            self.flats = [torch.tensor(t, device=device) for t in page_tables]
        else:
            self.flat = _flat_pages(page_tables, width, device)

    def weights(self, layer_idx: int, proj: str, n: int):
        """[n, rows, in] and [n, rows, out]; ragged: lists of each adapter's [its rows, in] and [its rows, out]."""
        a_pages, b_pages = self.views[layer_idx][proj]
        if self.ragged:
            return tuple([p.index_select(0, f).view(-1, p.shape[-1]) for f in self.flats[:n]]
                         for p in (a_pages, b_pages))
        return tuple(p.index_select(0, self.flat).view(self.n, self.rows, -1)[:n] for p in (a_pages, b_pages))


class LoraBatch:
    """One step's LoRA: implements model.LoraHook for a batch where every sequence has its own adapter or
    none. Tokens are grouped into one segment per adapter (segment i uses weights slot i). When the segments
    are short runs of rows (decode) each projection does a fixed handful of ops whatever the number of
    adapters: shrink and expand with two bmm over segments padded to the longest, then gather the deltas back
    into token order (base-model rows read a zero row) to add them. When the segments are long runs of rows
    (prompts), or padding would more than double the rows, each segment runs on its own, unpadded: on slices
    of rows where its runs are long, else on its gathered rows."""

    def __init__(self, source: AdapterStacks | PageGather, segments: list[list[int]], targets: set[str],
                 num_tokens: int, device: torch.device):
        n, longest = len(segments), max(len(s) for s in segments)
        self.source, self.targets = source, targets
        self.num_segments, self.length = n, longest
        order = [t for s in segments for t in s]
        runs = [_runs(s) for s in segments]
        long_runs = len(order) >= RUN_ROWS * sum(map(len, runs))
        self.per_segment = source.ragged or long_runs or n * longest > MAX_PADDING_FACTOR * len(order)
        if self.per_segment:
            self.segment_rows = [r if len(s) >= RUN_ROWS * len(r) else torch.tensor(s, device=device)
                                 for s, r in zip(segments, runs)]
            return
        self.src = torch.tensor(order, device=device)
        self.dense = all(len(s) == longest for s in segments)
        # Segments that are the leading rows in order, all of one length (decode rows grouped by adapter, as
        # the engine orders them): the token rows are the segments themselves, no packing and no gathering back.
        self.in_place = self.dense and order == list(range(len(order)))
        self.dst = self.pad = None
        if not self.dense:
            self.dst = torch.tensor([i * longest + j for i, s in enumerate(segments) for j in range(len(s))],
                                    device=device)
            self.pad = torch.tensor([i * longest + j for i, s in enumerate(segments) for j in range(len(s), longest)],
                                    device=device)
        # Each token's row in the segment-major deltas; base-model tokens read the zero row past them. A gather
        # then a dense add is far cheaper on CPU than index_add_'s scatter.
        rows = n * longest
        back = [rows] * num_tokens
        for i, s in enumerate(segments):
            for j, t in enumerate(s):
                back[t] = i * longest + j
        self.back = torch.tensor(back, device=device)
        self._x: torch.Tensor | None = None
        self._xs: torch.Tensor | None = None

    @property
    def packed_rows(self) -> int:
        """Rows of the largest activation buffer one projection packs (the LoRA transient, in rows)."""
        return self.length if self.per_segment else self.num_segments * self.length

    def _segments(self, x: torch.Tensor) -> torch.Tensor:
        # q/k/v (and gate/up) share one input: pack it into segments once. Only padding rows are zeroed (`back`
        # never reads their results, but uninitialised memory could hold anything).
        if x is not self._x:
            rows = x[:self.src.numel()] if self.in_place else x.index_select(0, self.src)
            if not self.dense:
                packed = x.new_empty(self.num_segments * self.length, x.shape[1])
                rows = packed.index_fill_(0, self.pad, 0).index_copy_(0, self.dst, rows)
            self._x, self._xs = x, rows.view(self.num_segments, self.length, -1)
        return self._xs

    def apply(self, layer_idx: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if proj not in self.targets:
            return y
        n = self.num_segments
        a, b = self.source.weights(layer_idx, proj, n)
        if self.per_segment:
            for i, rows in enumerate(self.segment_rows):
                if isinstance(rows, list):  # runs of rows: slices of x and y
                    for run in rows:
                        y[run].addmm_(x[run] @ a[i].t(), b[i])
                else:
                    y.index_add_(0, rows, (x.index_select(0, rows) @ a[i].t()) @ b[i])
            return y
        rows = n * self.length
        shrunk = torch.bmm(self._segments(x), a.transpose(1, 2))
        if self.in_place:
            out = y[:rows].view(n, self.length, -1)
            # q/k/v and gate/up are column slices of one fused output: batched BLAS cannot write those in place.
            if n == 1 or y.is_contiguous():
                out.baddbmm_(shrunk, b)
            else:
                out.add_(torch.bmm(shrunk, b))
            return y
        delta = y.new_empty(rows + 1, y.shape[1])
        delta[rows].zero_()
        torch.bmm(shrunk, b, out=delta[:rows].view(n, self.length, -1))
        return y.add_(delta.index_select(0, self.back))


@dataclass(slots=True)
class TritonLoraBatch:
    """LoraBatch's contract on CUDA through the Triton SGMV kernels (shard/kernels/sgmv.py), which read each
    segment's adapter pages straight out of the pool: no stacks, no packing. Opt-in with LOOM_TRITON_LORA=1
    until verified on a GPU; tested against LoraBatch on CPU under Triton's interpreter. The padded decode
    (shard/decode_graphs.py) builds one over its fixed buffers, with empty segments past the step's adapters."""

    pool: torch.Tensor
    layout: PageLayout
    targets: set[str]
    table: torch.Tensor  # [S, W] each segment's pool pages, padded with the zero page 0
    pages: torch.Tensor  # [S] pages of each segment's adapter (the kernels skip the padding)
    tokens: torch.Tensor  # the rows of every segment, segment after segment
    starts: torch.Tensor  # [S] where each segment's rows start in `tokens`
    lens: torch.Tensor  # [S] each segment's rows
    longest: int  # >= every lens[s]

    @classmethod
    def from_segments(cls, pool: torch.Tensor, layout: PageLayout, segments: list[list[int]],
                      page_tables: list[list[int]], targets: set[str], device: torch.device) -> TritonLoraBatch:
        width = max(len(t) for t in page_tables)
        lens = [len(s) for s in segments]
        table = [t + [0] * (width - len(t)) for t in page_tables]
        starts = [sum(lens[:i]) for i in range(len(lens))]
        tensors = [torch.tensor(v, device=device) for v in (table, [len(t) for t in page_tables],
                                                             [t for s in segments for t in s], starts, lens)]
        return cls(pool, layout, targets, *tensors, max(lens))

    def apply(self, layer_idx: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if proj not in self.targets:
            return y
        from shard.kernels.sgmv import sgmv_lora

        a_offset, b_offset = self.layout.offsets[layer_idx, proj]
        return sgmv_lora(x, y, self.pool, a_offset, b_offset, self.layout.page_rank, self.table, self.tokens,
                         self.starts, self.lens, self.pages, self.longest)
