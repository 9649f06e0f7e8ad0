"""The three servers, each launched on its defaults plus only the flags its documentation requires to serve
LoRA adapters, and how an OpenAI request names an adapter on each.

- Loom: `loom --model-id <hf dir> --local-adapter-root <adapters>`; a request names an adapter by its path.
- vLLM: `vllm serve <hf dir> --enable-lora --max-loras N --max-lora-rank R --lora-modules name=path ...`, plus
  `--dtype float32`: vLLM's `auto` would run this float32 checkpoint in a 16-bit type, which is not the model
  the others serve; and `--kv-cache-memory-bytes` (4 GiB, 6× what 64 requests of these workloads hold): by
  default vLLM's CPU build reserves 92% of the host's memory at start and refuses to start when that much is
  not free. A request names an adapter by its --lora-modules name.
- llama.cpp: `llama-server -m <f32 gguf> --lora a.gguf,b.gguf,... --lora-init-without-apply` (loaded at scale 0);
  every request lists every adapter's scale in `lora`: 1 for its adapter, 0 for the others (all 0: the base).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.host import free_port
from bench.peers.assets import Assets

SERVERS = ("loom", "vllm", "llamacpp")
VLLM_KV_BYTES = 4 << 30
REPO = Path(__file__).resolve().parents[2]


@dataclass(slots=True)
class Server:
    name: str
    command: list[str]
    assets: Assets
    url: str = ""
    proc: subprocess.Popen | None = None

    def request(self, adapter: int) -> tuple[str, dict]:
        """(the OpenAI `model`, the extra body fields) that pick adapter `adapter` (-1: the base model)."""
        if self.name == "loom":
            return (str(self.assets.adapters[adapter]) if adapter >= 0 else str(self.assets.hf_dir)), {}
        if self.name == "vllm":
            return (self.assets.adapters[adapter].name if adapter >= 0 else str(self.assets.hf_dir)), {}
        # Every adapter's scale, explicitly: without a `lora` field (or with an empty one) llama-server 11434
        # does not serve the base model, --lora-init-without-apply notwithstanding (greedy outputs differ from
        # transformers' from the first tokens).
        scales = [{"id": i, "scale": float(i == adapter)} for i in range(len(self.assets.gguf_adapters))]
        return "base", {"lora": scales}

    def start(self, log: Path, timeout: float = 900) -> None:
        """Starts the server in its own process group and waits until /health answers 200."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                         env=os.environ | {"HF_HUB_OFFLINE": "1"}, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}; see {log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"{self.name} did not become healthy in {timeout:.0f} s; see {log}")

    def stop(self) -> None:
        """SIGTERM to the server's process group (vLLM and Loom run worker processes), SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def make_server(name: str, assets: Assets, vllm_python: Path | None, llama_server: Path | None) -> Server:
    port = free_port()
    if name == "loom":
        cmd = [sys.executable, "-m", "launcher", "--model-id", str(assets.hf_dir),
               "--local-adapter-root", str(assets.adapter_root), "--port", str(port)]
    elif name == "vllm":
        rank = read_rank(assets.adapters[0])
        cmd = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(assets.hf_dir), "--port", str(port),
               "--dtype", "float32", "--kv-cache-memory-bytes", str(VLLM_KV_BYTES), "--enable-lora", "--max-loras", str(len(assets.adapters)),
               "--max-lora-rank", str(rank), "--lora-modules", *(f"{a.name}={a}" for a in assets.adapters)]
    elif name == "llamacpp":
        cmd = [str(llama_server), "-m", str(assets.gguf), "--port", str(port),
               "--lora", ",".join(map(str, assets.gguf_adapters)), "--lora-init-without-apply"]
    else:
        raise ValueError(f"unknown server {name!r}; one of {', '.join(SERVERS)}")
    return Server(name, cmd, assets, url=f"http://127.0.0.1:{port}")


def read_rank(adapter: Path) -> int:
    return int(json.loads((adapter / "adapter_config.json").read_text())["r"])
