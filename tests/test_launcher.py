"""The `loom` launcher: flags and supervision of the real shard and router processes.

Flag checks run `launcher.cli.main` in this process. Every supervision test runs the real `python -m
shard` and `python -m router` under a real launcher. Launching takes seconds of CPU, so the launches
this module needs are all started in the background when the module begins (see `fleet`). They boot
while the quick tests run, and each supervision test waits only for its own.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import httpx
import psutil
import pytest

from launcher.cli import FlagError, derive_limits, main
from tests.conftest import REPO, SCRUBBED_ENV, LoomServer, hermetic_env, run_loom

READY_TIMEOUT_S = 180.0  # several launches boot at once on a small CI machine
ALL_FLAGS = [
    "--model-id", "--port", "--hostname", "--num-shard", "--device", "--dtype", "--adapter",
    "--local-adapter-root", "--adapter-source", "--max-input-length", "--max-total-tokens",
    "--max-batch-prefill-tokens", "--max-batch-total-tokens", "--max-concurrent-requests",
    "--max-active-adapters", "--api-key", "--json-output", "--enforce-eager",
]
API_KEY = "secret"
# For launches that only exist to be killed: a tiny KV cache and warmup prefill boot faster.
SMALL_CACHE = ("--max-total-tokens", "256", "--max-batch-total-tokens", "256")


# ---- launched servers --------------------------------------------------------------------------------


class Launch(LoomServer):
    """conftest's LoomServer with its output in a file (the tests read the launcher's log lines; a pipe
    could fill up and block it), started in the background by `launch()` and awaited by `start()`."""

    def __init__(self, log_path: Path, model_dir: Path, *args: str, env: dict[str, str]):
        super().__init__(model_dir, *args, env=env)
        self.env = {k: v for k, v in self.env.items() if k not in SCRUBBED_ENV or k in env}
        self.log_path = log_path
        self.children: list[psutil.Process] = []

    def launch(self) -> "Launch":
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def start(self, timeout: float = READY_TIMEOUT_S) -> "Launch":
        """Waits for the launcher's "Loom is ready" line, then records its children."""
        if self.proc is None:
            self.launch()
        deadline = time.monotonic() + timeout
        while "Loom is ready" not in self.output():
            assert self.proc.poll() is None, f"loom exited with {self.proc.returncode}:\n{self.output()}"
            assert time.monotonic() < deadline, f"loom not ready after {timeout} s:\n{self.output()}"
            time.sleep(0.1)
        self.children = psutil.Process(self.proc.pid).children(recursive=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log_path.read_text()

    def shard(self, rank: int) -> psutil.Process:
        return next(p for p in self.children if child_kind(p) == "shard" and flag(p, "--rank") == str(rank))

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"loom still running after {timeout} s:\n{self.output()}")

    def kill(self) -> None:
        """Cleanup: nothing may outlive the module, whatever state a test left this launch in."""
        if self.alive():
            try:
                self.children += psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for proc in self.children:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        if self.alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()


def child_kind(proc: psutil.Process) -> str | None:
    """"shard" or "router" for a `python -m shard|router` process."""
    try:
        cmdline = proc.cmdline()
    except psutil.NoSuchProcess:
        return None
    return cmdline[cmdline.index("-m") + 1] if "-m" in cmdline else None


def flag(proc: psutil.Process, name: str) -> str:
    cmdline = proc.cmdline()
    return cmdline[cmdline.index(name) + 1]


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


class Fleet:
    """The module's launches by fixture name. `get` hands out the running one, or launches a fresh one when
    it was never started or a test has already stopped it, so that tests pass in any order."""

    def __init__(self, specs: dict[str, Callable[[], Launch]]):
        self.specs = specs
        self.paths = SimpleNamespace()  # what the specs were made from, for the tests' checks
        self.current: dict[str, Launch] = {}
        self.all: list[Launch] = []

    def launch(self, name: str) -> Launch:
        launch = self.specs[name]().launch()
        self.current[name] = launch
        self.all.append(launch)
        return launch

    def get(self, name: str) -> Launch:
        launch = self.current.get(name)
        return launch if launch is not None and launch.alive() else self.launch(name)

    def kill_all(self) -> None:
        for launch in self.all:
            launch.kill()


