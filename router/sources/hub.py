"""Adapters from the Hugging Face hub (`org/name[@revision]`), through common/hub.py's snapshots.

A request's `api_token` is the hub token it downloads with; an adapter fetched with one is served only to
requests whose token the hub lets read the repo too. Offline (HF_HUB_OFFLINE=1) the cache answers whatever
the token, so nothing is bound to one.
"""

from __future__ import annotations

import os

from common.hub import HubError, not_found, repo_cache_dir, snapshot, split_revision
from router.errors import APIError
from router.sources import ADAPTER_FILES, AdapterSource, Located


class HubSource(AdapterSource):
    name = "hub"

    def caller(self, api_token: str | None) -> str | None:
        token = api_token or None
        return None if token is not None and token == os.environ.get("HF_TOKEN") else token

    def fetch(self, ref: str, credentials: str | None, param: str) -> Located:
        repo_id, revision = split_revision(ref)
        try:
            path = snapshot(repo_id, revision, ADAPTER_FILES, what="adapter", token=credentials)
        except HubError as e:
            raise hub_api_error(e, param) from None
        return Located(path, repo_cache_dir(repo_id), self.name, ref=f"{repo_id}@{path.name}",
                       bound=credentials is not None and not hub_offline())

    def check_access(self, ref: str, shown: str, credentials: str | None, param: str) -> None:
        repo_id, revision = split_revision(ref)
        try:
            snapshot(repo_id, revision, ADAPTER_FILES, "adapter", credentials)
        except HubError:
            raise hub_api_error(not_found(shown, "adapter"), param) from None


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_api_error(e: HubError, param: str) -> APIError:
    """A malformed id is a 400; any other miss is a 404, whether or not the hub could be reached (as vLLM
    answers an unknown adapter): the message says which."""
    if e.invalid:
        return APIError(400, str(e), param=param)
    return APIError(404, str(e), param=param, code="model_not_found")


SOURCE = HubSource
