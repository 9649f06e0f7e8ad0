"""LoRAX's `merged_adapters` through the real server: every strategy token-exact against the adapter that LoRAX's
rule builds (written here from the rule, saved as a PEFT adapter and run by peft), merges batched with plain
adapters and the base model, through /generate, the OpenAI SDK's extra_body and lorax-client, at 1 and 2 ranks;
recipes that cannot merge are 400s naming the field."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from openai import OpenAI
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from launcher.tiny_model import build_tiny_adapter
from tests.conftest import LoomServer
from tests.operating import ids_of

NEW_TOKENS = 8
# Rank 8 each, overlapping targets: some tensors are merged over all three, some over one or two.
TARGETS = {"m0": ["q_proj", "v_proj", "down_proj"], "m1": ["q_proj", "k_proj", "o_proj"],
           "m2": ["q_proj", "gate_proj", "up_proj", "down_proj"]}
RECIPES = [
    {"merge_strategy": "linear", "weights": [0.7, 0.5, -0.4]},
    {"merge_strategy": "ties", "weights": [1.0, 0.8, 0.6], "density": 0.5, "majority_sign_method": "total"},
    {"merge_strategy": "ties", "weights": [0.9, 1.2, 0.5], "density": 0.3, "majority_sign_method": "frequency"},
    {"merge_strategy": "dare_linear", "weights": [0.6, 0.6, 0.6], "density": 0.7, "seed": 3},
    {"merge_strategy": "dare_ties", "weights": [1.0, 0.5, 0.8], "density": 0.6, "seed": 5,
     "majority_sign_method": "frequency"},
]


# ---- LoRAX's rule, written from its description (router/adapter_merge.py is what is tested) ------------------


def lorax_merge(tensors: list[torch.Tensor], weights: list[float], recipe: dict, generator) -> torch.Tensor:
    strategy, density = recipe["merge_strategy"], recipe.get("density", 1.0)
    method = recipe.get("majority_sign_method", "total")
    w = torch.tensor(weights)
    if strategy in ("dare_linear", "dare_ties") and density < 1:
        tensors = [t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density for t in tensors]
    if strategy == "ties" and density < 1:
        pruned = []
        for t in tensors:
            mask = torch.zeros(t.numel())
            mask[t.abs().flatten().topk(int(density * t.numel())).indices] = 1
            pruned.append(t * mask.view(t.shape))
        tensors = pruned
    stacked = torch.stack(tensors)
    if strategy in ("linear", "dare_linear"):
        return (stacked * w[:, None, None]).sum(0)
    votes = stacked.sum(0) if method == "total" else stacked.sign().sum(0)
    agree = stacked.sign() == torch.where(votes >= 0, 1.0, -1.0)
    return (stacked * w[:, None, None] * agree).sum(0) / agree.sum(0).clamp(min=1)


def reference_adapter(sources: list, recipe: dict, out):
    """The merged adapter by LoRAX's rule as a PEFT directory."""
    states = [load_file(s / "adapter_model.safetensors") for s in sources]
    generator = torch.Generator().manual_seed(recipe.get("seed", 0))
    merged = {}
    for key in sorted(set().union(*states)):
        having = [i for i, s in enumerate(states) if key in s]
        merged[key] = lorax_merge([states[i][key] for i in having], [recipe["weights"][i] for i in having], recipe,
                                  generator).contiguous()
    config = json.loads((sources[0] / "adapter_config.json").read_text())
    config["target_modules"] = sorted({t for s in states for t in (k.split(".")[-3] for k in s)})
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


# ---- fixtures -------------------------------------------------------------------------------------------------


def build(base, root):
    """The three rank-8 sources, a rank-4 and a DoRA adapter, and the reference merge of each recipe."""
    adapters = {n: build_tiny_adapter(root / n, base, 8, 16, t, seed=60 + i)
                for i, (n, t) in enumerate(TARGETS.items())}
    adapters["rank4"] = build_tiny_adapter(root / "rank4", base, 4, 8, ["q_proj"], seed=70)
    adapters["dora"] = build_tiny_adapter(root / "dora", base, 8, 16, ["q_proj"], seed=71, use_dora=True)
    refs = [reference_adapter([adapters[n] for n in TARGETS], r, root / f"ref{i}") for i, r in enumerate(RECIPES)]
    return base, adapters, refs


@pytest.fixture(scope="module")
def llama(tmp_path_factory, model_dirs):
    return build(model_dirs["llama"], tmp_path_factory.mktemp("merge-llama"))


@pytest.fixture(scope="module")
def server(llama):
    base, adapters, _ = llama
    srv = LoomServer(base, "--local-adapter-root", str(adapters["m0"].parent),
                     "--max-batch-total-tokens", "8192").start()
    yield srv
    srv.stop()


def merged(adapters: dict, recipe: dict) -> dict:
    return {"ids": [str(adapters[n]) for n in TARGETS], **recipe}


def run_all(url: str, jobs: list[tuple[str, dict]]) -> list[httpx.Response]:
    async def go():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i, prompt, params):
                await asyncio.sleep(0.02 * i)
                return await client.post(f"{url}/generate", json={"inputs": prompt, "parameters": {
                    "max_new_tokens": NEW_TOKENS, "details": True, **params}})
            return await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)))
    return asyncio.run(go())


def check_batch(url: str, base, adapters: dict, refs: list, reference):
    """Every recipe, a plain adapter and the base model in one batch, each exact."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    jobs = [(f"the merged crew {i} sang", {"merged_adapters": merged(adapters, r)}) for i, r in enumerate(RECIPES)]
    jobs += [("a plain adapter", {"adapter_id": str(adapters["m1"])}), ("the base model", {})]
    wants = refs + [adapters["m1"], None]
    for (prompt, params), response, adapter_dir in zip(jobs, run_all(url, jobs), wants):
        want = reference.greedy(base, tokenizer(prompt)["input_ids"], NEW_TOKENS, stop_at_eos=False,
                                adapter_dir=adapter_dir)
        assert ids_of(response) == want, params
    return tokenizer


# ---- tests ----------------------------------------------------------------------------------------------------


def test_each_strategy_matches_loraxs_rule_batched(server, llama, reference):
    base, adapters, refs = llama
    check_batch(server.url, base, adapters, refs, reference)
    plain = reference.greedy(base, AutoTokenizer.from_pretrained(base)("x")["input_ids"], NEW_TOKENS, False,
                             adapters["m0"])
    assert reference.greedy(base, AutoTokenizer.from_pretrained(base)("x")["input_ids"], NEW_TOKENS, False,
                            refs[0]) != plain  # the merge is not one of its sources
    listed = [m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]]
    assert not any(i.startswith("merged-") for i in listed)


def test_same_recipe_is_merged_once(server, llama):
    _, adapters, _ = llama
    recipe = {"merged_adapters": merged(adapters, RECIPES[1])}
    before = httpx.get(f"{server.url}/metrics", timeout=10).text
    first, again = run_all(server.url, [("same recipe", recipe), ("same recipe", recipe)])
    assert ids_of(first) == ids_of(again)
    loads = [line for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines()
             if line.startswith("loom_adapter_loads_total")]
    assert loads == [line for line in before.splitlines() if line.startswith("loom_adapter_loads_total")]


def test_openai_extra_body_and_lorax_client(server, llama, reference):
    base, adapters, refs = llama
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt = "merged through the SDK"
    want = reference.greedy(base, tokenizer(prompt)["input_ids"], NEW_TOKENS, stop_at_eos=False, adapter_dir=refs[3])
    client = OpenAI(api_key="EMPTY", base_url=f"{server.url}/v1", max_retries=0)
    out = client.completions.create(model=str(base), prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                    extra_body={"merged_adapters": merged(adapters, RECIPES[3]), "ignore_eos": True})
    assert out.choices[0].text == tokenizer.decode(want)
    lorax = pytest.importorskip("lorax")
    recipe = RECIPES[1]
    spec = lorax.types.MergedAdapters(ids=[str(adapters[n]) for n in TARGETS], weights=recipe["weights"],
                                      merge_strategy=recipe["merge_strategy"], density=recipe["density"],
                                      majority_sign_method=recipe["majority_sign_method"])
    resp = lorax.Client(server.url, timeout=120).generate(prompt, merged_adapters=spec, max_new_tokens=NEW_TOKENS,
                                                          details=True, ignore_eos_token=True)
    want = reference.greedy(base, tokenizer(prompt)["input_ids"], NEW_TOKENS, stop_at_eos=False, adapter_dir=refs[1])
    assert [t.id for t in resp.details.tokens] == want


@pytest.mark.parametrize("change, field", [
    ({"merge_strategy": "magic"}, "parameters.merged_adapters.merge_strategy"),
    ({"weights": [1.0, 2.0]}, "parameters.merged_adapters.weights"),
    ({"density": 1.5}, "parameters.merged_adapters.density"),
    ({"merge_strategy": "dare_ties", "density": 0.0}, "parameters.merged_adapters.density"),
    ({"majority_sign_method": "vote"}, "parameters.merged_adapters.majority_sign_method"),
    ({"ids": ["x"] * 9}, "parameters.merged_adapters.ids"),
    ({"ids": ["rank4"]}, "parameters.merged_adapters.ids"),
    ({"ids": ["dora"]}, "parameters.merged_adapters.ids"),
    ({"ids": [""], "weights": [1.0]}, "parameters.merged_adapters.ids"),
])
def test_refused_recipes_name_the_field(server, llama, change, field):
    adapters = llama[1]
    recipe = merged(adapters, {"weights": [1.0, 1.0, 1.0]}) | change
    if change.get("ids") in (["rank4"], ["dora"]):
        recipe["ids"] = [str(adapters["m0"]), str(adapters[change["ids"][0]])]
        recipe["weights"] = [1.0, 1.0]
    r = httpx.post(f"{server.url}/generate", json={"inputs": "x", "parameters": {"merged_adapters": recipe}},
                   timeout=60)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"], r.text
    message = r.json()["error"]
    for sent in recipe["ids"]:
        message = message.replace(sent, "")
    assert "/" not in message, r.text  # no host path but the ids as sent


def test_refused_combinations(server, llama):
    adapters = llama[1]
    recipe = merged(adapters, {"weights": [1.0, 1.0, 1.0]})
    r = httpx.post(f"{server.url}/generate", json={"inputs": "x", "parameters": {
        "merged_adapters": recipe, "adapter_id": str(adapters["m0"])}}, timeout=60)
    assert r.status_code == 400 and "parameters.adapter_id" in r.text
    for weight in ("NaN", "1e300"):  # not JSON; out of bounds
        body = json.dumps({"inputs": "x", "parameters": {"merged_adapters": recipe}}).replace("1.0]", f"{weight}]")
        r = httpx.post(f"{server.url}/generate", content=body, headers={"content-type": "application/json"},
                       timeout=60)
        assert r.status_code == 400, r.text
    assert "parameters.merged_adapters.weights" in r.text, r.text
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "nope", "prompt": "x", "merged_adapters": recipe},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def scaled_copy(adapter_dir, scale: float, out):
    """A PEFT adapter whose update is `scale` times `adapter_dir`'s (lora_B scaled)."""
    state = load_file(adapter_dir / "adapter_model.safetensors")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: (t * scale if ".lora_B." in k else t).contiguous() for k, t in state.items()},
              out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    return out


