"""Workloads end to end: a stand-in kubelet's pods, through a real agent and collector,
to ``agentctl status --by workload`` and the Prometheus endpoint (rooftop and DCGM
names), and again after the pod moves to the other MIG instance.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner

from rooftop.cli import main
from tests.e2e.conftest import CollectorProc, Harness, wait_for
from tests.kubelet_standin import KubeletStandin

pytestmark = pytest.mark.slow

MIG_RESOURCE = "nvidia.com/mig-3g.40gb"
NODE = "gpu-node-a"
LLM = "llm-7d9f8b6c5d-x2k4p"  # a Deployment's pod: <name>-<template hash>-<suffix>
LLM_AGAIN = "llm-7d9f8b6c5d-q9w8z"  # the Deployment's replacement pod


def status(c: CollectorProc, *args: str) -> str:
    result = CliRunner().invoke(main, ["status", "--collector", c.address, "--insecure", *args])
    assert result.exit_code == 0, result.output
    return result.output


def rows(c: CollectorProc) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in json.loads(status(c, "--by", "workload", "--json"))["rows"]}


def dcgm_pods(c: CollectorProc) -> dict[str, tuple[str, str, str]]:
    """MIG uuid → (pod, namespace, container) of DCGM_FI_DEV_FB_USED, by GPU_I_ID."""
    out = {}
    for (name, labels), _ in c.metrics().items():
        la = dict(labels)
        if name == "DCGM_FI_DEV_FB_USED" and "GPU_I_ID" in la:
            out[la["GPU_I_ID"]] = (la.get("pod", ""), la.get("namespace", ""),
                                   la.get("container", ""))  # fmt: skip
    return out


def test_status_by_workload_and_prometheus_show_the_pods_and_follow_a_move(
    e2e: Harness, kubelet: KubeletStandin
):
    c = e2e.collector(prometheus={"dcgm_names": True})
    a = e2e.agent("agent-a", c.address, environ={"NODE_NAME": NODE}, backend="fake:h100-mig",
                  fake_gpus=1, pod_resources_socket=str(kubelet.socket_path),
                  pod_resources_refresh_s=0.2, window_s=1.0, rate_hz=5.0)  # fmt: skip
    wait_for(lambda: len(dcgm_pods(c)) == 2, "two MIG instances' DCGM series", procs=(a, c))
    migs = sorted(
        dict(la)["hw_id"]
        for (n, la), _ in c.metrics().items()
        if n == "hw_gpu_memory_limit_bytes" and dict(la)["hw_id"].startswith("MIG-")
    )
    assert len(migs) == 2
    kubelet.assign(migs[0], pod=LLM, namespace="serving", container="vllm", resource=MIG_RESOURCE)
    kubelet.assign(migs[1], pod="embed-0", namespace="batch", container="tei",
                   resource=MIG_RESOURCE)  # fmt: skip

    def shows(key: str, pod: str, mig: str) -> bool:
        row = rows(c).get(key)
        return (
            row is not None
            and [p["pod"] for p in row["pods"]] == [pod]
            and any(d.endswith(mig) for d in row["devices"])
        )

    wait_for(lambda: shows("deployment/llm", LLM, migs[0]), "the llm Deployment's row",
             procs=(a, c))  # fmt: skip
    row = rows(c)["deployment/llm"]
    assert (row["namespace"], row["pods"]) == (
        "serving",
        [{"pod": LLM, "namespace": "serving", "container": "vllm"}],
    )
    assert rows(c)["statefulset/embed"]["namespace"] == "batch"
    text = status(c, "--by", "workload")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("deployment/llm ")]
    assert line.split()[1:3] == ["serving", "1"]
    assert f"{LLM}/vllm" in line
    wait_for(lambda: sorted(dcgm_pods(c).values()) == [("embed-0", "batch", "tei"),
                                                       (LLM, "serving", "vllm")],
             "the pods on the DCGM series", procs=(a, c))  # fmt: skip

    # The Deployment's pod is replaced by one on the other instance, beside embed-0.
    kubelet.remove(LLM, "serving")
    kubelet.assign(migs[1], pod=LLM_AGAIN, namespace="serving", container="vllm",
                   resource=MIG_RESOURCE)  # fmt: skip
    wait_for(lambda: shows("deployment/llm", LLM_AGAIN, migs[1]), "the move in --by workload",
             procs=(a, c))  # fmt: skip
    assert rows(c)["deployment/llm"]["devices"] == [f"{NODE}:0/{migs[1]}"]
    by_ns = status(c, "--by", "namespace")
    assert any(ln.split()[:2] == ["serving", "1"] for ln in by_ns.splitlines())

    def moved() -> bool:
        series = {v for (n, la), v in c.metrics().items() if n == "DCGM_FI_DEV_FB_USED"
                  and dict(la).get("pod") == LLM}  # fmt: skip
        pods = {dict(la).get("pod") for (n, la), _ in c.metrics().items()
                if n == "DCGM_FI_DEV_FB_USED"}  # fmt: skip
        return not series and LLM_AGAIN in pods

    wait_for(moved, "the move on the DCGM series", procs=(a, c))
    wait_for(lambda: c.metric("rooftop_workload_bound", rooftop_workload_name="llm",
                              k8s_namespace_name="serving", rooftop_workload_kind="deployment")
             == 1, "the workload gauge", procs=(a, c))  # fmt: skip
    a.stop()
