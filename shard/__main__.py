"""`python -m shard`: one tensor-parallel rank serving the Shard gRPC service on a unix socket."""

from __future__ import annotations

import argparse
import asyncio
import os
import logging
import signal
import sys

import torch

from common.defaults import (
    DEFAULT_ADAPTER_HOST_CACHE_BYTES,
    DEFAULT_ADAPTER_MEMORY_FRACTION,
    DEFAULT_ADAPTER_PAGE_RANK,
    DEFAULT_ADAPTER_VOCAB_BYTES,
)
from common.logs import configure_logging

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
    p.add_argument("--adapter-memory-fraction", type=float, default=DEFAULT_ADAPTER_MEMORY_FRACTION,
                   help="adapter pool size: this fraction of free GPU memory at warmup (CPU: of the KV cache budget)")
    p.add_argument("--adapter-pool-pages", type=int, default=None,
                   help="adapter pool size in pages, overriding --adapter-memory-fraction")
    p.add_argument("--adapter-page-rank", type=int, default=DEFAULT_ADAPTER_PAGE_RANK,
                   help="LoRA rank held by one pool page; an adapter of rank r takes ceil(r / this) pages")
    p.add_argument("--adapter-host-cache-bytes", type=int, default=DEFAULT_ADAPTER_HOST_CACHE_BYTES,
                   help="bound of the host-memory LRU cache of adapters evicted from the device pool")
    p.add_argument("--adapter-vocab-bytes", type=int, default=DEFAULT_ADAPTER_VOCAB_BYTES,
                   help="bound of the adapters' embedding / lm_head tensors held on this rank")
    p.add_argument("--enforce-eager", action="store_true",
                   help="never capture CUDA graphs (LOOM_CUDA_GRAPHS=1 asks for them on one GPU)")
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


def configure_engine_thread(device: str) -> None:
    """Thread count and current CUDA device are per thread: set them where the engine runs."""
    threads = int(os.environ.get("LOOM_NUM_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)


def main(argv=None) -> None:
    args = parse_args(argv)
    configure_logging(f"shard{args.rank}")
    device = f"cuda:{args.rank}" if args.device == "cuda" else "cpu"
    init_distributed(args)

    from shard.engine import Engine
    from shard.server import engine_thread, serve
    from shard.weights import CheckpointError

    worker = engine_thread()
    worker.submit(configure_engine_thread, device).result()
    try:
        engine = worker.submit(
            Engine,
            args.model_dir,
            device=device,
            dtype=DTYPES[args.dtype],
            kv_cache_bytes=args.kv_cache_bytes,
            tp_rank=args.rank,
            tp_size=args.world_size,
            adapter_memory_fraction=args.adapter_memory_fraction,
            adapter_pool_pages=args.adapter_pool_pages,
            adapter_host_cache_bytes=args.adapter_host_cache_bytes,
            adapter_page_rank=args.adapter_page_rank,
            enforce_eager=args.enforce_eager,
            adapter_vocab_bytes=args.adapter_vocab_bytes,
        ).result()
    except CheckpointError as e:  # a bad checkpoint is the user's to fix: one line that names the file
        logging.getLogger("loom.shard").error("cannot load the model: %s", e)
        sys.exit(1)
    # The launcher stops us with SIGTERM; exit promptly without a traceback.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(serve(engine, args.uds, args.rank, args.world_size, worker))


if __name__ == "__main__":
    main()
