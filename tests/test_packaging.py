"""The container files are consistent with the project: what pyproject packages, the Dockerfile copies, and
docker-compose runs it with GPUs, the hub cache volume, HF_TOKEN and a /health check. (No Docker engine runs
here; this checks the files, not an image.)"""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_dockerfile_copies_every_package_and_the_pinned_project():
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    dockerfile = (REPO / "Dockerfile").read_text()
    for package in {p.partition(".")[0] for p in packages}:  # subpackages travel with their top-level one
        assert f"COPY {package} ./{package}" in dockerfile
    assert "pip install -r requirements.lock" in dockerfile and "pip install --no-deps ." in dockerfile
    assert '"--hostname", "0.0.0.0"' in dockerfile


def test_compose_reserves_gpus_and_checks_health():
    service = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["loom"]
    devices = service["deploy"]["resources"]["reservations"]["devices"][0]
    assert devices["driver"] == "nvidia" and "gpu" in devices["capabilities"]
    assert "HF_TOKEN" in service["environment"]
    assert any(v.endswith(":/data/hf") for v in service["volumes"])
    assert "/health" in " ".join(service["healthcheck"]["test"])
    assert "--num-shard" in service["command"]


def test_torch_is_pinned():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in deps
