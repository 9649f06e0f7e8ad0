"""vLLM's request and token metric families, under vLLM's names and labels (`model_name`, `engine`), so that
vLLM's published Grafana dashboard (and deploy/grafana/loom.json) reads Loom unchanged.

Observed once per finished generation from its timeline (router/generation.py GenerationStats). A generation is
what vLLM's engine calls a request: `n` choices are `n` of them. Beside them, `LoraResidency`: which adapters are
resident where, under the names vLLM's open pull requests propose (llm-d's `lora-load-state-scorer` reads them).
"""

from __future__ import annotations

import asyncio

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from router.generation import GenerationStats
from router.shard_client import ShardClient, ShardError

if TYPE_CHECKING:
    from router.adapter_slots import AdapterSlots
    from router.adapters import Adapter

# vLLM's bucket bounds.
LATENCY = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
           960.0, 1920.0, 7680.0)
TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
        80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
ADAPTER_LOAD = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# vLLM's finished_reason values: a generation that ended any other way was aborted.
FINISHED = {"eos_token": "stop", "stop_token": "stop", "stop_sequence": "stop", "length": "length"}
LABELS = ["model_name", "engine"]


class VllmMetrics:
    """Owns the families; `bind` names the model once it is known, `observe` takes each finished generation."""

    def __init__(self, registry: CollectorRegistry):
        def histogram(name: str, documentation: str, buckets) -> Histogram:
            return Histogram(name, documentation, LABELS, buckets=buckets, registry=registry)

        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished generations", LABELS,
                                     registry=registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens of finished generations",
                                         LABELS, registry=registry)
        self.success = Counter("vllm:request_success", "Finished generations by finished_reason (stop, length, "
                               "abort)", LABELS + ["finished_reason"], registry=registry)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Queueing to last token", LATENCY)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Queueing to first token", TTFT)
        # vLLM's current name and its older one (which vLLM's published dashboard reads): each generation's
        # mean gap between tokens, once per gap.
        self.inter_token = [histogram("vllm:inter_token_latency_seconds", "Time between generated tokens",
                                      INTER_TOKEN),
                            histogram("vllm:time_per_output_token_seconds", "Time between generated tokens",
                                      INTER_TOKEN)]
        self.queue = histogram("vllm:request_queue_time_seconds", "Queueing to admission", LATENCY)
        self.inference = histogram("vllm:request_inference_time_seconds", "Admission to last token", LATENCY)
        self.prefill = histogram("vllm:request_prefill_time_seconds", "Admission to first token", LATENCY)
        self.decode = histogram("vllm:request_decode_time_seconds", "First to last token", LATENCY)
        self.prompt_len = histogram("vllm:request_prompt_tokens", "Prompt tokens per generation", TOKENS)
        self.generation_len = histogram("vllm:request_generation_tokens", "Generated tokens per generation", TOKENS)
        self.max_generation = histogram("vllm:request_max_num_generation_tokens",
                                        "Generated tokens per generation (one sequence each)", TOKENS)
        self.max_tokens = histogram("vllm:request_params_max_tokens", "max_tokens asked per generation", TOKENS)
        self.adapter_load = histogram("vllm:lora_adapter_load_seconds", "Time to fetch, check and register an "
                                      "adapter on the shards", ADAPTER_LOAD)
        self._labels: tuple[str, str] | None = None

    def bind(self, model_name: str) -> None:
        """Creates every series (zeros, so that dashboards see them before the first request)."""
        self._labels = (model_name, "0")
        for family in (self.prompt_tokens, self.generation_tokens, self.e2e, self.ttft, *self.inter_token,
                       self.queue, self.inference, self.prefill, self.decode, self.prompt_len, self.generation_len,
                       self.max_generation, self.max_tokens, self.adapter_load):
            family.labels(*self._labels)
        for reason in ("stop", "length", "abort"):
            self.success.labels(*self._labels, reason)

    def observe_adapter_load(self, seconds: float) -> None:
        if self._labels is not None:
            self.adapter_load.labels(*self._labels).observe(seconds)

    def observe(self, stats: GenerationStats) -> None:
        if self._labels is None:
            return
        labels = self._labels
        self.prompt_tokens.labels(*labels).inc(stats.prompt_tokens)
        self.generation_tokens.labels(*labels).inc(stats.generated)
        self.success.labels(*labels, FINISHED.get(stats.finish_reason, "abort")).inc()
        self.prompt_len.labels(*labels).observe(stats.prompt_tokens)
        self.generation_len.labels(*labels).observe(stats.generated)
        self.max_generation.labels(*labels).observe(stats.generated)
        if stats.max_new_tokens:
            self.max_tokens.labels(*labels).observe(stats.max_new_tokens)
        self.queue.labels(*labels).observe(stats.queue_s)
        end = stats.finished
        if end is None:
            return
        self.e2e.labels(*labels).observe(end - stats.enqueued)
        if stats.admitted is not None:
            self.inference.labels(*labels).observe(end - stats.admitted)
        if stats.first_token is None:
            return
        self.ttft.labels(*labels).observe(stats.first_token - stats.enqueued)
        if stats.admitted is not None:
            self.prefill.labels(*labels).observe(stats.first_token - stats.admitted)
        self.decode.labels(*labels).observe(end - stats.first_token)
        if (gap := stats.tpot_s) is not None:
            for family in self.inter_token:
                child = family.labels(*labels)
                for _ in range(stats.generated - 1):
                    child.observe(gap)


