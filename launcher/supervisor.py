"""Starts the shards and the router, waits until each answers, then keeps them alive as one unit: when
any child exits, all are stopped and loom exits non-zero; SIGINT/SIGTERM stop the router first (so it
drains) and then the shards, and loom exits 0."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import http.client
import ssl
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

from router.config import RouterConfig

# The launcher forks its children while grpc (loaded by the shard probes) runs its poller thread. With fork
# support on, grpc restarts that poller in the forked child, where subprocess has already closed the poller's
# epoll descriptor: the child can abort (SIGABRT, "epoll_wait error: Bad file descriptor") before it execs.
# The children exec at once and need none of it. Set before grpc is first imported in this process.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

log = logging.getLogger("loom")

SHARD_STARTUP_TIMEOUT_S = 1800.0  # loading a large model onto the GPUs can take many minutes
ROUTER_STARTUP_TIMEOUT_S = 600.0  # includes the KV-cache warmup the router asks the shards for
ROUTER_GRACE_S = 30.0  # time the router gets to finish in-flight requests after SIGTERM
SHARD_GRACE_S = 10.0
FAILURE_GRACE_S = 5.0  # after a child failed there is nothing left to drain: a batch needs every shard
POLL_S = 0.1
PR_SET_PDEATHSIG = 1
# Project root (holds launcher/, shard/, router/): children import the same code as this launcher.
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


class LaunchError(Exception):
    """A child failed to start; the message is the one line the user sees."""


@dataclass(slots=True)
class Child:
    name: str  # "shard 0", ..., "router"
    proc: subprocess.Popen

    def alive(self) -> bool:
        return self.proc.poll() is None

    def exit_line(self) -> str:
        return f"{self.name} (pid {self.proc.pid}) exited with code {self.proc.returncode}"


class StopRequest:
    """Counts SIGINT/SIGTERM: the first asks for a graceful stop, a second one for an immediate kill."""

    def __init__(self) -> None:
        self.count = 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.count += 1

    @property
    def requested(self) -> bool:
        return self.count > 0

    @property
    def forced(self) -> bool:
        return self.count > 1


def launch(config: RouterConfig, device: str, dtype: str, num_shard: int, shard_flags: list[str] = ()) -> int:
    """Runs Loom until a signal (returns 0) or until a child fails (returns 1)."""
    stop = StopRequest()
    run_dir = Path(tempfile.mkdtemp(prefix="loom-"))  # private (0700): shard sockets, router config + api key
    children: list[Child] = []
    try:
        config = start(config, device, dtype, num_shard, run_dir, children, stop, list(shard_flags))
        if stop.requested:
            return 0
        log.info(f"Loom is ready: {router_address(config)} (model {config.model_id}, {num_shard} shard(s))")
        failed = supervise(children, stop)
        if failed is None:
            log.info("shutting down")
            return 0
        log.error(f"{failed.exit_line()}; shutting down")
        return 1
    except LaunchError as e:
        log.error(str(e))
        return 1
    finally:
        stop_all(children, stop, drain=stop.requested)
        shutil.rmtree(run_dir, ignore_errors=True)


def start(config: RouterConfig, device: str, dtype: str, num_shard: int, run_dir: Path,
          children: list[Child], stop: StopRequest, shard_flags: list[str]) -> RouterConfig:
    """Spawns the shards, waits for their Health, then spawns the router and waits for its /health.
    Appends each child to `children` as soon as it exists so that the caller can always stop it."""
    if not config.uds:
        check_port_free(config.hostname, config.port)
    sockets = [str(run_dir / f"shard-{rank}.sock") for rank in range(num_shard)]
    master_port = free_port()
    for rank, path in enumerate(sockets):
        argv = [sys.executable, "-m", "shard", "--model-dir", config.model_dir, "--uds", path,
                "--rank", str(rank), "--world-size", str(num_shard), "--master-addr", "127.0.0.1",
                "--master-port", str(master_port), "--device", device, "--dtype", dtype, *shard_flags]
        children.append(spawn(f"shard {rank}", argv, shard_env(device, num_shard)))

    pending = set(sockets)

    def shards_ready() -> bool:
        pending.difference_update([path for path in list(pending) if shard_healthy(path)])
        return not pending

    if not wait_ready("shards", shards_ready, children, stop, SHARD_STARTUP_TIMEOUT_S):
        return config
    log.info(f"{num_shard} shard(s) ready")

    config = replace(config, shard_sockets=sockets)
    config_path = run_dir / "router.json"
    config_path.write_text(config.to_json())
    children.append(spawn("router", [sys.executable, "-m", "router", "--config", str(config_path)], child_env()))
    wait_ready("router", partial(router_healthy, config), children, stop, ROUTER_STARTUP_TIMEOUT_S)
    return config


def wait_ready(what: str, is_ready: Callable[[], bool], children: list[Child], stop: StopRequest,
               timeout_s: float) -> bool:
    """Polls `is_ready` until it holds (True) or a stop is requested (False); raises LaunchError when a
    child exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while not stop.requested:
        if (dead := first_exited(children)) is not None:
            raise LaunchError(f"{dead.exit_line()} while starting; shutting down")
        if is_ready():
            return True
        if time.monotonic() > deadline:
            raise LaunchError(f"{what} not ready after {timeout_s:.0f} s; shutting down")
        time.sleep(POLL_S)
    return False


