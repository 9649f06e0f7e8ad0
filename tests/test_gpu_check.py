"""The GPU kit (bench/gpu_check) cannot rot while no GPU is at hand: its dry run (`GPU_CHECK_DRY=1 make gpu-check`)
runs every stage on CPU with tiny sizes and must pass, token parity included; and the wheel list `make
gpu-wheels` carries to the GPU machine is exactly what its image lacks or has too old."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from bench.gpu_check import wheels
from bench.gpu_check.__main__ import STAGES
from tests.conftest import REPO


def test_dry_run_passes_every_stage(tmp_path):
    pytest.importorskip("triton")  # its interpreter runs the CUDA kernels on CPU
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry", "--no-wheels", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "dry-run.json").read_text())
    stages = report["stages"]
    assert list(stages) == list(STAGES) and all(s["status"] == "ok" for s in stages.values()), stages
    parity = stages["parity"]["results"]
    assert parity["llama"]["alone"]["exact"] and parity["llama"]["batched"]["exact"]
    for case in ("busy_adapters", "preempted", "prefix_cached", "chunked"):
        assert parity[case]["exact"], (case, parity[case])
    assert parity["preempted"]["preemptions"] > 0 and parity["prefix_cached"]["hit_tokens"] > 0
    switches = stages["switches"]["results"]
    assert {k for k in switches} == {"triton_lora/float32", "triton_attention/float32", "cuda_graphs/float32"}
    assert all(v["exact"] for v in switches.values()) and switches["cuda_graphs/float32"]["padded_steps"] > 0
    kernels = stages["kernels"]["results"]
    assert any(k.startswith("sgmv_padded/") for k in kernels) and all("rel_error" in v for v in kernels.values())
    decode = stages["throughput"]["results"]
    assert {"decode/batch3/adapters3", "prefill/adapters3"} <= decode.keys()
    assert decode["decode/batch3/adapters3"]["tok_s"] > 0 and decode["decode/batch3/adapters3"]["roofline_tok_s"] > 0
    graphs = stages["graphs"]["results"]["decode/batch3/adapters3"]
    assert graphs["padded_tokens"]["exact"], graphs
    summary = (tmp_path / "dry-run.txt").read_text()
    assert "dry run (CPU)" in summary and "decode tok/s" in summary and "errors:" not in summary
    assert "==== stage graphs" in (tmp_path / "dry-run.log").read_text()


def test_on_a_gpu_each_stage_runs_in_a_fresh_interpreter(tmp_path):
    """The way the GPU run takes (a forked child of a process that touched the CUDA driver could not use it),
    here with the cheapest stage."""
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry", "--no-wheels", "--fresh", "--stages",
                           "machine", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stages = json.loads((tmp_path / "dry-run.json").read_text())["stages"]
    assert list(stages) == ["machine"] and stages["machine"]["status"] == "ok"
    machine = stages["machine"]["results"]
    assert machine["machine"]["torch"] and all("error" not in machine[f"import/{m}"] for m in ("shard.engine", "peft"))


def test_a_stage_past_its_deadline_is_cut_and_the_run_goes_on(tmp_path):
    from bench.gpu_check.__main__ import run_stage
    from bench.gpu_check.common import DRY

    with open(tmp_path / "log", "w") as log:
        result = run_stage("parity", DRY, tmp_path, log, deadline_s=1.0, fresh=True)
    assert result["status"] == "timeout" and result["seconds"] < 30


# ---- the wheels ----------------------------------------------------------------------------------------


def requires_of(metadata: dict[str, list[str]], asked: list[str]):
    def fetch(packages: dict[str, str]) -> list[Requirement]:
        asked.extend(packages)
        return [Requirement(r) for name in packages for r in metadata.get(name, [])]
    return fetch


def test_plan_carries_what_the_image_lacks_or_has_too_old():
    lock = {"a": "2.0", "b": "1.5", "c": "3.0", "d": "1.0", "torch": "2.13.0", "f": "0.9"}
    image = {"a": "1.0", "b": None, "c": "3.1", "torch": "2.11.0", "setuptools": None, "f": None}
    metadata = {"a": ["b>=1.2", "d", "c<4", "e; python_version < '3.11'", "g; extra == 'dev'"],
                "d": ["setuptools>=70", "torch>=2.12"]}
    asked: list[str] = []
    direct = [Requirement(r) for r in ("a>=2", "c>=3", "torch==2.13.0", "f")]
    carried = wheels.plan(lock, image, direct, requires_of(metadata, asked))
    # a: too old; b: bounded by a's metadata, its version there unknown; d: missing. c and f are served (f has
    # no bound), torch stays the image's build, setuptools (not in the lock) too, e and g do not apply there.
    assert carried == {"a": "2.0", "b": "1.5", "d": "1.0"}
    assert sorted(asked) == ["a", "b", "d"]  # each wheel's metadata read once


def test_plan_refuses_what_it_cannot_carry():
    with pytest.raises(wheels.PlanError, match="x is not in requirements.lock"):
        wheels.plan({}, {}, [Requirement("x")], requires_of({}, []))
    with pytest.raises(wheels.PlanError, match="requirements.lock has a==1.0"):
        wheels.plan({"a": "1.0"}, {}, [Requirement("a>=2")], requires_of({}, []))


def test_the_real_lock_against_the_image_list():
    """Loom's own stack: what the image lacks (the router's web stack, llguidance, gguf), what it has too old
    (transformers 5.17, huggingface_hub 1.33), what it has at a version it does not state but Loom bounds;
    never torch, never what it has at a good version."""
    lock, image = wheels.read_lock(), wheels.read_image()
    assert image["transformers"] == "5.17.0" and image["torch"] == "2.11.0" and "starlette" not in image
    carried = wheels.plan(lock, image, wheels.runtime_requirements(), requires_of({}, []))
    assert {"transformers", "huggingface-hub", "starlette", "uvicorn", "pydantic", "llguidance", "gguf", "httptools",
            "peft", "grpcio", "protobuf"} <= carried.keys()
    assert not {"torch", "safetensors", "tokenizers"} & carried.keys()  # 0.8.0 and 0.23.2 there meet the floors
    assert all(carried[name] == lock[name] for name in carried)


def test_download_asks_for_cpython_312_manylinux_wheels_without_dependencies(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(wheels.subprocess, "run", lambda cmd, check: calls.append(cmd))
    wheels.download({"starlette": "1.10.0"}, tmp_path)
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "pip", "download"] and cmd[-1] == "starlette==1.10.0"
    for flag in ("--no-deps", "--only-binary=:all:"):
        assert flag in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and cmd[cmd.index("--implementation") + 1] == "cp"
    platforms = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--platform"]
    assert platforms[0] == "manylinux2014_x86_64" and "manylinux_2_39_x86_64" in platforms
