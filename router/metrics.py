"""Prometheus metrics of the router, served on /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from router.scheduler import Scheduler


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loom_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.request_duration = Histogram("loom_request_duration_seconds", "Time from request to last byte",
                                          ["route"], registry=r)
        self.running = Gauge("loom_running_requests", "Requests being generated on the shards", registry=r)
        self.waiting = Gauge("loom_waiting_requests", "Requests queued for admission", registry=r)
        self.kv_blocks_total = Gauge("loom_kv_blocks_total", "KV cache blocks on the shards", registry=r)
        self.adapter_loads = Counter("loom_adapter_loads", "Adapters resolved and registered on the shards",
                                     registry=r)
        self.adapter_load_seconds = Histogram("loom_adapter_load_seconds", "Time to resolve and register an adapter",
                                              registry=r)
        self.active_adapters = Gauge("loom_active_adapters", "Distinct adapters in the running batch", registry=r)
        self.kv_blocks_reserved = Gauge("loom_kv_blocks_reserved", "KV blocks reserved by admitted requests",
                                        registry=r)

    def watch(self, scheduler: Scheduler) -> None:
        """Gauges read the scheduler at scrape time, so the step loop pays nothing for them."""
        self.running.set_function(lambda: scheduler.num_running)
        self.waiting.set_function(lambda: scheduler.num_waiting)
        self.kv_blocks_total.set_function(lambda: scheduler.num_blocks)
        self.kv_blocks_reserved.set_function(lambda: scheduler.reserved_blocks)
        self.active_adapters.set_function(lambda: scheduler.active_adapters)

    def render(self) -> bytes:
        return generate_latest(self.registry)
