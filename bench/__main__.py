"""`python -m bench` (`make bench`): the standard benchmark set, every figure side by side in one run.

Builds (once, cached) a random Llama and its PEFT adapters, launches Loom on them, and serves one fixed
workload several ways: Loom over HTTP for each adapter distribution and base-only, the engine driven
in-process, 1,000 adapters against 16, and the transformers + PEFT baseline. Writes results/latest.json and
PNG plots, and prints a table with each target's ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import httpx

from bench import report
from bench.client import run_http, warm_adapters
from bench.host import free_port, machine
from bench.inprocess import make_engine, run_engine
from bench.roofline import matmul_rate, roofline_tok_s
from bench.stats import summarize
from bench.step import measure as measure_step
from bench.workload import DISTRIBUTIONS, ModelSpec, WorkloadSpec, build_adapters, build_model, make_requests

HERE = Path(__file__).resolve().parent


def start_server(model_dir: Path, adapter_root: Path, args) -> tuple[subprocess.Popen, str]:
    """Launches loom on the bench model; its logs go to <out-dir>/server.log. Without the prefix cache: every
    repeat serves the same prompts, which would otherwise hit the blocks the previous repeat cached (bench.kv
    measures the cache)."""
    port = free_port()
    cmd = [sys.executable, "-m", "launcher", "--model-id", str(model_dir), "--port", str(port), "--no-prefix-caching",
           "--local-adapter-root", str(adapter_root), "--adapter-pool-pages", str(args.adapter_pool_pages),
           "--adapter-host-cache-mb", str(args.host_cache_mb), "--max-active-adapters", str(args.adapter_pool_pages)]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, env=os.environ | {"HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT)
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


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--input-len", type=int, nargs=2, default=[16, 64], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[32, 32], metavar=("MIN", "MAX"))
    p.add_argument("--adapters", type=int, default=16, help="adapter pool of the standard runs")
    p.add_argument("--many-adapters", type=int, default=1000, help="adapter pool of the scaling run (0: skip)")
    p.add_argument("--rate", type=float, default=64.0, help="mean arrivals per second (0: all at once)")
    p.add_argument("--cv", type=float, default=1.0, help="CV of inter-arrival gaps (1: Poisson, else Gamma)")
    p.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of the skewed distribution")
    p.add_argument("--distributions", nargs="+", default=list(DISTRIBUTIONS), choices=DISTRIBUTIONS)
    p.add_argument("--decode-heavy", type=int, default=64, metavar="N",
                   help="requests of the decode-heavy run: prompts 8-16 tokens, 128 new, all sent at once (0: skip)")
    p.add_argument("--mixed", type=int, default=64, metavar="N",
                   help="requests of the mixed run: prompts 96-116 tokens, 32 new, all sent at once (0: skip)")
    p.add_argument("--step-batch", type=int, default=64, metavar="N",
                   help="rows of the isolated decode step, each with its adapter, timed beside its matmuls (0: skip)")
    p.add_argument("--step-context", type=int, default=76, help="tokens each row of that step holds in the KV cache")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the Loom runs (the median is reported)")
    p.add_argument("--no-peft", action="store_true", help="skip the transformers + PEFT baseline")
    p.add_argument("--adapter-pool-pages", type=int, default=256)
    p.add_argument("--host-cache-mb", type=int, default=6144)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "loom-bench")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def workloads(args) -> dict[str, WorkloadSpec]:
    base = WorkloadSpec(args.requests, args.adapters, "distinct", args.alpha, args.rate, args.cv,
                        tuple(args.input_len), tuple(args.output_len), args.seed)
    specs = {("base" if d == "base" else f"{d}-{args.adapters}"): replace(base, distribution=d)
             for d in args.distributions}
    if args.decode_heavy:
        specs[f"decode-heavy-{args.adapters}"] = replace(base, num_requests=args.decode_heavy, input_len=(8, 16),
                                                        output_len=(128, 128), rate=0.0)
    if args.mixed:
        specs[f"mixed-{args.adapters}"] = replace(base, num_requests=args.mixed, input_len=(96, 116),
                                                 output_len=(32, 32), rate=0.0)
    if args.many_adapters:
        specs[f"uniform-{args.adapters}"] = replace(base, distribution="uniform")
        specs[f"uniform-{args.many_adapters}"] = replace(base, distribution="uniform", num_adapters=args.many_adapters)
    return specs


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    load_before = os.getloadavg()
    spec = ModelSpec()
    model_dir = build_model(args.cache_dir, spec)
    adapters = build_adapters(model_dir, spec, max(args.adapters, args.many_adapters))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    specs = workloads(args)
    requests = {name: make_requests(s, tokenizer) for name, s in specs.items()}
    used = {name: {r.adapter for r in reqs if r.adapter >= 0} for name, reqs in requests.items()}
    served = f"distinct-{args.adapters}"
    compared = [name for name in (served, f"decode-heavy-{args.adapters}", f"mixed-{args.adapters}") if name in requests]
    rate = matmul_rate(spec)  # measured before anything else runs
    prefill_budget = 4096  # the launcher's default --max-batch-prefill-tokens; the in-process loop uses the same

    samples: dict[str, list[dict]] = {}
    proc, url = start_server(model_dir, adapters[0].parent, args)
    try:
        first = requests[next(iter(requests))][0]
        ids = httpx.post(f"{url}/tokenize", json={"inputs": first.text}).json()
        assert [t["id"] for t in ids] == first.input_ids, "the server tokenizes the prompts differently"
        print(f"loom up at {url}; registering {len(set().union(*used.values()))} adapters", flush=True)
        asyncio.run(warm_adapters(url, adapters, set().union(*used.values())))
        asyncio.run(run_http(url, requests[next(iter(requests))][:16], adapters))  # warm-up, not measured
        engine, peft = None, None
        if not args.no_peft and compared:
            from bench.baseline import load_peft, run_peft
            peft = load_peft(model_dir, adapters, set().union(*(used[name] for name in compared)))
        for rep in range(args.repeats):
            for name, reqs in requests.items():
                timings, wall = asyncio.run(run_http(url, reqs, adapters))
                samples.setdefault(f"http/{name}", []).append(summarize(timings, wall))
                print(f"[{rep}] http/{name}: {samples[f'http/{name}'][-1]['throughput_tok_s']} tok/s", flush=True)
            # The in-process engine runs while the server idles, right after the served runs it is compared to.
            if engine is None:
                engine = make_engine(model_dir, adapters, set().union(*used.values()), prefill_budget,
                                     args.adapter_pool_pages, args.host_cache_mb << 20)
                run_engine(engine, requests[served][:16], adapters, prefill_budget)  # warm-up
            for name in ("base", *compared):
                if name in requests:
                    timings, wall = run_engine(engine, requests[name], adapters, prefill_budget)
                    samples.setdefault(f"engine/{name}", []).append(summarize(timings, wall))
                    print(f"[{rep}] engine/{name}: {samples[f'engine/{name}'][-1]['throughput_tok_s']} tok/s", flush=True)
            # PEFT every repeat too: its batch-1 steps swing with this shared machine's load as Loom's do, so each
            # repeat's ratio compares runs minutes apart, not a whole bench run apart.
            for name in compared if peft is not None else ():
                timings, wall = run_peft(peft, requests[name])
                samples.setdefault(f"peft/{name}", []).append(summarize(timings, wall))
                print(f"[{rep}] peft/{name}: {samples[f'peft/{name}'][-1]['throughput_tok_s']} tok/s", flush=True)
        step = None
        if args.step_batch:  # while the server idles, as the in-process runs
            step = measure_step(engine, [str(adapters[i]) for i in sorted(used.get(served, ()))], args.step_batch,
                                args.step_context)
            print(f"decode step: {step['step_ms']} ms, its matmuls alone {step['matmul_ms']} ms", flush=True)
        del engine, peft
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    # The peak is the better of a sample before anything runs and one after: a burst of load on this shared
    # machine during one sample would otherwise put the roofline below what the runs reached.
    rate = max(rate, matmul_rate(spec))
    runs = {name: report.merge_repeats(s) for name, s in samples.items()}
    for name, run in runs.items():
        workload = requests[name.split("/", 1)[1]]
        prompt_tokens = sum(len(r.input_ids) for r in workload)
        lora = any(r.adapter >= 0 for r in workload)
        run["roofline_tok_s"] = round(roofline_tok_s(prompt_tokens, run["output_tokens"], spec, lora, rate), 1)
    checks = report.ratios(runs, args.adapters, args.many_adapters)
    if step is not None:
        checks["decode_step_vs_matmuls"] = report.step_check(step)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": machine(),
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": asdict(spec) | {"adapters": args.adapters, "many_adapters": args.many_adapters},
        "matmul_gflops": round(rate / 1e9, 1),
        "workloads": {name: asdict(s) for name, s in specs.items()},
        "runs": runs,
        "decode_step": step,
        "targets": checks,
    }
    result["plots"] = [str(p) for p in report.plot(runs, args.out_dir)]
    (args.out_dir / "latest.json").write_text(json.dumps(result, indent=2) + "\n")
    print(report.table(runs, checks))
    print(f"matmul rate {result['matmul_gflops']} GFLOP/s (the roofline's); machine: {result['machine']}; load average before {result['load_average']['before']}, "
          f"after {result['load_average']['after']}")
    print(f"wrote {args.out_dir / 'latest.json'} and {', '.join(result['plots'])}")


if __name__ == "__main__":
    main()
