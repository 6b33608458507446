"""The Kubernetes manifests in deploy/k8s, validated offline against the 1.30 schemas.

kubernetes-validate ships the OpenAPI-derived JSON schemas; ``strict`` rejects any
field the schema does not know, so a typo (``readOnlyRootFileSystem``) fails here
rather than being dropped by the API server.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from rooftop.agent.config import load_config as load_agent_config
from rooftop.collector.config import load_config as load_collector_config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
K8S_VERSION = "1.30"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{p.name}:{d['kind']}/{d['metadata']['name']}", d)
        for p in sorted(K8S.glob("*.yaml"))
        if p.name != "kustomization.yaml"
        for d in documents(p)
    ]


def find(kind: str, name: str) -> dict[str, Any]:
    hits = [d for _, d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} found"
    return hits[0]


@pytest.mark.parametrize("manifest", [m for _, m in manifests()], ids=[i for i, _ in manifests()])
def test_manifest_is_valid_kubernetes(manifest: dict[str, Any]):
    assert kubernetes_validate.validate(manifest, K8S_VERSION, strict=True) == K8S_VERSION


def test_strict_validation_catches_a_misspelt_field():
    daemonset = copy.deepcopy(find("DaemonSet", "rooftop-agent"))
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = documents(K8S / "kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    images = {i["name"] for i in kustomization["images"]}
    used = {
        c["image"]
        for _, d in manifests()
        if d["kind"] in ("DaemonSet", "Deployment")
        for c in d["spec"]["template"]["spec"].get("initContainers", [])
        + d["spec"]["template"]["spec"]["containers"]
    }
    assert used <= images, f"images not set by the kustomization: {used - images}"


def pod_spec(kind: str, name: str) -> dict[str, Any]:
    workload = find(kind, name)
    template = workload["spec"]["template"]
    assert (
        workload["spec"]["selector"]["matchLabels"].items()
        <= template["metadata"]["labels"].items()
    )
    return template["spec"]


def test_agent_daemonset_reads_nvml_without_taking_a_gpu():
    spec = pod_spec("DaemonSet", "rooftop-agent")
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["hostPID"] is True
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    (agent,) = spec["containers"]
    env = {e["name"]: e for e in agent["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"]["value"] == "utility"
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["ROOFTOP_AGENT_ID"]["value"] == "$(NODE_NAME)"
    for container in spec["containers"] + spec["initContainers"]:
        resources = container["resources"]
        for section in ("requests", "limits"):
            assert not any(k.startswith("nvidia.com/") for k in resources[section]), container
    assert "livenessProbe" not in agent and "readinessProbe" not in agent  # none offered


def test_containers_run_non_root_read_only_without_capabilities():
    for kind, name in (("DaemonSet", "rooftop-agent"), ("Deployment", "rooftop-collector")):
        spec = pod_spec(kind, name)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"]:
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"] == {"drop": ["ALL"]}
            assert container["resources"]["limits"]["memory"]
        # The one exception: the agent's init container chowns the hostPath dirs.
        for init in spec.get("initContainers", []):
            assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}


def mounts(spec: dict[str, Any]) -> dict[str, str]:
    (container,) = spec["containers"]
    return {m["mountPath"]: m["name"] for m in container["volumeMounts"]}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_agent_config_and_host_paths_agree(tmp_path: Path):
    spec = pod_spec("DaemonSet", "rooftop-agent")
    volumes = {v["name"]: v for v in spec["volumes"]}
    by_path = mounts(spec)
    config_map = find("ConfigMap", "rooftop-agent-config")
    (agent,) = spec["containers"]
    config_path = Path(agent["command"][agent["command"].index("--config") + 1])
    assert volumes[by_path[str(config_path.parent)]]["configMap"]["name"] == "rooftop-agent-config"
    text = config_map["data"][config_path.name]
    config = load_agent_config(
        write(tmp_path, config_path.name, text), env={"ROOFTOP_AGENT_ID": "node-1"}
    )
    # The spool lives on the host, so a new pod resends what the old one left unacked.
    spool_volume = volumes[by_path["/var/lib/rooftop"]]
    assert config.spool_dir.is_relative_to("/var/lib/rooftop")
    assert spool_volume["hostPath"]["path"] == "/var/lib/rooftop"
    assert volumes[by_path["/run/rooftop"]]["hostPath"]["path"] == "/run/rooftop"
    service = find("Service", "rooftop-collector")
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    host, _, port = config.collectors[0].rpartition(":")
    assert host.startswith("rooftop-collector.") and int(port) == grpc_port
    # TLS + token from the agent's Secret, required (the pod waits for it).
    assert not config.insecure
    secret = volumes[by_path["/etc/rooftop-credentials"]]["secret"]
    assert secret["secretName"] == "rooftop-agent-credentials"
    assert secret["optional"] is False
    named = [config.ca_file, config.token_file, config.cert_file, config.key_file]
    assert config.ca_file is not None and config.token_file is not None
    assert all(p.parent == Path("/etc/rooftop-credentials") for p in named if p is not None)


def test_collector_ports_probes_and_config_agree(tmp_path: Path):
    spec = pod_spec("Deployment", "rooftop-collector")
    (collector,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in collector["ports"]}
    assert ports == {"grpc": 4850, "metrics": 9464}
    text = find("ConfigMap", "rooftop-collector-config")["data"]["collector.toml"]
    config = load_collector_config(write(tmp_path, "collector.toml", text))
    assert config.listen.endswith(":4850") and config.prometheus_listen.endswith(":9464")
    # TLS + token from the collector's Secret, required (the pod waits for it).
    assert not config.insecure
    named = [config.tls_cert_file, config.tls_key_file, config.token_file]
    assert all(p is not None and p.parent == Path("/etc/rooftop-credentials") for p in named)
    volumes = {v["name"]: v for v in spec["volumes"]}
    secret = volumes[mounts(spec)["/etc/rooftop-credentials"]]["secret"]
    assert secret["secretName"] == "rooftop-collector-credentials"
    assert secret["optional"] is False
    # The kubelet's gRPC probe cannot do TLS: a TLS listener is probed with tcpSocket.
    for probe in ("readinessProbe", "livenessProbe"):
        assert "grpc" not in collector[probe], probe
        assert collector[probe]["tcpSocket"]["port"] in ("grpc", ports["grpc"]), probe
    tomllib.loads(text)  # and it is plain TOML
    template = find("Deployment", "rooftop-collector")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    service = find("Service", "rooftop-collector")
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)


def test_only_agents_may_stream_to_the_collector():
    policy = find("NetworkPolicy", "rooftop-collector")
    agent_labels = find("DaemonSet", "rooftop-agent")["spec"]["template"]["metadata"]["labels"]
    grpc_rules = [
        r for r in policy["spec"]["ingress"] if {"port": "grpc", "protocol": "TCP"} in r["ports"]
    ]
    (rule,) = grpc_rules
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= agent_labels.items()
