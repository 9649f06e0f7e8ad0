"""Where adapters come from: one module per source in this package, each defining `SOURCE`, a subclass of
`AdapterSource`. The registry (router/adapters.py) knows sources only through this interface:

- `claims(ref)`: an id the source recognises by its form (`s3://…`, an absolute path), whatever
  --adapter-source says; an id no source claims goes to the default source.
- `fetch(ref, credentials, param)`: the adapter's files as a local directory (downloaded once into a cache
  the source owns), and the root every file must resolve into (router/adapter_files.py checks that).
- `check_access(ref, shown, credentials, param)`: whether a caller with other credentials may be served an
  adapter that was fetched with someone else's; refused with the words a missing adapter gets.

Adding a source is adding a module here (README, "Adapter sources"): `SOURCES` finds it by its `SOURCE`.
Sources run in a thread (they block on the network or the disk) and raise APIError naming the request field.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from router.config import RouterConfig

# The files of an adapter that a source fetches (hub allow patterns; object-store keys, matched on the path
# under the adapter's prefix): weights, configs, tokenizer files, chat templates.
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "*.json", "*.jinja",
                 "*.model", "*.txt"]


@dataclass(slots=True, frozen=True)
class Located:
    path: Path  # the adapter's real directory
    root: Path  # every file it reads must resolve inside this
    source: str  # the name of the source that found it
    ref: str | None = None  # the one version fetched (`org/name@<commit>`, `s3://bucket/prefix@<version>`)
    bound: bool = False  # fetched with credentials the source checked: served to their holders only


class AdapterSource(ABC):
    name: str  # what `adapter_source` and --adapter-source call it

    def __init__(self, config: RouterConfig):
        self.config = config

    def claims(self, ref: str) -> bool:
        """True when `ref`'s form names this source (an `s3://` URL, an absolute path)."""
        return False

    def caller(self, api_token: str | None) -> str | None:
        """The credentials a request brings, as the registry keys access by them; None: the server's own."""
        return api_token or None

    @abstractmethod
    def fetch(self, ref: str, credentials: str | None, param: str) -> Located:
        """The adapter `ref` on local disk, fetched with `credentials` (None: the server's own)."""

    def check_access(self, ref: str, shown: str, credentials: str | None, param: str) -> None:
        """Raises APIError (worded like a missing adapter `shown`) unless `credentials` may read `ref`, the
        version an adapter was fetched as by another caller."""


def _discover() -> dict[str, type[AdapterSource]]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        source = importlib.import_module(f"{__name__}.{info.name}").SOURCE
        found[source.name] = source
    return found


SOURCES: dict[str, type[AdapterSource]] = _discover()


def build_sources(config: RouterConfig) -> dict[str, AdapterSource]:
    """One instance of every source, by name."""
    return {name: cls(config) for name, cls in SOURCES.items()}
