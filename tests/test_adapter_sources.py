"""Adapters from an S3-compatible object store: a real S3 server on loopback (moto's server mode, with IAM
checks and SigV4 signatures enforced), the router's own client against it. Outputs are token-exact with the
same adapter served from a local directory; credentials and key paths are checked as for the hub."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from launcher.tiny_model import build_tiny_adapter
from tests.conftest import LoomServer, free_port
from tests.operating import ids_of

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

ALL_S3 = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
SHARED_ONLY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                                                        "Resource": ["arn:aws:s3:::shared", "arn:aws:s3:::shared/*"]}]}
# alice reads every bucket, the server's own `reader` only `shared`, bob nothing.
USERS = {"alice": ALL_S3, "reader": SHARED_ONLY, "bob": None}
SETUP_CALLS = 3 + 3 + 2  # create_user and create_access_key for each, a policy for two: then IAM is enforced


class S3Store:
    """moto's S3 server in its own process; `keys[user]` = (access key id, secret)."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_CALLS)}
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the S3 server did not start")
                time.sleep(0.1)
        iam = boto3.client("iam", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        self.keys = {}
        for user, policy in USERS.items():
            iam.create_user(UserName=user)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            self.keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
            if policy:
                iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(policy))
        self.admin = self.client("alice")
        for bucket in ("shared", "private"):
            self.admin.create_bucket(Bucket=bucket)

    def client(self, user: str):
        key, secret = self.keys[user]
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id=key,
                            aws_secret_access_key=secret)

    def token(self, user: str) -> str:
        return ":".join(self.keys[user])

    def upload(self, directory: Path, bucket: str, prefix: str) -> None:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                self.admin.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(directory).as_posix()}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def store():
    s3 = S3Store()
    yield s3
    s3.stop()


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory, llama_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("s3-adapters")
    return {name: build_tiny_adapter(root / name, llama_dir, rank=rank, alpha=2 * rank, target_modules=targets,
                                     seed=seed)
            for name, rank, targets, seed in [("a0", 8, ["q_proj", "v_proj"], 71),
                                              ("a1", 4, ["gate_proj", "down_proj"], 72)]}


def store_env(store: S3Store, user: str | None, cache: Path) -> dict[str, str]:
    """The environment of a process that reads `store` as `user` (None: no credentials of its own)."""
    env = {"AWS_ENDPOINT_URL": store.url, "AWS_REGION": "us-east-1", "LOOM_CACHE": str(cache),
           "AWS_SHARED_CREDENTIALS_FILE": str(cache / "no-credentials"), "AWS_CONFIG_FILE": str(cache / "no-config")}
    if user is not None:
        env.update(AWS_ACCESS_KEY_ID=store.keys[user][0], AWS_SECRET_ACCESS_KEY=store.keys[user][1])
    return env


@pytest.fixture(scope="module")
def s3_server(store, lora_dirs, llama_dir, tmp_path_factory):
    store.upload(lora_dirs["a0"], "shared", "loras/a0")
    store.upload(lora_dirs["a1"], "private", "team/a1")
    cache = tmp_path_factory.mktemp("loom-cache")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    srv = LoomServer(llama_dir, "--local-adapter-root", str(lora_dirs["a0"].parent), env=env)
    srv.env = {**env, **store_env(store, "reader", cache)}
    srv.cache = cache
    yield srv.start()
    srv.stop()


def generate(url: str, adapter_id: str, source: str | None = None, token: str | None = None,
             prompt: str = "The quick brown fox") -> httpx.Response:
    params = {"max_new_tokens": 12, "details": True, "adapter_id": adapter_id}
    if source is not None:
        params["adapter_source"] = source
    if token is not None:
        params["api_token"] = token
    return httpx.post(f"{url}/generate", json={"inputs": prompt, "parameters": params}, timeout=120)


def test_s3_adapter_is_exact_by_url_and_by_adapter_source(s3_server, lora_dirs, llama_dir, reference, tokenizer):
    local = ids_of(generate(s3_server.url, str(lora_dirs["a0"]), "local"))
    prompt_ids = tokenizer("The quick brown fox")["input_ids"]
    assert local == reference.greedy(llama_dir, prompt_ids, 12, adapter_dir=lora_dirs["a0"])
    by_url = ids_of(generate(s3_server.url, "s3://shared/loras/a0"))
    by_source = ids_of(generate(s3_server.url, "shared/loras/a0/", "s3"))
    assert by_url == local and by_source == local
    base = ids_of(generate(s3_server.url, ""))
    assert base != local, "the adapter must change the output"
    out = httpx.post(f"{s3_server.url}/v1/completions", timeout=120,
                     json={"model": "s3://shared/loras/a0", "prompt": "The quick brown fox", "max_tokens": 12})
    assert out.status_code == 200, out.text
    listed = [m["id"] for m in httpx.get(f"{s3_server.url}/v1/models", timeout=10).json()["data"]]
    assert "s3://shared/loras/a0" in listed
    # Downloaded once: one version folder in the cache, the same adapter for every spelling.
    versions = [p for p in (s3_server.cache / "adapters" / "s3").glob("*/*") if not p.name.startswith(".")]
    assert len(versions) == 1 and (versions[0] / "adapter_config.json").is_file()


