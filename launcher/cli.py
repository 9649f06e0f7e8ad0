"""The `loom` command: parses the flags (LoRAX launcher names, and vLLM's where they mean the same:
launcher/vllm_flags.py), resolves the model, device and token limits, and hands the rest to the supervisor."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from common.defaults import (
    DEFAULT_ADAPTER_CYCLE_TIME_S,
    DEFAULT_ADAPTER_HOST_CACHE_BYTES,
    DEFAULT_ADAPTER_MEMORY_FRACTION,
    DEFAULT_ADAPTER_PAGE_RANK,
    DEFAULT_ADAPTER_VOCAB_BYTES,
    DEFAULT_CPU_KV_BYTES,
    DEFAULT_GPU_MEMORY_FRACTION,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_ACTIVE_ADAPTERS,
    DEFAULT_MAX_BATCH_PREFILL_TOKENS,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_INPUT_LENGTH,
    DEFAULT_MAX_QUEUE_TIME_S,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_TOTAL_TOKENS,
    MIN_MEASURED_PREFILL_BUDGET,
    PREFILL_STEP_DECODES,
)
from common.logs import log_handler
from launcher.model_source import ModelSourceError, max_position_embeddings, resolve_model
from launcher.vllm_flags import VllmFlagError, add_vllm_flags, merge_model, router_settings
from router.reasoning import REASONING_PARSERS
from router.sources import SOURCES
from router.tool_parsers import TOOL_CALL_FAMILIES

log = logging.getLogger("loom")


class FlagError(Exception):
    """Flags that contradict each other, the model or the machine; reported like argparse errors (exit 2)."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def port_number(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"must be between 1 and 65535, got {text}")
    return value


