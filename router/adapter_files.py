"""An adapter's directory, read once at registration by `read_adapter_files`: its files are untrusted input.

Every entry of the directory, at any depth, must resolve inside the adapter's allowed root (its
--local-adapter-root, its repo's folder of the hub cache, or its --adapter directory), symlinks included: one
that leads out is refused, whatever it points at. The files the router uses (tokenizer files, configs, chat
templates) are then read into memory through a descriptor whose real path is checked again after opening, so
a link swapped in after the walk is caught too. Nothing reads the directory again: the tokenizer is built from a
private copy of these bytes (router/tokenization.py). Errors name the file, never what it holds.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from common.limits import MAX_JSON_DEPTH

MAX_ENTRIES = 4096  # files and folders walked in one adapter directory (training checkpoints included)
MAX_DEPTH = 8  # folders below the adapter's own
MAX_TEMPLATE_BYTES = 1 << 20  # one chat template file
MAX_FILE_BYTES = 64 << 20  # any other file the router reads (a large vocabulary's tokenizer.json: ~35 MB)
MAX_TOTAL_BYTES = 128 << 20  # everything the router reads from one adapter

# The files the router reads (the shards read the weights); chat templates also from TEMPLATE_FOLDER.
ROUTER_FILES = frozenset({
    "adapter_config.json", "config.json", "generation_config.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "tokenizer.json",
    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "tiktoken.model", "tekken.json"})
TEMPLATE_FOLDER = "additional_chat_templates"
JSON_FILES = frozenset(n for n in ROUTER_FILES if n.endswith(".json") and n != "tokenizer.json")


class AdapterFileError(ValueError):
    """One of the adapter's files is refused; the message names the file (relative to the adapter directory)."""


@dataclass(slots=True, frozen=True)
class AdapterFiles:
    """The router's files of one adapter, as read once: relative POSIX path → bytes."""

    files: dict[str, bytes]

    def has(self, name: str) -> bool:
        return name in self.files

    def text(self, name: str) -> str | None:
        """The file as UTF-8 text, None when the adapter has no such file."""
        data = self.files.get(name)
        if data is None:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise AdapterFileError(f"its file '{name}' is not UTF-8 text") from None

    def json(self, name: str) -> dict:
        """The JSON object in the file ({} when absent); anything else, or one nested too deep, is refused."""
        text = self.text(name)
        if text is None:
            return {}
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            raise AdapterFileError(f"its file '{name}' is not valid JSON") from None
        if not isinstance(value, dict):
            raise AdapterFileError(f"its file '{name}' does not hold a JSON object")
        if _depth(value) > MAX_JSON_DEPTH:
            raise AdapterFileError(f"its file '{name}' is nested more than {MAX_JSON_DEPTH} levels deep")
        return value

    def templates(self) -> dict[str, str]:
        """`additional_chat_templates/NAME.jinja` files as {NAME: template}, sorted by name."""
        prefix = TEMPLATE_FOLDER + "/"
        names = sorted(n for n in self.files if n.startswith(prefix) and "/" not in n[len(prefix):])
        return {PurePosixPath(n).stem: self.text(n) for n in names if n.endswith(".jinja")}


def read_adapter_files(directory: Path, root: Path) -> AdapterFiles:
    """Walks `directory` (a real directory inside `root`), checks that every entry resolves inside `root`, and
    reads the files the router uses. Raises AdapterFileError naming the first file that is refused."""
    files: dict[str, bytes] = {}
    budget = MAX_TOTAL_BYTES
    entries = 0
    pending: list[tuple[Path, PurePosixPath, int]] = [(directory, PurePosixPath(), 0)]
    while pending:
        folder, relative, depth = pending.pop()
        try:
            children = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            raise AdapterFileError(f"its folder '{relative or '.'}' cannot be read") from None
        for entry in children:
            entries += 1
            name = relative / entry.name
            if entries > MAX_ENTRIES:
                raise AdapterFileError(f"it has more than {MAX_ENTRIES} files and folders")
            real = Path(os.path.realpath(entry.path))
            if not real.is_relative_to(root):
                raise AdapterFileError(f"its file '{name}' links outside the allowed adapter roots")
            if real.is_dir():
                if depth + 1 > MAX_DEPTH:
                    raise AdapterFileError(f"its folder '{name}' is more than {MAX_DEPTH} folders deep")
                pending.append((real, name, depth + 1))
            elif _wanted(name):
                limit = MAX_TEMPLATE_BYTES if name.suffix == ".jinja" else MAX_FILE_BYTES
                if limit > budget:
                    limit, too_large = budget, f"its files are larger than {MAX_TOTAL_BYTES} bytes in all"
                else:
                    too_large = f"its file '{name}' is larger than {limit} bytes"
                files[str(name)] = _read_inside(real, root, str(name), limit, too_large)
                budget -= len(files[str(name)])
    return AdapterFiles(files)


def _wanted(name: PurePosixPath) -> bool:
    parts = name.parts
    return (len(parts) == 1 and parts[0] in ROUTER_FILES) or \
        (len(parts) == 2 and parts[0] == TEMPLATE_FOLDER and name.suffix == ".jinja")


def _read_inside(real: Path, root: Path, shown: str, limit: int, too_large: str) -> bytes:
    """The bytes of the regular file at `real`, opened without following a final link (O_NOFOLLOW) or blocking
    (a FIFO), and only if the opened file itself still lies inside `root`."""
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        raise AdapterFileError(f"its file '{shown}' cannot be read") from None
    try:
        opened = _opened_path(fd, real)
        if not opened.is_relative_to(root):
            raise AdapterFileError(f"its file '{shown}' links outside the allowed adapter roots")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AdapterFileError(f"its file '{shown}' is not a regular file")
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise AdapterFileError(too_large)
        return b"".join(chunks)
    except OSError:
        raise AdapterFileError(f"its file '{shown}' cannot be read") from None
    finally:
        os.close(fd)


def _opened_path(fd: int, fallback: Path) -> Path:
    """Where the descriptor really points (Linux: /proc/self/fd), else the path it was opened by."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return fallback


def _depth(value) -> int:
    """Nesting depth of a JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest
