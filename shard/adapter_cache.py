"""The paged adapter cache: device pool pages <-> bounded host LRU <-> a private spill file.

The device pool is one tensor [num_pages + 1, page_numel] allocated at warmup; page 0 stays all zero and
pads adapters of smaller rank in a step's page tables. Adapters are copied into free pages when a step needs
them and evicted least-recently-used, but never while a live sequence pins them. Evicted adapters keep their
host copy while the host cache has room; past that their pages are written once to a spill file of this
process's own and read back from there. An adapter's directory is read exactly once, at registration: files
edited, swapped or linked elsewhere afterwards change nothing that is served. Each step's LoRA hook is built
here too (`lora_batch`), from the pages and stacks slots this cache owns.
"""

from __future__ import annotations

import atexit
import itertools
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shard.dora import BaseLinear, DoraHook, DoraWeights
from shard.expert_lora import ExpertLora, MoeLora
from shard.lora import AdapterError, HostAdapter, PageLayout
from shard.peft_adapter import load_adapter
from shard.lora_batch import AdapterStacks, LoraBatch, PageGather, TritonLoraBatch
from common.defaults import DEFAULT_ADAPTER_VOCAB_BYTES
from shard.vocab_adapter import VocabBatch, VocabWeights

# Share of the adapter memory budget that holds the running adapters' dense rows (AdapterStacks) on the torch
# LoRA path; the rest is pool pages. The Triton path reads pages directly and gives the pool everything.
DEFAULT_STACKS_SHARE = 0.25


@dataclass(slots=True)
class AdapterEntry:
    path: str
    rank: int
    num_pages: int
    targets: frozenset[str]
    pages: list[int] | None = None  # device pool pages while resident
    pins: int = 0  # live sequences using it
    preloaded: bool = False  # --preloaded-adapter-ids: paged in at registration and never evicted
    spilled: Path | None = None  # its pages in the spill directory, once the host cache let them go
    expert_pages: int = 0  # the trailing pages that hold expert rows (shard/expert_lora.py)
    dora: DoraWeights | None = None  # a DoRA adapter's factors (shard/dora.py), kept with the entry
    vocab: VocabWeights | None = None  # its embedding / lm_head tensors, on the device while registered

    @property
    def projection_pages(self) -> list[int]:
        """Its resident pages in the ordinary page layout (the ones before its expert pages)."""
        return self.pages[:len(self.pages) - self.expert_pages]


