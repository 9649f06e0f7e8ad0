"""Unloading an adapter load that was replaced in place (router/adapters.py), after its last request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from router.shard_client import ShardClient, ShardError

log = logging.getLogger("loom.adapters")

POLL_S = 0.25  # how often a replaced load checks for its last request
TRIES = 40  # unloads tried once no request holds it (the shards may still be finishing its last step)


async def unload_once_released(client: ShardClient, adapter_id: str) -> str:
    """Unloads `adapter_id`, which no queued or running request holds any more, trying again while the shards
    still hold its last sequences (their release goes out with the next step); returns the last refusal ("":
    unloaded)."""
    error = ""
    for _ in range(TRIES):
        try:
            if not (error := await client.unload_adapter(adapter_id)):
                return ""
        except ShardError as e:
            error = str(e)
        await asyncio.sleep(POLL_S)
    return error


async def retire(client: ShardClient, adapter_id: str, users: Callable[[str], int],
                 forget: Callable[[], None]) -> None:
    """Waits until no queued or running request holds `adapter_id`, unloads it on the shards, then `forget()`.
    A load the shards keep refusing stays registered (and is logged): never unloaded under a request."""
    while users(adapter_id):
        await asyncio.sleep(POLL_S)
    if error := await unload_once_released(client, adapter_id):
        log.warning("adapter %s (replaced in place) could not be unloaded: %s", adapter_id, error)
        return
    forget()
    log.info("adapter %s (replaced in place) unloaded", adapter_id)
