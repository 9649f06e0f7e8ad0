"""The install users get is the one tested: the Dockerfile's steps, replayed into a clean venv (no test
extras, no editable checkout), give a `loom` that serves a chat request; the locks and pyproject agree; and
the venv the tests run in holds exactly the locked versions.

No Docker engine runs here, so the Dockerfile is replayed step by step: each COPY copies from the checkout
into a scratch WORKDIR, each RUN runs there with the scratch venv's bin first on PATH, and the ENTRYPOINT
starts (on loopback instead of 0.0.0.0).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO, free_port

LOCKS = ("requirements.lock", "requirements-test.lock")


def read_lock(name: str) -> dict[str, str]:
    pins = {}
    for line in (REPO / name).read_text().splitlines():
        if line and not line.startswith("#"):
            package, _, version = line.partition("==")
            pins[package.lower().replace("_", "-")] = version
    return pins


def installed_version(package: str) -> str:
    return Version(metadata.version(package)).public  # torch's "+cpu" names the build, not the release


@pytest.mark.parametrize("lock", LOCKS)
def test_test_venv_holds_exactly_the_locked_versions(lock):
    wrong = {p: (v, installed_version(p)) for p, v in read_lock(lock).items() if installed_version(p) != v}
    assert not wrong, f"{lock} says (locked, installed): {wrong}; run `make install`"


def test_runtime_lock_satisfies_pyproject_and_leaves_tests_out():
    runtime, test_only = read_lock("requirements.lock"), read_lock("requirements-test.lock")
    assert not runtime.keys() & test_only.keys()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in runtime, f"{name} is a dependency but not in requirements.lock"
        assert req.specifier.contains(runtime[name]), f"requirements.lock has {name}=={runtime[name]}, pyproject {spec}"
    assert runtime["torch"] == "2.13.0"
    assert Version(runtime["transformers"]).major >= 5 and Version(runtime["huggingface-hub"]).major >= 1
    # The clients the tests drive run on the runtime stack, never the reverse.
    assert "lorax-client" in test_only and "openai" in test_only


def dockerfile_steps() -> list[tuple[str, str]]:
    steps = []
    for line in (REPO / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        instruction, _, rest = line.strip().partition(" ")
        if instruction in ("COPY", "RUN", "ENTRYPOINT"):
            steps.append((instruction, rest.strip()))
    return steps


@pytest.fixture(scope="module")
def docker_venv(tmp_path_factory) -> Path:
    """The Dockerfile's steps in a scratch dir and a fresh venv: the image, minus the container."""
    root = tmp_path_factory.mktemp("docker-path")
    workdir, venv = root / "opt-loom", root / "venv"
    workdir.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "PIP_QUIET": "1"}
    env.pop("PYTHONPATH", None)
    for instruction, args in dockerfile_steps():
        if instruction == "COPY":
            *sources, dest = args.split()
            for source in sources:
                src, dst = REPO / source, workdir / dest / (Path(source).name if dest.endswith("/") else "")
                if src.is_dir():
                    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(src, dst)
        elif instruction == "RUN":
            subprocess.run(args, shell=True, cwd=workdir, env=env, check=True, timeout=900)
    return venv


def test_dockerfile_install_matches_the_lock_and_is_consistent(docker_venv):
    python = str(docker_venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "check"], check=True)
    frozen = subprocess.run([python, "-m", "pip", "list", "--format", "json"], check=True, capture_output=True,
                            text=True).stdout
    installed = {p["name"].lower().replace("_", "-"): Version(p["version"]).public for p in json.loads(frozen)}
    locked = read_lock("requirements.lock")
    assert {p: installed.get(p) for p in locked} == locked
    for test_only in read_lock("requirements-test.lock"):
        assert test_only not in installed, f"test package {test_only} got into the image"


def test_installed_package_builds_the_cpu_kernels(docker_venv, tmp_path):
    """The kernels' C sources ship in the package, so a shard installed with `pip install .` builds them where a
    compiler is on PATH (the slim image has none and runs the torch ops)."""
    from shard.kernels import cpu

    if cpu._compiler() is None:
        pytest.skip("no C compiler on PATH")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "from shard.kernels import cpu; assert cpu.load() is not None, 'not built'; print(cpu.SOURCES[0].parent)"
    done = subprocess.run([str(docker_venv / "bin" / "python"), "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not Path(done.stdout.strip()).is_relative_to(REPO)  # the installed copy, not the checkout


def test_dockerfile_install_serves_a_chat_request(docker_venv, tmp_path):
    entrypoint = json.loads(dict(dockerfile_steps())["ENTRYPOINT"])
    assert entrypoint[0] == "loom"
    port = free_port()
    cmd = [str(docker_venv / "bin" / entrypoint[0]), *entrypoint[1:], "--hostname", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["LOOM_CACHE"] = str(tmp_path / "cache")  # the demo model, built by the installed package itself
    # Run outside the checkout, so nothing can be imported from it.
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"loom from the Dockerfile install exited with {proc.returncode}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("loom from the Dockerfile install did not become healthy: " + shlex.join(cmd))
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] >= 1 and body["choices"][0]["message"]["content"] is not None
    finally:
        proc.terminate()
        proc.wait(timeout=60)