LAUNCHES = ("shared_loom", "loom_for_shard_kill", "loom_for_launcher_kill", "loom_with_corrupt_weights")


@pytest.fixture(scope="module", autouse=True)
def fleet(request, tmp_path_factory):
    """Starts, in the background, every launch that the selected tests of this module will use."""
    wanted = [name for name in LAUNCHES
              if any(name in item.fixturenames for item in request.session.items if item.module is request.module)]
    if not wanted:
        yield Fleet({})
        return
    llama_dir: Path = request.getfixturevalue("llama_dir")
    root = tmp_path_factory.mktemp("launches")
    adapter_root = root / "adapters"
    (adapter_root / "mine").mkdir(parents=True)
    corrupt = root / "corrupt-model"
    shutil.copytree(llama_dir, corrupt)
    weights = corrupt / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # a real reason for the real shard to fail
    logs = iter(range(1000))

    def spec(model_dir: Path, *args: str, **env: str) -> Callable[[], Launch]:
        return lambda: Launch(root / f"loom-{next(logs)}.log", model_dir, *args, env=hermetic_env(root, **env))

    fleet = Fleet({
        "shared_loom": spec(llama_dir, "--num-shard", "2", "--device", "cpu",
                            "--adapter", f"mine={adapter_root / 'mine'}", "--adapter", "pirate=org/pirate-lora",
                            "--local-adapter-root", str(adapter_root), "--max-concurrent-requests", "7",
                            LOOM_API_KEY=API_KEY),
        "loom_for_shard_kill": spec(llama_dir, "--num-shard", "2", "--device", "cpu", *SMALL_CACHE),
        "loom_for_launcher_kill": spec(llama_dir, "--device", "cpu", *SMALL_CACHE),
        "loom_with_corrupt_weights": spec(corrupt, "--device", "cpu"),
    })
    fleet.paths.__dict__.update(llama_dir=llama_dir, adapter_root=adapter_root, corrupt=corrupt)
    for name in wanted:
        fleet.launch(name)
    yield fleet
    fleet.kill_all()


@pytest.fixture
def shared_loom(fleet) -> Launch:
    """2 shards, named adapters, a local adapter root and an api key; only the SIGTERM test stops it."""
    return fleet.get("shared_loom")


@pytest.fixture
def loom_for_shard_kill(fleet) -> Launch:
    return fleet.get("loom_for_shard_kill")


@pytest.fixture
def loom_for_launcher_kill(fleet) -> Launch:
    return fleet.get("loom_for_launcher_kill")


@pytest.fixture
def loom_with_corrupt_weights(fleet) -> Launch:
    return fleet.get("loom_with_corrupt_weights")


# ---- helpers for the quick tests -------------------------------------------------------------------------


@pytest.fixture
def loom_main(tmp_path, monkeypatch, capsys):
    """Runs `loom ARGS` in this process; returns (exit code, stdout, stderr).

    LOOM_CACHE points below a regular file, so the demo model cannot be built: were a flag checked only after
    resolving the model, `main` would fail on the cache (exit 1) instead of building the demo and starting
    a server inside pytest.
    """
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LOOM_CACHE", str(blocker / "loom-cache"))
    for name in SCRUBBED_ENV:
        monkeypatch.delenv(name, raising=False)
    logger = logging.getLogger("loom")
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))  # main adds one per call

    def run(*args: str) -> tuple[int | str | None, str, str]:
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


# ---- flags ---------------------------------------------------------------------------------------------


def test_help_mentions_every_flag(loom_main):
    code, out, _ = loom_main("--help")
    assert code == 0
    for name in ALL_FLAGS:
        assert name in out, name


def test_help_works_as_a_command(env):
    """The same through `python -m launcher`, the entry point `.venv/bin/loom` runs."""
    result = run_loom("--help", env=env, timeout=60)
    assert result.returncode == 0 and "--model-id" in result.stdout