def named_adapter(text: str) -> tuple[str, str]:
    name, sep, source = text.partition("=")
    if not sep or not name.strip() or not source.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=SOURCE, got {text!r}")
    return name.strip(), source.strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loom",
        description="Serve one base LLM and many LoRA adapters behind OpenAI- and LoRAX-compatible APIs.",
    )
    p.add_argument("--model-id", metavar="ID", default=None, help="Local model directory, a .gguf file (dequantized once into $LOOM_CACHE), "
                   "or hub repo id (org/name[@revision]). "
                   "Unset: the embedded demo model, built once into $LOOM_CACHE (default ~/.cache/loom) and reused.")
    p.add_argument("--port", metavar="PORT", type=port_number, default=8080, help="Port the HTTP server listens on (default: %(default)s).")
    p.add_argument("--hostname", "--host", metavar="HOST", default="127.0.0.1", help="Address the HTTP server listens on; 0.0.0.0 for all interfaces (default: %(default)s).")
    p.add_argument("--num-shard", "--tensor-parallel-size", "-tp", metavar="N", type=positive_int, default=None, help="Tensor-parallel ranks, one process each. "
                   "Must split the model's attention heads evenly. Default: 1 on cpu; on cuda the largest such count that "
                   "divides the number of visible GPUs.")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="Where the shards run. auto (default): cuda when a GPU is visible, else cpu.")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="Weight and activation dtype. auto (default): bfloat16 on cuda, float32 on cpu.")
    p.add_argument("--adapter", type=named_adapter, action="append", default=[], metavar="NAME=SOURCE",
                   help="A named adapter (SOURCE: hub repo id or local dir), listed in /v1/models. Repeatable.")
    p.add_argument("--local-adapter-root", action="append", default=[], metavar="DIR",
                   help="Requests may name an adapter by absolute path only inside these directories. Repeatable.")
    p.add_argument("--adapter-source", choices=sorted(SOURCES), default="hub",
                   help="Source of an adapter id that is neither a --adapter name nor an allowed path (default: %(default)s).")
    p.add_argument("--s3-endpoint-url", metavar="URL", default=None,
                   help="S3-compatible object store of s3:// adapters (MinIO, R2, GCS). Default: "
                   "$AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS.")
    p.add_argument("--enable-adapter-api", action="store_true",
                   help="Serve vLLM's runtime adapter routes POST /v1/load_lora_adapter and /v1/unload_lora_adapter.")
    p.add_argument("--preloaded-adapter-ids", nargs="+", action="extend", default=[], metavar="ID",
                   help="Adapters (ids as a request names them) loaded at start-up and never evicted from the pool.")
    p.add_argument("--max-input-length", metavar="N", type=positive_int, default=None,
                   help=f"Most prompt tokens per request. Default: {DEFAULT_MAX_INPUT_LENGTH}, kept below --max-total-tokens.")
    p.add_argument("--max-total-tokens", "--max-model-len", metavar="N", type=positive_int, default=None,
                   help=f"Most prompt + generated tokens per request. Default: {DEFAULT_MAX_TOTAL_TOKENS}, "
                   "capped at the model's max_position_embeddings.")
    p.add_argument("--max-batch-prefill-tokens", metavar="N", type=positive_int, default=None,
                   help="Most prompt tokens computed in one batch step, beside the running decodes; longer prompts "
                   "are prefilled in chunks over several steps. Default: sized at warmup from the measured cost of a "
                   "prompt token against a decode step, so that a step with a chunk costs about "
                   f"{PREFILL_STEP_DECODES} decode steps; at least {MIN_MEASURED_PREFILL_BUDGET}, at most "
                   f"max(--max-input-length, {DEFAULT_MAX_BATCH_PREFILL_TOKENS}) (and --max-batch-total-tokens).")
    p.add_argument("--max-batch-total-tokens", metavar="N", type=positive_int, default=None,
                   help="Most tokens (prompt + generated) of all running requests together. "
                   "Default: whatever fits in the shards' KV cache.")
    p.add_argument("--max-concurrent-requests", metavar="N", type=positive_int, default=DEFAULT_MAX_CONCURRENT_REQUESTS,
                   help="Requests accepted at once (queued + running); more are answered with 429 (default: %(default)s).")
    p.add_argument("--max-active-adapters", "--max-loras", metavar="N", type=positive_int, default=DEFAULT_MAX_ACTIVE_ADAPTERS,
                   help="Adapters that may be scheduled in the running batch at once (default: %(default)s); "
                   "each takes at least one adapter-pool page, so a smaller pool caps it: the start-up log says "
                   "the real limit, as /info and vllm:lora_requests_info's max_lora do.")
    p.add_argument("--adapter-cycle-time-s", metavar="SECONDS", type=positive_float,
                   default=DEFAULT_ADAPTER_CYCLE_TIME_S,
                   help="A request whose adapter cannot get a slot in the running batch lets the requests behind it "
                   "go first for at most this long; then admission waits for it, so it never starves "
                   "(default: %(default)s).")
    p.add_argument("--adapter-memory-fraction", metavar="F", type=float, default=DEFAULT_ADAPTER_MEMORY_FRACTION,
                   help="Share of the shard's memory (free GPU memory on cuda; on cpu the host memory available, "
                   "shared by its ranks) held by the paged adapter pool and the running adapters' rows, up to what "
                   "--max-active-adapters adapters of rank 64 take (default: %(default)s).")
    p.add_argument("--adapter-pool-pages", metavar="N", type=positive_int, default=None,
                   help="Size the adapter pool in pages instead (a page holds "
                   f"{DEFAULT_ADAPTER_PAGE_RANK} LoRA ranks of every layer).")
    p.add_argument("--adapter-host-cache-mb", metavar="MB", type=positive_int,
                   default=DEFAULT_ADAPTER_HOST_CACHE_BYTES >> 20,
                   help="Bound of the host-memory LRU cache of adapters paged out of the pool; adapters "
                   "evicted from it go to a spill file of the shard's own (default: %(default)s).")
    p.add_argument("--adapter-vocab-memory-mb", metavar="MB", type=positive_int,
                   default=DEFAULT_ADAPTER_VOCAB_BYTES >> 20,
                   help="Per shard, the memory adapters' own embedding / lm_head tensors may take (LoRA on "
                   "embed_tokens / lm_head, added tokens, modules_to_save), kept free of the KV cache on cuda; an "
                   "adapter past what is left is refused (default: %(default)s).")
    p.add_argument("--kv-cache-mb", metavar="MB", type=positive_int, default=None,
                   help=f"KV cache memory per shard. Default: {DEFAULT_GPU_MEMORY_FRACTION * 100:.0f}%% of free GPU "
                   f"memory after the weights on cuda, {DEFAULT_CPU_KV_BYTES >> 20} MB on cpu.")
    p.add_argument("--max-queue-time", metavar="SECONDS", type=positive_float, default=DEFAULT_MAX_QUEUE_TIME_S,
                   help="A request not scheduled within this many seconds fails with 503 (default: %(default)s).")
    p.add_argument("--max-request-bytes", metavar="N", type=positive_int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="Larger request bodies are answered with 413 (default: %(default)s).")
    p.add_argument("--max-connections", metavar="N", type=positive_int, default=DEFAULT_MAX_CONNECTIONS,
                   help="Open HTTP connections; past it the oldest one not being served makes room, and when all "
                   "are being served a new request gets 503. Lowered to fit the open-file limit (default: "
                   "%(default)s).")
    p.add_argument("--header-timeout", metavar="SECONDS", type=positive_float, default=DEFAULT_HEADER_TIMEOUT_S,
                   help="A connection that has not sent a complete request head this long after opening (or "
                   "after its last response) is closed; a request body must then arrive within as long again, "
                   "counted afresh per 64 KiB received, else 408 (default: %(default)s).")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("LOOM_API_KEY"),
                   help="When set, every route but /health needs 'Authorization: Bearer KEY'. Default: $LOOM_API_KEY.")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="Compute every prompt whole instead of reusing the KV of a prefix computed before for the "
                   "same adapter (on by default).")
    p.add_argument("--public-metrics", action="store_true",
                   help="Answer /metrics without the API key (for the inference extension's endpoint picker and "
                   "Prometheus, which scrape without credentials).")
    p.add_argument("--enforce-eager", action="store_true",
                   help="Run every step eagerly: no CUDA graphs for decode steps (vLLM's flag). Graphs are opt-in "
                   "with LOOM_CUDA_GRAPHS=1 until verified on a GPU (README, \"What has and has not run on a GPU\").")
    p.add_argument("--tool-call-parser", choices=TOOL_CALL_FAMILIES, default=None,
                   help="How tool calls are read from generated text (vLLM's names). Default: from the chat "
                   "template ([TOOL_CALLS]: mistral, <|python_tag|>: llama3_json, else hermes).")
    p.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=None,
                   help="Split <think> reasoning into reasoning_content (vLLM's names; none: never). Default: "
                   "when the chat template writes <think>.")
    p.add_argument("--json-output", action="store_true", help="Log as JSON lines; the shards and router see LOOM_LOG_FORMAT=json in their environment.")
    add_vllm_flags(p)
    return p


