"""Adapter residency on /metrics under the names vLLM's open pull requests propose (and llm-d's
lora-load-state-scorer reads): which adapters sit in the device pool, which in the host cache, pinned or not,
of which rank; the counts; and how long loads take."""

from __future__ import annotations

import shutil

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LoomServer


@pytest.fixture(scope="module")
def resident(llama_dir, ops_adapters, tmp_path_factory):
    """A pool of 3 pages (8 ranks each): the preloaded rank-4 adapter holds one for good, so a rank-8 and a
    rank-12 adapter (1 and 2 pages) cannot be on the device together."""
    root = tmp_path_factory.mktemp("residency")
    dirs = {}
    for name, source in (("pinned", ops_adapters[0]), ("we,ird", ops_adapters[1]), ("wide", ops_adapters[2])):
        dirs[name] = root / name
        shutil.copytree(source, dirs[name])
    srv = LoomServer(llama_dir, "--adapter-pool-pages", "3", "--local-adapter-root", str(root),
                     "--preloaded-adapter-ids", str(dirs["pinned"])).start(timeout=300)
    srv.dirs = dirs
    yield srv
    srv.stop()


def residency(url: str) -> tuple[dict[str, set[tuple[str, str, str]]], dict[str, float]]:
    """({level: {(adapter_name, pinned, rank)}}, {gauge or histogram count: value})."""
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)}
    levels: dict[str, set] = {"gpu": set(), "cpu": set()}
    for sample in families["vllm:lora_adapter_loaded"].samples:
        assert sample.value == 1 and families["vllm:lora_adapter_loaded"].type == "gauge"
        levels[sample.labels["level"]].add((sample.labels["adapter_name"], sample.labels["pinned"],
                                            sample.labels["rank"]))
    values = {name: families[name].samples[0].value for name in (
        "vllm:num_gpu_loaded_lora_adapters", "vllm:num_cpu_loaded_lora_adapters", "vllm:max_gpu_lora_adapters")}
    values["loads"] = next(s.value for s in families["vllm:lora_adapter_load_seconds"].samples
                           if s.name.endswith("_count"))
    return levels, values


def complete(url: str, model: str) -> None:
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text


def test_residency_follows_the_pool(resident):
    pinned, weird, wide = (str(resident.dirs[n]) for n in ("pinned", "we,ird", "wide"))
    pinned_series = (pinned, "true", "4")
    weird_series = (weird.replace(",", "%2C"), "false", "8")  # escaped: a comma would read as two adapters
    levels, values = residency(resident.url)
    assert levels["gpu"] == {pinned_series} and values["vllm:num_gpu_loaded_lora_adapters"] == 1
    assert values["vllm:max_gpu_lora_adapters"] == 2  # the pages left beside the preloaded adapter
    complete(resident.url, weird)
    levels, values = residency(resident.url)
    assert levels["gpu"] == {pinned_series, weird_series}
    assert weird_series in levels["cpu"] and values["vllm:num_cpu_loaded_lora_adapters"] == len(levels["cpu"])
    assert values["loads"] == 2  # the preloaded adapter's and this one's
    complete(resident.url, wide)  # 2 pages: the rank-8 adapter is paged out to the host cache
    levels, values = residency(resident.url)
    assert levels["gpu"] == {pinned_series, (wide, "false", "12")}
    assert values["vllm:num_gpu_loaded_lora_adapters"] == 2
    assert {weird_series, (wide, "false", "12")} <= levels["cpu"]
    assert values["loads"] == 3
