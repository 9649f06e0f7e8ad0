"""vLLM's runtime adapter API (--enable-adapter-api) and LoRAX's --preloaded-adapter-ids, through the real server:
loaded → listed in /v1/models → served token-exact with peft → unloaded → 404; an adapter in use cannot be
unloaded; preloaded adapters stay in the pool for good."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from launcher.tiny_model import build_tiny_adapter
from shard.engine import AdapterError, Engine, SequenceRequest
from tests.conftest import LoomServer, install_in_hub_cache
from tests.engine_driver import EngineDriver
from tests.operating import SMALL_KV, completion, wait_until

KEY = "adapter-admin"
AUTH = {"Authorization": f"Bearer {KEY}"}
LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
PROMPT = "The lighthouse keeper"


@pytest.fixture(scope="module")
def adapter_dirs(llama_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("runtime-adapters")
    targets = {"live": ["q_proj", "v_proj"], "busy": ["o_proj"], "pre": ["gate_proj", "up_proj"],
               "hubbed": ["k_proj", "down_proj"]}
    dirs = {name: build_tiny_adapter(root / "local" / name, llama_dir, rank=4, alpha=8, target_modules=t, seed=70 + i)
            for i, (name, t) in enumerate(targets.items())}
    hf_home = root / "hf_home"
    install_in_hub_cache(dirs["hubbed"], hf_home, "org/runtime-lora")
    return {**dirs, "root": root / "local", "hf_home": hf_home}


@pytest.fixture(scope="module")
def admin(llama_dir, adapter_dirs):
    srv = LoomServer(llama_dir, *SMALL_KV, "--enable-adapter-api", "--api-key", KEY,
                     "--local-adapter-root", str(adapter_dirs["root"]),
                     "--preloaded-adapter-ids", str(adapter_dirs["pre"]),
                     env={"HF_HOME": str(adapter_dirs["hf_home"]), "HF_HUB_OFFLINE": "1"}).start()
    yield srv
    srv.stop()


def post(srv: LoomServer, path: str, body: dict, headers: dict = AUTH) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, headers=headers, timeout=60)


def model_ids(srv: LoomServer) -> list[str]:
    return [m["id"] for m in httpx.get(f"{srv.url}/v1/models", headers=AUTH, timeout=10).json()["data"]]


def served_text(srv: LoomServer, model: str) -> str:
    client = OpenAI(api_key=KEY, base_url=f"{srv.url}/v1", max_retries=0, timeout=60)
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=12).choices[0].text


def expected_text(reference, tokenizer, llama_dir, adapter_dir) -> str:
    ids = reference.greedy(llama_dir, tokenizer(PROMPT)["input_ids"], 12, adapter_dir=adapter_dir)
    return tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name,source", [("sql", "live"), ("hub-sql", "org/runtime-lora")])
def test_load_serve_unload(admin, adapter_dirs, llama_dir, reference, tokenizer, name, source):
    lora_path = str(adapter_dirs[source]) if source in adapter_dirs else source
    adapter_dir = adapter_dirs[source] if source in adapter_dirs else adapter_dirs["hubbed"]
    assert name not in model_ids(admin)
    r = post(admin, LOAD, {"lora_name": name, "lora_path": lora_path})
    assert r.status_code == 200 and r.text == f"Success: LoRA adapter '{name}' added successfully."
    models = httpx.get(f"{admin.url}/v1/models", headers=AUTH, timeout=10).json()["data"]
    assert {"id": name, "parent": str(llama_dir)}.items() <= next(m for m in models if m["id"] == name).items()
    assert served_text(admin, name) == expected_text(reference, tokenizer, llama_dir, adapter_dir)

    r = post(admin, UNLOAD, {"lora_name": name})
    assert r.status_code == 200 and r.text == f"Success: LoRA adapter '{name}' removed successfully."
    assert name not in model_ids(admin)
    gone = post(admin, "/v1/completions", {"model": name, "prompt": PROMPT, "max_tokens": 2})
    assert gone.status_code == 404, gone.text
    # The name is free again.
    assert post(admin, LOAD, {"lora_name": name, "lora_path": lora_path}).status_code == 200
    assert post(admin, UNLOAD, {"lora_name": name}).status_code == 200


def test_bad_loads_and_unloads(admin, adapter_dirs, tmp_path):
    root = adapter_dirs["root"]
    cases = [
        ({"lora_name": "x", "lora_path": str(tmp_path)}, 400, "--local-adapter-root"),
        ({"lora_name": "x", "lora_path": str(root / "nope")}, 404, "no such directory"),
        ({"lora_name": "x", "lora_path": "org/not-in-cache"}, 404, "not found"),
        ({"lora_name": "a,b", "lora_path": str(adapter_dirs["live"])}, 400, "commas"),
        ({"lora_name": "x"}, 400, "lora_path"),
        ({"lora_name": "x", "lora_path": str(adapter_dirs["live"]), "load_inplace": "yes"}, 400, "load_inplace"),
    ]
    for body, status, words in cases:
        r = post(admin, LOAD, body)
        assert r.status_code == status and words in r.json()["error"]["message"], (body, r.text)
    assert post(admin, LOAD, {"lora_name": "twice", "lora_path": str(adapter_dirs["live"])}).status_code == 200
    again = post(admin, LOAD, {"lora_name": "twice", "lora_path": str(adapter_dirs["busy"])})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    assert post(admin, UNLOAD, {"lora_name": "twice"}).status_code == 200
    missing = post(admin, UNLOAD, {"lora_name": "never-loaded"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    # Behind --api-key like every route; /metrics too, without --public-metrics.
    assert post(admin, LOAD, {"lora_name": "x", "lora_path": str(adapter_dirs["live"])}, headers={}).status_code == 401
    assert httpx.get(f"{admin.url}/metrics", timeout=10).status_code == 401
    assert "x" not in model_ids(admin)


def test_unloading_an_adapter_in_use_fails_clearly(admin, adapter_dirs):
    assert post(admin, LOAD, {"lora_name": "busy", "lora_path": str(adapter_dirs["busy"])}).status_code == 200
    body = {**completion(400, stream=True), "model": "busy"}
    with httpx.stream("POST", admin.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as stream:
        lines = stream.iter_lines()  # kept referenced: a collected iterator closes the stream
        next(line for line in lines if line.startswith("data: "))
        r = post(admin, UNLOAD, {"lora_name": "busy"})
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "adapter_in_use" and "in use by 1 request" in error["message"]
        assert "busy" in model_ids(admin)
        assert next(line for line in lines if line.startswith("data: "))  # the stream goes on
    assert wait_until(lambda: idle(admin), 10)
    assert post(admin, UNLOAD, {"lora_name": "busy"}).status_code == 200


def idle(srv: LoomServer) -> bool:
    text = httpx.get(f"{srv.url}/metrics", headers=AUTH, timeout=10).text
    gauges = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return gauges["loom_running_requests"] == gauges["loom_waiting_requests"] == 0


def test_preloaded_adapter_is_served_and_stays(admin, adapter_dirs, llama_dir, reference, tokenizer):
    pre = str(adapter_dirs["pre"])
    assert pre in model_ids(admin)
    assert served_text(admin, pre) == expected_text(reference, tokenizer, llama_dir, adapter_dirs["pre"])
    r = post(admin, UNLOAD, {"lora_name": pre})
    assert r.status_code == 400 and "preloaded" in r.json()["error"]["message"]
    assert pre in model_ids(admin)


def test_adapter_api_is_off_by_default(ops_server, ops_adapters):
    r = httpx.post(ops_server.url + LOAD, json={"lora_name": "x", "lora_path": str(ops_adapters[0])}, timeout=10)
    assert r.status_code == 404 and "--enable-adapter-api" in r.json()["error"]["message"]
    assert httpx.post(ops_server.url + UNLOAD, json={"lora_name": "x"}, timeout=10).status_code == 404


def test_preloaded_adapters_are_never_evicted(llama_dir, adapter_dirs):
    """A 2-page pool with one preloaded adapter: other adapters take turns in the one page left."""
    engine = Engine(str(llama_dir), adapter_pool_pages=2)
    engine.warmup(max_batch_prefill_tokens=256, max_batch_total_tokens=1024)
    engine = EngineDriver(engine)
    engine.load_adapter("pre", str(adapter_dirs["pre"]), preloaded=True)
    assert engine.adapters.entries["pre"].pages is not None  # resident from the start
    for i, name in enumerate(["live", "busy", "hubbed", "live"]):
        engine.load_adapter(name, str(adapter_dirs[name]))
        results = engine.step([SequenceRequest(i, [1, 2, 3], adapter_id=name)], [], [])
        assert not results[0].error, results[0].error
        engine.step([], [], [i])
        assert engine.adapters.entries["pre"].pages is not None
    # Two other adapters at once do not fit beside it: the second fails alone rather than evicting it.
    results = engine.step([SequenceRequest(10, [1, 2], adapter_id="busy"), SequenceRequest(11, [1, 2], adapter_id="hubbed")],
                          [], [])
    assert [bool(r.error) for r in results] == [False, True] and "pool pages" in results[1].error
    # Unloading: refused while a sequence holds the adapter, then frees its page.
    with pytest.raises(AdapterError, match="in use"):
        engine.unload_adapter("busy")
    engine.step([], [], [10])
    free = len(engine.adapters.free_pages)
    engine.unload_adapter("busy")
    assert "busy" not in engine.adapters.entries and len(engine.adapters.free_pages) == free + 1