def test_adapter_fetched_with_caller_credentials_is_served_only_to_them(s3_server, store, lora_dirs):
    private = "s3://private/team/a1"
    missing = generate(s3_server.url, "s3://private/team/nothing", token=store.token("alice"))
    assert missing.status_code == 404
    # The server's own credentials cannot read it: a 404, worded like an adapter that does not exist.
    refused = generate(s3_server.url, private)
    assert refused.status_code == 404
    assert refused.json()["error"] == missing.json()["error"].replace("team/nothing", "team/a1")
    alice = ids_of(generate(s3_server.url, private, token=store.token("alice")))
    assert alice == ids_of(generate(s3_server.url, str(lora_dirs["a1"]), "local"))
    for token in (None, store.token("bob"), f"{store.keys['alice'][0]}:wrong-secret"):
        r = generate(s3_server.url, private, token=token)
        assert r.status_code == 404 and r.json()["error"] == refused.json()["error"], (token, r.text)
    listed = [m["id"] for m in httpx.get(f"{s3_server.url}/v1/models", timeout=10).json()["data"]]
    assert private not in listed, "an adapter bound to a caller's credentials is not listed"
    assert ids_of(generate(s3_server.url, private, token=store.token("alice"))) == alice
    for token in ("not-a-key-pair", "key:secret\r\nx-injected: 1", "key:sécret"):
        r = generate(s3_server.url, private, token=token)
        assert r.status_code == 400 and "api_token" in r.json()["error"], (token, r.text)


def test_s3_ids_that_escape_or_name_no_bucket_are_400(s3_server):
    for adapter_id in ("s3://shared/loras/../../private/team/a1", "s3://shared/./loras/a0", "s3://shared//a0",
                       "s3://Not_A_Bucket/a0", "s3://shared/loras\\a0"):
        r = httpx.post(f"{s3_server.url}/v1/completions", json={"model": adapter_id, "prompt": "hi"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "model", (adapter_id, r.text)
        assert generate(s3_server.url, adapter_id).status_code == 400
    r = generate(s3_server.url, "/not/s3", "s3")
    assert r.status_code == 400 and "S3 bucket" in r.json()["error"], r.text


# -- the source in this process, against the same store ---------------------------------------------------


@pytest.fixture
def source(store, tmp_path, monkeypatch):
    from router.config import RouterConfig
    from router.sources.s3 import S3Source

    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in store_env(store, "alice", tmp_path).items():
        monkeypatch.setenv(name, value)
    return S3Source(RouterConfig(model_dir="", model_id="base", shard_sockets=[]))


def refusal(source, ref: str) -> tuple[int, str | None, str]:
    from router.errors import APIError

    with pytest.raises(APIError) as e:
        source.fetch(ref, None, "adapter_id")
    return e.value.status, e.value.param, e.value.message


def test_hostile_keys_and_sizes_refuse_the_adapter_before_any_download(source, store, lora_dirs, monkeypatch):
    from router.sources import s3

    config = (lora_dirs["a0"] / "adapter_config.json").read_bytes()
    store.admin.put_object(Bucket="shared", Key="dots/adapter_config.json", Body=config)
    store.admin.put_object(Bucket="shared", Key="dots/x/../../escape.json", Body=b"{}")
    status, param, message = refusal(source, "s3://shared/dots")
    assert (status, param) == (400, "adapter_id") and "not a plain relative path" in message, message
    store.admin.put_object(Bucket="shared", Key="big/adapter_config.json", Body=config)
    store.admin.put_object(Bucket="shared", Key="big/adapter_model.safetensors", Body=b"\0" * 4096)
    monkeypatch.setattr(s3, "MAX_OBJECT_BYTES", 4095)  # as a 10 GB object would be against the real bound
    status, param, message = refusal(source, "s3://shared/big")
    assert (status, param) == (400, "adapter_id") and "larger than 4095 bytes" in message, message
    assert not any(p.is_dir() for p in source.cache.glob("*/*")), "nothing was downloaded"


def test_a_changed_listing_is_a_new_version_beside_the_old(source, store, lora_dirs):
    store.upload(lora_dirs["a1"], "shared", "moving/a1")
    first = source.fetch("s3://shared/moving/a1", None, "adapter_id")
    assert source.fetch("s3://shared/moving/a1/", None, "adapter_id") == first
    store.admin.put_object(Bucket="shared", Key="moving/a1/tokenizer_config.json", Body=b"{}")
    second = source.fetch("s3://shared/moving/a1", None, "adapter_id")
    assert second.path != first.path and second.root == first.root and first.path.is_dir()
    assert second.ref.startswith("s3://shared/moving/a1@") and second.ref != first.ref
    assert sorted(p.name for p in second.path.iterdir()) == sorted(
        [p.name for p in first.path.iterdir()] + ["tokenizer_config.json"])
