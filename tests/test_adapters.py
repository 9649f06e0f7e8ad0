"""Multi-LoRA through the real server: adapter resolution, per-adapter chat templates, mixed batches,
broken and missing adapters — every output token-exact with peft."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from launcher.tiny_model import build_tiny_adapter, build_tiny_model
from tests.conftest import LoomServer, install_in_hub_cache
from tests.operating import ids_of

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
SPECS = [(4, ATTN, False), (8, MLP, False), (16, ATTN + MLP, True), (8, ["q_proj", "v_proj"], False),
         (4, ["down_proj"], True), (16, ["o_proj", "up_proj"], False)]
PIRATE_TEMPLATE = ("{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}[PIRATE]{% endif %}")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, llama_dir):
    root = tmp_path_factory.mktemp("adapters")
    local = root / "local"
    built = {}
    for i, (rank, targets, rslora) in enumerate(SPECS):
        built[f"a{i}"] = build_tiny_adapter(local / f"a{i}", llama_dir, rank=rank, alpha=2 * rank,
                                            target_modules=targets, use_rslora=rslora, seed=100 + i)
    # Used by no test but the one that checks a first use loads it once.
    built["fresh"] = build_tiny_adapter(local / "fresh", llama_dir, rank=4, alpha=4, target_modules=["q_proj"],
                                       seed=55)
    # An adapter that ships its own chat template (tokenizer files + template).
    templated = build_tiny_adapter(local / "templated", llama_dir, rank=8, alpha=16, target_modules=ATTN, seed=7)
    tok = AutoTokenizer.from_pretrained(llama_dir)
    tok.chat_template = PIRATE_TEMPLATE
    tok.save_pretrained(templated)
    built["templated"] = templated
    # Built for a wider model: its shapes cannot fit the base.
    wide = build_tiny_model(root / "wide-base", "llama", hidden_size=96)
    built["broken"] = build_tiny_adapter(local / "broken", wide, rank=4, alpha=8, target_modules=ATTN, seed=9)
    hf_home = root / "hf_home"
    install_in_hub_cache(built["a1"], hf_home, "org/hub-lora")
    return {"dirs": built, "local_root": local, "hf_home": hf_home}


@pytest.fixture(scope="module")
def lora_server(llama_dir, adapters):
    d = adapters["dirs"]
    srv = LoomServer(llama_dir, "--adapter", f"pirate={d['templated']}", "--adapter", f"named-a0={d['a0']}",
                     "--local-adapter-root", str(adapters["local_root"]),
                     env={"HF_HOME": str(adapters["hf_home"]), "HF_HUB_OFFLINE": "1"}).start()
    yield srv
    srv.stop()


def generate(url: str, prompt: str, adapter_id: str | None, max_new: int = 16, **extra) -> httpx.Response:
    params = {"max_new_tokens": max_new, "details": True, **extra}
    if adapter_id is not None:
        params["adapter_id"] = adapter_id
    return httpx.post(f"{url}/generate", json={"inputs": prompt, "parameters": params}, timeout=120)


def test_named_adapter_is_listed_and_exact(lora_server, adapters, llama_dir, reference, tokenizer):
    client = OpenAI(api_key="EMPTY", base_url=f"{lora_server.url}/v1", max_retries=0)
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == str(llama_dir) and {"pirate", "named-a0"} <= set(ids)
    prompt = "The quick brown fox"
    out = client.completions.create(model="named-a0", prompt=prompt, max_tokens=20)
    want = reference.greedy(llama_dir, tokenizer(prompt)["input_ids"], 20, adapter_dir=adapters["dirs"]["a0"])
    assert out.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)
    base = client.completions.create(model="", prompt=prompt, max_tokens=20)
    assert base.choices[0].text != out.choices[0].text, "the adapter must change the output"


def test_local_path_adapter_is_exact(lora_server, adapters, llama_dir, reference, tokenizer):
    path = adapters["dirs"]["a2"]
    prompt = "Once upon a time"
    got = ids_of(generate(lora_server.url, prompt, str(path), adapter_source="local"))
    assert got == reference.greedy(llama_dir, tokenizer(prompt)["input_ids"], 16, adapter_dir=path)


def test_path_outside_the_local_roots_is_refused(lora_server, llama_dir, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(llama_dir, outside)
    r = generate(lora_server.url, "hi", str(outside))
    assert r.status_code == 400 and "local-adapter-root" in r.json()["error"]


def test_hub_cache_adapter_offline(lora_server, adapters, llama_dir, reference, tokenizer):
    prompt = "How many helicopters"
    got = ids_of(generate(lora_server.url, prompt, "org/hub-lora"))
    assert got == reference.greedy(llama_dir, tokenizer(prompt)["input_ids"], 16, adapter_dir=adapters["dirs"]["a1"])
    listed = httpx.get(f"{lora_server.url}/v1/models", timeout=10).json()["data"]
    assert any(m["id"] == "org/hub-lora" and m["parent"] == str(llama_dir) for m in listed)


def test_lorax_client_with_adapter(lora_server, adapters, llama_dir, reference, tokenizer):
    lorax = pytest.importorskip("lorax")
    client = lorax.Client(lora_server.url, timeout=120)
    prompt = "Write a detailed analogy"
    resp = client.generate(prompt, adapter_id="org/hub-lora", max_new_tokens=12, details=True)
    want = reference.greedy(llama_dir, tokenizer(prompt)["input_ids"], 12, adapter_dir=adapters["dirs"]["a1"])
    assert [t.id for t in resp.details.tokens] == want


def test_adapter_with_its_own_chat_template(lora_server, adapters, llama_dir, reference, tokenizer):
    messages = [{"role": "user", "content": "Where is the treasure?"}]
    client = OpenAI(api_key="EMPTY", base_url=f"{lora_server.url}/v1", max_retries=0)
    out = client.chat.completions.create(model="pirate", messages=messages, max_tokens=12)
    own = AutoTokenizer.from_pretrained(adapters["dirs"]["templated"])
    prompt_ids = own.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert prompt_ids != tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False)
    assert out.usage.prompt_tokens == len(prompt_ids)
    want = reference.greedy(llama_dir, prompt_ids, 12, adapter_dir=adapters["dirs"]["templated"])
    assert out.choices[0].message.content == tokenizer.decode(want, skip_special_tokens=True)


def test_missing_adapter_is_404(lora_server, adapters):
    assert generate(lora_server.url, "hi", "org/does-not-exist").status_code == 404
    missing = adapters["local_root"] / "nope"
    r = generate(lora_server.url, "hi", str(missing))
    assert r.status_code == 404 and "not found" in r.json()["error"]
    r = httpx.post(f"{lora_server.url}/v1/completions", json={"model": "org/does-not-exist", "prompt": "hi"},
                   timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_broken_adapter_fails_only_its_own_requests(lora_server, adapters, llama_dir, reference, tokenizer):
    broken = str(adapters["dirs"]["broken"])
    good = str(adapters["dirs"]["a3"])
    prompts = ["alpha beta", "gamma delta epsilon", "zeta"]

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(prompt, adapter):
                return await client.post(f"{lora_server.url}/generate", json={"inputs": prompt, "parameters": {
                    "max_new_tokens": 10, "details": True, "adapter_id": adapter}})
            return await asyncio.gather(*(one(p, a) for p in prompts for a in (broken, good, None)))

    responses = asyncio.run(run())
    for i, r in enumerate(responses):
        prompt, adapter = prompts[i // 3], (broken, good, None)[i % 3]
        if adapter == broken:
            assert r.status_code == 400 and "cannot be used" in r.json()["error"], r.text
            continue
        want = reference.greedy(llama_dir, tokenizer(prompt)["input_ids"], 10,
                                adapter_dir=adapters["dirs"]["a3"] if adapter else None)
        assert ids_of(r) == want


def test_mixed_adapters_in_one_batch_are_exact(lora_server, adapters, llama_dir, reference, tokenizer):
    dirs = adapters["dirs"]
    jobs = [(f"prompt number {i} about pirates and ships" * (1 + i % 3), f"a{i % len(SPECS)}" if i % 4 else None)
            for i in range(18)]

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i, prompt, name):
                await asyncio.sleep(0.02 * i)
                params = {"max_new_tokens": 8 + i, "details": True}
                if name:
                    params["adapter_id"] = str(dirs[name])
                return await client.post(f"{lora_server.url}/generate", json={"inputs": prompt, "parameters": params})
            return await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(jobs)))

    for i, ((prompt, name), r) in enumerate(zip(jobs, asyncio.run(run()))):
        want = reference.greedy(llama_dir, tokenizer(prompt)["input_ids"], 8 + i,
                                adapter_dir=dirs[name] if name else None)
        assert ids_of(r) == want, (prompt, name)


def adapter_loads(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("loom_adapter_loads_total"))


def test_concurrent_first_requests_load_an_adapter_once(lora_server, adapters):
    path = str(adapters["dirs"]["fresh"])
    before = adapter_loads(lora_server.url)

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{lora_server.url}/generate", json={
                "inputs": "same adapter", "parameters": {"max_new_tokens": 4, "adapter_id": path}}) for _ in range(8)))

    assert all(r.status_code == 200 for r in asyncio.run(run()))
    assert adapter_loads(lora_server.url) == before + 1


def test_max_active_adapters_bounds_the_batch_and_starves_none(llama_dir, adapters, reference, tokenizer):
    """Six adapters, at most two in the running batch at once; every request still finishes, exactly."""
    dirs = [adapters["dirs"][f"a{i}"] for i in range(6)]
    srv = LoomServer(llama_dir, "--max-active-adapters", "2", "--local-adapter-root",
                     str(adapters["local_root"]), "--max-batch-total-tokens", "8192").start()
    seen = []
    try:
        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                async def watch():
                    while True:
                        text = (await client.get(f"{srv.url}/metrics")).text
                        seen.extend(float(line.split()[-1]) for line in text.splitlines()
                                    if line.startswith("loom_active_adapters "))
                        await asyncio.sleep(0.01)

                watcher = asyncio.create_task(watch())
                jobs = [client.post(f"{srv.url}/generate", json={"inputs": f"sail {i}", "parameters": {
                    "max_new_tokens": 12, "details": True, "adapter_id": str(dirs[i % 6])}}) for i in range(12)]
                results = await asyncio.gather(*jobs)
                watcher.cancel()
                return results

        for i, r in enumerate(asyncio.run(run())):
            want = reference.greedy(llama_dir, tokenizer(f"sail {i}")["input_ids"], 12, adapter_dir=dirs[i % 6])
            assert ids_of(r) == want
    finally:
        srv.stop()
    assert seen and max(seen) <= 2
