"""Prometheus metrics of the router, served on /metrics."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from proto import generate_pb2 as pb
from router.generation import GenerationStats
from router.scheduler import Scheduler
from router.vllm_metrics import LoraResidency, VllmMetrics

if TYPE_CHECKING:
    from router.adapters import Adapter

# Latency buckets from a few ms (one decode step on a GPU) to minutes (a long generation in a queue).
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOKENS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Why a request did not succeed (`loom_request_failures_total{reason}`).
FAILURE_REASONS = ("invalid_request", "unauthorized", "not_found", "overloaded", "queue_timeout", "shard_error",
                   "cancelled", "server_error")


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        # -- HTTP requests (GuardMiddleware) --
        self.requests = Counter("loom_requests", "HTTP requests by route and status (499: client went away)",
                                ["route", "status"], registry=r)
        self.request_duration = Histogram("loom_request_duration_seconds", "Time from request to last byte",
                                          ["route"], buckets=SECONDS, registry=r)
        self.request_success = Counter("loom_request_success", "Requests that completed without error",
                                       registry=r)
        self.request_failures = Counter("loom_request_failures", "Requests that failed, by reason", ["reason"],
                                        registry=r)
        # -- generations (the scheduler's on_finish) --
        self.generations = Counter("loom_generations", "Finished generations by finish reason", ["finish_reason"],
                                   registry=r)
        self.queue_duration = Histogram("loom_queue_duration_seconds", "Time from queueing to admission",
                                        buckets=SECONDS, registry=r)
        self.ttft = Histogram("loom_time_to_first_token_seconds", "Time from queueing to the first token",
                              buckets=SECONDS, registry=r)
        self.tpot = Histogram("loom_time_per_output_token_seconds", "Mean time per generated token after the first",
                              buckets=SECONDS, registry=r)
        self.prompt_tokens = Histogram("loom_prompt_tokens", "Prompt tokens per generation", buckets=TOKENS,
                                       registry=r)
        self.generated_tokens = Histogram("loom_generated_tokens", "Generated tokens per generation",
                                          buckets=TOKENS, registry=r)
        # -- batch steps (the scheduler's on_step) --
        self.batch_size = Histogram("loom_batch_size", "Sequences per batch step (prefill + decode)",
                                    buckets=BATCH, registry=r)
        self.step_duration = Histogram("loom_step_duration_seconds", "Batch step round trip, router to shards",
                                       buckets=SECONDS, registry=r)
        self.forward_duration = Histogram("loom_forward_duration_seconds", "Batch step compute time on shard 0",
                                          buckets=SECONDS, registry=r)
        # -- scheduler state, read at scrape time --
        self.running = Gauge("loom_running_requests", "Requests being generated on the shards", registry=r)
        self.waiting = Gauge("loom_waiting_requests", "Requests queued for admission", registry=r)
        self.kv_blocks_total = Gauge("loom_kv_blocks_total", "KV cache blocks on the shards", registry=r)
        self.kv_blocks_used = Gauge("loom_kv_blocks_used", "KV blocks held by running requests", registry=r)
        self.kv_blocks_free = Gauge("loom_kv_blocks_free", "KV blocks free for allocation (cached prefixes that no "
                                    "request holds included)", registry=r)
        self.active_adapters = Gauge("loom_active_adapters", "Distinct adapters in the running batch", registry=r)
        self.adapter_pages_used = Gauge("loom_adapter_pages_used", "Adapter-pool pages held by the running batch",
                                        registry=r)
        # -- adapters (the registry) --
        self.adapter_loads = Counter("loom_adapter_loads", "Adapters resolved and registered on the shards",
                                     registry=r)
        self.adapter_load_seconds = Histogram("loom_adapter_load_seconds", "Time to resolve and register an adapter",
                                              buckets=SECONDS, registry=r)
        self.adapter_activations = Counter("loom_adapter_activations",
                                           "Adapters entering the running batch (paged in unless still resident)",
                                           registry=r)
        for reason in FAILURE_REASONS:  # so that dashboards see zeros, not missing series
            self.request_failures.labels(reason)
        self.vllm = VllmMetrics(r)  # vLLM's request and token families, for vLLM's dashboards
        self.residency: LoraResidency | None = None  # which adapters are resident where (`watch`)

    def watch(self, scheduler: Scheduler, model_name: str, label: Callable[[str], str | None],
              lookup: Callable[[str], Adapter | None]) -> None:
        """Gauges read the scheduler at scrape time, so the step loop pays nothing for them. `label` names an
        adapter id in labels (None: not to be named), `lookup` finds the registered adapter of an id."""
        self.registry.register(InferenceExtensionCollector(scheduler, model_name, label))
        self.residency = LoraResidency(scheduler.client, lookup, label, scheduler.adapters, model_name)
        self.registry.register(self.residency)
        self.running.set_function(lambda: scheduler.num_running)
        self.waiting.set_function(lambda: scheduler.num_waiting)
        blocks = scheduler.blocks
        self.kv_blocks_total.set_function(lambda: blocks.num_blocks)
        self.kv_blocks_used.set_function(lambda: blocks.num_held)
        self.kv_blocks_free.set_function(lambda: blocks.num_free)
        self.active_adapters.set_function(lambda: len(scheduler.adapters.active))
        self.adapter_pages_used.set_function(lambda: scheduler.adapters.pages_used)
        scheduler.on_step = self.observe_step
        scheduler.on_finish = self.observe_generation
        scheduler.adapters.on_active = self.adapter_activations.inc

    def observe_step(self, batch: int, reply: pb.StepResponse, seconds: float) -> None:
        self.batch_size.observe(batch)
        self.step_duration.observe(seconds)
        self.forward_duration.observe(reply.forward_ms / 1000)

    def observe_generation(self, stats: GenerationStats) -> None:
        self.generations.labels(stats.finish_reason).inc()
        self.queue_duration.observe(stats.queue_s)
        self.prompt_tokens.observe(stats.prompt_tokens)
        self.generated_tokens.observe(stats.generated)
        if (ttft := stats.ttft_s) is not None:
            self.ttft.observe(ttft)
        if (tpot := stats.tpot_s) is not None:
            self.tpot.observe(tpot)
        self.vllm.observe(stats)

    async def render(self) -> bytes:
        """The exposition, with the shards' adapter residency asked for first."""
        if self.residency is not None:
            await self.residency.refresh()
        return generate_latest(self.registry)


