"""Adapters merged per request (LoRAX's `merged_adapters`): the request field, and the merges as virtual adapters.

A request names adapters, weights and a strategy (router/adapter_merge.py says what each strategy computes). Its
recipe — the adapters' load identities (a name loaded again with other weights is another recipe), the weights,
the strategy and the parameters that strategy reads — is merged once, into a private directory, and registered on
the shards like any adapter: counted against the adapter pool by admission, paged in and out of the pool, batched
with every other adapter in one step. Requests with the same recipe share it, concurrent ones one merge.

At most `max_merges` recipes stay registered; a new one unloads the least recently used merge that no request
holds (queued or running) and that no request resolved within `min_idle_s` (one that is between resolving and
queueing). When every merge is in use, the request is refused with 429. Merged adapters are not listed in
/v1/models and carry no metric label: they are not names clients chose.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from common.limits import MAX_MODEL_ID_CHARS, UINT32_MAX
from router.adapter_merge import MergeError, Recipe, merge_adapters
from router.adapters import Adapter, AdapterRegistry
from router.backend import StrictModel
from router.errors import APIError

log = logging.getLogger("loom.adapters")

MAX_MERGE_IDS = 8  # adapters one recipe may merge
MAX_MERGE_WEIGHT = 1e3  # |weight|: past it the merged update would swamp the base model
MAX_ADAPTER_SCALE = 1e3
DEFAULT_MAX_MERGES = 16
DEFAULT_MIN_IDLE_S = 30.0


# A request's adapter scale: the adapter's update (scale * B A) times this, as PEFT's set_scale / llama.cpp's
# --lora-scaled do.
AdapterScale = Annotated[float, Field(ge=-MAX_ADAPTER_SCALE, le=MAX_ADAPTER_SCALE)]


class MergedAdaptersSpec(StrictModel):
    """LoRAX's MergedAdapters, plus `seed` (DARE's random pruning; LoRAX draws it unseeded)."""

    ids: Annotated[list[Annotated[str, Field(max_length=MAX_MODEL_ID_CHARS)]],
                   Field(min_length=1, max_length=MAX_MERGE_IDS)]
    weights: Annotated[list[Annotated[float, Field(ge=-MAX_MERGE_WEIGHT, le=MAX_MERGE_WEIGHT)]],
                       Field(max_length=MAX_MERGE_IDS)] = Field(default_factory=list)
    merge_strategy: Literal["linear", "ties", "dare_linear", "dare_ties"] | None = "linear"
    density: float = Field(1.0, ge=0, le=1)
    majority_sign_method: Literal["total", "frequency"] | None = "total"
    seed: int = Field(0, ge=0, le=UINT32_MAX)

    @field_validator("weights")
    @classmethod
    def _one_per_id(cls, weights: list[float], info: ValidationInfo) -> list[float]:
        ids = info.data.get("ids") or []
        if weights and len(weights) != len(ids):
            raise ValueError(f"{len(weights)} weights for {len(ids)} ids (give one per id, or none for all 1)")
        return weights

    @field_validator("density")
    @classmethod
    def _dare_density(cls, density: float, info: ValidationInfo) -> float:
        if (info.data.get("merge_strategy") or "").startswith("dare") and density == 0:
            raise ValueError("DARE strategies need a density above 0 (the weights they keep are divided by it)")
        return density

    def normalized(self) -> tuple[tuple[float, ...], str, float, str, int]:
        """(weights, strategy, density, sign method, seed) with what the strategy ignores set to its default, so
        that recipes that merge alike are one recipe."""
        strategy = self.merge_strategy or "linear"
        weights = tuple(self.weights) if self.weights else (1.0,) * len(self.ids)
        density = 1.0 if strategy == "linear" else self.density
        method = (self.majority_sign_method or "total") if strategy.endswith("ties") else "total"
        seed = self.seed if strategy.startswith("dare") and density < 1 else 0
        return weights, strategy, density, method, seed


@dataclass(slots=True)
class _Merge:
    adapter: Adapter
    directory: Path
    resolved_at: float


class MergedAdapters:
    """The merges registered on the shards, by recipe; one owner of their directories."""

    def __init__(self, registry: AdapterRegistry, users: Callable[[str], int], max_merges: int = DEFAULT_MAX_MERGES,
                 min_idle_s: float = DEFAULT_MIN_IDLE_S):
        self.registry, self.users = registry, users
        self.max_merges, self.min_idle_s = max_merges, min_idle_s
        self._merges: OrderedDict[str, _Merge] = OrderedDict()  # recipe key -> merge, least recently used first
        self._building: dict[str, asyncio.Task] = {}
        self._root = Path(tempfile.mkdtemp(prefix="loom-merged-adapters-"))
        atexit.register(shutil.rmtree, self._root, True)

    async def resolve(self, spec: MergedAdaptersSpec, source: str | None, api_token: str | None, param: str,
                      scale: float = 1.0) -> Adapter:
        """The merged adapter of `spec` (its ids resolved like a request's adapter id), its update times `scale`,
        merged and registered on first use."""
        sources = []
        for i, name in enumerate(spec.ids):
            adapter = await self.registry.resolve(name, source, api_token, param=f"{param}.ids")
            if adapter is None:
                raise APIError(400, f"`{param}.ids[{i}]` names the base model, which has no adapter weights to merge",
                               param=f"{param}.ids")
            sources.append((name, adapter))
        return await self._merged(sources, spec.normalized(), scale, param)

    async def scaled(self, name: str, adapter: Adapter, scale: float, param: str) -> Adapter:
        """`adapter` with its update (lora_B) times `scale`: a recipe of one adapter, cached like merges."""
        return await self._merged([(name, adapter)], ((1.0,), "linear", 1.0, "total", 0), scale, param, False)

    async def _merged(self, sources: list[tuple[str, Adapter]], how: tuple, scale: float, param: str,
                      nested: bool = True) -> Adapter:
        """`nested`: `param` is a recipe object, whose field at fault errors name (else `param` itself)."""
        weights, strategy, density, method, seed = how
        identity = [[a.cache_key for _, a in sources], weights, strategy, density, method, seed, scale]
        key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]
        merge = self._merges.get(key)
        if merge is None:
            task = self._building.get(key)
            if task is None:
                recipe = Recipe(tuple((n, a.path) for n, a in sources), weights, strategy, density, method, seed,
                                scale)
                task = asyncio.create_task(self._build(key, recipe, param, nested))
                self._building[key] = task
                task.add_done_callback(lambda _: self._building.pop(key, None))
            merge = await asyncio.shield(task)
        self._merges.move_to_end(key)
        merge.resolved_at = time.monotonic()
        return merge.adapter

    async def _build(self, key: str, recipe: Recipe, param: str, nested: bool) -> _Merge:
        await self._make_room(param)
        directory = self._root / key
        try:
            await asyncio.to_thread(merge_adapters, recipe, directory)
            adapter = await self.registry.register_derived(f"merged-{key}", directory, param)
        except MergeError as e:
            shutil.rmtree(directory, ignore_errors=True)
            field = f"{param}.{e.field}" if nested else param
            raise APIError(400, f"`{field}`: {e}", param=field, code="invalid_adapter") from None
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        merge = _Merge(adapter, directory, time.monotonic())
        self._merges[key] = merge
        log.info("merged adapter %s: %s of %s", adapter.id, recipe.strategy, ", ".join(n for n, _ in recipe.sources))
        return merge

    async def _make_room(self, param: str) -> None:
        while len(self._merges) + len(self._building) > self.max_merges:
            now = time.monotonic()
            victim = next((k for k, m in self._merges.items() if not self.users(m.adapter.id)
                           and now - m.resolved_at >= self.min_idle_s), None)
            if victim is None:
                raise APIError(429, f"`{param}`: all {self.max_merges} merged adapters are in use; try again later",
                               param=param, code="merged_adapters_busy")
            merge = self._merges.pop(victim)
            await self.registry.forget_derived(merge.adapter)
            shutil.rmtree(merge.directory, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self._root, ignore_errors=True)