def test_adapter_scale(server, llama, reference, tmp_path):
    base, adapters, refs = llama
    tokenizer = AutoTokenizer.from_pretrained(base)
    jobs = [("scaled down", {"adapter_id": str(adapters["m2"]), "adapter_scale": 0.5}),
            ("scaled merge", {"merged_adapters": merged(adapters, RECIPES[1]), "adapter_scale": 1.5}),
            ("unscaled", {"adapter_id": str(adapters["m2"])})]
    wants = [scaled_copy(adapters["m2"], 0.5, tmp_path / "half"), scaled_copy(refs[1], 1.5, tmp_path / "more"),
             adapters["m2"]]
    for (prompt, params), response, adapter_dir in zip(jobs, run_all(server.url, jobs), wants):
        want = reference.greedy(base, tokenizer(prompt)["input_ids"], NEW_TOKENS, stop_at_eos=False,
                                adapter_dir=adapter_dir)
        assert ids_of(response) == want, params
    r = httpx.post(f"{server.url}/generate", json={"inputs": "x", "parameters": {"adapter_scale": 2.0}}, timeout=60)
    assert r.status_code == 400 and "parameters.adapter_scale" in r.text
    r = httpx.post(f"{server.url}/generate", json={"inputs": "x", "parameters": {
        "adapter_id": str(adapters["dora"]), "adapter_scale": 2.0}}, timeout=60)
    assert r.status_code == 400 and "`parameters.adapter_scale`" in r.text and "use_dora" in r.text, r.text
    client = OpenAI(api_key="EMPTY", base_url=f"{server.url}/v1", max_retries=0)
    out = client.completions.create(model=str(adapters["m2"]), prompt="scaled down", max_tokens=NEW_TOKENS,
                                    temperature=0, extra_body={"adapter_scale": 0.5, "ignore_eos": True})
    assert out.choices[0].text == tokenizer.decode(reference.greedy(
        base, tokenizer("scaled down")["input_ids"], NEW_TOKENS, stop_at_eos=False, adapter_dir=wants[0]))


