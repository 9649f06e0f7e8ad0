"""The report's short text: what ran, what failed, and the figures the README's GPU section quotes."""

from __future__ import annotations

import re

HEADLINE = ("batch64", "adapters16")  # the figure the issue asks for: decode at batch 64 with 16 adapters


def summary(report: dict) -> str:
    stages = report["stages"]
    lines = [_title(report), f"wheels: {report.get('install', {}).get('status', 'not installed')}",
             "stages: " + " | ".join(f"{n} {s['status']} {s.get('seconds', 0):.0f}s" for n, s in stages.items())]
    lines += _headline(stages)
    lines += _matches("parity (float32: tokens against transformers + peft)", stages.get("parity"))
    lines += _matches("bf16 (tokens against transformers bf16)", stages.get("bf16"))
    lines += _kernels(stages.get("kernels"))
    lines += _matches("switches (tokens with the path on against off)", stages.get("switches"))
    lines += _table("decode tok/s (share of the bandwidth roofline)", stages.get("throughput"), "tok_s",
                    "of_roofline")
    lines += _prefill_and_memory(stages.get("throughput"))
    lines += _table("graphs: decode tok/s replayed (÷ unpadded eager)", stages.get("graphs"), "graphs_tok_s",
                    "graphs_over_default", ratio=True)
    lines += _errors(stages)
    return "\n".join(lines) + "\n"


def _title(report: dict) -> str:
    machine = report["stages"].get("machine", {}).get("results", {}).get("machine", {})
    parts = ["Loom GPU check", report["date"], "dry run (CPU)" if report["dry"] else machine.get("gpu", "?")]
    if "," in machine.get("nvidia_smi", ""):  # name, memory, driver
        parts.append(f"driver {machine['nvidia_smi'].split(',')[-1].strip()}")
    parts += [f"{k} {machine[k]}" for k in ("torch", "cuda", "triton") if machine.get(k)]
    return " · ".join(parts) + f" · {report.get('seconds', 0):.0f} s"


def _results(stage: dict | None) -> dict:
    return (stage or {}).get("results", {})


def _headline(stages: dict) -> list[str]:
    decode = _results(stages.get("throughput"))
    key = f"decode/{HEADLINE[0]}/{HEADLINE[1]}"
    if "tok_s" not in decode.get(key, {}):
        return []
    row, base = decode[key], decode.get(f"decode/{HEADLINE[0]}/adapters0", {})
    text = (f"headline (batch 64, 16 adapters): {row['tok_s']:,.0f} tok/s, {row['of_roofline']:.0%} of the "
            "bandwidth roofline")
    if base.get("tok_s"):
        text += f"; LoRA ÷ base {row['tok_s'] / base['tok_s']:.2f}"
    graphs = _results(stages.get("graphs")).get(key, {})
    if graphs.get("graphs_over_default"):
        text += f"; graphs on ÷ off {graphs['graphs_over_default']:.2f}"
    return [text]


def _describe(match: dict) -> str:
    if match.get("exact"):
        return "exact"
    identical, first = match.get("identical_tokens", 0), match.get("first_divergence")
    return f"{identical:.1%} identical, first divergence at token {first}"


def _matches(title: str, stage: dict | None) -> list[str]:
    results = _results(stage)
    if not results:
        return []
    parts = []
    for case, value in results.items():
        if not isinstance(value, dict) or "error" in value:
            continue
        matches = {k: v for k, v in value.items() if isinstance(v, dict) and "exact" in v}
        if "exact" in value:
            matches[""] = value
        extra = [f"{k} {value[k]}" for k in ("preemptions", "hit_tokens", "adapters", "graphs", "padded_steps",
                                             "varlen_active") if k in value]
        described = ", ".join(f"{k + ' ' if k else ''}{_describe(m)}" for k, m in matches.items())
        parts.append(f"{case}: {described}" + (f" ({', '.join(extra)})" if extra else ""))
    return [f"{title}:"] + [f"  {p}" for p in parts]


def _kernels(stage: dict | None) -> list[str]:
    results = {k: v for k, v in _results(stage).items() if isinstance(v, dict)}
    if not results:
        return []
    worst: dict[str, float] = {}
    for case, value in results.items():
        if "rel_error" in value:
            group = re.sub(r"/\d+$", "", case)
            worst[group] = max(worst.get(group, 0.0), value["rel_error"])
    failed = [case for case, value in results.items() if "error" in value]
    lines = ["kernels (worst relative error against the torch twin): "
             + ", ".join(f"{g} {e:.1e}" for g, e in worst.items())]
    return lines + ([f"  failed: {', '.join(failed)}"] if failed else [])


def _table(title: str, stage: dict | None, field: str, share: str, ratio: bool = False) -> list[str]:
    rows: dict[str, dict[str, str]] = {}
    for case, value in _results(stage).items():
        m = re.fullmatch(r"decode/batch(\d+)/adapters(\d+)", case)
        if m and isinstance(value, dict) and field in value:
            cell = f"{value[field]:,.0f} ({value[share]:.2f}x)" if ratio else \
                f"{value[field]:,.0f} ({value[share]:.0%})"
            rows.setdefault(m[2], {})[m[1]] = cell
    if not rows:
        return []
    batches = sorted({b for r in rows.values() for b in r}, key=int)
    lines = [f"{title}:", "  adapters \\ batch " + "".join(f"{b:>20}" for b in batches)]
    for adapters in sorted(rows, key=int):
        lines.append(f"  {adapters:>16} " + "".join(f"{rows[adapters].get(b, '-'):>20}" for b in batches))
    return lines


def _prefill_and_memory(stage: dict | None) -> list[str]:
    results = _results(stage)
    lines = [f"prefill, {k.split('/')[1]}: {v['tok_s']:,.0f} tok/s ({v['of_roofline']:.0%} of the matmul roofline)"
             for k, v in results.items() if k.startswith("prefill/") and "tok_s" in v]
    memory = results.get("memory")
    if memory:
        lines.append(f"memory: activation peak {memory['activation_peak_bytes'] / 2**30:.2f} GiB against "
                     f"{memory['warmup_reserved_bytes'] / 2**30:.2f} GiB the warmup kept free "
                     f"({memory['peak_over_reserved']:.2f}x)")
    return lines


def _errors(stages: dict) -> list[str]:
    lines = []
    for name, stage in stages.items():
        for case, value in _results(stage).items():
            error = value.get("error") if isinstance(value, dict) else (value if case == "error" else None)
            if error:
                lines.append(f"  {name}/{case}: {error.splitlines()[0][:200]}")
    return ["errors:"] + lines if lines else []
