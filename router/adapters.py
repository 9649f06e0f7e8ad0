"""Adapter resolution: a request's `model` / `adapter_id` → an adapter the shards have registered.

Order (DESIGN.md): "" or the base model id → base; a `--adapter NAME=SOURCE` name; an absolute path inside
a `--local-adapter-root`; otherwise a hub repo id (`org/name[@revision]`). Hub downloads run in a thread,
and concurrent requests for one new adapter share a single load.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from launcher.hub import HubError, snapshot, split_revision
from router.errors import APIError
from router.metrics import Metrics
from router.shard_client import ShardClient
from router.tokenization import ModelTokenizer, load_adapter_tokenizer

log = logging.getLogger("loom.adapters")

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "*.json", "*.jinja",
                 "*.model", "*.txt"]


@dataclass(slots=True, frozen=True)
class Adapter:
    id: str  # the key shards know it by: a --adapter name, an absolute path, or `org/name[@rev]`
    path: Path
    rank: int
    pages: int  # adapter-pool pages it takes when it joins the batch (0 when preloaded: its pages are held for good)
    tokenizer: ModelTokenizer  # its own tokenizer / chat template, else the base model's
    created: int
    preloaded: bool = False  # --preloaded-adapter-ids: resident for good, never unloaded


BASE = None  # what resolve() returns for the base model


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
        self._loaded: dict[str, Adapter] = {}
        self._loading: dict[str, asyncio.Task] = {}

    async def resolve(self, name: str | None, source: str | None = None, api_token: str | None = None,
                      param: str = "model") -> Adapter | None:
        """The adapter `name` denotes (loading it on first use), or None for the base model."""
        if name in (None, "", self.base_id):
            return BASE
        if name in self._loaded:
            return self._loaded[name]
        task = self._loading.get(name)
        if task is None:
            task = asyncio.create_task(self._load(name, source, api_token, param))
            self._loading[name] = task
            task.add_done_callback(lambda _: self._loading.pop(name, None))
        return await asyncio.shield(task)

    def listed(self) -> list[dict]:
        """`/v1/models` entries: named adapters and every adapter loaded so far."""
        ids = list(self.named) + [a for a in self._loaded if a not in self.named]
        return [{"id": i, "object": "model", "created": self._loaded[i].created if i in self._loaded else 0,
                 "owned_by": "loom", "parent": self.base_id} for i in ids]

    # -- at start-up and at run time (router/adapter_api.py) ------------------------------------------

    async def preload(self, ids: list[str]) -> None:
        """--preloaded-adapter-ids: each resolved like a request's adapter id and paged into the pool for good.
        Their pages leave `pool_pages`, the part of the pool that admission shares out."""
        for name in ids:
            started = time.perf_counter()
            path = await asyncio.to_thread(self._locate, name, None, None, "--preloaded-adapter-ids")
            await self._install(name, path, "--preloaded-adapter-ids", started, preloaded=True)

    async def register(self, name: str, source: str) -> Adapter:
        """`POST /v1/load_lora_adapter`: adapter `name` from `source`, an absolute path inside a
        --local-adapter-root or a hub repo id."""
        if name in (self.base_id, "") or name in self.named or name in self._loaded or name in self._loading:
            raise APIError(400, f"the adapter '{name}' has already been loaded", param="lora_name")
        task = asyncio.create_task(self._register(name, source))
        self._loading[name] = task
        task.add_done_callback(lambda _: self._loading.pop(name, None))
        return await asyncio.shield(task)

    async def _register(self, name: str, source: str) -> Adapter:
        started = time.perf_counter()
        path = Path(source)
        if path.is_absolute():
            path = await asyncio.to_thread(self._local, path, source, "lora_path")
        else:
            path = await asyncio.to_thread(self._hub, source, None, "lora_path")
        return await self._install(name, path, "lora_path", started)

    async def unregister(self, name: str, users: Callable[[str], int]) -> None:
        """`POST /v1/unload_lora_adapter`: forgets adapter `name` on the router and the shards. Refused (409)
        while `users(name)` requests hold it, so a request never loses its adapter mid-generation."""
        adapter = self._loaded.get(name)
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
            return  # a --adapter name never used: nothing on the shards
        del self._loaded[name]  # before the await: from here on new requests no longer find it
        if error := await self.client.unload_adapter(name):
            self._loaded[name] = adapter
            if named is not None:
                self.named[name] = named
            raise APIError(409, f"the adapter '{name}' cannot be unloaded: {error}", param="lora_name",
                           code="adapter_in_use")
        log.info("adapter %s unloaded", name)

    async def _load(self, name: str, source: str | None, api_token: str | None, param: str) -> Adapter:
        started = time.perf_counter()
        path = await asyncio.to_thread(self._locate, name, source, api_token, param)
        return await self._install(name, path, param, started)

    async def _install(self, name: str, path: Path, param: str, started: float, preloaded: bool = False) -> Adapter:
        """Registers the adapter dir `path` on the shards under `name`."""
        error, rank, pages = await self.client.load_adapter(name, str(path), preloaded)
        if not error and pages > self.pool_pages:
            error = f"it needs {pages} adapter-pool pages and the pool has {self.pool_pages}"
        if error:
            raise APIError(400, f"adapter '{name}' cannot be used with this model: {error}", param=param,
                           code="invalid_adapter")
        if preloaded:
            self.pool_pages -= pages
        tokenizer = await asyncio.to_thread(load_adapter_tokenizer, path, self.base_tokenizer)
        adapter = Adapter(name, path, rank, 0 if preloaded else pages, tokenizer, int(time.time()), preloaded)
        self._loaded[name] = adapter
        seconds = time.perf_counter() - started
        self.metrics.adapter_loads.inc()
        self.metrics.adapter_load_seconds.observe(seconds)
        log.info("adapter %s %s from %s (rank %d, %d pages) in %.2fs", name, "preloaded" if preloaded else "loaded",
                 path, rank, pages, seconds)
        return adapter

    def _locate(self, name: str, source: str | None, api_token: str | None, param: str) -> Path:
        """Where the adapter's files are on disk, downloading from the hub if that is its source."""
        if name in self.named:  # the operator's own --adapter NAME=SOURCE: a local dir or a hub id
            name = self.named[name]
            if Path(name).is_dir():
                return Path(name).resolve()
            source = "hub"
        path = Path(name)
        source = source or ("local" if path.is_absolute() else self.default_source)
        if source == "local":
            return self._local(path, name, param)
        if source != "hub":
            raise APIError(400, f"adapter_source '{source}' is not supported: use 'hub' or 'local'",
                           param="adapter_source")
        return self._hub(name, api_token, param)

    def _hub(self, name: str, api_token: str | None, param: str) -> Path:
        repo_id, revision = split_revision(name)
        try:
            return snapshot(repo_id, revision, ADAPTER_FILES, what="adapter", token=api_token)
        except HubError as e:
            raise APIError(404 if e.not_found else 502, str(e), param=param,
                           code="model_not_found" if e.not_found else "hub_error") from None

    def _local(self, path: Path, name: str, param: str) -> Path:
        if not path.is_absolute():
            raise APIError(400, f"local adapter '{name}' must be an absolute path", param=param)
        resolved = path.resolve()
        if not any(resolved.is_relative_to(root) for root in self.local_roots):
            raise APIError(400, f"adapter path '{name}' is outside every --local-adapter-root", param=param)
        if not resolved.is_dir():
            raise APIError(404, f"adapter '{name}' not found: no such directory", param=param,
                           code="model_not_found")
        return resolved
