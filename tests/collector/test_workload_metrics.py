"""``rooftop.workload.bound``: the GPU verdict gauge's pattern, per workload."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rooftop.collector.fleet import Fleet
from rooftop.collector.otel import Telemetry
from rooftop.common.model import Bound, Cause, GpuProcess, PodRef
from tests.collector.helpers import batch, engine, gpu, verdict
from tests.collector.test_otel import InMemoryMetricReader, collect, feed

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
TRAIN = PodRef("trainer-7d9f8b6c5d-x2k4p", "research", "pytorch")
MOVED = PodRef("finetune-0", "research", "pytorch")


@pytest.fixture
def telemetry() -> Iterator[tuple[Fleet, Telemetry, InMemoryMetricReader]]:
    reader = InMemoryMetricReader()
    fleet = Fleet()
    t = Telemetry(fleet, readers=[reader], prometheus_listen="127.0.0.1:0")
    yield fleet, t, reader
    t.shutdown(timeout_s=1)


def states(reader: InMemoryMetricReader) -> dict[tuple[str, str, str], dict[str, float]]:
    """(kind, name, namespace) → {bound: share}."""
    out: dict[tuple[str, str, str], dict[str, float]] = {}
    metric = collect(reader).get("rooftop.workload.bound")
    for p in metric.data.data_points if metric is not None else ():
        a = p.attributes
        key = (a["rooftop.workload.kind"], a["rooftop.workload.name"],
               a.get("k8s.namespace.name", ""))  # fmt: skip
        out.setdefault(key, {})[a["rooftop.bound"]] = p.value
    return out


def fleet_batch(seq: int, train_pod: PodRef) -> object:
    return batch(
        seq,
        records=[
            # GPUs 0 and 1 serve Llama (the engine's model wins over the pod).
            gpu(0, pods=(PodRef("vllm-0", "serving", "vllm"),)),
            gpu(1, pods=(PodRef("vllm-0", "serving", "vllm"),)),
            gpu(2, pods=(train_pod,), processes=(GpuProcess(pid=77),)),
            gpu(3, processes=(GpuProcess(pid=99, gpu_mem_bytes=2**30),)),
            engine(gpu_indices=(0, 1), pid=None),
        ],
        verdicts=[
            verdict(0, Bound.MEMORY),
            verdict(1, Bound.HOST, cause=Cause.CPU),
            verdict(2, Bound.COMPUTE),
            verdict(3, Bound.IDLE),
        ],
    )


def test_each_workload_has_one_series_per_state_valued_at_its_share_of_gpus(telemetry):
    fleet, t, reader = telemetry
    feed(fleet, t, fleet_batch(1, TRAIN))
    got = states(reader)
    llama = got[("model", LLAMA, "serving")]
    assert llama == {"memory": 0.5, "host": 0.5, "compute": 0, "mixed": 0, "idle": 0,
                     "lost": 0, "unknown": 0}  # fmt: skip
    assert got[("deployment", "trainer", "research")]["compute"] == 1
    assert sum(got[("deployment", "trainer", "research")].values()) == 1
    # A process is named on its own node only.
    (proc,) = [p for p in collect(reader)["rooftop.workload.bound"].data.data_points
               if p.attributes["rooftop.workload.kind"] == "process"
               and p.attributes["rooftop.bound"] == "idle"]  # fmt: skip
    assert proc.attributes["rooftop.workload.name"] == "pid 99"
    assert proc.attributes["host.name"] == "gpu-node-1"
    assert proc.value == 1


def test_the_workload_series_follow_a_pod_that_moves(telemetry):
    fleet, t, reader = telemetry
    feed(fleet, t, fleet_batch(1, TRAIN))
    assert ("deployment", "trainer", "research") in states(reader)
    feed(fleet, t, fleet_batch(2, MOVED))
    got = states(reader)
    assert ("deployment", "trainer", "research") not in got
    assert got[("statefulset", "finetune", "research")]["compute"] == 1
    text = t.prometheus_text()
    assert (
        'rooftop_workload_bound{k8s_namespace_name="research",rooftop_bound="compute",'
        'rooftop_workload_kind="statefulset",rooftop_workload_name="finetune"} 1'
    ) in text
    assert "trainer" not in text


def test_a_gpu_without_a_verdict_or_a_workload_exports_no_workload_series(telemetry):
    fleet, t, reader = telemetry
    feed(fleet, t, batch(1, records=[gpu(0, processes=())], verdicts=[verdict(0)]),
         batch(2, records=[gpu(1, pods=(TRAIN,))]))  # fmt: skip
    assert states(reader) == {}