@dataclass(frozen=True, slots=True)
class Limits:
    max_input_length: int
    max_total_tokens: int
    max_batch_prefill_tokens: int  # with measure_prefill_budget, the most the measured budget may be
    max_batch_total_tokens: int  # 0: whatever the shards' KV cache holds
    measure_prefill_budget: bool  # --max-batch-prefill-tokens not given: sized at warmup


def derive_limits(args: argparse.Namespace, max_positions: int | None) -> Limits:
    """Fills the unset token limits from LoRAX's defaults, shrunk to fit the model and the explicit flags (an
    unset prefill budget is measured at warmup, up to LoRAX's default); raises FlagError naming the flag when
    explicit values contradict each other or the model."""
    batch_total = args.max_batch_total_tokens or 0
    total = args.max_total_tokens
    if total is None:
        total = max(DEFAULT_MAX_TOTAL_TOKENS, (args.max_input_length or 0) + 1)
        total = min(total, max_positions or total)
    max_input = args.max_input_length
    if max_input is None:
        max_input = min(DEFAULT_MAX_INPUT_LENGTH, total - 1)
    prefill = args.max_batch_prefill_tokens
    if prefill is None:
        prefill = max(max_input, min(DEFAULT_MAX_BATCH_PREFILL_TOKENS, batch_total or DEFAULT_MAX_BATCH_PREFILL_TOKENS))

    if max_positions is not None and total > max_positions:
        raise FlagError(f"--max-total-tokens ({total}) must be <= the model's max_position_embeddings ({max_positions})")
    if max_input < 1 or max_input >= total:
        raise FlagError(f"--max-input-length ({max_input}) must be less than --max-total-tokens ({total})")
    if batch_total and batch_total < total:
        raise FlagError(f"--max-batch-total-tokens ({batch_total}) must be >= --max-total-tokens ({total})")
    if batch_total and prefill > batch_total:
        raise FlagError(f"--max-batch-prefill-tokens ({prefill}) must be <= --max-batch-total-tokens ({batch_total})")
    return Limits(max_input, total, prefill, batch_total, args.max_batch_prefill_tokens is None)


