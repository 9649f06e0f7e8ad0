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


def test_peers_report_figures_agreement_and_tables():
    """`make bench-peers`' figures, on synthetic results (the bench itself needs vLLM and llama.cpp installed)."""
    from bench.peers import report
    from bench.peers.load import Result
    from bench.stats import Timing

    results = [Result(Timing(0.0, [0.5, 0.7, 0.8]), "abc def", 3), Result(Timing(0.0, [1.5, 1.6]), "x", 2)]
    figures = report.summarize(results, wall=2.0, new_tokens=3)
    assert figures["output_tokens"] == 5 and figures["throughput_tok_s"] == 2.5
    assert figures["short_requests"] == 1  # the second request stopped short of its 3 tokens
    assert (figures["ttft_p50_ms"], figures["ttft_p95_ms"]) == (500.0, 1500.0)
    assert figures["itl_p50_ms"] == 100.0  # gaps 200, 100, 100 ms pooled over requests

    texts = {"loom": [["abc def", "x y"]], "vllm": [["abc deg", "x y"]], "llamacpp": [["abc def", "x y"]]}
    agree = report.agreement(texts, count_tokens=lambda text: len(text.split()))
    assert agree["loom/llamacpp"]["identical"] == 2 and agree["loom/llamacpp"]["first_divergence_tokens_min"] is None
    assert agree["loom/vllm"] == {"compared": 2, "identical": 1, "identical_share": 0.5,
                                  "first_divergence_tokens_min": 2, "first_divergence_tokens_p50": 2}  # "abc de"

    runs = {name: {"w": report.median_run([dict(figures, throughput_tok_s=tps), dict(figures, throughput_tok_s=tps + 2)])}
            for name, tps in (("loom", 40.0), ("vllm", 20.0), ("llamacpp", 10.0))}
    result = {"servers": list(runs), "workloads": ["w"], "runs": runs, "agreement": {"w": agree},
              "config": {"requests": 2}}
    table = report.markdown(result)
    assert "| w | 40 (40, 42) | 20 (20, 22) | 10 (10, 12) | 2.00× | 4.00× |" in table  # median repeat, each repeat
    assert "| w | Loom / vLLM CPU | 1/2 | 2 / 2 |" in table


def test_peers_prompts_are_exact_length_distinct_and_seeded():
    from bench.peers.load import WORKLOADS, make_requests

    def tokenizer(text, add_special_tokens):
        return {"input_ids": [sum(map(ord, word)) for word in text.split()]}

    heavy = next(w for w in WORKLOADS if w.adapters and w.new_tokens == 128)
    requests = make_requests(heavy, tokenizer, count=20, adapters=16, seed=3)
    assert [r.adapter for r in requests] == [i % 16 for i in range(20)]
    assert {len(r.prompt) for r in requests} == {heavy.prompt_tokens}
    assert len({tuple(r.prompt) for r in requests}) == 20
    assert requests == make_requests(heavy, tokenizer, count=20, adapters=16, seed=3)
    assert requests[0].prompt != make_requests(heavy, tokenizer, count=1, adapters=16, seed=4)[0].prompt
