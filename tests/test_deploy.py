"""deploy/kubernetes/: every object validates against the Kubernetes schemas (kubernetes-validate, strict: unknown
fields fail) or, for the custom resources, against their CRDs' schemas (tests/crd_schemas.yaml); and the
objects agree with each other and with Loom (flags parse, ports, selectors, GPUs = --num-shard, drain time)."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from launcher.cli import build_parser
from launcher.supervisor import ROUTER_GRACE_S, SHARD_GRACE_S

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
CRD_SCHEMAS = yaml.safe_load((Path(__file__).parent / "crd_schemas.yaml").read_text())
# The oldest release whose API the manifests need (grpc probes, sizeLimit on emptyDir) and the newest known.
KUBERNETES_VERSIONS = ["1.29", kubernetes_validate.latest_version()]
# The image's entrypoint (Dockerfile): `loom --hostname 0.0.0.0 --port 8080`.
LOOM_PORT = 8080


def objects() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(kind: str, name: str) -> dict:
    return next(o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name)


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_there_is_something_to_validate():
    kinds = {o["kind"] for o in objects()}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "InferencePool", "HTTPRoute", "Gateway"} <= kinds


@pytest.mark.parametrize("obj", objects(), ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_manifest_validates(obj: dict):
    key = f"{obj['apiVersion']} {obj['kind']}"
    if key in CRD_SCHEMAS:
        jsonschema.Draft202012Validator(CRD_SCHEMAS[key]).validate(obj)
        return
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)  # raises on an unknown kind or a bad field


def test_validation_catches_mistakes():
    """The validators reject what the API server would reject (or silently drop)."""
    deployment = find("Deployment", "loom")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    pool = find("InferencePool", "loom")
    del pool["spec"]["endpointPickerRef"]["port"]  # required for a Service
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pool, CRD_SCHEMAS["inference.networking.k8s.io/v1 InferencePool"])


def test_loom_deployment_runs_loom_as_the_pool_needs():
    deployment = find("Deployment", "loom")
    pod = deployment["spec"]["template"]
    c = container(deployment)
    args = build_parser().parse_args(c["args"])  # every flag is one loom knows
    # One shard per GPU of the pod, and shared memory for NCCL between them.
    assert args.num_shard == int(c["resources"]["limits"]["nvidia.com/gpu"])
    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    # The hub cache on the claim, HF_TOKEN and the API key from the Secret; with a key the endpoint picker
    # still has to scrape /metrics.
    env = {e["name"]: e for e in c["env"]}
    cache = next(v for v in pod["spec"]["volumes"] if v["name"] == "hf-cache")
    find("PersistentVolumeClaim", cache["persistentVolumeClaim"]["claimName"])
    assert {"name": "hf-cache", "mountPath": env["HF_HOME"]["value"]} in c["volumeMounts"]
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == env["LOOM_API_KEY"]["valueFrom"]["secretKeyRef"]["name"]
    assert args.public_metrics
    # Probes on /health at the port the router listens on.
    assert c["ports"] == [{"name": "http", "containerPort": LOOM_PORT}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    # Termination leaves time for preStop, the router's drain and the shards' stop.
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["spec"]["terminationGracePeriodSeconds"] >= pre_stop + ROUTER_GRACE_S + SHARD_GRACE_S


def test_pool_picker_and_route_are_wired_together():
    pool = find("InferencePool", "loom")
    loom_pods = find("Deployment", "loom")["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= loom_pods.items()
    assert pool["spec"]["targetPorts"] == [{"number": LOOM_PORT}]
    # The endpoint picker's Service, its pods, and the pool it serves.
    ref = pool["spec"]["endpointPickerRef"]
    service = find("Service", ref["name"])
    picker = find("Deployment", ref["name"])
    assert service["spec"]["selector"].items() <= picker["spec"]["template"]["metadata"]["labels"].items()
    assert not service["spec"]["selector"].items() <= loom_pods.items()
    port = next(p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"])
    args = container(picker)["args"]
    assert args[args.index("--pool-name") + 1] == pool["metadata"]["name"]
    named_ports = {p["name"]: p["containerPort"] for p in container(picker)["ports"]}
    assert named_ports[port["targetPort"]] == int(args[args.index("--grpc-port") + 1])
    # Its configuration: the LoRA affinity scorer among the scheduling plugins, mounted where --config-file reads.
    config_path = Path(args[args.index("--config-file") + 1])
    config_map = find("ConfigMap", picker["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"])
    mount = container(picker)["volumeMounts"][0]
    assert Path(mount["mountPath"]) == config_path.parent
    config = yaml.safe_load(config_map["data"][config_path.name])
    assert "lora-affinity-scorer" in {p["type"] for p in config["plugins"]}
    profile_refs = {p["pluginRef"] for profile in config["schedulingProfiles"] for p in profile["plugins"]}
    assert profile_refs == {p["type"] for p in config["plugins"]} - {"single-profile-handler"}
    # The route: the Gateway in front, the pool behind, the OpenAI paths.
    route = find("HTTPRoute", "loom")
    (rule,) = route["spec"]["rules"]
    find("Gateway", route["spec"]["parentRefs"][0]["name"])
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                    "name": pool["metadata"]["name"]}]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/v1"}}]