def resolve_device(args: argparse.Namespace) -> tuple[str, str, int]:
    """(device, dtype, GPUs visible) from --device/--dtype and the GPUs torch can see; the shard count is
    decided once the model is known (resolve_num_shard)."""
    import torch  # imported here so that `loom --help` stays fast

    gpus = torch.cuda.device_count() if args.device != "cpu" else 0
    if args.device == "cuda" and gpus == 0:
        raise FlagError("--device cuda: no CUDA GPU is visible")
    device = "cuda" if gpus else "cpu"
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    if device == "cuda" and args.num_shard and args.num_shard > gpus:
        raise FlagError(f"--num-shard {args.num_shard} needs {args.num_shard} GPUs but only {gpus} are visible")
    return device, dtype, gpus


# Intermediate sizes a model splits across ranks: the dense MLP's, and a mixture of experts' experts and shared
# expert (shard/models/moe.py).
INTERMEDIATE_SIZES = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")


def tensor_parallel_sizes(model_dir: Path, limit: int | None = None) -> list[int]:
    """Shard counts up to `limit` (default: the attention head count) the model splits into: attention heads
    and every intermediate size divide evenly, KV heads divide or are replicated (the rules of shard/layers.py's
    parallel layers, which a test holds this to)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    heads = config.num_attention_heads
    inters = [size for field in INTERMEDIATE_SIZES if (size := getattr(config, field, None))]
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return [n for n in range(1, (limit or heads) + 1)
            if heads % n == 0 and all(i % n == 0 for i in inters) and (kv_heads % n == 0 or n % kv_heads == 0)]


def resolve_num_shard(requested: int | None, device: str, gpus: int, model_dir: Path) -> int:
    """--num-shard when the model splits that way, else a FlagError naming the valid values. Unset: 1 on cpu,
    on cuda the largest valid count that divides the visible GPUs (28 heads on 8 GPUs: 4)."""
    if requested is None and device != "cuda":
        return 1
    valid = tensor_parallel_sizes(model_dir, gpus if device == "cuda" else None)
    if requested is None:
        return max(n for n in valid if gpus % n == 0)
    if requested not in valid:
        raise FlagError(f"--num-shard {requested} does not split this model evenly; valid values"
                        f"{' on ' + str(gpus) + ' GPU(s)' if device == 'cuda' else ''}: {', '.join(map(str, valid))}")
    return requested


def resolve_adapter_paths(args: argparse.Namespace) -> tuple[dict[str, str], list[str]]:
    """Named adapters (local sources made absolute, since the router has its own working dir) and the
    allowed local adapter roots."""
    adapters: dict[str, str] = {}
    for name, source in args.adapter + args.lora_modules:
        if name in adapters:
            raise FlagError(f"--adapter (or --lora-modules) {name!r} is given twice")
        local = Path(source).expanduser()
        adapters[name] = str(local.resolve()) if local.is_dir() else source
    roots = []
    for root in args.local_adapter_root:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise FlagError(f"--local-adapter-root {root!r} is not a directory")
        roots.append(str(path.resolve()))
    return adapters, roots


def setup_logging(json_output: bool) -> None:
    """The launcher's own lines, in its children's format; LOOM_LOG_FORMAT reaches them by inheritance."""
    if json_output:
        os.environ["LOOM_LOG_FORMAT"] = "json"
    log.addHandler(log_handler("loom"))
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    from launcher.supervisor import launch
    from router.config import RouterConfig

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.json_output)
    try:
        merge_model(args)
        vllm = router_settings(args)
        derive_limits(args, None)  # explicit contradictions fail before a slow model download or build
        adapters, adapter_roots = resolve_adapter_paths(args)
        device, dtype, gpus = resolve_device(args)
    except (FlagError, VllmFlagError) as e:
        parser.error(str(e))
    try:
        model = resolve_model(args.model_id)
    except ModelSourceError as e:
        log.error(str(e))
        return 1
    except KeyboardInterrupt:  # Ctrl-C during a download or the demo build: no traceback
        return 130
    try:
        limits = derive_limits(args, max_position_embeddings(model.path))
        num_shard = resolve_num_shard(args.num_shard, device, gpus, model.path)
    except FlagError as e:
        parser.error(str(e))
    model_name = vllm.pop("served_model_name") or model.name
    log.info(f"model {model_name} from {model.path} on {device} ({dtype}), {num_shard} shard(s)")
    config = RouterConfig(
        model_dir=str(model.path),
        model_id=model_name,
        shard_sockets=[],  # the supervisor fills them in once it has made the socket dir
        hostname=args.hostname,
        port=args.port,
        max_input_length=limits.max_input_length,
        max_total_tokens=limits.max_total_tokens,
        max_batch_prefill_tokens=limits.max_batch_prefill_tokens,
        max_batch_total_tokens=limits.max_batch_total_tokens,
        measure_prefill_budget=limits.measure_prefill_budget,
        max_concurrent_requests=args.max_concurrent_requests,
        max_active_adapters=args.max_active_adapters,
        adapter_cycle_time_s=args.adapter_cycle_time_s,
        prefix_caching=args.prefix_caching,
        max_queue_time_s=args.max_queue_time,
        max_request_bytes=args.max_request_bytes,
        max_connections=args.max_connections,
        header_timeout_s=args.header_timeout,
        api_key=args.api_key or None,
        adapters=adapters,
        local_adapter_roots=adapter_roots,
        adapter_source=args.adapter_source,
        s3_endpoint_url=args.s3_endpoint_url,
        enable_adapter_api=args.enable_adapter_api,
        preloaded_adapter_ids=list(dict.fromkeys(args.preloaded_adapter_ids)),
        public_metrics=args.public_metrics,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        **vllm,
    )
    return launch(config, device=device, dtype=dtype, num_shard=num_shard, shard_flags=shard_flags(args))


def shard_flags(args: argparse.Namespace) -> list[str]:
    """Memory and execution settings every shard gets on its command line."""
    flags = ["--adapter-memory-fraction", str(args.adapter_memory_fraction),
             "--adapter-host-cache-bytes", str(args.adapter_host_cache_mb << 20),
             "--adapter-vocab-bytes", str(args.adapter_vocab_memory_mb << 20)]
    if args.adapter_pool_pages:
        flags += ["--adapter-pool-pages", str(args.adapter_pool_pages)]
    if args.kv_cache_mb:
        flags += ["--kv-cache-bytes", str(args.kv_cache_mb << 20)]
    if args.enforce_eager:
        flags.append("--enforce-eager")
    return flags
