"""`loom` started with a typical multi-LoRA `vllm serve` command line: the model as a positional argument,
vLLM's flag names, and the calls a vLLM user makes, token-exact with peft."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time

import httpx
import pytest
from openai import OpenAI

from launcher.cli import build_parser
from launcher.tiny_model import build_tiny_adapter
from tests.conftest import REPO, LoomServer, free_port

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def loras(tmp_path_factory, llama_dir):
    root = tmp_path_factory.mktemp("vllm-loras")
    return {name: build_tiny_adapter(root / name, llama_dir, rank=rank, alpha=2 * rank, target_modules=targets,
                                     seed=seed)
            for name, rank, targets, seed in [("sql", 8, ["q_proj", "v_proj"], 81), ("chat", 4, ["o_proj"], 82),
                                              ("wide", 16, ["q_proj"], 83)]}


@pytest.fixture(scope="module")
def vllm_server(llama_dir, loras, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "template.jinja"
    template.write_text(TEMPLATE)
    srv = LoomServer(None, str(llama_dir), "--served-model-name", "base-llm", "--enable-lora",
                     "--lora-modules", f"sql={loras['sql']}", json.dumps({"name": "chat", "path": str(loras["chat"]),
                                                                           "base_model_name": "base-llm"}),
                     f"wide={loras['wide']}",
                     "--max-loras", "4", "--max-lora-rank", "8", "--max-cpu-loras", "8", "--tensor-parallel-size",
                     "1", "--max-model-len", "512", "--gpu-memory-utilization", "0.9", "--chat-template",
                     str(template), "--host", "127.0.0.1", "--allowed-origins", json.dumps([ORIGIN])).start()
    yield srv
    srv.stop()


def test_help_shows_vllms_names_beside_loraxs():
    text = build_parser().format_help()
    for pair in ("--num-shard N, --tensor-parallel-size N", "--max-total-tokens N, --max-model-len N",
                 "--max-active-adapters N, --max-loras N", "--hostname HOST, --host HOST"):
        assert pair in text, pair
    for flag in ("--served-model-name", "--lora-modules", "--max-lora-rank", "--enable-lora", "--chat-template",
                 "--uds", "--ssl-keyfile", "--ssl-certfile", "--allowed-origins", "--max-cpu-loras",
                 "--gpu-memory-utilization"):
        assert flag in text, flag


def test_a_vllm_serve_command_line_serves_vllms_calls(vllm_server, loras, llama_dir, reference, tokenizer):
    client = OpenAI(api_key="EMPTY", base_url=f"{vllm_server.url}/v1", max_retries=0)
    assert [m.id for m in client.models.list().data][:4] == ["base-llm", "sql", "chat", "wide"]
    prompt = "The quick brown fox"
    ids = tokenizer(prompt)["input_ids"]
    for name in ("sql", "chat"):
        out = client.completions.create(model=name, prompt=prompt, max_tokens=10)
        want = reference.greedy(llama_dir, ids, 10, adapter_dir=loras[name])
        assert out.choices[0].text == tokenizer.decode(want, skip_special_tokens=True), name
    base = client.completions.create(model="base-llm", prompt=prompt, max_tokens=10)
    assert base.model == "base-llm"
    assert base.choices[0].text == tokenizer.decode(reference.greedy(llama_dir, ids, 10), skip_special_tokens=True)
    # --chat-template: the base model's conversations are rendered with it.
    messages = [{"role": "user", "content": "Hello there"}]
    chat = client.chat.completions.create(model="base-llm", messages=messages, max_tokens=4)
    rendered = "<user>Hello there\n<assistant>"
    assert chat.usage.prompt_tokens == len(tokenizer(rendered)["input_ids"])
    # --max-lora-rank 8: the rank-16 adapter is refused, naming the flag.
    r = httpx.post(f"{vllm_server.url}/v1/completions", json={"model": "wide", "prompt": "hi"}, timeout=60)
    assert r.status_code == 400 and "--max-lora-rank" in r.json()["error"]["message"], r.text
    # --max-model-len 512 is --max-total-tokens.
    assert httpx.get(f"{vllm_server.url}/info", timeout=10).json()["max_total_tokens"] == 512


def test_allowed_origins_answer_browser_preflights(vllm_server):
    preflight = httpx.options(f"{vllm_server.url}/v1/completions", timeout=10, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(f"{vllm_server.url}/v1/completions", timeout=10, headers={
        "Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def _self_signed(directory) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(key_path), str(cert_path)


def test_uds_with_tls(llama_dir, tmp_path):
    pytest.importorskip("cryptography")
    key, cert = _self_signed(tmp_path)
    socket_path = str(tmp_path / "loom.sock")
    proc = subprocess.Popen([sys.executable, "-m", "launcher", str(llama_dir), "--uds", socket_path,
                             "--ssl-keyfile", key, "--ssl-certfile", cert, "--port", str(free_port())], cwd=REPO)
    client = httpx.Client(transport=httpx.HTTPTransport(uds=socket_path, verify=False), base_url="https://localhost",
                          timeout=60)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "loom exited while starting"
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "loom did not become healthy over its socket"
            time.sleep(0.25)
        out = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=60)
