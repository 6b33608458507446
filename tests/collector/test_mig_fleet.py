"""MIG instances at the collector: kept apart from their parent and each other, and
exported as GPUs of their own (``hw.id`` = MIG uuid, ``hw.parent``, ``rooftop.gpu.mig``)."""

from __future__ import annotations

from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from rooftop.collector.fleet import Fleet, decode_batch
from rooftop.collector.otel import Telemetry
from rooftop.collector.query import fleet_status
from rooftop.common.model import Bound
from rooftop.v1 import telemetry_pb2 as pb
from tests.collector.helpers import batch, gpu, verdict

NOW = 1_800_000_000.0
PARENT = "GPU-0000-uuid"
MIG_A = "MIG-aaaa"
MIG_B = "MIG-bbbb"


def apply(fleet: Fleet, b: pb.Batch) -> None:
    fleet.apply(decode_batch(b, received_s=NOW), received_s=NOW)


def mig_batch() -> pb.Batch:
    return batch(
        1,
        records=[
            gpu(0, NOW - 1, busy_pct=None),
            gpu(0, NOW - 1, mig_uuid=MIG_A, gpu_instance_id=1, compute_instance_id=0),
            gpu(0, NOW - 1, mig_uuid=MIG_B, gpu_instance_id=2, compute_instance_id=0),
        ],
        verdicts=[
            verdict(0, Bound.UNKNOWN),
            verdict(0, Bound.MEMORY, mig_uuid=MIG_A, gpu_instance_id=1),
            verdict(0, Bound.COMPUTE, mig_uuid=MIG_B, gpu_instance_id=2),
        ],
    )


def test_two_instances_of_one_gpu_stay_apart_from_each_other_and_the_parent():
    fleet = Fleet(clock=lambda: NOW)
    apply(fleet, mig_batch())
    gpus = {g.mig_uuid: g for g in fleet.snapshot().gpus}
    assert set(gpus) == {"", MIG_A, MIG_B}
    assert {g.gpu_uuid for g in gpus.values()} == {PARENT}
    assert gpus[MIG_A].verdict is not None and gpus[MIG_A].verdict.verdict is Bound.MEMORY
    assert gpus[MIG_B].verdict is not None and gpus[MIG_B].verdict.verdict is Bound.COMPUTE
    assert gpus[""].verdict is not None and gpus[""].verdict.verdict is Bound.UNKNOWN
    # Each kept its own newest sample (the batch decode keys by GPU and MIG uuid).
    assert gpus[MIG_A].sample is not None and gpus[MIG_A].sample.gpu_instance_id == 1
    assert gpus[MIG_B].sample is not None and gpus[MIG_B].sample.gpu_instance_id == 2


def test_fleet_status_names_each_instance():
    fleet = Fleet(clock=lambda: NOW)
    apply(fleet, mig_batch())
    (node,) = fleet_status(fleet.snapshot(), detail=False).nodes
    assert [(g.gpu_index, g.mig_uuid, g.verdict.verdict) for g in node.gpus] == [
        (0, "", "unknown"), (0, MIG_A, "memory-bound"), (0, MIG_B, "compute-bound")]


def test_export_names_instances_by_mig_uuid_under_their_parent():
    reader = InMemoryMetricReader()
    fleet = Fleet(clock=lambda: NOW)
    telemetry = Telemetry(fleet, readers=[reader], host_name="collector-host")
    try:
        apply(fleet, mig_batch())
        data = reader.get_metrics_data()
    finally:
        telemetry.shutdown()
    assert data is not None
    bound = next(m for rm in data.resource_metrics for sm in rm.scope_metrics
                 for m in sm.metrics if m.name == "rooftop.gpu.bound")
    current = {(p.attributes["hw.id"], p.attributes.get("hw.parent"),
                p.attributes.get("rooftop.gpu.mig"), p.attributes["rooftop.bound"])
               for p in bound.data.data_points if p.value == 1}
    assert current == {
        (PARENT, None, None, "unknown"),
        (MIG_A, PARENT, MIG_A, "memory"),
        (MIG_B, PARENT, MIG_B, "compute"),
    }
