"""Adapter resolution: a request's `model` / `adapter_id` → an adapter the shards have registered.

Order (DESIGN.md): "" or the base model id → base; a `--adapter NAME=SOURCE` name; an absolute path inside
a `--local-adapter-root`; otherwise a hub repo id (`org/name[@revision]`). Hub downloads run in a thread,
and concurrent requests for one new adapter share a single load.
"""

from __future__ import annotations

import asyncio
import logging
import time
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
    pages: int  # adapter-pool pages it takes while active
    tokenizer: ModelTokenizer  # its own tokenizer / chat template, else the base model's
    created: int


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

    async def _load(self, name: str, source: str | None, api_token: str | None, param: str) -> Adapter:
        started = time.perf_counter()
        path = await asyncio.to_thread(self._locate, name, source, api_token, param)
        error, rank, pages = await self.client.load_adapter(name, str(path))
        if not error and pages > self.pool_pages:
            error = f"it needs {pages} adapter-pool pages and the pool has {self.pool_pages}"
        if error:
            raise APIError(400, f"adapter '{name}' cannot be used with this model: {error}", param=param,
                           code="invalid_adapter")
        tokenizer = await asyncio.to_thread(load_adapter_tokenizer, path, self.base_tokenizer)
        adapter = Adapter(name, path, rank, pages, tokenizer, int(time.time()))
        self._loaded[name] = adapter
        seconds = time.perf_counter() - started
        self.metrics.adapter_loads.inc()
        self.metrics.adapter_load_seconds.observe(seconds)
        log.info("adapter %s loaded from %s (rank %d, %d pages) in %.2fs", name, path, rank, pages, seconds)
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
