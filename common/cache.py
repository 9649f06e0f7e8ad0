"""Loom's own cache folder: built demo models, converted GGUF files, adapters fetched from object storage."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$LOOM_CACHE, else $XDG_CACHE_HOME/loom (default ~/.cache/loom)."""
    if os.environ.get("LOOM_CACHE"):
        return Path(os.environ["LOOM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "loom"
