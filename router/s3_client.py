"""A small S3 client for adapters in object storage: SigV4-signed ListObjectsV2 and GetObject over urllib3
(already a runtime dependency), no SDK. Any S3-compatible store works (AWS, MinIO, R2, GCS interoperability):
with an endpoint URL requests are path-style (`endpoint/bucket/key`), without one they go to AWS.

Credentials and region come from the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION, AWS_PROFILE) and files (AWS_SHARED_CREDENTIALS_FILE, default
~/.aws/credentials; AWS_CONFIG_FILE, default ~/.aws/config); none at all: anonymous requests (public buckets).
Every answer is bounded: a listing page, an error body, and an object to the size its listing declared.
"""

from __future__ import annotations

import configparser
import datetime
import hashlib
import hmac
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, urlsplit

import urllib3

MAX_LISTING_BYTES = 16 << 20  # one ListObjectsV2 page (1000 keys of up to 1024 bytes, with their metadata)
MAX_ERROR_BYTES = 64 << 10
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
TIMEOUT = urllib3.Timeout(connect=10.0, read=60.0)
PRINTABLE = re.compile(r"^[\x21-\x7e]+$")  # what a key id, secret or session token may hold (they go into headers)


class S3Error(Exception):
    """A request the store refused (`status`, its error `code`) or could not answer (`status` 0);
    `refused_adapter`: the store answered, and what it holds is past a bound (too many objects, a wrong size)."""

    def __init__(self, message: str, status: int = 0, code: str = "", refused_adapter: bool = False):
        super().__init__(message)
        self.status = status
        self.code = code
        self.refused_adapter = refused_adapter


