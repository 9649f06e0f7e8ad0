"""Adapter ids reveal nothing and name one thing: adapters are listed and labelled by the id the client used (never a
resolved host path), labels cannot be forged into two adapters, token-bound adapters are named to nobody, and a
hub snapshot is one identity: a branch that moves brings a new adapter beside the old one, with exact outputs
and exact page accounting for both."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import LoomServer
from tests.operating import COMP, capacity_idle, metric, post, sse_payloads, stream_outcome, wait_until
from tests.test_metrics import endpoint_picker_view

V1, V2 = "1" * 40, "2" * 40  # the commits `main` points at, before and after it moves
PROMPT = "The operator said"


def add_snapshot(hf_home: Path, repo_id: str, src: Path, commit: str) -> Path:
    """`src` as the hub cache holds a download of `commit`: blobs, snapshot links into them, refs/main."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in src.iterdir():
        blob = repo / "blobs" / f"{commit[:8]}-{file.name}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def places(tmp_path_factory, ops_adapters, llama_dir):
    from launcher.tiny_model import build_tiny_adapter, build_tiny_model

    base = tmp_path_factory.mktemp("ids")
    root, hf_home = base / "root", base / "hf"
    shutil.copytree(ops_adapters[0], root / "hidden-target-name")
    (root / "alias").symlink_to(root / "hidden-target-name", target_is_directory=True)
    shutil.copytree(ops_adapters[1], root / "x,victim-adapter")
    wide = build_tiny_model(base / "wide", "llama", hidden_size=96)
    build_tiny_adapter(root / "my secret dir" / "broken", wide, rank=4, alpha=8, target_modules=["q_proj"])
    (root / "link-to-broken").symlink_to(root / "my secret dir" / "broken", target_is_directory=True)
    add_snapshot(hf_home, "org/moving", ops_adapters[1], V1)
    return {"root": root, "hf_home": hf_home, "v1": ops_adapters[1], "v2": ops_adapters[2]}


@pytest.fixture(scope="module")
def ids_server(llama_dir, places):
    srv = LoomServer(llama_dir, "--max-batch-total-tokens", "16384", "--local-adapter-root", str(places["root"]),
                     env={"HF_HOME": str(places["hf_home"]), "HF_HUB_OFFLINE": "1"}).start()
    yield srv
    assert srv.stop() == 0


def listed(url: str) -> list[str]:
    return [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]]


def greedy_text(server: LoomServer, model: str, tokens: int = 8, **native) -> str:
    if native:
        parameters = {"max_new_tokens": tokens, "adapter_id": model, "ignore_eos_token": True, **native}
        r = post(server.url, "/generate", {"inputs": PROMPT, "parameters": parameters})
        assert r.status_code == 200, r.text
        return r.json()["generated_text"]
    r = post(server.url, COMP, {"model": model, "prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_a_symlinked_adapter_is_listed_by_the_spelling_used(ids_server, places):
    alias = str(places["root"] / "alias")
    assert post(ids_server.url, COMP, {"model": alias, "prompt": PROMPT, "max_tokens": 2}).status_code == 200
    assert alias in listed(ids_server.url)
    everything = httpx.get(ids_server.url + "/v1/models", timeout=10).text + httpx.get(
        ids_server.url + "/metrics", timeout=10).text
    assert "hidden-target-name" not in everything


def test_an_error_never_shows_where_a_link_leads_even_through_spaces(ids_server, places):
    r = post(ids_server.url, COMP, {"model": str(places["root"] / "link-to-broken"), "prompt": PROMPT})
    assert r.status_code == 400, r.text
    assert "my secret dir" not in r.text and "secret" not in r.text


def test_a_comma_in_an_adapter_id_cannot_forge_a_second_adapter_label(ids_server, places):
    url, victim = ids_server.url, str(places["root"] / "x,victim-adapter")
    body = {"model": victim, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + COMP, json=body, timeout=120) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # running now
        view = endpoint_picker_view(httpx.get(url + "/metrics", timeout=10).text)
        for _ in lines:
            pass
    assert view["active_models"] == {victim.replace(",", "%2C")}
    assert wait_until(lambda: capacity_idle(url), 10)


def test_a_moved_branch_is_a_new_adapter_and_the_old_spelling_keeps_its_own(ids_server, places, llama_dir,
                                                                              reference, tokenizer):
    url = ids_server.url
    ids = tokenizer(PROMPT)["input_ids"]
    want = {v: tokenizer.decode(reference.greedy(llama_dir, ids, 8, stop_at_eos=False, adapter_dir=places[v]),
                                skip_special_tokens=True) for v in ("v1", "v2")}
    assert want["v1"] != want["v2"]
    assert greedy_text(ids_server, "org/moving") == want["v1"]
    pages_v1 = None
    body = {"model": "org/moving", "prompt": PROMPT, "max_tokens": 300, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + COMP, json=body, timeout=120) as old_stream:  # v1 holds its pages throughout
        lines = old_stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        pages_v1 = metric(url, "loom_adapter_pages_used")
        add_snapshot(places["hf_home"], "org/moving", places["v2"], V2)  # `main` moves
        # Another spelling (adapter_source "hub") finds the new commit: a new adapter, under the commit's id.
        assert greedy_text(ids_server, "org/moving", adapter_source="hub") == want["v2"]
        assert greedy_text(ids_server, "org/moving@main") == want["v2"]
        assert greedy_text(ids_server, f"org/moving@{V2}") == want["v2"]
        assert greedy_text(ids_server, "org/moving") == want["v1"]  # the old spelling keeps serving its load
        rest = sse_payloads([first, *lines])
    assert stream_outcome(rest) == ("length", 300)
    assert pages_v1 and wait_until(lambda: capacity_idle(url), 10)
    assert [m for m in listed(url) if m.startswith("org/moving")] == ["org/moving", f"org/moving@{V2}"]
    assert greedy_text(ids_server, "") and metric(url, "loom_adapter_pages_used") == 0


def test_racing_spellings_of_a_new_directory_register_it_once(ids_server, places):
    url = ids_server.url
    shutil.copytree(places["v1"], places["root"] / "raced")
    before = metric(url, "loom_adapter_loads_total")
    spellings = [str(places["root"] / "raced"), str(places["root"] / "raced") + "/", str(places["root"]) + "//raced"]
    results = []
    threads = [threading.Thread(target=lambda s=s: results.append(greedy_text(ids_server, s))) for s in spellings]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and metric(url, "loom_adapter_loads_total") == before + 1


def test_path_redaction_runs_through_spaces_and_quotes():
    from router.errors import redact_paths

    assert redact_paths("cannot read /srv/my adapters/secret dir/adapter_config.json: bad") == \
        "cannot read adapter_config.json: bad"
    assert redact_paths("file '/r/it's here/x y/weights.bin' is short") == "file 'weights.bin' is short"
    assert redact_paths("adapter 'org/name' rank 8/16, see https://hf.co/org/name") == \
        "adapter 'org/name' rank 8/16, see https://hf.co/org/name"
