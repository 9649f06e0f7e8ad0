"""The results: ratios against the targets, a compact table, and PNG plots."""

from __future__ import annotations

from pathlib import Path

# (name, numerator run, denominator run, target): each target of the issue as a throughput ratio.
def targets(adapters: int, many_adapters: int) -> list[tuple[str, str, str, float]]:
    """(name, numerator run, denominator run, target ratio) of the issue's targets for these adapter counts."""
    served, heavy, mixed = f"http/distinct-{adapters}", f"decode-heavy-{adapters}", f"mixed-{adapters}"
    return [
        ("loom_vs_peft", served, f"peft/distinct-{adapters}", 20.0),
        ("decode_heavy_vs_peft", f"http/{heavy}", f"peft/{heavy}", 20.0),
        ("mixed_vs_peft", f"http/{mixed}", f"peft/{mixed}", 7.0),
        ("lora_vs_base", served, "http/base", 0.9),
        ("http_vs_inprocess", served, f"engine/distinct-{adapters}", 0.95),
        ("http_vs_inprocess_decode_heavy", f"http/{heavy}", f"engine/{heavy}", 0.95),
        ("http_vs_inprocess_mixed", f"http/{mixed}", f"engine/{mixed}", 0.95),
        (f"adapters_{many_adapters}_vs_{adapters}", f"http/uniform-{many_adapters}", f"http/uniform-{adapters}", 0.9),
    ]


def merge_repeats(repeats: list[dict]) -> dict:
    """The repeat with the median throughput, plus every repeat's throughput."""
    ordered = sorted(repeats, key=lambda r: r["throughput_tok_s"])
    median = dict(ordered[(len(ordered) - 1) // 2])
    median["throughput_repeats"] = [r["throughput_tok_s"] for r in repeats]
    return median


def ratios(runs: dict[str, dict], adapters: int, many_adapters: int) -> dict[str, dict]:
    """Each target's ratio of median throughputs, and the ratio within every repeat (runs of one repeat ran
    back to back, so their ratio is the least noisy figure)."""
    out = {}
    for name, num, den, target in targets(adapters, many_adapters):
        if num not in runs or den not in runs:
            continue
        a, b = runs[num]["throughput_repeats"], runs[den]["throughput_repeats"]
        per_repeat = [x / y for x, y in zip(a, b)] if len(a) == len(b) else []
        value = runs[num]["throughput_tok_s"] / runs[den]["throughput_tok_s"]
        out[name] = {"ratio": round(value, 3), "per_repeat": [round(r, 3) for r in per_repeat],
                     "target": target, "met": value >= target, "of": f"{num} / {den}"}
    return out


def step_check(step: dict, target: float = 1.3) -> dict:
    """The isolated decode step against the time its own matmuls take alone: the lower the better."""
    return {"ratio": step["ratio"], "per_repeat": [], "target": target, "met": step["ratio"] <= target,
            "at_most": True, "of": f"decode step / its matmuls alone (batch {step['batch']}, context "
                                   f"{step['context']}, {step['adapters']} adapters)"}


def table(runs: dict[str, dict], checks: dict[str, dict]) -> str:
    head = (f"{'run':<26}{'tok/s':>9}{'roofline':>10}{'of it':>7}{'req/s':>8}{'TTFT p50':>10}{'p99':>8}"
            f"{'TPOT p50':>10}{'p99':>8}  repeats")
    lines = [head, "-" * len(head)]
    for name, r in runs.items():
        reps = " ".join(f"{x:g}" for x in r["throughput_repeats"])
        roof = r.get("roofline_tok_s", 0.0)
        share = f"{r['throughput_tok_s'] / roof:.0%}" if roof else "-"
        lines.append(f"{name:<26}{r['throughput_tok_s']:>9.1f}{roof:>10.1f}{share:>7}{r['throughput_req_s']:>8.2f}"
                     f"{r['ttft_p50_ms']:>10.0f}{r['ttft_p99_ms']:>8.0f}{r['tpot_p50_ms']:>10.1f}{r['tpot_p99_ms']:>8.1f}"
                     f"  {reps}")
    lines.append("")
    for name, c in checks.items():
        spread = f" (per repeat {', '.join(map(str, c['per_repeat']))})" if len(c["per_repeat"]) > 1 else ""
        lines.append(f"{name:<32}{c['ratio']:>8.3f}  target {'<=' if c.get('at_most') else '>='} {c['target']:g}  "
                     f"{'MET' if c['met'] else 'MISSED'}  {c['of']}{spread}")
    return "\n".join(lines)


def plot(runs: dict[str, dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    values = [runs[n]["throughput_tok_s"] for n in names]
    ax.bar(names, values, color=["tab:gray" if n.startswith("peft") else "tab:blue" for n in names])
    for i, n in enumerate(names):
        reps = runs[n]["throughput_repeats"]
        ax.vlines(i, min(reps), max(reps), color="black")
    ax.set_ylabel("output tokens / s")
    ax.set_title("Throughput (bar: median repeat, line: spread of repeats)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    throughput = out_dir / "throughput.png"
    fig.savefig(throughput, dpi=110)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(names))
    for ax, metric, label in ((ax1, "ttft", "TTFT (ms)"), (ax2, "tpot", "time per output token (ms)")):
        ax.bar([i - 0.2 for i in x], [runs[n][f"{metric}_p50_ms"] for n in names], 0.4, label="p50")
        ax.bar([i + 0.2 for i in x], [runs[n][f"{metric}_p99_ms"] for n in names], 0.4, label="p99")
        ax.set_xticks(list(x), names, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    latency = out_dir / "latency.png"
    fig.savefig(latency, dpi=110)
    plt.close(fig)
    return [throughput, latency]