class LoraResidency:
    """`vllm:lora_adapter_loaded{adapter_name, level, pinned, rank}` = 1 for each adapter in the device pool
    (`level="gpu"`) and each with a copy in the host cache (`level="cpu"`, device residents included, as vLLM's
    CPU cache holds its GPU adapters too), so at most pool pages + host-cache entries series; `pinned` is
    "true" for --preloaded-adapter-ids. Beside them the counts and `vllm:max_gpu_lora_adapters` (what runs at
    once). Adapters are named by `label` (escaped; private ones are counted but not named). Shard 0 answers
    on its engine thread, between steps: `refresh`, before each scrape, asks it (one question on its way at a
    time) and waits at most REFRESH_WAIT_S, so a long step or a stuck shard delays no scrape; until the answer
    comes the series show the last one."""

    REFRESH_WAIT_S = 0.25

    def __init__(self, client: ShardClient, lookup: Callable[[str], Adapter | None],
                 label: Callable[[str], str | None], slots: AdapterSlots, model_name: str):
        self.client, self.lookup, self.label, self.slots = client, lookup, label, slots
        self.labels = {"model_name": model_name, "engine": "0"}
        self._levels: dict[str, list[str]] = {"gpu": [], "cpu": []}
        self._asking: asyncio.Task | None = None

    async def refresh(self) -> None:
        if self._asking is None or self._asking.done():
            self._asking = asyncio.create_task(self._ask())
        await asyncio.wait({self._asking}, timeout=self.REFRESH_WAIT_S)

    async def _ask(self) -> None:
        try:
            reply = await self.client.adapter_residency()
        except ShardError:
            self._levels = {"gpu": [], "cpu": []}
            return
        self._levels = {"gpu": list(reply.device), "cpu": list(reply.host)}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        loaded = GaugeMetricFamily("vllm:lora_adapter_loaded", "1 for each adapter resident at a level (gpu: the "
                                   "device pool, cpu: the host cache)",
                                   labels=[*self.labels, "adapter_name", "level", "pinned", "rank"])
        counts = {}
        for level, ids in self._levels.items():
            adapters = [(i, a) for i in ids if (a := self.lookup(i)) is not None]
            counts[level] = len(adapters)
            for adapter_id, adapter in adapters:
                if (name := self.label(adapter_id)) is not None:
                    loaded.add_metric([*self.labels.values(), name, level, str(adapter.preloaded).lower(),
                                       str(adapter.rank)], 1)
        yield loaded
        for name, documentation, value in (
                ("vllm:num_gpu_loaded_lora_adapters", "Adapters in the device pool", counts["gpu"]),
                ("vllm:num_cpu_loaded_lora_adapters", "Adapters with a copy in the host cache", counts["cpu"]),
                ("vllm:max_gpu_lora_adapters", "Adapters that can run at once", self.slots.max_running)):
            family = GaugeMetricFamily(name, documentation, labels=list(self.labels))
            family.add_metric(list(self.labels.values()), value)
            yield family
