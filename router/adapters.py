"""Adapter resolution: a request's `model` / `adapter_id` → an adapter the shards have registered.

Order (DESIGN.md): "" or the base model id → base; a `--adapter NAME=SOURCE` name; an absolute path inside
a `--local-adapter-root`; otherwise a hub repo id (`org/name[@revision]`). Hub downloads run in a thread,
and concurrent requests for one new adapter share a single load.

Every spelling of one directory (`/r/a`, `/r/a/./`, `/r//a`, a hub id and its `@main`) is one adapter: the
registry keys adapters by their real directory, so a client cannot multiply loads, `/v1/models` entries or
active-adapter slots. A hub snapshot is its own directory (`snapshots/<commit>`): when a branch moves, the new
commit is a new adapter beside the old one, never a replacement under its id. The source and the token are
checked on every request, cache hit or not.

An adapter's id (the key the shards know it by, what `/v1/models` lists and metrics show) is its --adapter or
runtime name, else the spelling the client first used (a path as written, never its resolved target), made
unique: a spelling that already names another directory gets the snapshot's `@<commit>` (hub) or `#<n>`.
Its files are read once, at registration, by router/adapter_files.py.

Operators add names at start-up (`--adapter`, `--preloaded-adapter-ids`) and at run time (`register` /
`unregister`, vLLM's load/unload routes in router/adapter_api.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.hub import HubError, not_found, repo_cache_dir, snapshot, split_revision
from common.limits import MAX_MODEL_ID_CHARS
from router.adapter_files import AdapterFileError, read_adapter_files
from router.errors import APIError, redact_paths
from router.metrics import Metrics
from router.shard_client import ShardClient
from router.tokenization import ModelTokenizer, load_adapter_tokenizer

log = logging.getLogger("loom.adapters")

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "*.json", "*.jinja",
                 "*.model", "*.txt"]
SOURCES = ("hub", "local")
MAX_ALIASES = 4096  # spellings remembered (LRU); a forgotten one is resolved again, to the same adapter
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Characters an id may not carry into a metric label: the picker splits adapter lists at commas.
_LABEL_UNSAFE = re.compile(r"[%,\s\x00-\x1f\x7f-\x9f\u2028\u2029\"\\]")


@dataclass(slots=True)
class Adapter:
    id: str  # the key shards know it by, listed and labelled: a name, a path as written, or `org/name[@rev]`
    path: Path  # its real directory (never shown to clients)
    rank: int
    pages: int  # adapter-pool pages it takes when it joins the batch (0 when preloaded: held for good)
    tokenizer: ModelTokenizer  # its own tokenizer / chat template, else the base model's
    created: int
    preloaded: bool = False  # --preloaded-adapter-ids: resident for good, never unloaded
    # Unique to this load: KV computed under it is cached under this key, so a name that is loaded again (other
    # weights, same name) never reuses the old KV.
    cache_key: str = ""
    # Request tokens it may be served to; None in it: to anyone (fetched without a request's own token).
    tokens: set[str | None] = field(default_factory=lambda: {None})
    hub_ref: str | None = None  # `org/name@<commit>`: the one hub snapshot it is
    vocab_size: int = 0  # its requests' vocabulary when it brings its own embeddings (0: the model's)

    def allows(self, token: str | None) -> bool:
        return None in self.tokens or token in self.tokens

    @property
    def public(self) -> bool:
        """Served to anyone; otherwise only to requests with a token it was fetched (or checked) with, and
        neither listed nor labelled."""
        return None in self.tokens


@dataclass(slots=True, frozen=True)
class _Located:
    path: Path  # the real directory
    root: Path  # the allowed root every file it reads must resolve into
    hub: bool


BASE = None  # what resolve() returns for the base model
_load_serials = itertools.count(1)


class AdapterRegistry:
    def __init__(self, base_id: str, base_tokenizer: ModelTokenizer, client: ShardClient, named: dict[str, str],
                 local_roots: list[str], default_source: str, pool_pages: int, metrics: Metrics):
        self.base_id = base_id
        self.base_tokenizer = base_tokenizer
        self.client = client
        self.named = dict(named)
        self.local_roots = [Path(r).resolve() for r in local_roots]
        self.default_source = default_source
        self.pool_pages = pool_pages
        self.metrics = metrics
        self._loaded: dict[Path, Adapter] = {}  # real directory → adapter
        self._ids: dict[str, Adapter] = {}  # id → adapter
        self._aliases: OrderedDict[tuple[str, str | None], Path] = OrderedDict()  # (spelling, source) → dir
        self._loading: dict[tuple[str, str | None], asyncio.Task] = {}
        self._registering: dict[Path, asyncio.Task] = {}  # loads under way, by directory
        self._claimed: set[str] = set()  # ids of registrations on their way to the shards

    async def resolve(self, name: str | None, source: str | None = None, api_token: str | None = None,
                      param: str = "model") -> Adapter | None:
        """The adapter `name` denotes (loading it on first use), or None for the base model."""
        if name in (None, "", self.base_id):
            return BASE
        _check_name(name, param)
        if source is not None and source not in SOURCES:
            raise APIError(400, f"adapter_source {source[:32]!r} is not supported: use 'hub' or 'local'",
                           param="adapter_source")
        token = api_token or None
        if token is not None and token == os.environ.get("HF_TOKEN"):
            token = None  # the server's own token: what it fetches with anyway
        key = (name, source)
        adapter = self._ids.get(name) if name in self.named else None  # a name keeps its first directory
        adapter = adapter or self._loaded.get(self._aliases.get(key))
        if adapter is None:
            adapter = await self._load_once(key, lambda: self._load(name, source, token, param))
        else:
            self._aliases.move_to_end(key)
        if not adapter.allows(token):
            await self._verify_access(adapter, name, source, token, param)
        return adapter

    def listed(self) -> list[dict]:
        """`/v1/models` entries: named adapters and every public adapter loaded so far (one per directory)."""
        ids = list(self.named) + [i for i, a in self._ids.items() if i not in self.named and a.public]
        return [{"id": i, "object": "model", "created": self._ids[i].created if i in self._ids else 0,
                 "owned_by": "loom", "parent": self.base_id} for i in ids]

    def label(self, adapter_id: str) -> str | None:
        """How metrics name an adapter: its id with `%`, commas, whitespace, quotes and control characters
        percent-encoded (no id can read as two); None for an adapter that is not public."""
        adapter = self._ids.get(adapter_id)
        if adapter is None or not adapter.public:
            return None
        return _LABEL_UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), adapter_id)

    # -- at start-up and at run time (router/adapter_api.py) ------------------------------------------

    async def preload(self, ids: list[str]) -> None:
        """--preloaded-adapter-ids: each resolved like a request's adapter id and paged into the pool for good.
        Their pages leave `pool_pages`, the part of the pool that admission shares out."""
        for name in ids:
            _check_name(name, "--preloaded-adapter-ids")
            await self._load(name, None, None, "--preloaded-adapter-ids", preloaded=True)

    async def register(self, name: str, source: str) -> Adapter:
        """`POST /v1/load_lora_adapter`: adapter `name` from `source`, an absolute path inside a
        --local-adapter-root or a hub repo id. Served under `name` from then on, like an `--adapter` name."""
        _check_name(name, "lora_name")
        _check_name(source, "lora_path")
        if name in (self.base_id, "") or name in self.named or name in self._ids or \
                any(key[0] == name for key in self._loading):
            raise APIError(400, f"the adapter '{name}' has already been loaded", param="lora_name")
        path = Path(source)
        located = await asyncio.to_thread(self._local, path, source, "lora_path") if path.is_absolute() else \
            await asyncio.to_thread(self._hub, source, None, "lora_path")
        self.named[name] = str(located.path) if not located.hub else source
        try:
            load = lambda: self._load(name, None, None, "lora_path", located=located)  # noqa: E731
            return await self._load_once((name, None), load)
        except APIError:
            self.named.pop(name, None)
            raise

    async def unregister(self, name: str, users: Callable[[str], int]) -> None:
        """`POST /v1/unload_lora_adapter`: forgets adapter `name` on the router and the shards. Refused (409)
        while `users(name)` requests hold it, so a request never loses its adapter mid-generation."""
        adapter = self._ids.get(name)
        if adapter is None and name not in self.named:
            raise APIError(404, f"the adapter '{name}' cannot be found", param="lora_name", code="model_not_found")
        if adapter is not None and adapter.preloaded:
            raise APIError(400, f"the adapter '{name}' was preloaded (--preloaded-adapter-ids) and stays loaded",
                           param="lora_name")
        if count := users(name):
            raise APIError(409, f"the adapter '{name}' is in use by {count} request(s): unload it once they finish",
                           param="lora_name", code="adapter_in_use")
        named = self.named.pop(name, None)
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
            raise APIError(409, f"the adapter '{name}' cannot be unloaded: {redact_paths(error)}",
                           param="lora_name", code="adapter_in_use")
        log.info("adapter %s unloaded", name)

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
                    preloaded: bool = False, located: _Located | None = None) -> Adapter:
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
        elif located.hub and token is not None and not _hub_offline():
            adapter.tokens.add(token)  # fetched just now with this token: it may read the repo
        self._remember((name, source), located.path)
        return adapter

    async def _register(self, name: str, located: _Located, param: str, preloaded: bool,
                        bound_to: str | None) -> Adapter:
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
        hub_ref = f"{split_revision(self.named.get(name, name))[0]}@{located.path.name}" if located.hub else None
        adapter_id = self._fresh_id(name, hub_ref)
        self._claimed.add(adapter_id)  # no other registration takes this id while the shards load it
        try:
            error, rank, pages, vocab_size = await self.client.load_adapter(adapter_id, str(located.path), preloaded)
            if not error and pages > self.pool_pages:
                await self.client.unload_adapter(adapter_id)
                error = f"it needs {pages} adapter-pool pages and the pool has {self.pool_pages}"
        finally:
            self._claimed.discard(adapter_id)
        if error:
            raise APIError(400, f"adapter '{name}' cannot be used with this model: {redact_paths(error)}",
                           param=param, code="invalid_adapter")
        # Offline, the cache answers whatever the token: only a token the hub has checked binds the adapter.
        bound = located.hub and bound_to is not None and not _hub_offline()
        if preloaded:
            self.pool_pages -= pages
        adapter = Adapter(adapter_id, located.path, rank, 0 if preloaded else pages, tokenizer, int(time.time()),
                          preloaded, f"{adapter_id}#{next(_load_serials)}", tokens={bound_to} if bound else {None},
                          hub_ref=hub_ref, vocab_size=vocab_size)
        self._keep(adapter)
        seconds = time.perf_counter() - started
        self.metrics.adapter_loads.inc()
        self.metrics.adapter_load_seconds.observe(seconds)
        log.info("adapter %s %s from %s (rank %d, %d pages) in %.2fs", adapter_id,
                 "preloaded" if preloaded else "loaded", located.path, rank, pages, seconds)
        return adapter

    def _fresh_id(self, name: str, hub_ref: str | None) -> str:
        """`name` (a path as written, without `.` parts or doubled slashes), unless it already names another
        adapter (a branch that moved, a link pointed elsewhere): then the snapshot's `org/name@<commit>`, or
        `name#<n>`."""
        taken = lambda i: i in self._ids or i in self._claimed  # noqa: E731
        wanted = name if name in self.named or not name.startswith("/") else str(Path(name))
        if not taken(wanted):
            return wanted
        if hub_ref is not None and not taken(hub_ref):
            return hub_ref
        return next(f"{wanted}#{n}" for n in itertools.count(2) if not taken(f"{wanted}#{n}"))

    async def _verify_access(self, adapter: Adapter, name: str, source: str | None, token: str | None,
                             param: str) -> None:
        """A hub adapter fetched with another caller's token: served only if the hub lets this caller read it
        too. The refusal reads exactly like a missing adapter."""
        repo_id, revision = split_revision(adapter.hub_ref or self.named.get(adapter.id, adapter.id))
        try:
            await asyncio.to_thread(snapshot, repo_id, revision, ADAPTER_FILES, "adapter", token)
        except HubError:
            raise _hub_api_error(not_found(name, "adapter"), param) from None
        adapter.tokens.add(token)

    def _locate(self, name: str, source: str | None, token: str | None, param: str) -> _Located:
        """Where the adapter's files are on disk, downloading from the hub if that is its source."""
        if name in self.named:  # the operator's own --adapter NAME=SOURCE: a local dir or a hub id
            target = self.named[name]
            if Path(target).is_dir():
                path = Path(target).resolve()
                return _Located(path, path, hub=False)
            return self._hub(target, None, param)
        path = Path(name)
        source = source or ("local" if path.is_absolute() else self.default_source)
        if source == "local":
            return self._local(path, name, param)
        return self._hub(name, token, param)

    def _hub(self, ref: str, token: str | None, param: str) -> _Located:
        repo_id, revision = split_revision(ref)
        try:
            path = snapshot(repo_id, revision, ADAPTER_FILES, what="adapter", token=token)
        except HubError as e:
            raise _hub_api_error(e, param) from None
        return _Located(path, repo_cache_dir(repo_id), hub=True)

    def _local(self, path: Path, name: str, param: str) -> _Located:
        if not path.is_absolute():
            raise APIError(400, f"local adapter '{name}' must be an absolute path", param=param)
        resolved = path.resolve()
        root = next((r for r in self.local_roots if resolved.is_relative_to(r)), None)
        if root is None:
            raise APIError(400, f"adapter path '{name}' is outside every --local-adapter-root", param=param)
        if not resolved.is_dir():
            raise APIError(404, f"adapter '{name}' not found: no such directory", param=param,
                           code="model_not_found")
        return _Located(resolved, root, hub=False)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _check_name(name: str, param: str) -> None:
    if len(name) > MAX_MODEL_ID_CHARS:
        raise APIError(400, f"`{param}` is longer than {MAX_MODEL_ID_CHARS} characters", param=param)
    if _CONTROL.search(name):
        raise APIError(400, f"`{param}` must not contain control characters", param=param)


def _hub_api_error(e: HubError, param: str) -> APIError:
    """A malformed id is a 400; any other miss is a 404, whether or not the hub could be reached (as vLLM
    answers an unknown adapter): the message says which."""
    if e.invalid:
        return APIError(400, str(e), param=param)
    return APIError(404, str(e), param=param, code="model_not_found")
