"""Per-request timings and the figures reported for a run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Timing:
    sent: float  # seconds from the run's start to the request's arrival
    tokens: list[float]  # each output token's time after `sent`

    @property
    def ttft(self) -> float:
        return self.tokens[0]

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first."""
        return (self.tokens[-1] - self.tokens[0]) / max(len(self.tokens) - 1, 1)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(timings: list[Timing], wall: float) -> dict:
    tokens = sum(len(t.tokens) for t in timings)
    ttft = [t.ttft for t in timings]
    tpot = [t.tpot for t in timings]
    return {
        "requests": len(timings),
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "throughput_tok_s": round(tokens / wall, 1),
        "throughput_req_s": round(len(timings) / wall, 2),
        "ttft_p50_ms": round(percentile(ttft, 0.5) * 1000, 1),
        "ttft_p99_ms": round(percentile(ttft, 0.99) * 1000, 1),
        "tpot_p50_ms": round(percentile(tpot, 0.5) * 1000, 2),
        "tpot_p99_ms": round(percentile(tpot, 0.99) * 1000, 2),
    }
