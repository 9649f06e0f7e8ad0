"""The `loom` launcher: flags, model resolution and supervision of the shard and router processes.

Supervision runs against two implementations: "fake" (tiny stand-ins for `python -m shard` and
`python -m router`, written below into a copy of the project, so the launcher is tested on its own) and
"real" (this repo's shard/ and router/, skipped until both have a __main__.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from argparse import Namespace
from pathlib import Path

import psutil
import pytest

from launcher.cli import FlagError, derive_limits
from launcher.model_source import DEMO_DIR_NAME, ModelSourceError, resolve_model
from launcher.tiny_model import build_tiny_model

REPO = Path(__file__).resolve().parent.parent
REAL_IMPL_MISSING = not (REPO / "shard" / "__main__.py").exists() or not (REPO / "router" / "__main__.py").exists()
READY_TIMEOUT_S = 180.0
ALL_FLAGS = [
    "--model-id", "--port", "--hostname", "--num-shard", "--device", "--dtype", "--adapter",
    "--local-adapter-root", "--adapter-source", "--max-input-length", "--max-total-tokens",
    "--max-batch-prefill-tokens", "--max-batch-total-tokens", "--max-concurrent-requests",
    "--max-active-adapters", "--api-key", "--json-output",
]

FAKE_SHARD = '''
"""Stand-in shard: answers Health on its socket; records its argv and thread env."""
import argparse, json, os, sys
from concurrent import futures
import grpc
from proto import generate_pb2, generate_pb2_grpc

class Shard(generate_pb2_grpc.ShardServicer):
    def Health(self, request, context):
        return generate_pb2.HealthResponse()

p = argparse.ArgumentParser()
for flag in ("--model-dir", "--uds", "--master-addr", "--device", "--dtype"):
    p.add_argument(flag, required=True)
for flag in ("--rank", "--world-size", "--master-port"):
    p.add_argument(flag, type=int, required=True)
args = p.parse_args()
record = {"argv": sys.argv[1:], "LOOM_NUM_THREADS": os.environ.get("LOOM_NUM_THREADS")}
with open(os.path.join(os.environ["LOOM_FAKE_RECORD"], f"shard-{args.rank}.json"), "w") as f:
    json.dump(record, f)
if os.environ.get("FAKE_SHARD_EXIT_RANK") == str(args.rank):
    sys.exit(3)
server = grpc.server(futures.ThreadPoolExecutor(2))
generate_pb2_grpc.add_ShardServicer_to_server(Shard(), server)
server.add_insecure_port(f"unix://{args.uds}")
server.start()
server.wait_for_termination()
'''

FAKE_ROUTER = '''
"""Stand-in router: serves GET /health with 200; records the config it was given."""
import argparse, os, shutil
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from router.config import RouterConfig

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass

p = argparse.ArgumentParser()
p.add_argument("--config", required=True)
args = p.parse_args()
config = RouterConfig.from_file(args.config)
shutil.copy(args.config, os.path.join(os.environ["LOOM_FAKE_RECORD"], "router.json"))
ThreadingHTTPServer((config.hostname, config.port), Handler).serve_forever()
'''


# ---- fixtures and helpers ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def fake_root(tmp_path_factory) -> Path:
    """A copy of the launcher, proto and router config next to fake shard/router entry points."""
    root = tmp_path_factory.mktemp("fake-project")
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "launcher", root / "launcher", ignore=ignore)
    shutil.copytree(REPO / "proto", root / "proto", ignore=ignore)
    (root / "router").mkdir()
    for name in ("__init__.py", "config.py"):
        shutil.copy(REPO / "router" / name, root / "router" / name)
    (root / "router" / "__main__.py").write_text(textwrap.dedent(FAKE_ROUTER))
    (root / "shard").mkdir()
    (root / "shard" / "__init__.py").write_text("")
    (root / "shard" / "__main__.py").write_text(textwrap.dedent(FAKE_SHARD))
    return root


@pytest.fixture(params=["fake", "real"])
def impl_root(request, fake_root) -> Path:
    if request.param == "real" and REAL_IMPL_MISSING:  # remove once shard/ and router/ have landed
        pytest.skip("shard/__main__.py or router/__main__.py does not exist yet")
    return fake_root if request.param == "fake" else REPO


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """The launcher's environment: a private demo cache and hub cache, no hub access, no api key."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOOM_API_KEY", "PYTHONPATH", "HF_TOKEN")}
    env.update(LOOM_CACHE=str(tmp_path / "loom-cache"), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
               LOOM_FAKE_RECORD=str(tmp_path))
    return env


