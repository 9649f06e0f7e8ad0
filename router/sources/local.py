"""Adapters in local directories: an absolute path inside a --local-adapter-root."""

from __future__ import annotations

from pathlib import Path

from router.config import RouterConfig
from router.errors import APIError
from router.sources import AdapterSource, Located


class LocalSource(AdapterSource):
    name = "local"

    def __init__(self, config: RouterConfig):
        super().__init__(config)
        self.roots = [Path(r).resolve() for r in config.local_adapter_roots]

    def claims(self, ref: str) -> bool:
        return Path(ref).is_absolute()

    def caller(self, api_token: str | None) -> str | None:
        return None  # a local directory is the server's: no request credentials apply

    def fetch(self, ref: str, credentials: str | None, param: str) -> Located:
        path = Path(ref)
        if not path.is_absolute():
            raise APIError(400, f"local adapter '{ref}' must be an absolute path", param=param)
        resolved = path.resolve()
        root = next((r for r in self.roots if resolved.is_relative_to(r)), None)
        if root is None:
            raise APIError(400, f"adapter path '{ref}' is outside every --local-adapter-root", param=param)
        if not resolved.is_dir():
            raise APIError(404, f"adapter '{ref}' not found: no such directory", param=param,
                           code="model_not_found")
        return Located(resolved, root, self.name)


SOURCE = LocalSource
