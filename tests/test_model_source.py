"""Model resolution (launcher/model_source.py): a local directory as it is, the demo model built once into
LOOM_CACHE, hub ids from the offline hub cache, and one clear line for every id that cannot be served."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from launcher.model_source import DEMO_DIR_NAME, ModelSourceError, resolve_model
from tests.conftest import REPO, hermetic_env, install_in_hub_cache, run_loom


def test_local_model_dir_is_used_as_is(llama_dir):
    model = resolve_model(str(llama_dir))
    assert model.path == llama_dir.resolve() and model.name == str(llama_dir)


def test_local_dir_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelSourceError, match="config.json"):
        resolve_model(str(tmp_path))


def test_quantized_checkpoint_is_refused_naming_the_field(llama_dir, tmp_path):
    quantized = shutil.copytree(llama_dir, tmp_path / "quantized")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match="quantization_config.*awq"):
        resolve_model(str(quantized))


@pytest.mark.parametrize("model_id", ["./no-such-model", "/no/such/model", "~/no-such-model", "a/b/c"])
def test_missing_local_path_is_a_clear_error(model_id):
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model(model_id)


def test_malformed_model_id_is_a_clear_error():
    with pytest.raises(ModelSourceError, match="is not a hub repo id"):
        resolve_model("org/bad name")


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory) -> SimpleNamespace:
    """Two launches resolving the demo model at once into an empty cache: the module's only demo build."""
    env = hermetic_env(tmp_path_factory.mktemp("demo"))
    # CPU seconds rather than wall time: the module's launches boot on the same cores meanwhile.
    code = ("import time; from launcher.model_source import resolve_model; t = time.process_time(); "
            "path = resolve_model(None).path; print(path, time.process_time() - t)")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=180)[0].split() for proc in procs]
    return SimpleNamespace(cache=Path(env["LOOM_CACHE"]), returncodes=[proc.returncode for proc in procs],
                           paths={out[0] for out in outputs if out},
                           cpu_seconds=max((float(out[1]) for out in outputs if out), default=None))


def test_concurrent_launches_build_the_demo_model_once(demo_build):
    assert demo_build.returncodes == [0, 0]
    assert demo_build.paths == {str(demo_build.cache / DEMO_DIR_NAME)}
    assert sorted(p.name for p in demo_build.cache.iterdir() if p.is_dir()) == [DEMO_DIR_NAME]  # no staging dirs left


def test_demo_model_is_built_once_and_reused(demo_build, monkeypatch):
    monkeypatch.setenv("LOOM_CACHE", str(demo_build.cache))
    assert demo_build.cpu_seconds < 30, "the demo model should build in seconds"
    path = demo_build.cache / DEMO_DIR_NAME
    assert (path / "tokenizer.json").is_file() and (path / "model.safetensors").is_file()
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    started = time.monotonic()
    model = resolve_model(None)
    assert model.name == "demo" and model.path == path
    assert time.monotonic() - started < 1, "a built demo model is reused, not rebuilt"
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


HUB_IDS = ["org/tiny", "org/tiny@main", "org/tiny@0123456789abcdef0123456789abcdef01234567"]


@pytest.fixture(scope="module")
def hub_resolutions(tmp_path_factory, llama_dir) -> tuple[Path, dict[str, str]]:
    """(snapshot dir, model id -> resolved path or error) for HUB_IDS with "org/tiny" in an offline hub cache.
    huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when imported, hence a fresh interpreter (one for all)."""
    env = hermetic_env(tmp_path_factory.mktemp("hub"))
    snapshot = install_in_hub_cache(llama_dir, Path(env["HF_HOME"]), "org/tiny")
    code = ("import json, sys; from launcher.model_source import resolve_model\n"
            "def resolve(i):\n"
            "    try: return str(resolve_model(i).path)\n"
            "    except Exception as e: return f'{type(e).__name__}: {e}'\n"
            "print(json.dumps({i: resolve(i) for i in sys.argv[1:]}))")
    result = subprocess.run([sys.executable, "-c", code, *HUB_IDS], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return snapshot, json.loads(result.stdout)


@pytest.mark.parametrize("model_id", HUB_IDS)
def test_hub_model_resolves_from_the_offline_cache(hub_resolutions, model_id):
    snapshot, resolved = hub_resolutions
    assert resolved[model_id] == str(snapshot)


def test_missing_hub_model_offline_is_one_clear_line(env):
    result = run_loom("--model-id", "org/missing", "--device", "cpu", env=env)
    assert result.returncode == 1
    assert "model 'org/missing' not found in the local hub cache and HF_HUB_OFFLINE=1" in result.stderr
    assert "Traceback" not in result.stderr