@pytest.mark.parametrize("args, name", [
    (["--adapter", "no-equals-sign"], "--adapter"),
    (["--adapter", "=some/adapter"], "--adapter"),
    (["--adapter", "a=x/y", "--adapter", "a=x/z"], "--adapter"),
    (["--max-input-length", "2048", "--max-total-tokens", "1024"], "--max-input-length"),
    (["--max-batch-total-tokens", "4096", "--max-batch-prefill-tokens", "8192"], "--max-batch-prefill-tokens"),
    (["--max-total-tokens", "2048", "--max-batch-total-tokens", "1000"], "--max-batch-total-tokens"),
    (["--max-total-tokens", "0"], "--max-total-tokens"),
    (["--max-concurrent-requests", "many"], "--max-concurrent-requests"),
    (["--port", "70000"], "--port"),
    (["--device", "tpu"], "--device"),
    (["--dtype", "int8"], "--dtype"),
    (["--local-adapter-root", "/no/such/dir"], "--local-adapter-root"),
])
def test_invalid_flags_exit_2_naming_the_flag(loom_main, args, name):
    code, _, err = loom_main(*args)
    assert code == 2, err
    assert name in err


def test_max_total_tokens_beyond_the_model_exits_2(loom_main, llama_dir):
    code, _, err = loom_main("--model-id", str(llama_dir), "--device", "cpu", "--max-total-tokens", "4096")
    assert code == 2, err
    assert "--max-total-tokens" in err and "max_position_embeddings (512)" in err


def test_device_cuda_without_gpu_exits_2(loom_main):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    code, _, err = loom_main("--device", "cuda")
    assert code == 2 and "--device" in err


def limits(max_positions: int | None, **flags: int):
    names = ["max_input_length", "max_total_tokens", "max_batch_prefill_tokens", "max_batch_total_tokens"]
    args = Namespace(**{name: flags.get(name) for name in names})
    return derive_limits(args, max_positions)


def test_limits_default_like_lorax_and_shrink_to_the_model():
    big = limits(32768)
    assert (big.max_input_length, big.max_total_tokens, big.max_batch_prefill_tokens, big.max_batch_total_tokens) == (1024, 2048, 4096, 0)
    small = limits(512)
    assert (small.max_input_length, small.max_total_tokens, small.max_batch_prefill_tokens) == (511, 512, 4096)
    # No --max-batch-prefill-tokens: the prefill budget is measured at warmup, up to LoRAX's default.
    assert big.measure_prefill_budget and small.measure_prefill_budget


def test_limits_follow_the_explicit_flags():
    long_prompts = limits(32768, max_input_length=8000)
    assert (long_prompts.max_total_tokens, long_prompts.max_batch_prefill_tokens) == (8001, 8000)
    short_batch = limits(32768, max_batch_total_tokens=3000)
    assert short_batch.max_batch_prefill_tokens == 3000
    chunked = limits(32768, max_input_length=8000, max_batch_prefill_tokens=512)  # longer prompts go in chunks
    assert (chunked.max_input_length, chunked.max_batch_prefill_tokens) == (8000, 512)
    assert not chunked.measure_prefill_budget and long_prompts.measure_prefill_budget  # the flag is the budget
    with pytest.raises(FlagError, match="--max-input-length"):
        limits(512, max_input_length=600)


# ---- supervision (real shards and router) ---------------------------------------------------------------


def test_a_shard_failing_at_startup_is_named(loom_with_corrupt_weights, fleet):
    launch = loom_with_corrupt_weights
    assert launch.wait_exit(READY_TIMEOUT_S) == 1
    output = launch.output()
    failed = re.search(r"shard 0 \(pid (\d+)\) exited with code (-?\d+) while starting; shutting down", output)
    assert failed and failed.group(2) != "0", output
    assert "Loom is ready" not in output and "started router" not in output
    corrupt = str(fleet.paths.corrupt)
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if corrupt in (p.info["cmdline"] or [])]
    assert not left, f"processes still running on the corrupt model: {left}"


