"""Pure encoders between the agent's model and the protobuf schema (no I/O, no sockets).

``record_to_proto`` / ``record_from_proto`` round-trip every sample kind; proto3
``optional`` fields stay absent when the model says ``None``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from rooftop.common.model import (
    ENGINE_HISTOGRAM_FIELDS,
    Bound,
    Cause,
    EngineSample,
    Evidence,
    GpuProcess,
    GpuSample,
    HistogramDelta,
    HostProcess,
    HostSample,
    PodRef,
    Provenance,
    Record,
    Verdict,
)
from rooftop.v1 import telemetry_pb2 as pb

__all__ = [
    "record_from_proto",
    "record_to_proto",
    "timestamp",
    "timestamp_s",
    "verdict_from_proto",
    "verdict_to_proto",
]

_NESTED = {
    "processes",
    "gpu_indices",
    "time_s",
    "xid_codes",
    "xid_code_counts",
    "pods",
    *ENGINE_HISTOGRAM_FIELDS,
}


def timestamp(time_s: float) -> Timestamp:
    """A protobuf Timestamp for Unix epoch seconds."""
    # Microseconds: a float epoch carries no more, and round-trips then stay exact.
    micros = round(time_s * 1e6)
    return Timestamp(seconds=micros // 1_000_000, nanos=(micros % 1_000_000) * 1000)


def timestamp_s(ts: Timestamp) -> float:
    """Unix epoch seconds for a protobuf Timestamp."""
    return float(ts.seconds) + ts.nanos / 1e9


# Per class, once: dataclasses.fields() on every record was a measurable share of encoding.
_SCALAR_NAMES: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls) if f.name not in _NESTED)
    for cls in (GpuSample, EngineSample, HostSample, HostProcess)
}


def _scalars(obj: Any) -> dict[str, Any]:
    # One pass, not a dict of every field filtered into a second one (per record, per tick).
    names = _SCALAR_NAMES.get(type(obj))
    if names is None:  # a subclass (a columns row decoded on first read): its model's, kept
        names = next(_SCALAR_NAMES[c] for c in type(obj).__mro__ if c in _SCALAR_NAMES)
        _SCALAR_NAMES[type(obj)] = names
    return {name: value for name in names if (value := getattr(obj, name)) is not None}


def record_to_proto(record: Record) -> pb.TraceRecord:
    """Encode one sample as a ``TraceRecord``."""
    if isinstance(record, GpuSample):
        gpu = pb.GpuSample(
            time=timestamp(record.time_s),
            xid_codes=record.xid_codes,
            xid_code_counts=record.xid_code_counts,
            **_scalars(record),
        )
        gpu.processes.extend(
            pb.GpuProcess(
                pid=p.pid, gpu_mem_bytes=p.gpu_mem_bytes, name=p.name, slurm_job_id=p.slurm_job_id
            )
            for p in record.processes
        )
        if record.pods:
            gpu.pods.extend(_pods_to_proto(record.pods))
        return pb.TraceRecord(gpu=gpu)
    if isinstance(record, EngineSample):
        engine = pb.EngineSample(
            time=timestamp(record.time_s), gpu_indices=record.gpu_indices, **_scalars(record)
        )
        for name in ENGINE_HISTOGRAM_FIELDS:
            hist: HistogramDelta | None = getattr(record, name)
            if hist is not None:
                getattr(engine, name).CopyFrom(_histogram_to_proto(hist))
        return pb.TraceRecord(engine=engine)
    host = pb.HostSample(time=timestamp(record.time_s), cpu_pct=record.cpu_pct)
    host.processes.extend(
        pb.HostProcess(gpu_indices=p.gpu_indices, **_scalars(p)) for p in record.processes
    )
    return pb.TraceRecord(host=host)


def _histogram_to_proto(hist: HistogramDelta) -> pb.HistogramDelta:
    return pb.HistogramDelta(
        bounds_s=hist.bounds_s,
        bucket_counts=hist.bucket_counts,
        sum_s=hist.sum_s,
        count=hist.count,
    )


def _histogram_from_proto(msg: Any, name: str) -> HistogramDelta | None:
    if not msg.HasField(name):
        return None
    h = getattr(msg, name)
    return HistogramDelta(
        bounds_s=tuple(h.bounds_s),
        bucket_counts=tuple(h.bucket_counts),
        sum_s=h.sum_s,
        count=h.count,
    )


def _histograms_from_proto(msg: Any) -> dict[str, Any]:
    return {name: _histogram_from_proto(msg, name) for name in ENGINE_HISTOGRAM_FIELDS}


def _process_from_proto(p: pb.GpuProcess) -> GpuProcess:
    return GpuProcess(
        p.pid,
        p.gpu_mem_bytes if p.HasField("gpu_mem_bytes") else None,
        name=p.name if p.HasField("name") else None,
        slurm_job_id=p.slurm_job_id if p.HasField("slurm_job_id") else None,
    )


def _pods_to_proto(pods: tuple[PodRef, ...]) -> list[pb.PodRef]:
    return [pb.PodRef(pod=p.pod, namespace=p.namespace, container=p.container) for p in pods]


def _pods_from_proto(msgs: Any) -> tuple[PodRef, ...]:
    return tuple(PodRef(m.pod, m.namespace, m.container) for m in msgs)


def _present(msg: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {n: getattr(msg, n) for n in names if msg.HasField(n)}


def _optional_names(cls: type) -> tuple[str, ...]:
    return tuple(
        f.name for f in dataclasses.fields(cls) if f.name not in _NESTED and "None" in str(f.type)
    )


_GPU_OPTIONAL = _optional_names(GpuSample)
_ENGINE_OPTIONAL = _optional_names(EngineSample)
_HOST_PROC_OPTIONAL = _optional_names(HostProcess)


def record_from_proto(msg: pb.TraceRecord) -> Record:
    """Decode a ``TraceRecord``; raises ``ValueError`` when it holds no record."""
    kind = msg.WhichOneof("record")
    if kind == "gpu":
        g = msg.gpu
        return GpuSample(
            time_s=timestamp_s(g.time),
            gpu_index=g.gpu_index,
            gpu_uuid=g.gpu_uuid,
            gpu_name=g.gpu_name,
            processes=tuple(_process_from_proto(p) for p in g.processes),
            lost=g.lost,
            gpm_stale=g.gpm_stale,
            xid_codes=tuple(g.xid_codes),
            xid_code_counts=tuple(g.xid_code_counts),
            mig_uuid=g.mig_uuid,
            pods=_pods_from_proto(g.pods),
            **_present(g, _GPU_OPTIONAL),
        )
    if kind == "engine":
        e = msg.engine
        return EngineSample(
            time_s=timestamp_s(e.time),
            engine_id=e.engine_id,
            gpu_indices=tuple(e.gpu_indices),
            **_histograms_from_proto(e),
            **_present(e, _ENGINE_OPTIONAL),
        )
    if kind == "host":
        h = msg.host
        return HostSample(
            time_s=timestamp_s(h.time),
            cpu_pct=h.cpu_pct if h.HasField("cpu_pct") else None,
            processes=tuple(
                HostProcess(
                    pid=p.pid, gpu_indices=tuple(p.gpu_indices), **_present(p, _HOST_PROC_OPTIONAL)
                )
                for p in h.processes
            ),
        )
    raise ValueError("TraceRecord holds none of gpu, engine, host")


def verdict_to_proto(v: Verdict) -> pb.Verdict:
    """Encode a verdict for the stream."""
    msg = pb.Verdict(
        window_start=timestamp(v.window_start_s),
        window_end=timestamp(v.window_end_s),
        gpu_index=v.gpu_index,
        gpu_uuid=v.gpu_uuid,
        verdict=v.verdict.value,
        confidence=v.confidence,
        rule=v.rule,
        recommendations=v.recommendations,
        samples=v.samples,
        active_samples=v.active_samples,
        mig_uuid=v.mig_uuid,
    )
    if v.cause is not None:
        msg.cause = v.cause.value
    if v.gpu_instance_id is not None:
        msg.gpu_instance_id = v.gpu_instance_id
    if v.compute_instance_id is not None:
        msg.compute_instance_id = v.compute_instance_id
    msg.evidence.extend(
        pb.Evidence(name=e.name, value=e.value, provenance=e.provenance.value) for e in v.evidence
    )
    msg.regimes.extend(pb.RegimeShare(regime=b.value, share=s) for b, s in v.regimes)
    if v.pods:
        msg.pods.extend(_pods_to_proto(v.pods))
    return msg


def verdict_from_proto(msg: pb.Verdict, gpu_name: str = "") -> Verdict:
    """Decode a verdict; raises ``ValueError`` on unknown enum strings."""
    return Verdict(
        gpu_index=msg.gpu_index,
        gpu_uuid=msg.gpu_uuid,
        gpu_name=gpu_name,
        verdict=Bound(msg.verdict),
        cause=Cause(msg.cause) if msg.HasField("cause") else None,
        confidence=msg.confidence,
        rule=msg.rule,
        evidence=tuple(
            Evidence(e.name, e.value, Provenance(e.provenance)) for e in msg.evidence
        ),
        recommendations=tuple(msg.recommendations),
        regimes=tuple((Bound(r.regime), r.share) for r in msg.regimes),
        samples=msg.samples,
        active_samples=msg.active_samples,
        window_start_s=timestamp_s(msg.window_start),
        window_end_s=timestamp_s(msg.window_end),
        mig_uuid=msg.mig_uuid,
        gpu_instance_id=msg.gpu_instance_id if msg.HasField("gpu_instance_id") else None,
        compute_instance_id=(
            msg.compute_instance_id if msg.HasField("compute_instance_id") else None
        ),
        pods=_pods_from_proto(msg.pods),
    )
