"""Adapter directories are untrusted input. Every file the router reads for an adapter resolves inside its allowed
root (links at any depth), is read once at registration through one function, and a refusal names the file,
never what it holds. Each probe is a fast 400 while bystander streams finish untouched, and capacity comes back
to exactly where it was."""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from transformers import AutoTokenizer

from router.adapter_files import MAX_TEMPLATE_BYTES, AdapterFileError, read_adapter_files
from tests.conftest import LoomServer
from tests.operating import (
    CHAT,
    FAST_S,
    USER,
    capacity_idle,
    error_text,
    health_s,
    metric,
    post,
    router_rss_mb,
    stream_outcome,
    timed_stream,
    wait_until,
)

SECRET = "PROBE-SECRET 7f3a: the quick brown fox"
STREAM_TOKENS = 300


@pytest.fixture(scope="module")
def layout(tmp_path_factory, ops_adapters, llama_dir):
    """A root of adapters that each try one way out of it (or one malformed file), and a secret outside it."""
    base = tmp_path_factory.mktemp("adapter-files")
    root, outside = base / "root", base / "outside"
    (outside / "templates").mkdir(parents=True)
    (outside / "secret.jinja").write_text(SECRET)
    (outside / "templates" / "default.jinja").write_text(SECRET)

    def adapter(name: str):
        shutil.copytree(ops_adapters[0], root / name)
        return root / name

    (adapter("nested-link") / "additional_chat_templates").mkdir()
    (root / "nested-link" / "additional_chat_templates" / "tool_use.jinja").symlink_to(outside / "secret.jinja")
    (adapter("nested-dir-link") / "additional_chat_templates").symlink_to(outside / "templates", True)
    (adapter("deep-link") / "a" / "b").mkdir(parents=True)
    (root / "deep-link" / "a" / "b" / "notes.txt").symlink_to(outside / "secret.jinja")
    os.mkfifo(adapter("fifo") / "chat_template.jinja")
    (adapter("nested-config") / "adapter_config.json").write_text('{"a": ' * 5000 + "1" + "}" * 5000)
    (adapter("bad-json") / "tokenizer_config.json").write_text("{not json " + SECRET)
    (adapter("huge-template") / "chat_template.jinja").write_text("x" * (MAX_TEMPLATE_BYTES + 1))
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    tokenizer.chat_template = "{{ 'PROBE' }}{{ messages[0]['content'] }}"
    tokenizer.add_tokens(["PROBE"])  # an id the model has no embedding row for
    tokenizer.save_pretrained(adapter("wide-vocab"))
    names_files = adapter("config-names-file")
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(names_files)
    config = json.loads((names_files / "tokenizer_config.json").read_text())
    config.update(tokenizer_file=str(outside / "secret.jinja"), vocab_file=str(outside / "secret.jinja"),
                  vocab=str(outside / "secret.jinja"))
    (names_files / "tokenizer_config.json").write_text(json.dumps(config))
    (adapter("edited") / "chat_template.jinja").write_text("{{ raise_exception('the first template') }}")
    return {"root": root, "outside": outside, "wide_id": len(tokenizer) - 1}


@pytest.fixture(scope="module")
def files_server(llama_dir, layout):
    srv = LoomServer(llama_dir, "--max-input-length", "64", "--max-total-tokens", "512", "--max-batch-total-tokens",
                     "16384", "--local-adapter-root", str(layout["root"])).start()
    yield srv
    assert srv.stop() == 0


# (adapter, words the 400 must hold)
PROBES = [
    ("nested-link", "'additional_chat_templates/tool_use.jinja' links outside"),
    ("nested-dir-link", "'additional_chat_templates' links outside"),
    ("deep-link", "'a/b/notes.txt' links outside"),
    ("fifo", "'chat_template.jinja' is not a regular file"),
    ("nested-config", "'adapter_config.json' is not valid JSON"),
    ("bad-json", "'tokenizer_config.json' is not valid JSON"),
    ("huge-template", "'chat_template.jinja' is larger than"),
    ("wide-vocab", "outside the model's vocabulary"),
]


