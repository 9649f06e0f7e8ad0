"""The router's one log line per request (its format is common/logs.py's)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.generation import GenerationStats

request_log = logging.getLogger("loom.requests")


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