class InferenceExtensionCollector:
    """The model-server protocol of the Kubernetes Gateway API Inference Extension, under vLLM's names, so that
    its endpoint picker (and llm-d's) routes to Loom with its stock vLLM mapping. Read at scrape time.

    The picker parses these as gauges (an untyped sample reads as 0), takes the newest series of each, and for
    `vllm:lora_requests_info` the series with the largest value, so that one carries the time its labels were
    computed. vLLM's `model_name` and `engine` labels are kept for dashboards built on vLLM's names. Adapters
    are named by `label` (escaped, so that no id reads as two; private adapters not at all).
    """

    def __init__(self, scheduler: Scheduler, model_name: str, label: Callable[[str], str | None]):
        self.scheduler = scheduler
        self.labels = {"model_name": model_name, "engine": "0"}
        self.label = label

    def _adapter_list(self, adapter_ids: list[str]) -> str:
        return ",".join(name for name in map(self.label, adapter_ids) if name is not None)

    def _gauge(self, name: str, documentation: str, value: float, labels: dict[str, str]) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, documentation, labels=list(labels))
        family.add_metric(list(labels.values()), value)
        return family

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.scheduler
        yield self._gauge("vllm:num_requests_waiting", "Requests queued for admission", s.num_waiting, self.labels)
        yield self._gauge("vllm:num_requests_running", "Requests in the running batch", s.num_running, self.labels)
        yield self._gauge("vllm:kv_cache_usage_perc", "KV cache usage, 0-1: blocks held by running requests over "
                          "all blocks", s.kv_cache_usage(), self.labels)
        yield self._gauge("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc under vLLM's older name (its "
                          "published dashboard reads it)", s.kv_cache_usage(), self.labels)
        yield self._gauge("vllm:lora_requests_info", "Adapters running and queued; the value is when the labels "
                          "were computed (Unix time)", time.time(), {
                              "max_lora": str(s.adapters.max_running),
                              "running_lora_adapters": self._adapter_list(s.adapters.active),
                              "waiting_lora_adapters": self._adapter_list(s.waiting_adapters)})
        yield self._gauge("vllm:cache_config_info", "KV cache layout", 1, {
            "block_size": str(s.blocks.block_size), "num_gpu_blocks": str(s.blocks.num_blocks), "engine": "0"})
        yield self._counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                            s.blocks.queried_tokens)
        yield self._counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache (not recomputed)",
                            s.blocks.hit_tokens)
        yield self._counter("vllm:num_preemptions", "Running requests preempted for lack of KV blocks",
                            s.num_preemptions)

    def _counter(self, name: str, documentation: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, documentation, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), value)
        return family
