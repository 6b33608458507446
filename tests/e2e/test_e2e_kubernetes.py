"""Kubernetes end to end: node names and pod attribution through real processes.

Two agent processes on this one machine stand for two nodes: they share its host name
and, with the same fake profile, their GPU and MIG UUIDs. Only ``NODE_NAME`` (the
downward API's ``spec.nodeName``) tells them apart, as it must: before it was read,
both reported this machine's host name and their series collapsed into one. Node A
asks a stand-in kubelet (a real gRPC server on a unix socket) which pods hold its
MIG instances; node B has no kubelet socket and so no k8s labels.
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Harness, wait_for
from tests.kubelet_standin import KubeletStandin

pytestmark = pytest.mark.slow

MIG_RESOURCE = "nvidia.com/mig-3g.40gb"
METRIC = "hw_gpu_memory_limit_bytes"  # every device has it, a MIG instance included


def series(c, host: str) -> list[dict[str, str]]:
    """The label sets of ``METRIC`` for one node."""
    return [dict(labels) for (name, labels), _ in c.metrics().items()
            if name == METRIC and dict(labels).get("host_name") == host]  # fmt: skip


def pods_by_device(c, host: str) -> dict[str, str]:
    """hw_id -> k8s_pod_name ("" when no pod) for one node's devices."""
    return {s["hw_id"]: s.get("k8s_pod_name", "") for s in series(c, host)}


def test_two_nodes_keep_their_series_and_pods_follow_the_kubelet(
    e2e: Harness, kubelet: KubeletStandin, tmp_path
):
    c = e2e.collector()
    common = {"backend": "fake:h100-mig", "fake_gpus": 1, "pod_resources_refresh_s": 0.2}
    a = e2e.agent("agent-a", c.address, environ={"NODE_NAME": "gpu-node-a"},
                  pod_resources_socket=str(kubelet.socket_path), **common)  # fmt: skip
    b = e2e.agent("agent-b", c.address, environ={"NODE_NAME": "gpu-node-b"},
                  pod_resources_socket=str(tmp_path / "no-kubelet.sock"), **common)  # fmt: skip
    wait_for(lambda: len(series(c, "gpu-node-a")) == 3 and len(series(c, "gpu-node-b")) == 3,
             "both nodes' parent GPU and two MIG instances", procs=(a, b, c))  # fmt: skip
    # Same UUIDs on both "nodes", yet six series: host.name is each node's name.
    ids_a = {s["hw_id"] for s in series(c, "gpu-node-a")}
    assert ids_a == {s["hw_id"] for s in series(c, "gpu-node-b")}
    migs = sorted(i for i in ids_a if i.startswith("MIG-"))
    assert len(migs) == 2

    kubelet.assign(migs[0], pod="llm-0", namespace="serving", container="vllm",
                   resource=MIG_RESOURCE)  # fmt: skip
    kubelet.assign(migs[1], pod="embed-0", namespace="batch", container="tei",
                   resource=MIG_RESOURCE)  # fmt: skip
    wait_for(lambda: pods_by_device(c, "gpu-node-a").get(migs[0]) == "llm-0",
             "node A's pods on the Prometheus endpoint", procs=(a, b, c))  # fmt: skip
    wait_for(lambda: pods_by_device(c, "gpu-node-a").get(migs[1]) == "embed-0",
             "node A's second MIG instance's pod", procs=(a, b, c))  # fmt: skip
    by_id = {s["hw_id"]: s for s in series(c, "gpu-node-a")}
    assert by_id[migs[0]]["k8s_namespace_name"] == "serving"
    assert by_id[migs[0]]["k8s_container_name"] == "vllm"
    assert "k8s_pod_name" not in {k for s in series(c, "gpu-node-b") for k in s}

    # llm-0 moves onto the other instance, which embed-0 keeps: one series lists both.
    kubelet.move("llm-0", "serving", "vllm", to=[migs[1]], resource=MIG_RESOURCE)
    wait_for(lambda: pods_by_device(c, "gpu-node-a") == {
        **{i: "" for i in ids_a}, migs[1]: "embed-0,llm-0"},
        "the move on the Prometheus endpoint", procs=(a, b, c))  # fmt: skip
    shared = {s["hw_id"]: s for s in series(c, "gpu-node-a")}[migs[1]]
    assert shared["k8s_namespace_name"] == "batch,serving"
    assert len(series(c, "gpu-node-a")) == 3  # the moved pod left no series behind
    a.stop()
    b.stop()
