"""Adapter resolution: a request's `model` / `adapter_id` → an adapter the shards have registered.

Order (DESIGN.md): "" or the base model id → base; a `--adapter NAME=SOURCE` name; an id whose form a source
claims (an absolute path inside a `--local-adapter-root`, an `s3://bucket/prefix`); otherwise the request's
`adapter_source` or --adapter-source (default: a hub repo id, `org/name[@revision]`). Sources (router/sources/)
fetch in a thread, and concurrent requests for one new adapter share a single load.

Every spelling of one directory (`/r/a`, `/r/a/./`, `/r//a`, a hub id and its `@main`) is one adapter: the
registry keys adapters by their real directory, so a client cannot multiply loads, `/v1/models` entries or
active-adapter slots. A fetched version is its own directory (a hub `snapshots/<commit>`, an object store's
listing): when a branch moves, the new version is a new adapter beside the old one, never a replacement under
its id. The source and the credentials are checked on every request, cache hit or not.

An adapter's id (the key the shards know it by, what `/v1/models` lists and metrics show) is its --adapter or
runtime name, else the spelling the client first used (a path as written, never its resolved target), made
unique: a spelling that already names another directory gets the version's ref (`org/name@<commit>`) or `#<n>`.
Its files are read once, at registration, by router/adapter_files.py.

Operators add names at start-up (`--adapter`, `--preloaded-adapter-ids`) and at run time (`register` /
`unregister`, vLLM's load/unload routes in router/adapter_api.py). A runtime name may be loaded again in place
(`load_inplace`): the new weights are registered on the shards under a fresh id, the name points at them for
every request from then on, and the old load is unloaded once no request holds it (queued or running requests
keep the weights they were admitted with). Its KV never serves the new load: the cache key is per load.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.limits import MAX_MODEL_ID_CHARS
from router.adapter_files import AdapterFileError, read_adapter_files
from router.adapter_retire import retire, unload_once_released
from router.errors import APIError, redact_paths
from router.metrics import Metrics
from router.shard_client import ShardClient
from router.sources import AdapterSource, Located
from router.tokenization import ModelTokenizer, load_adapter_tokenizer

log = logging.getLogger("loom.adapters")

MAX_ALIASES = 4096  # spellings remembered (LRU); a forgotten one is resolved again, to the same adapter
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Characters an id may not carry into a metric label: the picker splits adapter lists at commas.
_LABEL_UNSAFE = re.compile(r"[%,\s\x00-\x1f\x7f-\x9f\u2028\u2029\"\\]")


@dataclass(slots=True)
class Adapter:
    id: str  # the key shards know it by: a name, a path as written, a source's ref (`name#<n>` when reloaded)
    path: Path  # its real directory (never shown to clients)
    rank: int
    pages: int  # adapter-pool pages it takes when it joins the batch (0 when preloaded: held for good)
    tokenizer: ModelTokenizer  # its own tokenizer / chat template, else the base model's
    created: int
    preloaded: bool = False  # --preloaded-adapter-ids: resident for good, never unloaded
    # Unique to this load: KV computed under it is cached under this key, so a name that is loaded again (other
    # weights, same name) never reuses the old KV.
    cache_key: str = ""
    # Request credentials it may be served to; None in it: to anyone (fetched without a request's own).
    tokens: set[str | None] = field(default_factory=lambda: {None})
    name: str = ""  # what it is listed and labelled as: its id, or the name it was loaded in place under
    source: str = "local"  # the source it came from (router/sources/)
    ref: str | None = None  # the one version fetched (`org/name@<commit>`, `s3://bucket/prefix@<version>`)
    vocab_size: int = 0  # its requests' vocabulary when it brings its own embeddings (0: the model's)

    def allows(self, token: str | None) -> bool:
        return None in self.tokens or token in self.tokens

    @property
    def public(self) -> bool:
        """Served to anyone; otherwise only to requests with credentials it was fetched (or checked) with, and
        neither listed nor labelled."""
        return None in self.tokens


BASE = None  # what resolve() returns for the base model
_load_serials = itertools.count(1)


class AdapterRegistry:
    def __init__(self, base_id: str, base_tokenizer: ModelTokenizer, client: ShardClient, named: dict[str, str],
                 sources: dict[str, AdapterSource], default_source: str, pool_pages: int, metrics: Metrics,
                 max_rank: int = 0):
        self.base_id = base_id
        self.base_tokenizer = base_tokenizer
        self.client = client
        self.named = dict(named)
        self.sources = sources
        self.default_source = default_source
        self.pool_pages = pool_pages
        self.metrics = metrics
        self.max_rank = max_rank  # `--max-lora-rank`: larger adapters are refused; 0: any
        self._loaded: dict[Path, Adapter] = {}  # real directory → adapter
        self._ids: dict[str, Adapter] = {}  # id → adapter
        self._aliases: OrderedDict[tuple[str, str | None], Path] = OrderedDict()  # (spelling, source) → dir
        self._loading: dict[tuple[str, str | None], asyncio.Task] = {}
        self._registering: dict[Path, asyncio.Task] = {}  # loads under way, by directory
        self._claimed: set[str] = set()  # ids of registrations on their way to the shards
        self._current: dict[str, str] = {}  # a name loaded again in place → the id of its newest load
        self._retiring: set[asyncio.Task] = set()  # old loads waiting for their last request

    async def resolve(self, name: str | None, source: str | None = None, api_token: str | None = None,
                      param: str = "model") -> Adapter | None:
        """The adapter `name` denotes (loading it on first use), or None for the base model."""
        if name in (None, "", self.base_id):
            return BASE
        _check_name(name, param)
        if source is not None and source not in self.sources:
            raise APIError(400, f"adapter_source {source[:32]!r} is not supported: use one of "
                           f"{', '.join(map(repr, self.sources))}", param="adapter_source")
        token = self._caller(name, source, api_token)
        key = (name, source)
        adapter = self._named(name)  # a name keeps its directory until it is loaded again in place
        adapter = adapter or self._loaded.get(self._aliases.get(key))
        if adapter is None:
            adapter = await self._load_once(key, lambda: self._load(name, source, token, param))
        else:
            self._aliases.move_to_end(key)
        if not adapter.allows(token):
            await self._verify_access(adapter, name, token, param)
        return adapter

    def listed(self) -> list[dict]:
        """`/v1/models` entries: named adapters and every public adapter loaded so far (one per directory)."""
        ids = list(self.named) + [i for i, a in self._ids.items()
                                  if i not in self.named and a.public and a.name == i]
        found = {i: self._named(i) or self._ids.get(i) for i in ids}
        return [{"id": i, "object": "model", "created": a.created if a else 0, "owned_by": "loom",
                 "parent": self.base_id} for i, a in found.items()]

    def label(self, adapter_id: str) -> str | None:
        """How metrics name an adapter: its id with `%`, commas, whitespace, quotes and control characters
        percent-encoded (no id can read as two); None for an adapter that is not public."""
        adapter = self._ids.get(adapter_id)
        if adapter is None or not adapter.public:
            return None
        return _LABEL_UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), adapter.name)

    def get(self, adapter_id: str) -> Adapter | None:
        """The registered adapter known to the shards as `adapter_id`."""
        return self._ids.get(adapter_id)

    # -- at start-up and at run time (router/adapter_api.py) ------------------------------------------

    async def preload(self, ids: list[str]) -> None:
        """--preloaded-adapter-ids: each resolved like a request's adapter id and paged into the pool for good.
        Their pages leave `pool_pages`, the part of the pool that admission shares out."""
        for name in ids:
            _check_name(name, "--preloaded-adapter-ids")
            await self._load(name, None, None, "--preloaded-adapter-ids", preloaded=True)

    async def register(self, name: str, source: str, inplace: bool = False,
                       users: Callable[[str], int] | None = None) -> Adapter:
        """`POST /v1/load_lora_adapter`: adapter `name` from `source`, an absolute path inside a
        --local-adapter-root, an `s3://` URL or a hub repo id. Served under `name` from then on, like an
        `--adapter` name. `inplace`: a name already loaded gets the new weights (`users` counts an id's
        requests, so that the old load is unloaded after its last)."""
        _check_name(name, "lora_name")
        _check_name(source, "lora_path")
        loading = any(key[0] == name for key in self._loading)
        old = self._named(name) if inplace and not loading else None
        if inplace and old is None and not loading and name in self.named and name not in self._ids:
            del self.named[name]  # a name not used yet: loading it in place is its first load
        if name in (self.base_id, "") or loading or (old is None and (name in self.named or name in self._ids)):
            raise APIError(400, f"the adapter '{name}' has already been loaded", param="lora_name")
        if old is not None and (old.preloaded or name not in self.named):
            raise APIError(400, f"the adapter '{name}' cannot be loaded in place: only runtime and --adapter "
                           "names that are not preloaded can", param="lora_name")
        located = await asyncio.to_thread(self._source(source, None, "hub").fetch, source, None, "lora_path")
        if old is not None:
            return await self._reload(name, source, located, old, users or (lambda _: 0))
        self.named[name] = str(located.path) if located.ref is None else source
        try:
            load = lambda: self._load(name, None, None, "lora_path", located=located)  # noqa: E731
            return await self._load_once((name, None), load)
        except APIError:
            self.named.pop(name, None)
            raise

    async def unregister(self, name: str, users: Callable[[str], int]) -> None:
        """`POST /v1/unload_lora_adapter`: forgets adapter `name` on the router and the shards. Refused (409)
        while `users(name)` requests hold it, so a request never loses its adapter mid-generation."""
        adapter = self._named(name) or self._ids.get(name)
        if adapter is None and name not in self.named:
            raise APIError(404, f"the adapter '{name}' cannot be found", param="lora_name", code="model_not_found")
        if adapter is not None and adapter.preloaded:
            raise APIError(400, f"the adapter '{name}' was preloaded (--preloaded-adapter-ids) and stays loaded",
                           param="lora_name")
        if count := users(adapter.id if adapter else name):
            raise APIError(409, f"the adapter '{name}' is in use by {count} request(s): unload it once they finish",
                           param="lora_name", code="adapter_in_use")
        named = self.named.pop(name, None)
        current = self._current.pop(name, None)
        if adapter is None:
            return  # a name never used: nothing on the shards
        aliases = {k: p for k, p in self._aliases.items() if p == adapter.path}
        self._forget(adapter)  # before the await: from here on new requests no longer find it
        for key in aliases:
            del self._aliases[key]
        if error := await self.client.unload_adapter(adapter.id):
            self._keep(adapter)
            self._aliases.update(aliases)
            if named is not None:
                self.named[name] = named
            if current is not None:
                self._current[name] = current
            raise APIError(409, f"the adapter '{name}' cannot be unloaded: {redact_paths(error)}",
                           param="lora_name", code="adapter_in_use")
        log.info("adapter %s unloaded", name)

    async def _reload(self, name: str, source: str, located: Located, old: Adapter,
                      users: Callable[[str], int]) -> Adapter:
        """`name` loaded again in place from `located` (its files read afresh, even from the same directory)."""
        adapter = await self._register(name, located, "lora_path", False, bound_to=None, public_name=name)
        if old.path != adapter.path and self._loaded.get(old.path) is old:
            del self._loaded[old.path]  # another spelling of the old directory loads it afresh
        for key in [k for k, p in self._aliases.items() if p == old.path]:
            del self._aliases[key]
        self._remember((name, None), adapter.path)
        self.named[name] = str(located.path) if located.ref is None else source
        self._current[name] = adapter.id
        task = asyncio.create_task(retire(self.client, old.id, users, lambda: self._retired(old)))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        log.info("adapter %s loaded in place as %s; %s goes once its requests end", name, adapter.id, old.id)
        return adapter

    def _retired(self, old: Adapter) -> None:
        """Forgets a load replaced in place, once the shards have unloaded it."""
        if self._ids.get(old.id) is old:
            del self._ids[old.id]
        if self._loaded.get(old.path) is old:
            del self._loaded[old.path]

    def _named(self, name: str) -> Adapter | None:
        """The newest load of a --adapter or runtime name, once used."""
        return self._ids.get(self._current.get(name, name)) if name in self.named else None

    async def register_derived(self, name: str, directory: Path, param: str) -> Adapter:
        """An adapter the router wrote itself from loaded ones (a merge, router/merged_adapters.py), registered on
        the shards under `name` (made unique). No spelling resolves to it and it is neither listed nor labelled:
        its owner hands it to requests and unloads it (`forget_derived`)."""
        adapter = await self._register(name, Located(directory, directory, "derived"), param, False, bound_to=None)
        adapter.tokens = set()
        return adapter

    async def forget_derived(self, adapter: Adapter) -> None:
        """Unloads a derived adapter that no request holds (once the shards have released its last sequences)."""
        self._forget(adapter)
        if error := await unload_once_released(self.client, adapter.id):
            log.warning("adapter %s could not be unloaded: %s", adapter.id, redact_paths(error))

    async def _load_once(self, key: tuple[str, str | None], load: Callable[[], Awaitable[Adapter]]) -> Adapter:
        """`load()` run once for concurrent requests naming `key`; each waits on it (shielded: a request that
        goes away does not cancel the others' load)."""
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(load())
            self._loading[key] = task
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(task)

    def _keep(self, adapter: Adapter) -> None:
        self._loaded[adapter.path] = adapter
        self._ids[adapter.id] = adapter

    def _forget(self, adapter: Adapter) -> None:
        del self._loaded[adapter.path]
        del self._ids[adapter.id]

    def _remember(self, key: tuple[str, str | None], path: Path) -> None:
        self._aliases[key] = path
        self._aliases.move_to_end(key)
        while len(self._aliases) > MAX_ALIASES:
            self._aliases.popitem(last=False)

    async def _load(self, name: str, source: str | None, token: str | None, param: str,
                    preloaded: bool = False, located: Located | None = None) -> Adapter:
        """The adapter `name` denotes, registered on the shards once per directory (`located`: where it is,
        when already known)."""
        if located is None:
            located = await asyncio.to_thread(self._locate, name, source, token, param)
        adapter = self._loaded.get(located.path)
        if adapter is None:
            task = self._registering.get(located.path)
            if task is None:  # one registration per directory, whichever spellings ask for it at once
                task = asyncio.create_task(self._register(name, located, param, preloaded, bound_to=token))
                self._registering[located.path] = task
                task.add_done_callback(lambda _: self._registering.pop(located.path, None))
            adapter = await asyncio.shield(task)
        elif located.bound:
            adapter.tokens.add(token)  # fetched just now with these credentials: they may read it
        self._remember((name, source), located.path)
        return adapter

    async def _register(self, name: str, located: Located, param: str, preloaded: bool,
                        bound_to: str | None, public_name: str | None = None) -> Adapter:
        """Reads the adapter's files once (router/adapter_files.py), builds its tokenizer, and registers it on
        the shards under a fresh id. Whatever is refused leaves nothing registered."""
        started = time.perf_counter()
        try:
            files = await asyncio.to_thread(read_adapter_files, located.path, located.root)
            files.json("adapter_config.json")  # parsed (and bounded) here, before any shard reads it
            tokenizer = await asyncio.to_thread(load_adapter_tokenizer, files, self.base_tokenizer)
        except AdapterFileError as e:
            log.warning("adapter %s (%s) refused: %s", name, located.path, e)
            raise APIError(400, f"adapter '{name}' cannot be used: {e}", param=param, code="invalid_adapter") \
                from None
        except Exception as e:  # a broken tokenizer file is this adapter's problem, named without its path
            log.warning("adapter %s: its tokenizer failed to load: %r", name, e)
            raise APIError(400, f"adapter '{name}' cannot be used: its tokenizer files cannot be loaded",
                           param=param, code="invalid_adapter") from None
        adapter_id = self._fresh_id(name, located.ref)
        self._claimed.add(adapter_id)  # no other registration takes this id while the shards load it
        try:
            error, rank, pages, vocab_size = await self.client.load_adapter(adapter_id, str(located.path), preloaded)
            refusal = self._refusal(rank, pages) if not error else None
            if refusal:
                await self.client.unload_adapter(adapter_id)
                error = refusal
        finally:
            self._claimed.discard(adapter_id)
        if error:
            raise APIError(400, f"adapter '{name}' cannot be used with this model: {redact_paths(error)}",
                           param=param, code="invalid_adapter")
        if preloaded:
            self.pool_pages -= pages
        adapter = Adapter(adapter_id, located.path, rank, 0 if preloaded else pages, tokenizer, int(time.time()),
                          preloaded, f"{adapter_id}#{next(_load_serials)}",
                          tokens={bound_to} if located.bound else {None}, name=public_name or adapter_id,
                          source=located.source, ref=located.ref, vocab_size=vocab_size)
        self._keep(adapter)
        seconds = time.perf_counter() - started
        self.metrics.adapter_loads.inc()
        self.metrics.adapter_load_seconds.observe(seconds)
        self.metrics.vllm.observe_adapter_load(seconds)
        log.info("adapter %s %s from %s (rank %d, %d pages) in %.2fs", adapter_id,
                 "preloaded" if preloaded else "loaded", located.path, rank, pages, seconds)
        return adapter

    def _refusal(self, rank: int, pages: int) -> str | None:
        """Why an adapter the shards loaded is refused all the same, if it is."""
        if pages > self.pool_pages:
            return f"it needs {pages} adapter-pool pages and the pool has {self.pool_pages}"
        if self.max_rank and rank > self.max_rank:
            return f"its rank {rank} is larger than --max-lora-rank {self.max_rank}"
        return None

    def _fresh_id(self, name: str, ref: str | None) -> str:
        """`name` (a path as written, without `.` parts or doubled slashes), unless it already names another
        adapter (a branch that moved, a link pointed elsewhere): then the version's ref (`org/name@<commit>`),
        or `name#<n>`."""
        taken = lambda i: i in self._ids or i in self._claimed  # noqa: E731
        wanted = name if name in self.named or not name.startswith("/") else str(Path(name))
        if not taken(wanted):
            return wanted
        if ref is not None and not taken(ref):
            return ref
        return next(f"{wanted}#{n}" for n in itertools.count(2) if not taken(f"{wanted}#{n}"))

    async def _verify_access(self, adapter: Adapter, name: str, token: str | None, param: str) -> None:
        """An adapter fetched with another caller's credentials: served only if its source lets this caller read
        it too. The refusal reads exactly like a missing adapter."""
        source = self.sources[adapter.source]
        await asyncio.to_thread(source.check_access, adapter.ref or adapter.id, name, token, param)
        adapter.tokens.add(token)

    def _source(self, ref: str, source: str | None, fallback: str | None = None) -> AdapterSource:
        """The source `ref` comes from: `source` when the request names one, else the one its form names,
        else `fallback` (default: --adapter-source)."""
        if source is not None:
            return self.sources[source]
        claimed = next((s for s in self.sources.values() if s.claims(ref)), None)
        return claimed or self.sources[fallback or self.default_source]

    def _caller(self, name: str, source: str | None, api_token: str | None) -> str | None:
        """The request's credentials as the source of `name` keys them (None: the server's own)."""
        if name in self.named:
            target = self.named[name]
            return None if Path(target).is_dir() else self._source(target, None, "hub").caller(api_token)
        return self._source(name, source).caller(api_token)

    def _locate(self, name: str, source: str | None, token: str | None, param: str) -> Located:
        """Where the adapter's files are on disk, fetched by its source."""
        if name in self.named:  # the operator's own --adapter NAME=SOURCE: a local dir or a source's ref
            target = self.named[name]
            if Path(target).is_dir():
                path = Path(target).resolve()
                return Located(path, path, "local")
            return self._source(target, None, "hub").fetch(target, token, param)
        return self._source(name, source).fetch(name, token, param)


def _check_name(name: str, param: str) -> None:
    if len(name) > MAX_MODEL_ID_CHARS:
        raise APIError(400, f"`{param}` is longer than {MAX_MODEL_ID_CHARS} characters", param=param)
    if _CONTROL.search(name):
        raise APIError(400, f"`{param}` must not contain control characters", param=param)
