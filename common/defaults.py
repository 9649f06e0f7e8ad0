"""Defaults that more than one process reads (the launcher's flags, the router's config, the shards' engine),
each written once. The README's "Operating Loom" documents the flags they belong to."""

from __future__ import annotations

# LoRAX's token limits; the launcher shrinks them to fit the model's context when not given explicitly.
DEFAULT_MAX_INPUT_LENGTH = 1024  # `--max-input-length`
DEFAULT_MAX_TOTAL_TOKENS = 2048  # `--max-total-tokens`
# `--max-batch-prefill-tokens` when not given: sized at warmup so that a step with a prompt chunk costs about
# PREFILL_STEP_DECODES one-row decode steps (router/prefill_budget.py), within [MIN_MEASURED_PREFILL_BUDGET,
# max(--max-input-length, DEFAULT_MAX_BATCH_PREFILL_TOKENS)].
DEFAULT_MAX_BATCH_PREFILL_TOKENS = 4096
PREFILL_STEP_DECODES = 4
MIN_MEASURED_PREFILL_BUDGET = 128

DEFAULT_MAX_CONCURRENT_REQUESTS = 128  # `--max-concurrent-requests`: queued + running requests
DEFAULT_MAX_ACTIVE_ADAPTERS = 128  # `--max-active-adapters`: distinct adapters in the running batch
# `--adapter-cycle-time-s` (LoRAX's flag): how long a request waiting for an adapter slot may be passed over.
DEFAULT_ADAPTER_CYCLE_TIME_S = 2.0
DEFAULT_MAX_QUEUE_TIME_S = 600.0  # `--max-queue-time`: a request not admitted within this fails with 503

DEFAULT_MAX_REQUEST_BYTES = 4 << 20  # `--max-request-bytes`
DEFAULT_HEADER_TIMEOUT_S = 10.0  # `--header-timeout`: to send a request head, and then its body
DEFAULT_MAX_CONNECTIONS = 4096  # `--max-connections` (lowered to fit the open-file limit)

DEFAULT_ADAPTER_MEMORY_FRACTION = 0.1  # `--adapter-memory-fraction`: the adapter pool's share of shard memory
DEFAULT_ADAPTER_HOST_CACHE_BYTES = 2 << 30  # `--adapter-host-cache-mb`: host LRU of adapters paged out
DEFAULT_ADAPTER_PAGE_RANK = 8  # LoRA ranks of every layer in one adapter pool page (`--adapter-pool-pages`)
# `--adapter-vocab-memory-mb`: per rank, the adapters' embedding / lm_head tensors (shard/vocab_adapter.py).
DEFAULT_ADAPTER_VOCAB_BYTES = 1 << 30

# `--kv-cache-mb` when not given: this share of free GPU memory after the weights, or this budget per rank on CPU.
DEFAULT_GPU_MEMORY_FRACTION = 0.9
DEFAULT_CPU_KV_BYTES = 1 << 30

# The Responses API's store of answers for `previous_response_id` (router/responses_api.py): the newest this
# many, holding at most this many characters of conversation, each for this long.
RESPONSES_STORE_ENTRIES = 1024
RESPONSES_STORE_CHARS = 64 * 1024 * 1024
RESPONSES_STORE_TTL_S = 3600.0