def supervise(children: list[Child], stop: StopRequest) -> Child | None:
    """Waits for a stop request (returns None) or for a child to exit (returns it)."""
    while not stop.requested:
        if (dead := first_exited(children)) is not None:
            return dead
        time.sleep(POLL_S)
    return None


def first_exited(children: list[Child]) -> Child | None:
    return next((child for child in children if not child.alive()), None)


def stop_all(children: list[Child], stop: StopRequest, drain: bool) -> None:
    """Router first, so that it stops accepting and, when `drain`, finishes what it can while the
    shards still answer; then the shards."""
    router_grace_s, shard_grace_s = (ROUTER_GRACE_S, SHARD_GRACE_S) if drain else (FAILURE_GRACE_S, FAILURE_GRACE_S)
    terminate([c for c in children if c.name == "router"], router_grace_s, stop)
    terminate([c for c in children if c.name != "router"], shard_grace_s, stop)


def terminate(children: list[Child], grace_s: float, stop: StopRequest) -> None:
    """SIGTERM, then SIGKILL after `grace_s` (or at once on a second Ctrl-C), to each child's process
    group so that anything a child spawned goes too."""
    for child in children:
        signal_group(child, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(c.alive() for c in children) and time.monotonic() < deadline and not stop.forced:
        time.sleep(POLL_S)
    for child in children:
        signal_group(child, signal.SIGKILL)
        child.proc.wait()


def signal_group(child: Child, sig: signal.Signals) -> None:
    if not child.alive():  # a reaped pid may belong to someone else by now
        return
    try:
        os.killpg(child.proc.pid, sig)
    except ProcessLookupError:
        pass


# ---- children ----------------------------------------------------------------------------------------


def spawn(name: str, argv: list[str], env: dict[str, str]) -> Child:
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, preexec_fn=partial(child_setup, os.getpid()))
    log.info(f"started {name} (pid {proc.pid})")
    return Child(name, proc)


def child_setup(parent_pid: int) -> None:
    """Runs in the child between fork and exec. Its own process group keeps a terminal's Ctrl-C away from
    it (the launcher stops the children in order instead); on Linux the kernel kills it when the launcher
    dies, even by SIGKILL, so that children never outlive loom."""
    os.setpgid(0, 0)
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the launcher died before prctl took effect
            os._exit(1)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_ROOT, env.get("PYTHONPATH")) if p)
    return env


def shard_env(device: str, num_shard: int) -> dict[str, str]:
    """On CPU the ranks share the cores instead of each one starting a thread per core."""
    env = child_env()
    if device == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = str(max(1, cores // num_shard))
        env.setdefault("LOOM_NUM_THREADS", threads)
        env.setdefault("OMP_NUM_THREADS", threads)
    return env


# ---- probes ------------------------------------------------------------------------------------------


def shard_healthy(socket_path: str) -> bool:
    import grpc

    from proto import generate_pb2, generate_pb2_grpc

    if not os.path.exists(socket_path):
        return False
    # A fresh channel per probe: a long-lived one would back off for up to minutes between reconnects.
    with grpc.insecure_channel(f"unix://{socket_path}") as channel:
        try:
            generate_pb2_grpc.ShardStub(channel).Health(generate_pb2.HealthRequest(), timeout=2.0)
            return True
        except grpc.RpcError:
            return False


def router_address(config: RouterConfig) -> str:
    """Where clients reach the router: its base URL, or its Unix socket (--uds)."""
    if config.uds:
        return f"unix:{config.uds} (HTTP{'S' if config.ssl_certfile else ''})"
    scheme = "https" if config.ssl_certfile else "http"
    return f"{scheme}://{url_host(config.hostname)}:{config.port}/v1"


def router_healthy(config: RouterConfig) -> bool:
    """GET /health answers 200 (over the Unix socket with --uds; over TLS, unverified, with --ssl-*: the
    probe is this machine's, to its own child)."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    tls = ssl._create_unverified_context() if config.ssl_certfile else None
    if config.uds:
        connection: http.client.HTTPConnection = _UnixConnection(config.uds, tls)
    elif tls is not None:
        connection = http.client.HTTPSConnection(url_host(config.hostname).strip("[]"), config.port, timeout=2.0,
                                                 context=tls)
    else:
        connection = http.client.HTTPConnection(url_host(config.hostname).strip("[]"), config.port, timeout=2.0)
    try:
        connection.request("GET", "/health", headers=headers)
        return connection.getresponse().status == 200
    except (http.client.HTTPException, OSError):
        return False
    finally:
        connection.close()


class _UnixConnection(http.client.HTTPConnection):
    """HTTP (or HTTPS with `tls`) over a Unix domain socket."""

    def __init__(self, path: str, tls: ssl.SSLContext | None):
        super().__init__("localhost", timeout=2.0)
        self.path, self.tls = path, tls

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = self.tls.wrap_socket(sock, server_hostname="localhost") if self.tls else sock


def url_host(hostname: str) -> str:
    """The address a client on this machine reaches `hostname` at, as written in a URL."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(hostname, hostname)
    return f"[{host}]" if ":" in host else host


def check_port_free(hostname: str, port: int) -> None:
    """Fails before any model is loaded when the router could not listen anyway."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(hostname or None, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise LaunchError(f"--hostname {hostname!r}: {e}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is fine
        try:
            probe.bind(address)
        except OSError as e:
            raise LaunchError(f"cannot listen on {hostname}:{port}: {e.strerror}") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
