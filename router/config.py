"""The router's settings. The launcher owns the command-line flags and hands these over as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.defaults import (
    DEFAULT_ADAPTER_CYCLE_TIME_S,
    DEFAULT_MAX_BATCH_PREFILL_TOKENS,
    DEFAULT_MAX_INPUT_LENGTH,
    DEFAULT_MAX_QUEUE_TIME_S,
    DEFAULT_MAX_TOTAL_TOKENS,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_ACTIVE_ADAPTERS,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_REQUEST_BYTES,
)


@dataclass(slots=True)
class RouterConfig:
    model_dir: str  # local directory holding config.json and the tokenizer
    model_id: str  # the name the base model is served under (`--model-id`, or "demo")
    shard_sockets: list[str]  # unix socket paths, rank 0 first
    hostname: str = "127.0.0.1"
    port: int = 8080
    max_input_length: int = DEFAULT_MAX_INPUT_LENGTH
    max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS
    # Prompt tokens per step: `--max-batch-prefill-tokens`, or the most a budget measured at warmup may be.
    max_batch_prefill_tokens: int = DEFAULT_MAX_BATCH_PREFILL_TOKENS
    measure_prefill_budget: bool = True  # the flag was not given: sized from the shards' step costs
    max_batch_total_tokens: int = 0  # 0: whatever the shards' KV cache holds
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    max_active_adapters: int = DEFAULT_MAX_ACTIVE_ADAPTERS
    adapter_cycle_time_s: float = DEFAULT_ADAPTER_CYCLE_TIME_S  # `--adapter-cycle-time-s`: how long admission
    # may pass over a request waiting for an adapter slot
    prefix_caching: bool = True  # `--no-prefix-caching` turns it off
    api_key: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)  # `--adapter NAME=SOURCE`
    local_adapter_roots: list[str] = field(default_factory=list)
    adapter_source: str = "hub"
    s3_endpoint_url: str | None = None  # `--s3-endpoint-url`; None: AWS_ENDPOINT_URL(_S3), else AWS
    step_timeout_s: float = 120.0  # a shard step slower than this counts as a hung shard
    max_queue_time_s: float = DEFAULT_MAX_QUEUE_TIME_S  # a request not admitted within this fails with 503 (`--max-queue-time`)
    enable_adapter_api: bool = False  # `--enable-adapter-api`: POST /v1/load_lora_adapter, /v1/unload_lora_adapter
    preloaded_adapter_ids: list[str] = field(default_factory=list)  # resident in the adapter pool for good
    public_metrics: bool = False  # `--public-metrics`: /metrics answers without the API key
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger bodies get 413 (`--max-request-bytes`)
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # open HTTP connections (`--max-connections`)
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S  # to send a request head (`--header-timeout`)
    tool_call_parser: str | None = None  # `--tool-call-parser`; None: from the chat template
    reasoning_parser: str | None = None  # `--reasoning-parser`; None: from the chat template
    # vLLM's serving flags (launcher/vllm_flags.py)
    max_lora_rank: int = 0  # `--max-lora-rank`: adapters of a larger rank are refused; 0: any
    chat_template: str | None = None  # `--chat-template`: replaces the base model's
    uds: str | None = None  # `--uds`: listen on this Unix socket instead of hostname:port
    ssl_keyfile: str | None = None  # `--ssl-keyfile` / `--ssl-certfile`: HTTPS
    ssl_certfile: str | None = None
    allowed_origins: list[str] = field(default_factory=list)  # `--allowed-origins`: CORS

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_file(cls, path: str | Path) -> "RouterConfig":
        return cls(**json.loads(Path(path).read_text()))
