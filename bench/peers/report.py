"""Figures of a peers run: per-run summaries, the median repeat, greedy agreement across servers, and the
markdown tables the README quotes."""

from __future__ import annotations

import os
from itertools import combinations

from bench.report import merge_repeats
from bench.stats import percentile

LABELS = {"loom": "Loom", "vllm": "vLLM CPU", "llamacpp": "llama.cpp server"}


def summarize(results: list, wall: float, new_tokens: int) -> dict:
    """One run's figures: output tok/s over the run's wall time, TTFT p50/p95 and the p50 of every gap
    between two text chunks of a request (inter-token latency), pooled over requests."""
    ttft = [r.timing.tokens[0] for r in results if r.timing.tokens]
    gaps = [b - a for r in results for a, b in zip(r.timing.tokens, r.timing.tokens[1:])]
    tokens = sum(r.tokens for r in results)
    return {
        "requests": len(results),
        "output_tokens": tokens,
        "short_requests": sum(r.tokens != new_tokens for r in results),
        "wall_s": round(wall, 3),
        "throughput_tok_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(percentile(ttft, 0.5) * 1000, 1) if ttft else None,
        "ttft_p95_ms": round(percentile(ttft, 0.95) * 1000, 1) if ttft else None,
        "itl_p50_ms": round(percentile(gaps, 0.5) * 1000, 2) if gaps else None,
    }


def median_run(repeats: list[dict]) -> dict:
    """The repeat with the median throughput, every repeat's figures beside it."""
    out = merge_repeats(repeats)
    out["repeats"] = [{k: r[k] for k in ("throughput_tok_s", "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms")}
                      for r in repeats]
    return out


def agreement(texts: dict[str, list[list[str]]], count_tokens) -> dict[str, dict]:
    """For every pair of servers: the share of requests whose greedy completions are identical, and for the
    others the first divergence, in tokens of the common prefix (`count_tokens(text)`). `texts[server][repeat]`
    lists completions in request order; every server served the same prompts."""
    out = {}
    for a, b in combinations(texts, 2):
        pairs = [(x, y) for ra, rb in zip(texts[a], texts[b]) for x, y in zip(ra, rb)]
        diverged = sorted(count_tokens(os.path.commonprefix([x, y])) for x, y in pairs if x != y)
        out[f"{a}/{b}"] = {
            "compared": len(pairs),
            "identical": len(pairs) - len(diverged),
            "identical_share": round(1 - len(diverged) / len(pairs), 3) if pairs else None,
            "first_divergence_tokens_min": diverged[0] if diverged else None,
            "first_divergence_tokens_p50": percentile(diverged, 0.5) if diverged else None,
        }
    return out


def _fmt(x, spec: str = ".0f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    """Three tables: output tok/s side by side (median and per repeat, with ratios to the first server),
    latencies, and greedy agreement."""
    servers = result["servers"]
    runs = result["runs"]
    first = servers[0]
    n = result["config"]["requests"]
    head = [f"workload ({n} requests)"] + [LABELS.get(s, s) for s in servers]
    head += [f"{LABELS.get(first, first)} / {LABELS.get(s, s)}" for s in servers[1:]]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for w in result["workloads"]:
        cells = [w]
        for s in servers:
            r = runs.get(s, {}).get(w)
            cells.append("–" if r is None else
                         f"{r['throughput_tok_s']:.0f} ({', '.join(_fmt(x['throughput_tok_s']) for x in r['repeats'])})")
        for s in servers[1:]:
            a, b = runs.get(first, {}).get(w), runs.get(s, {}).get(w)
            cells.append(f"{a['throughput_tok_s'] / b['throughput_tok_s']:.2f}×" if a and b else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| workload | server | tok/s | TTFT p50 (ms) | TTFT p95 (ms) | ITL p50 (ms) | short requests |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for w in result["workloads"]:
        for s in servers:
            if (r := runs.get(s, {}).get(w)) is not None:
                lines.append(f"| {w} | {LABELS.get(s, s)} | {r['throughput_tok_s']:.1f} | {_fmt(r['ttft_p50_ms'])} | "
                             f"{_fmt(r['ttft_p95_ms'])} | {_fmt(r['itl_p50_ms'], '.1f')} | {r['short_requests']} |")
    lines += ["", "| workload | servers | identical greedy completions | first divergence (tokens, min / p50) |",
              "| --- | --- | ---: | ---: |"]
    for w, pairs in result["agreement"].items():
        for pair, a in pairs.items():
            names = " / ".join(LABELS.get(s, s) for s in pair.split("/"))
            lines.append(f"| {w} | {names} | {a['identical']}/{a['compared']} | "
                         f"{_fmt(a['first_divergence_tokens_min'], 'd')} / {_fmt(a['first_divergence_tokens_p50'], 'd')} |")
    lines += [f"\n{LABELS.get(s, s)} failed: {err}" for s, err in result.get("errors", {}).items()]
    return "\n".join(lines) + "\n"