class AdapterCache:
    def __init__(self, layout: PageLayout, dtype: torch.dtype, device: torch.device, host_cache_bytes: int,
                 base: dict[tuple[int, str], BaseLinear] | None = None, tp_size: int = 1,
                 vocab_budget_bytes: int = DEFAULT_ADAPTER_VOCAB_BYTES):
        """`base`: the model's target weights, which DoRA adapters are read against (None: no DoRA)."""
        self.layout, self.dtype, self.device = layout, dtype, device
        self.base, self.tp_size = base, tp_size
        self.host_cache_bytes = host_cache_bytes
        # Registered adapters' vocabulary tensors (shard/vocab_adapter.py) are held on the device, whole, for as
        # long as they are registered, within this bound. A plain int: `read` checks it on the loader thread.
        self.vocab_bytes_free = vocab_budget_bytes
        self.entries: dict[str, AdapterEntry] = {}
        self.host: OrderedDict[str, torch.Tensor] = OrderedDict()  # LRU host copies, oldest first
        self.host_bytes = 0
        self.resident: OrderedDict[str, None] = OrderedDict()  # LRU device residents, oldest first
        self.pool: torch.Tensor | None = None
        self.views: list = []
        self.free_pages: list[int] = []
        self.stacks = AdapterStacks(layout, [], 0)  # the running adapters' rows, laid out for LoraBatch
        # Pool pages one adapter may take (all but the preloaded ones'); None before the pool exists. Read by
        # `read` on the loader thread, so it is kept as a plain int rather than derived from `entries`.
        self.max_adapter_pages: int | None = None
        self._spill_dir: Path | None = None
        self._spills = itertools.count()

    @property
    def num_pages(self) -> int:
        return 0 if self.pool is None else self.pool.shape[0] - 1

    @property
    def page_bytes(self) -> int:
        return self.layout.page_numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        """Device memory the adapters hold: pool pages and the stacks' buffer (what the budget bounds)."""
        pool = 0 if self.pool is None else self.pool.numel() * self.pool.element_size()
        return pool + self.stacks.nbytes

    def allocate(self, num_pages: int, stacks_bytes: int) -> None:
        """(Re)allocates the device pool and the stacks' buffer; every adapter becomes non-resident and
        unpinned."""
        self.pool, self.stacks = None, AdapterStacks(self.layout, [], 0)  # free the old ones first
        self.pool = torch.zeros(num_pages + 1, self.layout.page_numel, dtype=self.dtype, device=self.device)
        self.views = self.layout.views(self.pool)
        self.stacks = AdapterStacks(self.layout, self.views, stacks_bytes)
        self.free_pages = list(range(num_pages, 0, -1))
        self.resident.clear()
        for entry in self.entries.values():
            entry.pages, entry.pins = None, 0
        self._update_max_pages()

    def _update_max_pages(self) -> None:
        held = sum(e.num_pages for e in self.entries.values() if e.preloaded and e.path)
        self.max_adapter_pages = None if self.pool is None else self.num_pages - held

    # ---- registry and host cache ---------------------------------------------------------------------

    def read(self, adapter_id: str, path: str) -> HostAdapter:
        """Reads and checks an adapter dir into host pages. Touches no state of the cache, so it may run off the
        engine thread (a slow or large adapter then stalls no step); `register` takes its result."""
        return load_adapter(adapter_id, path, self.layout, self.dtype, self.max_adapter_pages,
                            pin_memory=self.device.type == "cuda", base=self.base,
                            max_vocab_bytes=self.vocab_bytes_free)

    def _keep_on_host(self, adapter_id: str, pages: torch.Tensor) -> None:
        self._drop_host(adapter_id)
        size = pages.numel() * pages.element_size()
        if size > self.host_cache_bytes:
            self._spill(adapter_id, pages)
            return
        self.host[adapter_id] = pages
        self.host_bytes += size
        while self.host_bytes > self.host_cache_bytes:
            oldest = next(iter(self.host))
            self._spill(oldest, self.host[oldest])
            self._drop_host(oldest)

    def _drop_host(self, adapter_id: str) -> None:
        pages = self.host.pop(adapter_id, None)
        if pages is not None:
            self.host_bytes -= pages.numel() * pages.element_size()

    def _spill(self, adapter_id: str, pages: torch.Tensor) -> None:
        """Writes a registered adapter's pages to this process's spill directory (once): what it pages in from
        after the host cache lets it go, instead of its directory."""
        entry = self.entries.get(adapter_id)
        if entry is None or entry.spilled is not None:
            return
        if self._spill_dir is None:
            self._spill_dir = Path(tempfile.mkdtemp(prefix="loom-adapter-spill-"))
            atexit.register(shutil.rmtree, self._spill_dir, True)
        entry.spilled = self._spill_dir / f"{next(self._spills)}.safetensors"
        save_file({"pages": pages.contiguous()}, str(entry.spilled))

    def _unspill(self, entry: AdapterEntry) -> None:
        if entry.spilled is not None:
            entry.spilled.unlink(missing_ok=True)
            entry.spilled = None

    def register(self, adapter_id: str, path: str, host: HostAdapter) -> AdapterEntry:
        """Registers `host` (what `read` made of `path`) under `adapter_id`, into the host cache. Registering an
        id again with another path replaces it, unless live sequences use it."""
        path = str(Path(path))
        old = self.entries.get(adapter_id)
        if old is not None and old.path == path:
            return old
        if old is not None and old.pins:
            raise AdapterError(f"adapter {adapter_id}: in use by running requests, cannot replace it")
        vocab_bytes = host.vocab.nbytes if host.vocab is not None else 0
        freed = old.vocab.nbytes if old is not None and old.vocab is not None else 0
        if vocab_bytes > self.vocab_bytes_free + freed:  # adapters registered since `read` checked it
            raise AdapterError(f"adapter {adapter_id}: its embedding and lm_head tensors take {vocab_bytes} bytes, "
                               f"more than the {self.vocab_bytes_free + freed} bytes left for adapter vocabularies "
                               "(--adapter-vocab-memory-mb)")
        if old is not None:
            self._forget(adapter_id)
        entry = AdapterEntry(path, host.rank, host.pages.shape[0], host.targets, expert_pages=host.expert_pages,
                             dora=host.dora, vocab=host.vocab.to(self.device) if host.vocab is not None else None)
        self.vocab_bytes_free -= vocab_bytes
        self.entries[adapter_id] = entry
        self._keep_on_host(adapter_id, host.pages)
        return entry

    def preload(self, adapter_id: str) -> None:
        """Pages a registered adapter in for good: eviction skips it from now on."""
        entry = self.entries[adapter_id]
        entry.preloaded = True
        if error := self.make_resident([adapter_id]).get(adapter_id):
            entry.preloaded = False
            raise AdapterError(error)
        self._update_max_pages()

    def unregister(self, adapter_id: str) -> None:
        """Forgets an adapter, its pool pages and host copy; refused while live sequences use it."""
        entry = self.entries.get(adapter_id)
        if entry is None:
            raise AdapterError(f"adapter {adapter_id!r} is not loaded on this shard")
        if entry.pins:
            raise AdapterError(f"adapter {adapter_id!r} is in use by {entry.pins} running request(s)")
        self._forget(adapter_id)

    def _forget(self, adapter_id: str) -> None:
        """Drops every copy of a registered adapter: pool pages, host pages, spill file, entry."""
        self._evict(adapter_id)
        self._drop_host(adapter_id)
        entry = self.entries.pop(adapter_id)
        self.vocab_bytes_free += entry.vocab.nbytes if entry.vocab is not None else 0
        self._unspill(entry)
        self._update_max_pages()

    # ---- device residency ----------------------------------------------------------------------------

    def _evict(self, adapter_id: str) -> None:
        entry = self.entries[adapter_id]
        if entry.pages is not None:
            self.free_pages.extend(reversed(entry.pages))
            entry.pages = None
            if entry.dora is not None:
                entry.dora.release()
            self.stacks.drop(adapter_id)
            del self.resident[adapter_id]

    def _page_in(self, adapter_id: str, entry: AdapterEntry) -> None:
        pages = self.host.get(adapter_id)
        if pages is None:  # evicted from the host cache too: back from its spill file
            try:
                pages = load_file(str(entry.spilled))["pages"]
            except Exception as e:  # the spill directory is this process's own: only a full or failing disk
                raise AdapterError(f"adapter {adapter_id!r}: its spilled pages cannot be read back ({e!r})") from None
            if self.device.type == "cuda":
                pages = pages.pin_memory()
            self._keep_on_host(adapter_id, pages)
        else:
            self.host.move_to_end(adapter_id)
        entry.pages = [self.free_pages.pop() for _ in range(entry.num_pages)]
        # Copies into pages allocated once; from pinned memory these overlap with compute on CUDA.
        for page, src in zip(entry.pages, pages):
            self.pool[page].copy_(src, non_blocking=True)
        self.resident[adapter_id] = None

    def make_resident(self, adapter_ids: list[str]) -> dict[str, str]:
        """Pages in every adapter of `adapter_ids` (in order) that is not on the device yet, evicting unpinned
        adapters not in this list. Returns an error message for each adapter that could not be made resident."""
        errors: dict[str, str] = {}
        needed = set(adapter_ids)
        for adapter_id in dict.fromkeys(adapter_ids):
            entry = self.entries.get(adapter_id)
            if entry is None:
                errors[adapter_id] = f"adapter {adapter_id!r} is not loaded on this shard (LoadAdapter it first)"
                continue
            if entry.pages is None:
                if message := self._make_room(adapter_id, entry, needed):
                    errors[adapter_id] = message
                    continue
                try:
                    self._page_in(adapter_id, entry)
                except AdapterError as e:
                    errors[adapter_id] = str(e)
        return errors

    def _make_room(self, adapter_id: str, entry: AdapterEntry, keep: set[str]) -> str:
        """Evicts LRU adapters until `entry` fits; returns an error (evicting nothing) when it cannot."""
        evictable = [a for a in self.resident
                     if self.entries[a].pins == 0 and not self.entries[a].preloaded and a not in keep]
        room = len(self.free_pages) + sum(self.entries[a].num_pages for a in evictable)
        if entry.num_pages > room:
            return (f"adapter {adapter_id!r} needs {entry.num_pages} adapter pool pages, only {room} of "
                    f"{self.num_pages} are free or held by idle adapters")
        for victim in evictable:
            if len(self.free_pages) >= entry.num_pages:
                break
            self._evict(victim)
        return ""

    @contextmanager
    def zero_adapters(self, count: int, num_pages: int) -> Iterator[list[str]]:
        """`count` adapters of `num_pages` pool pages each on every projection of the layout, resident for the
        block and yielded by id: steps run LoRA with them exactly as with real adapters, and since their pages
        are zero they add nothing (the warmup measures LoRA's memory with them). Afterwards they are gone:
        their pages free again in the order they were taken, the stacks' layout forgotten (the next step lays
        it out for its own adapters); the host cache never held them. The free pages must hold them."""
        unused = (f"warmup-{i}" for i in itertools.count() if f"warmup-{i}" not in self.entries)
        ids = list(itertools.islice(unused, count))
        for adapter_id in ids:
            self._place_zero(adapter_id, num_pages)
        try:
            yield ids
        finally:
            for adapter_id in reversed(ids):  # pages go back in the reverse order they were taken
                self._evict(adapter_id)
                del self.entries[adapter_id]
            self.stacks.reset()

    def _place_zero(self, adapter_id: str, num_pages: int) -> None:
        # No path to page it back in from: it must never be evicted while it is there.
        entry = AdapterEntry("", num_pages * self.layout.page_rank, num_pages, frozenset(self.layout.shapes),
                             preloaded=True)
        entry.pages = [self.free_pages.pop() for _ in range(num_pages)]
        self.pool.index_fill_(0, torch.tensor(entry.pages, device=self.device), 0)  # free pages may hold stale rows
        self.entries[adapter_id] = entry
        self.resident[adapter_id] = None

    def slot_order(self, adapter_ids: list[str]) -> list[str]:
        """The resident adapters among `adapter_ids` ("" is the base model) in AdapterStacks slot order, their
        rows made dense there; in order of appearance when the stacks cannot hold them all."""
        return self._arrange(adapter_ids) or list(dict.fromkeys(a for a in adapter_ids if a))

    def _arrange(self, adapter_ids: list[str]) -> list[str] | None:
        entries = {a: self.entries[a] for a in adapter_ids if a and self.entries[a].projection_pages}
        if not entries:  # no adapter on projections of the page layout (only on experts, or none)
            return None
        targets = set().union(*(e.targets for e in entries.values()))
        return self.stacks.arrange({a: e.projection_pages for a, e in entries.items()}, targets)

    def segments(self, adapter_ids: list[str], lengths: list[int]) -> dict[str, list[int]]:
        """Each adapter of a step ("" is the base model: left out) -> its rows, the tokens of its sequences,
        which hold `lengths` tokens each in batch order; in order of appearance. Marks them as just used."""
        segments: dict[str, list[int]] = {}
        offset = 0
        for adapter_id, n in zip(adapter_ids, lengths):
            if adapter_id:
                segments.setdefault(adapter_id, []).extend(range(offset, offset + n))
            offset += n
        for adapter_id in segments:
            self.resident.move_to_end(adapter_id)
        return segments

    def lora_batch(self, adapter_ids: list[str], lengths: list[int],
                   triton: bool) -> LoraBatch | TritonLoraBatch | MoeLora | None:
        """A step's LoRA hook: one segment per adapter over the tokens of its sequences, which hold `lengths`
        tokens each in batch order; None when all are the base model. Marks the adapters as just used. Adapters
        with expert pages add their expert LoRA (MoeLora around the projections' hook)."""
        if not any(adapter_ids):
            return None
        segments = self.segments(adapter_ids, lengths)
        offset = sum(lengths)
        entries = {a: self.entries[a] for a in segments}
        experts = {a: e for a, e in entries.items() if e.expert_pages}
        entries = {a: e for a, e in entries.items() if len(e.projection_pages)}
        hook = self._projection_lora(entries, segments, offset, triton) if entries else None
        dora = {a: e.dora for a, e in entries.items() if e.dora is not None}
        if dora:
            for weights in dora.values():  # every rank reaches this in the same step: finish's all-reduce lines up
                weights.finish(self.device, self.tp_size)
            hook = DoraHook(hook, [(segments[a], w.on(self.device, self.dtype)) for a, w in dora.items()],
                            self.device)
        if not experts:
            return hook
        return MoeLora(hook, ExpertLora(self.layout.experts, self.pool, [
            (segments[a], e.pages[len(e.projection_pages):], e.targets) for a, e in experts.items()], offset,
            self.device))

    def _projection_lora(self, entries: dict[str, AdapterEntry], segments: dict[str, list[int]], num_tokens: int,
                         triton: bool) -> LoraBatch | TritonLoraBatch:
        targets = set().union(*(e.targets for e in entries.values()))
        if triton:
            return TritonLoraBatch.from_segments(self.pool, self.layout, [segments[a] for a in entries],
                                                 [e.projection_pages for e in entries.values()], targets,
                                                 self.device)
        order = self._arrange(list(entries))
        source = self.stacks
        if order is None:
            order = list(entries)
            source = PageGather(self.views, self.layout.page_rank, [entries[a].projection_pages for a in order],
                                self.device, self.num_pages)
        return LoraBatch(source, [segments[a] for a in order], targets, num_tokens, self.device)

    def vocab_size(self, adapter_id: str, base: int) -> int:
        """The vocabulary of an adapter's requests (`base`: the model's, also for the base model "")."""
        entry = self.entries.get(adapter_id) if adapter_id else None
        return entry.vocab.vocab_size if entry is not None and entry.vocab is not None else base

    def vocab_batch(self, adapter_ids: list[str], lengths: list[int]) -> VocabBatch | None:
        """The vocabulary adapters of rows given as sequences (their adapter, `lengths` rows each, in order);
        None when none of them has one."""
        if not any(a and self.entries[a].vocab is not None for a in adapter_ids):
            return None
        rows = {a: r for a, r in self.segments(adapter_ids, lengths).items() if self.entries[a].vocab is not None}
        return VocabBatch([(self.entries[a].vocab, torch.tensor(r, device=self.device)) for a, r in rows.items()],
                          self.layout.vocab.vocab_size)

    def pin(self, adapter_id: str) -> None:
        self.entries[adapter_id].pins += 1

    def unpin(self, adapter_id: str) -> None:
        self.entries[adapter_id].pins -= 1

    def unpin_all(self) -> None:
        for entry in self.entries.values():
            entry.pins = 0