def loom(*args: str, env: dict[str, str], cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launcher:
    """A `loom` process in the background, its output in a file (a pipe could fill up and block it)."""

    def __init__(self, root: Path, env: dict[str, str], log_path: Path, *args: str):
        self.port = free_port()
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "launcher", "--port", str(self.port), *args],
                                         cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.children: list[psutil.Process] = []

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "Loom is ready" not in self.output():
            assert self.proc.poll() is None, f"loom exited with {self.proc.returncode}:\n{self.output()}"
            assert time.monotonic() < deadline, f"loom not ready:\n{self.output()}"
            time.sleep(0.2)
        self.children = psutil.Process(self.proc.pid).children(recursive=True)

    def shard(self, rank: int) -> psutil.Process:
        return next(p for p in self.children if "shard" in p.cmdline() and p.cmdline()[p.cmdline().index("--rank") + 1] == str(rank))

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"loom still running after {timeout} s:\n{self.output()}")

    def kill(self) -> None:
        """Cleanup after a failed test: nothing may leak into the next one."""
        for proc in self.children:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def gone(procs: list[psutil.Process], timeout: float = 10.0) -> bool:
    """True when every process exited (a zombie waiting for a reaper counts as exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in procs):
                return True
        except psutil.NoSuchProcess:
            continue
        time.sleep(0.1)
    return False


@pytest.fixture
def start_loom(tmp_path, env):
    launchers: list[Launcher] = []

    def start(root: Path, *args: str, extra_env: dict[str, str] | None = None) -> Launcher:
        launcher = Launcher(root, {**env, **(extra_env or {})}, tmp_path / f"loom-{len(launchers)}.log", *args)
        launchers.append(launcher)
        return launcher

    yield start
    for launcher in launchers:
        launcher.kill()


# ---- flags ---------------------------------------------------------------------------------------------


def test_help_mentions_every_flag(env):
    result = loom("--help", env=env)
    assert result.returncode == 0
    for flag in ALL_FLAGS:
        assert flag in result.stdout, flag


@pytest.mark.parametrize("args, flag", [
    (["--adapter", "no-equals-sign"], "--adapter"),
    (["--adapter", "=some/adapter"], "--adapter"),
    (["--adapter", "a=x/y", "--adapter", "a=x/z"], "--adapter"),
    (["--max-input-length", "2048", "--max-total-tokens", "1024"], "--max-input-length"),
    (["--max-input-length", "2000", "--max-batch-prefill-tokens", "1000"], "--max-batch-prefill-tokens"),
    (["--max-total-tokens", "2048", "--max-batch-total-tokens", "1000"], "--max-batch-total-tokens"),
    (["--max-total-tokens", "0"], "--max-total-tokens"),
    (["--max-concurrent-requests", "many"], "--max-concurrent-requests"),
    (["--port", "70000"], "--port"),
    (["--device", "tpu"], "--device"),
    (["--dtype", "int8"], "--dtype"),
    (["--local-adapter-root", "/no/such/dir"], "--local-adapter-root"),
])
def test_invalid_flags_exit_2_naming_the_flag(env, args, flag):
    result = loom(*args, env=env)
    assert result.returncode == 2, result.stderr
    assert flag in result.stderr
    assert not Path(env["LOOM_CACHE"]).exists(), "flags must be checked before the demo model is built"


def test_max_total_tokens_beyond_the_model_exits_2(env, tiny_model):
    result = loom("--model-id", str(tiny_model), "--device", "cpu", "--max-total-tokens", "4096", env=env)
    assert result.returncode == 2
    assert "--max-total-tokens" in result.stderr and "max_position_embeddings (512)" in result.stderr


def test_device_cuda_without_gpu_exits_2(env):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    result = loom("--device", "cuda", env=env)
    assert result.returncode == 2 and "--device" in result.stderr


def limits(max_positions: int | None, **flags: int):
    names = ["max_input_length", "max_total_tokens", "max_batch_prefill_tokens", "max_batch_total_tokens"]
    args = Namespace(**{name: flags.get(name) for name in names})
    return derive_limits(args, max_positions)


def test_limits_default_like_lorax_and_shrink_to_the_model():
    big = limits(32768)
    assert (big.max_input_length, big.max_total_tokens, big.max_batch_prefill_tokens, big.max_batch_total_tokens) == (1024, 2048, 4096, 0)
    small = limits(512)
    assert (small.max_input_length, small.max_total_tokens, small.max_batch_prefill_tokens) == (511, 512, 4096)


def test_limits_follow_the_explicit_flags():
    long_prompts = limits(32768, max_input_length=8000)
    assert (long_prompts.max_total_tokens, long_prompts.max_batch_prefill_tokens) == (8001, 8000)
    short_batch = limits(32768, max_batch_total_tokens=3000)
    assert short_batch.max_batch_prefill_tokens == 3000
    with pytest.raises(FlagError, match="--max-input-length"):
        limits(512, max_input_length=600)


# ---- model resolution -------------------------------------------------------------------------------------


def test_local_model_dir_is_used_as_is(tiny_model):
    model = resolve_model(str(tiny_model))
    assert model.path == tiny_model.resolve() and model.name == str(tiny_model)


def test_local_dir_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelSourceError, match="config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("model_id", ["./no-such-model", "/no/such/model", "~/no-such-model", "a/b/c"])
def test_missing_local_path_is_a_clear_error(model_id):
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model(model_id)


def test_malformed_model_id_is_a_clear_error():
    with pytest.raises(ModelSourceError, match="is not a hub repo id"):
        resolve_model("org/bad name")


def test_demo_model_is_built_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOM_CACHE", str(tmp_path / "cache"))
    started = time.monotonic()
    first = resolve_model(None)
    assert time.monotonic() - started < 30
    assert first.name == "demo" and first.path == tmp_path / "cache" / DEMO_DIR_NAME
    assert (first.path / "tokenizer.json").is_file() and (first.path / "model.safetensors").is_file()
    mtime = (first.path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(None).path == first.path
    assert (first.path / "model.safetensors").stat().st_mtime_ns == mtime


def test_concurrent_launches_build_the_demo_model_once(env):
    code = "from launcher.model_source import resolve_model; print(resolve_model(None).path)"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    paths = {proc.communicate(timeout=120)[0].strip() for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    cache = Path(env["LOOM_CACHE"])
    assert paths == {str(cache / DEMO_DIR_NAME)}
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [DEMO_DIR_NAME]  # no staging dirs left


def make_hub_cache(hf_home: Path, repo_id: str, model_dir: Path) -> Path:
    """The layout huggingface_hub writes: blobs behind snapshots/<commit>/, refs/main naming the commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def resolve_in_subprocess(model_id: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when imported, hence a fresh interpreter."""
    code = f"from launcher.model_source import resolve_model; print(resolve_model({model_id!r}).path)"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("model_id", ["org/tiny", "org/tiny@main", "org/tiny@0123456789abcdef0123456789abcdef01234567"])
def test_hub_model_resolves_from_the_offline_cache(env, tiny_model, model_id):
    snapshot = make_hub_cache(Path(env["HF_HOME"]), "org/tiny", tiny_model)
    result = resolve_in_subprocess(model_id, env)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == snapshot


def test_missing_hub_model_offline_is_one_clear_line(env):
    result = loom("--model-id", "org/missing", "--device", "cpu", env=env)
    assert result.returncode == 1
    assert "model 'org/missing' not found in the local hub cache and HF_HUB_OFFLINE=1" in result.stderr
    assert "Traceback" not in result.stderr


# ---- supervision -------------------------------------------------------------------------------------------


def test_serves_until_sigterm_then_stops_every_child(impl_root, start_loom, tiny_model):
    loom_proc = start_loom(impl_root, "--model-id", str(tiny_model), "--num-shard", "2", "--device", "cpu")
    loom_proc.wait_ready()
    assert f"Loom is ready: http://127.0.0.1:{loom_proc.port}/v1 (model {tiny_model}, 2 shard(s))" in loom_proc.output()
    with urllib.request.urlopen(f"http://127.0.0.1:{loom_proc.port}/health", timeout=10) as response:
        assert response.status == 200
    assert len(loom_proc.children) >= 3
    loom_proc.proc.send_signal(signal.SIGTERM)
    assert loom_proc.wait_exit(60) == 0
    assert gone(loom_proc.children)


def test_a_dead_shard_takes_everything_down(impl_root, start_loom, tiny_model):
    loom_proc = start_loom(impl_root, "--model-id", str(tiny_model), "--num-shard", "2", "--device", "cpu")
    loom_proc.wait_ready()
    shard = loom_proc.shard(1)
    shard.kill()
    assert loom_proc.wait_exit(15) != 0
    assert f"shard 1 (pid {shard.pid}) exited with code -9; shutting down" in loom_proc.output()
    assert gone(loom_proc.children)


def test_children_die_with_the_launcher(impl_root, start_loom, tiny_model):
    loom_proc = start_loom(impl_root, "--model-id", str(tiny_model), "--device", "cpu")
    loom_proc.wait_ready()
    loom_proc.proc.kill()
    assert gone(loom_proc.children)


def test_a_shard_failing_at_startup_is_named(fake_root, start_loom, tiny_model):
    loom_proc = start_loom(fake_root, "--model-id", str(tiny_model), "--num-shard", "2", "--device", "cpu",
                           extra_env={"FAKE_SHARD_EXIT_RANK": "1"})
    assert loom_proc.wait_exit(60) == 1
    assert "shard 1 (pid " in loom_proc.output() and "exited with code 3 while starting" in loom_proc.output()
    assert "Loom is ready" not in loom_proc.output()


def test_children_get_the_resolved_settings(fake_root, start_loom, tiny_model, tmp_path):
    adapter_dir = tmp_path / "my-adapter"
    adapter_dir.mkdir()
    loom_proc = start_loom(fake_root, "--model-id", str(tiny_model), "--num-shard", "2", "--device", "cpu",
                           "--adapter", f"mine={adapter_dir}", "--adapter", "pirate=org/pirate-lora",
                           "--local-adapter-root", str(tmp_path), "--max-concurrent-requests", "7",
                           extra_env={"LOOM_API_KEY": "secret"})
    loom_proc.wait_ready()
    config = json.loads((tmp_path / "router.json").read_text())
    assert config["model_dir"] == str(tiny_model.resolve()) and config["model_id"] == str(tiny_model)
    assert len(config["shard_sockets"]) == 2 and config["port"] == loom_proc.port
    assert (config["max_total_tokens"], config["max_input_length"], config["max_batch_prefill_tokens"]) == (512, 511, 4096)
    assert config["max_concurrent_requests"] == 7 and config["api_key"] == "secret"
    assert config["adapters"] == {"mine": str(adapter_dir), "pirate": "org/pirate-lora"}
    assert config["local_adapter_roots"] == [str(tmp_path)]
    for rank in range(2):
        shard = json.loads((tmp_path / f"shard-{rank}.json").read_text())
        argv = shard["argv"]
        assert argv[argv.index("--uds") + 1] == config["shard_sockets"][rank]
        assert argv[argv.index("--world-size") + 1] == "2" and argv[argv.index("--device") + 1] == "cpu"
        assert argv[argv.index("--dtype") + 1] == "float32"
        assert int(shard["LOOM_NUM_THREADS"]) >= 1
