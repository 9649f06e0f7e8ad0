"""Adapters in S3-compatible object storage: `s3://bucket/prefix` (or `bucket/prefix` with
`adapter_source: "s3"`), the adapter's files being the objects under `prefix/`.

The endpoint is --s3-endpoint-url, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (MinIO, R2, GCS), else AWS.
A request's `api_token` (`ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN]`) is what it fetches with; without
one, the server's own credentials (router/s3_client.py). An adapter fetched with a request's credentials is
served only to requests whose credentials the store lets list it too.

Every fetch lists the prefix (so every caller's access is checked by the store). A listing is one version,
named by a hash of its keys, sizes and ETags, downloaded once into $LOOM_CACHE/adapters/s3/<prefix hash>/<version>
(a temporary folder renamed into place, so a crash never leaves half an adapter); a changed listing is a new
version beside the old, as a moved hub branch is. Keys are untrusted: one that is not a plain relative path
under the prefix (`..`, `.`, an empty part, a backslash) or an object over MAX_OBJECT_BYTES refuses the whole
adapter, before anything is downloaded.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from common.cache import cache_root
from router.adapter_files import MAX_ENTRIES
from router.config import RouterConfig
from router.errors import APIError
from router.s3_client import Credentials, ObjectInfo, S3Client, S3Error, default_credentials, default_endpoint, \
    default_region
from router.sources import ADAPTER_FILES, AdapterSource, Located

MAX_OBJECT_BYTES = 4 << 30  # one file of an adapter (rank-256 weights of a 70B model: ~3.4 GB in bf16)
MAX_ADAPTER_BYTES = 8 << 30  # all the files of one adapter
BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
VERSION = re.compile(r"@[0-9a-f]{16}$")
NOT_FOUND_STATUSES = (301, 400, 401, 403, 404)  # the store's refusals, all worded like a missing adapter


class S3Source(AdapterSource):
    name = "s3"

    def __init__(self, config: RouterConfig):
        super().__init__(config)
        self.endpoint = config.s3_endpoint_url or default_endpoint()
        self.client = S3Client(self.endpoint, default_region())
        self.own = default_credentials()
        self.cache = cache_root() / "adapters" / "s3"

    def claims(self, ref: str) -> bool:
        return ref.startswith("s3://")

    def caller(self, api_token: str | None) -> str | None:
        if not api_token or (self.own is not None and api_token == self.own.as_token()):
            return None
        return api_token

    def fetch(self, ref: str, credentials: str | None, param: str) -> Located:
        bucket, prefix = parse_ref(ref, param)
        shown = f"s3://{bucket}/{prefix}"
        objects = self._listing(bucket, prefix, credentials, shown, param)
        version = hashlib.sha256("".join(f"{o.key}\0{o.size}\0{o.etag}\n" for o in objects).encode()).hexdigest()
        folder = self.cache / hashlib.sha256(f"{self.endpoint}\0{bucket}\0{prefix}".encode()).hexdigest()[:32]
        target = folder / version[:16]
        if not target.is_dir():
            self._download(bucket, prefix, objects, self._credentials(credentials), folder, target, shown, param)
        return Located(target.resolve(), folder.resolve(), self.name, ref=f"{shown}@{version[:16]}",
                       bound=credentials is not None)

    def check_access(self, ref: str, shown: str, credentials: str | None, param: str) -> None:
        bucket, prefix = parse_ref(VERSION.sub("", ref), param)
        self._listing(bucket, prefix, credentials, shown, param)

    def _credentials(self, credentials: str | None) -> Credentials | None:
        if credentials is None:
            return self.own
        try:
            return Credentials.parse(credentials)
        except ValueError as e:
            raise APIError(400, f"`api_token` for an s3 adapter: {e}", param="api_token") from None

    def _listing(self, bucket: str, prefix: str, credentials: str | None, shown: str,
                 param: str) -> list[ObjectInfo]:
        """The adapter's objects (those its files are made of), sorted by key, every key and size checked."""
        under = f"{prefix}/" if prefix else ""
        try:
            listed = self.client.list(bucket, under, self._credentials(credentials), MAX_ENTRIES)
        except S3Error as e:
            raise _api_error(e, shown, param) from None
        objects, total = [], 0
        for o in sorted(listed, key=lambda o: o.key):
            relative = o.key[len(under):]
            if not o.key.startswith(under) or not relative or relative.endswith("/") and o.size == 0:
                continue  # a folder marker (or a key the store should not have listed)
            if not _plain(relative):
                raise APIError(400, f"adapter '{shown}' cannot be used: its object key '{relative[:200]}' is not "
                               "a plain relative path", param=param, code="invalid_adapter")
            if not any(fnmatch.fnmatch(relative, pattern) for pattern in ADAPTER_FILES):
                continue
            if o.size > MAX_OBJECT_BYTES:
                raise APIError(400, f"adapter '{shown}' cannot be used: its file '{relative}' is larger than "
                               f"{MAX_OBJECT_BYTES} bytes", param=param, code="invalid_adapter")
            total += o.size
            if total > MAX_ADAPTER_BYTES:
                raise APIError(400, f"adapter '{shown}' cannot be used: its files are larger than "
                               f"{MAX_ADAPTER_BYTES} bytes in all", param=param, code="invalid_adapter")
            objects.append(o)
        if not any(o.key == under + "adapter_config.json" for o in objects):
            raise _not_found(shown, param)
        return objects

    def _download(self, bucket: str, prefix: str, objects: list[ObjectInfo], credentials: Credentials | None,
                  folder: Path, target: Path, shown: str, param: str) -> None:
        """Downloads `objects` into a temporary folder beside `target`, then renames it into place (another
        process that got there first wins; its copy is the same version)."""
        under = f"{prefix}/" if prefix else ""
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=folder))
        try:
            for o in objects:
                dest = staging / o.key[len(under):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
                with os.fdopen(fd, "wb") as out:
                    self.client.download(bucket, o.key, credentials, o.size, out)
            try:
                os.rename(staging, target)
            except OSError:
                if not target.is_dir():
                    raise
        except S3Error as e:
            raise _api_error(e, shown, param) from None
        except OSError:
            raise APIError(400, f"adapter '{shown}' cannot be used: its files cannot be stored (keys that are "
                           "both a file and a folder?)", param=param, code="invalid_adapter") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def parse_ref(ref: str, param: str) -> tuple[str, str]:
    """`s3://bucket/prefix` or `bucket/prefix` → (bucket, prefix without its trailing slash); a 400 naming
    `param` for a bucket name S3 does not allow or a prefix that is not a plain relative path."""
    rest = ref.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.rstrip("/")
    if not BUCKET.match(bucket):
        raise APIError(400, f"'{ref[:200]}' does not name an S3 bucket (s3://bucket/prefix)", param=param)
    if prefix and not _plain(prefix):
        raise APIError(400, f"the prefix of '{ref[:200]}' must be a plain relative path (no '.', '..', empty "
                       "parts or backslashes)", param=param)
    return bucket, prefix


def _plain(path: str) -> bool:
    return "\\" not in path and all(part not in ("", ".", "..") for part in path.split("/"))


def _not_found(shown: str, param: str) -> APIError:
    return APIError(404, f"adapter '{shown}' not found in object storage (private buckets need credentials)",
                    param=param, code="model_not_found")


def _api_error(e: S3Error, shown: str, param: str) -> APIError:
    """The store's refusals (no such bucket, access denied, a wrong region) read alike: no oracle for what
    exists. Anything else is a 404 too (as a hub that cannot be reached is), saying so."""
    if e.refused_adapter:
        return APIError(400, f"adapter '{shown}' cannot be used: {e}", param=param, code="invalid_adapter")
    if e.status in NOT_FOUND_STATUSES:
        return _not_found(shown, param)
    return APIError(404, f"adapter '{shown}' could not be read from object storage: {e}", param=param,
                    code="model_not_found")


SOURCE = S3Source
