"""`make bench`'s harness end to end at a tiny scale: it builds its model and adapters, launches Loom, runs
every workload over HTTP, in-process and through transformers + PEFT, and reports each target with plots.
(The figures themselves come from the full-size run; here only that every part runs and reports.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_bench_runs_every_workload_and_reports_every_target(tmp_path: Path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench", "--requests", "6", "--output-len", "4", "4", "--adapters", "3",
           "--many-adapters", "8", "--repeats", "1", "--rate", "0", "--distributions", "base", "distinct",
           "--decode-heavy", "3", "--mixed", "2", "--step-batch", "4",
           "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads((out / "latest.json").read_text())
    assert set(result["runs"]) == {"http/base", "http/distinct-3", "http/uniform-3", "http/uniform-8",
                                   "http/decode-heavy-3", "http/mixed-3", "engine/base", "engine/distinct-3",
                                   "engine/decode-heavy-3", "engine/mixed-3", "peft/distinct-3", "peft/decode-heavy-3",
                                   "peft/mixed-3"}
    for name, run in result["runs"].items():
        assert run["throughput_tok_s"] > 0, name
        assert run["ttft_p50_ms"] <= run["ttft_p99_ms"], name
        assert run["throughput_tok_s"] < run["roofline_tok_s"], name  # nothing beats its own matmuls
    assert result["runs"]["http/decode-heavy-3"]["output_tokens"] == 3 * 128
    assert result["runs"]["http/mixed-3"]["output_tokens"] == 2 * 32
    assert set(result["targets"]) == {"loom_vs_peft", "decode_heavy_vs_peft", "mixed_vs_peft", "lora_vs_base",
                                      "http_vs_inprocess", "http_vs_inprocess_decode_heavy", "http_vs_inprocess_mixed",
                                      "adapters_8_vs_3", "decode_step_vs_matmuls"}
    step = result["decode_step"]
    assert step["batch"] == 4 and step["adapters"] == 3 and step["matmul_calls"] > 0
    assert step["step_ms"] > step["matmul_ms"] > 0  # a step is its matmuls and more
    for plot in result["plots"]:
        assert Path(plot).stat().st_size > 0
    assert "loom_vs_peft" in proc.stdout  # the printed table


def test_kv_bench_runs_every_scenario(tmp_path: Path):
    """`make bench-kv` at a tiny scale: every scenario runs on both sides and reports its ratio."""
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench.kv", "--chats", "6", "--turns", "6", "--streams", "2", "--stream-tokens", "6",
           "--long-tokens", "300", "--long-arrival", "0.05", "--ttft-runs", "1",
           "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "kv.json").read_text())
    chats, prefix, chunked = result["chats"], result["prefix"], result["chunked"]
    assert chats["reservations_held"] == 16 and chats["reservation"]["peak_running"] <= 16
    assert chats["on_demand"]["peak_running"] == 6 and chats["batch_ratio"] > 0
    assert prefix["prefix_cache"]["prompt_tokens_computed"] < prefix["no_prefix_cache"]["prompt_tokens_computed"]
    assert prefix["no_prefix_cache"]["prompt_tokens_computed"] == prefix["no_prefix_cache"]["prompt_tokens"]
    assert chunked["decode_step_ms"] > 0
    assert 128 <= chunked["measured"]["budget"] <= 4096 and chunked["fixed"]["budget"] == 4096
    for name in ("steady", "measured", "fixed"):
        assert chunked[name]["gap_max_vs_p50"] >= 1, name
    for name in ("measured", "fixed"):
        assert len(chunked[name]["long_ttft_ms"]) == 2 and chunked[name]["lone_ttft_ms"] > 0, name
    assert chunked["lone_ttft_ratio"] > 0
