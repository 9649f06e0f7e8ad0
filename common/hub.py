"""Hub snapshots through huggingface_hub, for models (the launcher) and adapters (the router).

huggingface_hub honours HF_HOME, HF_TOKEN and HF_HUB_OFFLINE=1 (cache only) and draws its own progress
bars when a terminal is attached; this module checks repo ids and revisions before they reach it (offline,
a revision names a file under the cache: `../..` must never get there), keeps every snapshot inside its
repo's cache folder, and turns its exceptions into one clear line that names no host path.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger("loom.hub")

# A branch, a tag, a commit or `refs/pr/N`: slash-separated parts of these characters, none `.` or `..`.
REVISION = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
MAX_REVISION_CHARS = 256


class HubError(Exception):
    """`not_found`: the repo, revision or cached copy does not exist (a 404 to an API caller);
    `invalid`: the id or revision is malformed (a 400)."""

    def __init__(self, message: str, not_found: bool, invalid: bool = False):
        super().__init__(message)
        self.not_found = not_found
        self.invalid = invalid


def split_revision(ref: str) -> tuple[str, str | None]:
    """`org/name@rev` → (`org/name`, `rev`); no `@` → revision None."""
    repo_id, _, revision = ref.partition("@")
    return repo_id, revision or None


def check_ref(repo_id: str, revision: str | None, what: str = "model") -> None:
    """Raises HubError(invalid) unless `repo_id` is a hub repo id as huggingface_hub has them and `revision`
    is None or a plain ref (no `..`, no absolute or empty parts)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    shown = f"{repo_id}@{revision}" if revision else repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubError(f"{what} {shown!r} is not a hub repo id (org/name[@revision])", not_found=False,
                       invalid=True) from None
    if revision is not None and (len(revision) > MAX_REVISION_CHARS or not REVISION.match(revision)
                                 or any(part in (".", "..") for part in revision.split("/"))):
        raise HubError(f"{what} {shown!r}: the revision must be a branch, tag or commit", not_found=False,
                       invalid=True)


def repo_cache_dir(repo_id: str) -> Path:
    """The repo's folder in the hub cache (HF_HOME/hub/models--org--name): every file of its snapshots is
    inside it, the snapshot's links pointing into its blobs/."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).resolve() / ("models--" + repo_id.replace("/", "--"))


def not_found(shown: str, what: str = "model") -> HubError:
    """What a caller hears when the repo `shown` is missing, or is not theirs to read: the same words."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return HubError(f"{what} {shown!r} not found in the local hub cache and HF_HUB_OFFLINE=1", not_found=True)
    return HubError(f"{what} {shown!r} not found on the hub (private repos need a token)", not_found=True)


def snapshot(repo_id: str, revision: str | None, allow_patterns: list[str], what: str = "model",
             token: str | None = None) -> Path:
    """Downloads (or finds in the cache) the files of `repo_id` matching `allow_patterns`; the resolved
    snapshot directory, always inside `repo_cache_dir(repo_id)`."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    check_ref(repo_id, revision, what)
    shown = f"{repo_id}@{revision}" if revision else repo_id
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns, token=token))
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise not_found(shown, what) from None
        raise HubError(f"{what} {shown!r} could not be downloaded (no connection to the hub?) and is not in "
                       "the local hub cache", not_found=False) from None
    except GatedRepoError:
        raise HubError(f"{what} {shown!r} is gated: accept its terms on the hub and set HF_TOKEN",
                       not_found=False) from None
    except RevisionNotFoundError:
        raise HubError(f"revision {revision!r} not found for {what} {repo_id!r}", not_found=True) from None
    except RepositoryNotFoundError:
        raise not_found(shown, what) from None
    except (HFValidationError, OSError) as e:
        log.warning("hub snapshot of %s failed: %s", shown, e)  # the details (cache paths) stay in the log
        raise HubError(f"{what} {shown!r} could not be read from the hub or its cache", not_found=False) from None
    resolved = path.resolve()
    if not resolved.is_relative_to(repo_cache_dir(repo_id)) or not resolved.is_dir():
        log.warning("hub snapshot of %s resolved to %s, outside its cache folder", shown, resolved)
        raise not_found(shown, what)
    return resolved
