"""`python -m shard`: one tensor-parallel rank serving the Shard gRPC service on a unix socket."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m shard", description=__doc__)
    p.add_argument("--model-dir", required=True, help="local directory with config.json and safetensors")
    p.add_argument("--uds", required=True, help="unix socket path to serve gRPC on")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="KV cache budget (default: decided by the engine)")
    return p.parse_args(argv)


def init_distributed(args: argparse.Namespace) -> None:
    """Joins the tensor-parallel group: NCCL between GPUs, gloo on CPU."""
    if args.world_size == 1:
        return
    backend = "nccl" if args.device == "cuda" else "gloo"
    torch.distributed.init_process_group(
        backend,
        init_method=f"tcp://{args.master_addr}:{args.master_port}",
        rank=args.rank,
        world_size=args.world_size,
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s shard{args.rank} %(levelname)s %(message)s")
    threads = int(os.environ.get("LOOM_NUM_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    device = f"cuda:{args.rank}" if args.device == "cuda" else "cpu"
    if args.device == "cuda":
        torch.cuda.set_device(device)
    init_distributed(args)

    from shard.engine import Engine
    from shard.server import serve

    engine = Engine(
        args.model_dir,
        device=device,
        dtype=DTYPES[args.dtype],
        kv_cache_bytes=args.kv_cache_bytes,
        tp_rank=args.rank,
        tp_size=args.world_size,
    )
    # The launcher stops us with SIGTERM; exit promptly without a traceback.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(serve(engine, args.uds, args.rank, args.world_size))


if __name__ == "__main__":
    main()
