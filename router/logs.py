"""Log setup for the router and shard processes, and the router's one line per request.

`loom --json-output` sets LOOM_LOG_FORMAT=json for its children: every line is then a JSON object, and the
request lines carry their fields as keys.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the shards use this module too; they need none of the router
    from router.generation import GenerationStats

request_log = logging.getLogger("loom.requests")


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
    """One record, one line: control characters in the message are escaped; a traceback keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def configure_logging(process: str) -> None:
    """Root logging for one child process ("router", "shard0", ...): text, or JSON lines when the launcher
    asked for them."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("LOOM_LOG_FORMAT") == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(TextFormatter(f"%(asctime)s {process} %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


@dataclass(slots=True)
class RequestLine:
    """What the router logs when a request ends."""

    id: str
    method: str
    route: str
    status: int
    total_ms: float
    adapter: str = ""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    queue_ms: float | None = None
    ttft_ms: float | None = None
    finish_reason: str = ""

    def add_generations(self, generations: list[GenerationStats]) -> None:
        """A request may run several generations (n > 1): tokens add up, the slowest queue and the first
        token count."""
        if not generations:
            return
        self.adapter = generations[0].adapter_id
        self.prompt_tokens = generations[0].prompt_tokens
        self.generated_tokens = sum(g.generated for g in generations)
        self.queue_ms = _ms(max(g.queue_s for g in generations))
        first = [t for g in generations if (t := g.ttft_s) is not None]
        self.ttft_ms = _ms(min(first)) if first else None
        self.finish_reason = ",".join(sorted({g.finish_reason or "running" for g in generations}))

    def log(self) -> None:
        fields = asdict(self)
        text = " ".join(f"{k}={'-' if v in (None, '') else v}" for k, v in fields.items())
        request_log.info("request %s", text, extra={"fields": fields})


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)
