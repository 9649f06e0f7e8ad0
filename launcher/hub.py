"""Hub snapshots through huggingface_hub, for models (the launcher) and adapters (the router).

huggingface_hub honours HF_HOME, HF_TOKEN and HF_HUB_OFFLINE=1 (cache only) and draws its own progress
bars when a terminal is attached; this module only turns its exceptions into one clear line.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class HubError(Exception):
    """`not_found`: the repo, revision or cached copy does not exist (a 404 to an API caller)."""

    def __init__(self, message: str, not_found: bool):
        super().__init__(message)
        self.not_found = not_found


def split_revision(ref: str) -> tuple[str, str | None]:
    """`org/name@rev` → (`org/name`, `rev`); no `@` → revision None."""
    repo_id, _, revision = ref.partition("@")
    return repo_id, revision or None


def snapshot(repo_id: str, revision: str | None, allow_patterns: list[str], what: str = "model",
             token: str | None = None) -> Path:
    """Downloads (or finds in the cache) the files of `repo_id` matching `allow_patterns`."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    shown = f"{repo_id}@{revision}" if revision else repo_id
    if not REPO_ID.match(repo_id):
        raise HubError(f"{what} {shown!r} is not a hub repo id (org/name[@revision])", not_found=True)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns, token=token))
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise HubError(f"{what} {shown!r} not found in the local hub cache and HF_HUB_OFFLINE=1",
                           not_found=True) from None
        raise HubError(f"{what} {shown!r} could not be downloaded (no connection to the hub?) and is not in "
                       "the local hub cache", not_found=False) from None
    except GatedRepoError:
        raise HubError(f"{what} {shown!r} is gated: accept its terms on the hub and set HF_TOKEN",
                       not_found=False) from None
    except RevisionNotFoundError:
        raise HubError(f"revision {revision!r} not found for {what} {repo_id!r}", not_found=True) from None
    except RepositoryNotFoundError:
        raise HubError(f"{what} {shown!r} not found on the hub (private repos need a token)", not_found=True) from None
    except (HFValidationError, OSError) as e:
        raise HubError(f"{what} {shown!r}: {e}", not_found=False) from None
