"""`make gpu-check` (`python -m bench.gpu_check`): what a machine with a GPU runs first, in one call of at most
8 minutes. Writes one JSON report, a short text summary and the stages' log under --out ($OUT there; default
bench/gpu/), named by date and card: gpu-check-<date>-<card>.{json,txt,log}.

First the wheels `make gpu-wheels` put in .whl/ are installed into a fresh directory (no index, no
dependencies resolved: the machine has no network) that then shadows the image's older packages, and the
script starts again over them. Then the stages, each in its own process (on CUDA a fresh interpreter; in the
dry run a fork, which saves the imports) with its own deadline (2 minutes, less when the run's 8 minutes run
short): a stage that fails or is cut is reported with what it had recorded, and the next one starts.

  machine     GPU, memory, driver, torch / CUDA / Triton, the versions of Loom's packages there (speed.py)
  kernels     each Triton kernel natively against its torch twin, float32 and bf16 (paths.py)
  parity      float32 token parity on cuda against transformers + peft on the same GPU: every family alone
              and batched, a busy batch of many adapters, preempted, prefix-cached, chunked (parity.py)
  throughput  the 1B-class model in bf16 with 100 rank-16 adapters: decode and prefill tok/s beside their
              rooflines, peak memory against what the warmup kept free (speed.py)
  graphs      decode with CUDA graphs against the eager paths, tokens and tok/s (speed.py)
  switches    each opt-in path on against off (paths.py)
  bf16        bf16 against transformers' bf16 greedy output: identical tokens, first divergence (parity.py)

GPU_CHECK_DRY=1 (or --dry): the same stages on CPU with tiny sizes, the Triton kernels through Triton's
interpreter, the wheels only checked to install for CPython 3.12; exits non-zero on any stage error, so the
kit cannot rot while no GPU is at hand (tests/test_gpu_check.py runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STAGES = ("machine", "kernels", "parity", "throughput", "graphs", "switches", "bf16")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "gpu", help="where the report goes")
    p.add_argument("--dry", action="store_true", default=os.environ.get("GPU_CHECK_DRY") == "1",
                   help="tiny sizes on CPU (also GPU_CHECK_DRY=1)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    p.add_argument("--no-wheels", action="store_true", help="leave .whl/ alone (neither install nor check it)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 480)")
    p.add_argument("--fresh", action=argparse.BooleanOptionalAction, default=None,
                   help="each stage in a fresh interpreter instead of a fork (default: on CUDA)")
    p.add_argument("--run-stage", help=argparse.SUPPRESS)  # one stage in this process (how --fresh runs one)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.stages = [s for s in args.stages.split(",") if s]
    if unknown := set(args.stages) - set(STAGES):
        p.error(f"unknown stages: {', '.join(sorted(unknown))}")
    return args


def install_wheels(wheel_dir: Path = REPO / ".whl") -> tuple[dict, Path | None]:
    """Installs the carried wheels into a fresh directory for this interpreter (CPython 3.12, the GPU image's),
    or, on another one, checks that they install for 3.12 and throws that install away. Returns what happened
    and the directory to put first on the path (None: nothing to add)."""
    from bench.gpu_check.wheels import PLATFORMS, PYTHON_VERSION

    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        return {"status": "no wheels in .whl/ (run `make gpu-wheels` where a package index is reachable)"}, None
    native = f"{sys.version_info[0]}.{sys.version_info[1]}" == PYTHON_VERSION
    site = Path(tempfile.mkdtemp(prefix="loom-gpu-check-site-"))
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--target", str(site)]
    if not native:
        cmd += ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
                *[arg for p in PLATFORMS for arg in ("--platform", p)]]
    started = time.monotonic()
    done = subprocess.run(cmd + [str(w) for w in wheels], capture_output=True, text=True, timeout=300)
    result = {"wheels": [w.name for w in wheels], "seconds": round(time.monotonic() - started, 1)}
    if done.returncode != 0:  # one wheel pip refuses stops them all: install the others one by one
        failed = {}
        for wheel in wheels:
            alone = subprocess.run(cmd + [str(wheel)], capture_output=True, text=True, timeout=300)
            if alone.returncode != 0:
                failed[wheel.name] = alone.stderr[-1000:]
        result |= {"failed": failed, "seconds": round(time.monotonic() - started, 1)}
        if not native or len(failed) == len(wheels):
            shutil.rmtree(site, ignore_errors=True)
            return result | {"status": f"failed: {', '.join(failed) or done.stderr[-1000:]}"}, None
        return result | {"status": f"installed but {', '.join(failed)}", "site": str(site)}, site
    if not native:
        shutil.rmtree(site, ignore_errors=True)
        return result | {"status": f"checked: they install for CPython {PYTHON_VERSION} (not used here)"}, None
    return result | {"status": "installed", "site": str(site)}, site


def restart_over(site: Path, install: dict) -> None:
    """Runs this script again with the installed wheels first on the path (ahead of the image's packages),
    carrying what the install did."""
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), str(REPO), os.environ.get("PYTHONPATH")) if p)
    os.environ["GPU_CHECK_SITE"] = str(site)
    os.environ["GPU_CHECK_INSTALL"] = json.dumps(install)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "bench.gpu_check", *sys.argv[1:]])


def stage_functions() -> dict:
    """The stages (imported here: after the wheels are on the path)."""
    import peft  # noqa: F401  (once here, before stages fork, rather than in each stage that uses adapters)

    from bench.gpu_check import parity, paths, speed

    return {"machine": speed.machine, "kernels": paths.kernels, "parity": parity.parity,
            "throughput": speed.throughput, "graphs": speed.graphs, "switches": paths.switches, "bf16": parity.bf16}


def stage_main(name: str, sizes, work: Path) -> int:
    """Runs one stage in this process, its results recorded under `work`: 0 ok, 1 a part failed, 2 it raised."""
    from bench.gpu_check.common import Recorder

    recorder = Recorder(work / f"{name}.json")
    print(f"==== stage {name}", flush=True)
    try:
        stage_functions()[name](recorder, sizes, work)
        return 1 if recorder.failed else 0
    except BaseException as e:
        traceback.print_exc()
        recorder.record("error", f"{type(e).__name__}: {e}"[:2000])
        return 2
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def run_stage(name: str, sizes, work: Path, log, deadline_s: float, fresh: bool) -> dict:
    """One stage in its own process and process group (its output into `log`), killed past `deadline_s`: a
    fresh interpreter (`fresh`: on CUDA, where a forked child of a process that touched the driver cannot use
    it), else a fork of this one (its imports done once). Returns its recorded results and how it ended: ok,
    failed (a part of it failed), error (it raised), timeout, or the signal that ended it."""
    started, cpu = time.monotonic(), _children_cpu_seconds()
    if fresh:
        flags = ["--dry"] if sizes.dry else []
        pid = subprocess.Popen([sys.executable, "-m", "bench.gpu_check", "--run-stage", name, "--work", str(work),
                                *flags], cwd=REPO, stdout=log, stderr=log, start_new_session=True).pid
    else:
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            os._exit(stage_main(name, sizes, work))
        try:
            os.setpgid(pid, pid)  # here too: the deadline may come before the child runs
        except OSError:
            pass  # it did already, or it is gone
    status = None
    while status is None:
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            status = _ending(code)
        elif time.monotonic() - started > deadline_s:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = "timeout"
        else:
            time.sleep(0.05)
    path = work / f"{name}.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    return {"status": status, "seconds": round(time.monotonic() - started, 1),
            "cpu_seconds": round(_children_cpu_seconds() - cpu, 1), "results": results}


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _ending(code: int) -> str:
    if os.WIFSIGNALED(code):
        return f"killed by signal {os.WTERMSIG(code)}"
    return {0: "ok", 1: "failed"}.get(os.WEXITSTATUS(code), "error")


def card_name(report: dict) -> str:
    if report["dry"]:
        return "dry-run"
    gpu = report["stages"].get("machine", {}).get("results", {}).get("machine", {}).get("gpu", "gpu")
    return f"gpu-check-{report['date']}-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = float(os.environ.setdefault("GPU_CHECK_STARTED", str(time.time())))
    # torch.cuda.is_available() through NVML, which does not initialise the CUDA driver in this process.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the CPU runs the Triton kernels
    if args.run_stage:
        from bench.gpu_check.common import DRY, FULL

        return stage_main(args.run_stage, DRY if args.dry else FULL, args.work)
    install = json.loads(os.environ.get("GPU_CHECK_INSTALL", "{}"))
    if not args.no_wheels and "GPU_CHECK_SITE" not in os.environ:
        install, site = install_wheels()
        print(f"wheels: {install['status']}", flush=True)
        if site is not None:
            restart_over(site, install)

    from bench.gpu_check.common import DRY, FULL
    from bench.gpu_check.summary import summary

    sizes = DRY if args.dry else FULL
    budget = args.budget or sizes.total_budget_s
    fresh = not sizes.dry if args.fresh is None else args.fresh
    if not fresh:
        stage_functions()  # imported once, before the stages fork
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"date": date.today().isoformat(), "dry": sizes.dry, "sizes": sizes.to_json(), "install": install,
              "stages": {}}
    work = Path(tempfile.mkdtemp(prefix="loom-gpu-check-"))
    log_path = args.out / "gpu-check-running.log"
    try:
        with open(log_path, "w") as log:
            for name in [s for s in STAGES if s in args.stages]:
                left = budget - (time.time() - started) - 5  # a few seconds for the report
                if left < 10:
                    report["stages"][name] = {"status": "skipped: the run's budget is spent", "results": {}}
                    continue
                result = run_stage(name, sizes, work, log, min(sizes.stage_budget_s, left), fresh)
                report["stages"][name] = result
                print(f"stage {name}: {result['status']} ({result['seconds']} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if "GPU_CHECK_SITE" in os.environ:  # the wheels' install, made by this run
            shutil.rmtree(os.environ["GPU_CHECK_SITE"], ignore_errors=True)
    report["seconds"] = round(time.time() - started, 1)
    stem = args.out / card_name(report)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    text = summary(report)
    stem.with_suffix(".txt").write_text(text)
    os.replace(log_path, stem.with_suffix(".log"))
    print(text)
    print(f"report: {stem.with_suffix('.json')}")
    return 0 if all(s["status"] == "ok" for s in report["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