def test_merges_at_two_ranks(model_dirs, tmp_path_factory, reference):
    base, adapters, refs = build(model_dirs["qwen2"], tmp_path_factory.mktemp("merge-qwen2"))
    srv = LoomServer(base, "--num-shard", "2", "--local-adapter-root", str(adapters["m0"].parent),
                     "--max-batch-total-tokens", "8192").start()
    try:
        check_batch(srv.url, base, adapters, refs, reference)
    finally:
        srv.stop()


def test_merges_are_evicted_least_recently_used_but_never_in_use(small_engine, ops_adapters, llama_dir, tmp_path):
    """At most max_merges recipes registered: a new one unloads the least recently used idle merge (pages, entry
    and directory); a merge a request holds stays, and a recipe that would need its place is a 429."""
    from router.adapters import AdapterRegistry
    from router.config import RouterConfig
    from router.errors import APIError
    from router.merged_adapters import MergedAdapters, MergedAdaptersSpec
    from router.metrics import Metrics
    from router.sources import build_sources
    from router.tokenization import ModelTokenizer
    from tests.inprocess import Stack, collect, request

    source = str(ops_adapters[0])

    async def main():
        async with Stack(small_engine, tmp_path) as stack:
            config = RouterConfig(model_dir=str(llama_dir), model_id=str(llama_dir), shard_sockets=[],
                                  local_adapter_roots=[str(ops_adapters[0].parent)])
            registry = AdapterRegistry(str(llama_dir), ModelTokenizer.from_dir(str(llama_dir)), stack.client, {},
                                       build_sources(config), "local", small_engine.adapter_pages, Metrics())
            merges = MergedAdapters(registry, stack.scheduler.adapter_users, max_merges=2, min_idle_s=0)

            async def merge(weight: float):
                spec = MergedAdaptersSpec(ids=[source], weights=[weight])
                return await merges.resolve(spec, None, None, "merged_adapters")

            first, second = await merge(0.5), await merge(0.6)
            assert await merge(0.5) is first  # cached, and now the more recently used
            third = await merge(0.7)
            registered = small_engine.adapters.entries
            assert first.id in registered and third.id in registered and second.id not in registered
            assert not second.path.exists() and first.path.exists()
            held = [asyncio.create_task(collect(stack.scheduler.generate(
                request([1, 2, 3], 200, a.id, a.pages)))) for a in (first, third)]
            await asyncio.sleep(0.3)
            with pytest.raises(APIError) as refused:
                await merge(0.8)
            assert refused.value.status == 429 and refused.value.param == "merged_adapters"
            await asyncio.gather(*held)
            assert (await merge(0.8)).id in registered and first.id not in registered
            merges.close()
            assert not first.path.parent.exists()

    asyncio.run(main())