def test_probes_are_fast_400s_naming_the_file_and_bystanders_are_untouched(files_server, layout):
    url = files_server.url
    rss = router_rss_mb(files_server)
    with ThreadPoolExecutor(3) as pool:
        bystanders = [pool.submit(timed_stream, url, STREAM_TOKENS) for _ in range(3)]
        assert wait_until(lambda: metric(url, "loom_running_requests") == 3, 30)
        for name, words in PROBES:
            start = time.perf_counter()
            r = post(url, CHAT, {"model": str(layout["root"] / name), "messages": USER, "max_tokens": 2})
            assert r.status_code == 400, (name, r.text)
            message = error_text(r)
            assert words in message, (name, message)
            assert name == "wide-vocab" or f"adapter '{layout['root'] / name}'" in message, (name, message)
            assert SECRET not in r.text and str(layout["outside"]) not in r.text, name
            assert time.perf_counter() - start < FAST_S, name
            assert health_s(url) < FAST_S
        for future in bystanders:
            events, gap = future.result(timeout=120)
            assert stream_outcome(events) == ("length", STREAM_TOKENS)
            assert gap < FAST_S
    assert wait_until(lambda: capacity_idle(url), 10)
    assert router_rss_mb(files_server) < rss + 100


def test_an_out_of_vocabulary_id_from_an_adapter_tokenizer_is_not_echoed(files_server, layout):
    r = post(files_server.url, CHAT, {"model": str(layout["root"] / "wide-vocab"), "messages": USER})
    assert r.status_code == 400 and str(layout["wide_id"]) not in error_text(r) and "PROBE" not in r.text


def test_tokenizer_config_naming_outside_files_loads_from_its_private_copy(files_server, layout):
    r = post(files_server.url, CHAT, {"model": str(layout["root"] / "config-names-file"), "messages": USER,
                                      "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert SECRET not in r.text


def test_files_are_read_once_edits_after_registration_change_nothing(files_server, layout):
    edited = layout["root"] / "edited"
    body = {"model": str(edited), "messages": USER, "max_tokens": 2}
    r = post(files_server.url, CHAT, body)
    assert r.status_code == 400 and "the first template" in error_text(r), r.text
    (edited / "chat_template.jinja").write_text("{{ raise_exception('the second template') }}")
    assert "the first template" in error_text(post(files_server.url, CHAT, body))
    (edited / "chat_template.jinja").unlink()
    (edited / "chat_template.jinja").symlink_to(layout["outside"] / "secret.jinja")
    r = post(files_server.url, CHAT, body)
    assert "the first template" in error_text(r) and SECRET not in r.text


# ---- in process: the one reading function --------------------------------------------------------------------


def test_read_adapter_files_refuses_links_out_at_any_depth(layout):
    root = layout["root"]
    for name, words in PROBES[:3]:
        with pytest.raises(AdapterFileError, match=words.replace("'", "").split(" links")[0].split("/")[-1]):
            read_adapter_files(root / name, root)
    files = read_adapter_files(root / "config-names-file", root)
    assert {"adapter_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files.files)
    assert "adapter_model.safetensors" not in files.files  # the shards read the weights


def test_a_file_swapped_for_a_link_after_the_walk_is_refused(layout, tmp_path):
    """The walk resolves each entry; the read opens without following a final link and checks where the
    descriptor really points, so a link swapped in between is refused."""
    from router import adapter_files

    adapter = tmp_path / "swapped"
    adapter.mkdir()
    (adapter / "chat_template.jinja").write_text("fine")
    real_read = adapter_files._read_inside

    def swap_then_read(real, root, shown, *limits):
        os.unlink(real)
        os.symlink(layout["outside"] / "secret.jinja", real)
        return real_read(real, root, shown, *limits)

    adapter_files._read_inside = swap_then_read
    try:
        with pytest.raises(AdapterFileError, match="'chat_template.jinja' cannot be read"):
            read_adapter_files(adapter, tmp_path)
    finally:
        adapter_files._read_inside = real_read
