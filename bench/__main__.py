"""`python -m bench` (`make bench`): decode speed of a launched Loom server, one request and concurrent.

Starts `loom` on a free port (the demo model unless --model-id is given), warms it up, then streams the
same workload at concurrency 1 and 16 and prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import subprocess
import sys
import time

import httpx

from bench.client import run_concurrent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_id: str | None, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "launcher", "--port", str(port)] + (["--model-id", model_id] if model_id else [])
    proc = subprocess.Popen(cmd + extra)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"loom exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("loom did not become healthy")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--model-id", default=None, help="model to serve (default: the demo model)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--requests-per-level", type=int, default=32)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)

    proc, url = start_server(args.model_id, [])
    try:
        prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * (args.prompt_words // 9 + 1))
        asyncio.run(run_concurrent(url, [prompt] * 4, 8, 4))  # warm-up
        results = {"machine": f"{platform.machine()} {platform.processor() or ''} ({__import__('os').cpu_count()} cores)",
                   "model": args.model_id or "demo", "max_new_tokens": args.max_new_tokens, "levels": {}}
        for c in args.concurrency:
            n = max(c, args.requests_per_level if c > 1 else 4)
            results["levels"][str(c)] = asyncio.run(run_concurrent(url, [prompt] * n, args.max_new_tokens, c))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
