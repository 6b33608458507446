"""Kubernetes attributes on GPU series: k8s.pod.name & co. on the Prometheus endpoint."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rooftop.collector.fleet import Fleet, decode_batch
from rooftop.collector.otel import Telemetry
from rooftop.common.model import Bound, PodRef
from tests.collector.helpers import batch, gpu, verdict

LLM = PodRef("llm-0", "serving", "vllm")
EMBED = PodRef("embed-0", "batch", "tei")
METRIC = "hw_gpu_memory_usage_bytes"


class Endpoint:
    """A fleet behind a real Prometheus endpoint; ``send`` applies one batch."""

    def __init__(self) -> None:
        self.fleet = Fleet(forget_after_s=1e9)
        self.telemetry = Telemetry(self.fleet, prometheus_listen="127.0.0.1:0")
        self.telemetry.start()
        self.seq = 0

    def send(self, records=(), verdicts=(), hostname: str = "gpu-node-1") -> None:
        self.seq += 1
        msg = batch(self.seq, hostname=hostname, records=records, verdicts=verdicts)
        now = time.time()
        self.fleet.apply(decode_batch(msg, received_s=now), received_s=now)

    def series(self, name: str = METRIC, **where: str) -> dict[str, dict[str, str]]:
        """hw_id -> labels of ``name`` (its series whose labels include ``where``)."""
        url = f"http://127.0.0.1:{self.telemetry.prometheus_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and where.items() <= s.labels.items():
                    assert s.labels["hw_id"] not in out, "one series per GPU"
                    out[s.labels["hw_id"]] = dict(s.labels)
        return out


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    e = Endpoint()
    yield e
    e.telemetry.shutdown(timeout_s=1)


def test_gpu_series_carry_the_pod_and_follow_it_when_it_moves(endpoint):
    endpoint.send([gpu(0, pods=(LLM,)), gpu(1)])
    series = endpoint.series()
    assert series["GPU-0000-uuid"]["k8s_pod_name"] == "llm-0"
    assert series["GPU-0000-uuid"]["k8s_namespace_name"] == "serving"
    assert series["GPU-0000-uuid"]["k8s_container_name"] == "vllm"
    assert "k8s_pod_name" not in series["GPU-0001-uuid"]
    assert series["GPU-0000-uuid"]["host_name"] == "gpu-node-1"

    endpoint.send([gpu(0), gpu(1, pods=(LLM,))])  # the pod was rescheduled onto GPU 1
    series = endpoint.series()
    assert "k8s_pod_name" not in series["GPU-0000-uuid"]
    assert series["GPU-0001-uuid"]["k8s_pod_name"] == "llm-0"
    assert len(series) == 2  # renamed, not duplicated


def test_a_shared_gpu_is_one_series_listing_every_pod(endpoint):
    endpoint.send([gpu(0, pods=(EMBED, LLM, PodRef("llm-1", "serving", "vllm")))])
    labels = endpoint.series()["GPU-0000-uuid"]
    assert labels["k8s_pod_name"] == "embed-0,llm-0,llm-1"
    assert labels["k8s_namespace_name"] == "batch,serving"
    assert labels["k8s_container_name"] == "tei,vllm"


def test_the_verdict_series_carries_the_pods_too(endpoint):
    endpoint.send(verdicts=[verdict(3, Bound.MEMORY, pods=(LLM,))])  # no sample yet
    bound = endpoint.series("rooftop_gpu_bound", rooftop_bound="memory")
    assert bound["GPU-0003-uuid"]["k8s_pod_name"] == "llm-0"


def test_mig_instances_carry_their_own_pods(endpoint):
    parent = "GPU-0000-uuid"
    endpoint.send([
        gpu(0, mig_uuid="MIG-a", pods=(LLM,)),
        gpu(0, mig_uuid="MIG-b", pods=(EMBED,)),
    ])  # fmt: skip
    series = endpoint.series()
    assert series["MIG-a"]["k8s_pod_name"] == "llm-0"
    assert series["MIG-b"]["k8s_pod_name"] == "embed-0"
    assert series["MIG-a"]["hw_parent"] == parent