def test_children_get_the_resolved_settings(shared_loom, fleet):
    launch = shared_loom.start()
    llama_dir, adapter_root = fleet.paths.llama_dir, fleet.paths.adapter_root
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=launch.url, timeout=30) as client:
        assert client.get("/health").status_code == 200  # the only route without the key
        assert client.get("/info").status_code == 401  # LOOM_API_KEY reached the router
        info = client.get("/info", headers=auth).json()
        assert info["model_id"] == str(llama_dir) and info["num_shard"] == 2
        # Derived from the model's max_position_embeddings (512) and LoRAX's defaults.
        assert (info["max_input_length"], info["max_total_tokens"]) == (511, 512)
        # No --max-batch-prefill-tokens: sized from the step costs the two ranks measured, as the router logged it.
        budget = re.search(r"prefill budget: (\d+) prompt tokens per step, sized from a one-row decode step of "
                           r"[\d.]+ ms and -?[\d.]+ ms per prompt token \(at most 4096", launch.output())
        assert budget, launch.output()
        assert info["max_batch_prefill_tokens"] == int(budget.group(1)) and 128 <= int(budget.group(1)) <= 4096
        assert info["max_concurrent_requests"] == 7
        assert info["model_device_type"] == "cpu" and "float32" in info["model_dtype"]
        models = {m["id"]: m for m in client.get("/v1/models", headers=auth).json()["data"]}
        assert {"mine", "pirate"} <= models.keys() and models["pirate"]["parent"] == str(llama_dir)
        # --local-adapter-root: a path inside it is looked up (and missing), one outside is refused.
        inside = client.post("/v1/completions", headers=auth,
                             json={"model": str(adapter_root / "missing"), "prompt": "hi", "max_tokens": 1})
        assert inside.status_code == 404, inside.text
        outside = client.post("/v1/completions", headers=auth,
                              json={"model": "/elsewhere/adapter", "prompt": "hi", "max_tokens": 1})
        assert outside.status_code == 400 and "--local-adapter-root" in outside.text

    shards = sorted((p for p in launch.children if child_kind(p) == "shard"), key=lambda p: int(flag(p, "--rank")))
    routers = [p for p in launch.children if child_kind(p) == "router"]
    assert [flag(p, "--rank") for p in shards] == ["0", "1"] and len(routers) == 1
    for rank, shard in enumerate(shards):
        assert flag(shard, "--world-size") == "2"
        assert flag(shard, "--device") == "cpu" and flag(shard, "--dtype") == "float32"
        assert flag(shard, "--model-dir") == str(llama_dir.resolve())
        assert flag(shard, "--uds").endswith(f"shard-{rank}.sock")
        assert int(shard.environ()["LOOM_NUM_THREADS"]) >= 1
    assert flag(shards[0], "--master-port") == flag(shards[1], "--master-port")


def test_serves_until_sigterm_then_stops_every_child(shared_loom, fleet):
    """Runs after the settings test and ends the shared launch."""
    launch = shared_loom.start()
    assert (f"Loom is ready: http://127.0.0.1:{launch.port}/v1 (model {fleet.paths.llama_dir}, 2 shard(s))"
            in launch.output())
    assert httpx.get(f"{launch.url}/health", timeout=10).status_code == 200
    assert len(launch.children) >= 3
    launch.proc.terminate()
    assert launch.wait_exit(60) == 0
    assert gone(launch.children)


def test_a_dead_shard_takes_everything_down(loom_for_shard_kill):
    launch = loom_for_shard_kill.start()
    shard = launch.shard(1)
    shard.kill()
    assert launch.wait_exit(15) != 0
    assert f"shard 1 (pid {shard.pid}) exited with code -9; shutting down" in launch.output()
    assert gone(launch.children)


def test_children_die_with_the_launcher(loom_for_launcher_kill):
    launch = loom_for_launcher_kill.start()
    assert len(launch.children) >= 2
    launch.proc.kill()
    assert gone(launch.children)