@dataclass(slots=True, frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    session_token: str | None = None

    @classmethod
    def parse(cls, text: str) -> Credentials:
        """`ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN]`, the form a request's `api_token` takes."""
        parts = text.split(":", 2)
        if len(parts) < 2 or not all(PRINTABLE.match(part) for part in parts):
            raise ValueError("expected ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN], printable ASCII without "
                             "spaces")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def as_token(self) -> str:
        return ":".join(p for p in (self.access_key, self.secret_key, self.session_token) if p)


@dataclass(slots=True, frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


def _profile() -> str:
    return os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"


def _ini(env: str, default: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(Path(os.environ.get(env) or default).expanduser())
    except (OSError, configparser.Error):
        pass  # an unreadable or broken file: as if there were none
    return parser


def default_credentials() -> Credentials | None:
    """The server's own credentials: the environment, else the shared credentials file's profile."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return Credentials(key, secret, os.environ.get("AWS_SESSION_TOKEN") or None)
    section = _ini("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
    profile = _profile()
    if section.has_option(profile, "aws_access_key_id") and section.has_option(profile, "aws_secret_access_key"):
        return Credentials(section.get(profile, "aws_access_key_id"), section.get(profile, "aws_secret_access_key"),
                           section.get(profile, "aws_session_token", fallback=None))
    return None


def default_region() -> str:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        return region
    config = _ini("AWS_CONFIG_FILE", "~/.aws/config")
    profile = _profile()
    section = profile if profile == "default" else f"profile {profile}"
    return config.get(section, "region", fallback="us-east-1")


def default_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


class S3Client:
    def __init__(self, endpoint: str | None, region: str):
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.region = region
        self.pool = urllib3.PoolManager(retries=False, timeout=TIMEOUT)

    def list(self, bucket: str, prefix: str, credentials: Credentials | None, limit: int) -> list[ObjectInfo]:
        """Every object under `prefix` (ListObjectsV2, page by page); S3Error past `limit` objects."""
        objects: list[ObjectInfo] = []
        query = {"list-type": "2", "prefix": prefix, "max-keys": "1000"}
        while True:
            response = self._request(bucket, "", query, credentials)
            body = _read_bounded(response, MAX_LISTING_BYTES, "a listing page")
            page, token = _parse_listing(body)
            objects += page
            if len(objects) > limit:
                raise S3Error(f"it has more than {limit} objects", refused_adapter=True)
            if token is None:
                return objects
            query = {**query, "continuation-token": token}

    def download(self, bucket: str, key: str, credentials: Credentials | None, size: int, out: BinaryIO) -> None:
        """Streams the object into `out`; S3Error when it holds more (or fewer) bytes than `size`."""
        response = self._request(bucket, key, {}, credentials)
        written = 0
        try:
            for chunk in response.stream(1 << 20):
                written += len(chunk)
                if written > size:
                    raise S3Error(f"object '{key}' holds more bytes than its listing says", refused_adapter=True)
                out.write(chunk)
        except urllib3.exceptions.HTTPError:
            raise S3Error("the download was cut off") from None
        finally:
            response.release_conn()
        if written != size:
            raise S3Error(f"object '{key}' holds fewer bytes than its listing says", refused_adapter=True)

    def _request(self, bucket: str, key: str, query: dict[str, str], credentials: Credentials | None):
        if self.endpoint:
            base, path = self.endpoint, f"/{bucket}/{key}"
        elif "." in bucket:  # a dotted bucket breaks the TLS name of the virtual host
            base, path = f"https://s3.{self.region}.amazonaws.com", f"/{bucket}/{key}"
        else:
            base, path = f"https://{bucket}.s3.{self.region}.amazonaws.com", f"/{key}"
        path = quote(path, safe="/-_.~")
        query_string = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items()))
        url = base + path + (f"?{query_string}" if query_string else "")
        headers = {"x-amz-content-sha256": EMPTY_SHA256}
        if credentials is not None:
            headers = self._sign(urlsplit(base).netloc, path, query_string, headers, credentials)
        try:
            response = self.pool.request("GET", url, headers=headers, preload_content=False, redirect=False)
        except urllib3.exceptions.HTTPError:
            raise S3Error("object storage could not be reached") from None
        if response.status != 200:
            body = _read_bounded(response, MAX_ERROR_BYTES, "an error answer", strict=False)
            raise S3Error(f"object storage answered {response.status}", response.status, _error_code(body))
        return response

    def _sign(self, host: str, path: str, query_string: str, headers: dict[str, str],
              credentials: Credentials) -> dict[str, str]:
        """AWS Signature Version 4 headers for a GET of `path?query_string` on `host`."""
        now = datetime.datetime.now(datetime.timezone.utc)
        stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        headers = {**headers, "host": host, "x-amz-date": stamp}
        if credentials.session_token:
            headers["x-amz-security-token"] = credentials.session_token
        names = sorted(headers)
        canonical = "\n".join(["GET", path, query_string, *(f"{n}:{headers[n].strip()}" for n in names), "",
                               ";".join(names), EMPTY_SHA256])
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        key = f"AWS4{credentials.secret_key}".encode()
        for part in (day, self.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
                                    f"SignedHeaders={';'.join(names)}, Signature={signature}")
        del headers["host"]  # urllib3 sends it from the URL
        return headers


def _read_bounded(response, limit: int, what: str, strict: bool = True) -> bytes:
    data = b""
    try:
        for chunk in response.stream(1 << 16):
            data += chunk
            if len(data) > limit:
                if strict:
                    raise S3Error(f"{what} is larger than {limit} bytes")
                break
    except urllib3.exceptions.HTTPError:
        raise S3Error("object storage could not be reached") from None
    finally:
        response.release_conn()
    return data


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _parse_listing(body: bytes) -> tuple[list[ObjectInfo], str | None]:
    """(objects, continuation token or None) of one ListObjectsV2 page."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        raise S3Error("object storage answered a listing that is not XML") from None
    objects, token, truncated = [], None, False
    for element in root:
        name = _local(element.tag)
        if name == "Contents":
            fields = {_local(child.tag): (child.text or "") for child in element}
            try:
                objects.append(ObjectInfo(fields["Key"], int(fields["Size"]), fields.get("ETag", "")))
            except (KeyError, ValueError):
                raise S3Error("object storage answered a listing without keys or sizes") from None
        elif name == "IsTruncated":
            truncated = (element.text or "").strip() == "true"
        elif name == "NextContinuationToken":
            token = element.text
    return objects, token if truncated and token else None


def _error_code(body: bytes) -> str:
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return ""
    code = next((child.text for child in root if _local(child.tag) == "Code"), None)
    return (code or "")[:64]
