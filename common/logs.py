"""One log format for every process: text lines, or JSON lines.

`loom --json-output` sets LOOM_LOG_FORMAT=json for itself and its children: every line is then a JSON object
whose `target` names the process, and structured records (the router's request lines) carry their fields as keys.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import datetime, timezone


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "target": self.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


# C0 and C1 control characters (newlines included) and the Unicode line separators: in a text log they could
# start a forged line or hide one.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """`text` with each control character written as an escape (a newline becomes the two characters \\n)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class TextFormatter(logging.Formatter):
    """One record, one line: control characters in the message are escaped. A traceback (or stack) keeps its
    lines, each escaped and indented, so that no text in it (an exception's message) can start a line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("    " + escape_controls(line) for line in text.split("\n"))


def log_handler(process: str) -> logging.Handler:
    """A stderr handler for one process ("loom", "router", "shard0", ...): text lines, or JSON lines when
    LOOM_LOG_FORMAT=json."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("LOOM_LOG_FORMAT") == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(TextFormatter(f"%(asctime)s {process} %(levelname)s %(message)s"))
    return handler


def configure_logging(process: str) -> None:
    """Root logging for one child process of the launcher (the router, each shard)."""
    logging.basicConfig(level=logging.INFO, handlers=[log_handler(process)], force=True)
