"""OTel output of the collector, asserted through InMemoryMetricReader and real receivers."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    InMemoryMetricReader,
    Metric,
    Sum,
)

from rooftop.collector.config import OtlpExport
from rooftop.collector.fleet import Fleet, LimitReason, decode_batch
from rooftop.collector.otel import (
    METRICS,
    REQUEST_DURATION_BUCKETS_S,
    TPOT_BUCKETS_S,
    Telemetry,
    bound_value,
    engine_provider,
)
from rooftop.common.model import Bound, Cause, GpuSample, HistogramDelta
from rooftop.v1 import telemetry_pb2 as pb
from tests.collector.helpers import batch, engine, gpu, verdict
from tests.collector.otlp_receiver import GrpcOtlpReceiver, HttpOtlpReceiver, attributes

REPO = Path(__file__).resolve().parents[2]
UUID0 = "GPU-0000-uuid"


def feed(fleet: Fleet, telemetry: Telemetry | None, *batches: pb.Batch) -> None:
    for b in batches:
        now = time.time()
        decoded = decode_batch(b, received_s=now)
        fleet.apply(decoded, received_s=now)
        if telemetry is not None:
            telemetry.observe_batch(decoded, now)


_TWO = (0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0)  # two in (0.16 s, 0.32 s]


def fleet_batch(seq: int = 1) -> pb.Batch:
    return batch(
        seq,
        records=[
            gpu(0, xid_count=0, ecc_corrected_aggregate=2, ecc_uncorrected_aggregate=0),
            gpu(
                1,
                busy_pct=99.0,
                sm_active_pct=0.75,
                dram_bw_pct=0.0,
                mem_ctrl_pct=0.0,
                xid_codes=(79,),
                xid_count=1,
            ),
            gpu(2, lost=True),
            # An A100: no GPM, so no SM/tensor/DRAM activity at all.
            gpu(
                3,
                sm_active_pct=None,
                sm_occupancy_pct=None,
                tensor_active_pct=None,
                fp16_active_pct=None,
                fp32_active_pct=None,
                fp64_active_pct=None,
                dram_bw_pct=None,
                pcie_rx_bytes_per_s=None,
                pcie_tx_bytes_per_s=None,
                gpu_name="NVIDIA A100-SXM4-80GB",
            ),
            # Interval means only (a source without per-request counts) and two
            # requests of 0.25 s in the request-duration histogram.
            engine(request_duration_hist=HistogramDelta(REQUEST_DURATION_BUCKETS_S, _TWO, 0.5, 2)),
        ],
        verdicts=[
            verdict(0, Bound.MEMORY),
            verdict(1, Bound.HOST, cause=Cause.CPU, confidence=0.7),
        ],
        stats=pb.AgentStats(queued=3, sent=10, acked=7, dropped_spool_full=2, reconnects=1),
    )


@pytest.fixture
def exported() -> Iterator[dict[str, Metric]]:
    reader = InMemoryMetricReader()
    fleet = Fleet()
    telemetry = Telemetry(fleet, readers=[reader], host_name="collector-host")
    feed(fleet, telemetry, fleet_batch())
    yield collect(reader)
    telemetry.shutdown()


def collect(reader: InMemoryMetricReader) -> dict[str, Metric]:
    data = reader.get_metrics_data()
    assert data is not None
    out: dict[str, Metric] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out[m.name] = m
    return out


def points(metric: Metric, **attrs: Any) -> list[Any]:
    return [
        p
        for p in metric.data.data_points
        if all(p.attributes.get(k) == v for k, v in attrs.items())
    ]


def value(metric: Metric, **attrs: Any) -> float:
    found = points(metric, **attrs)
    assert len(found) == 1, (
        metric.name,
        attrs,
        [dict(p.attributes) for p in metric.data.data_points],
    )
    return found[0].value


def test_every_exported_metric_is_in_the_catalog_with_its_unit(exported):
    catalog = {m.name: m for m in METRICS}
    assert set(exported) <= set(catalog)
    for name, metric in exported.items():
        assert metric.unit == catalog[name].unit, name
        kind = catalog[name].instrument
        if kind == "gauge":
            assert isinstance(metric.data, Gauge), name
        elif kind == "histogram":
            assert isinstance(metric.data, Histogram), name
        else:
            assert isinstance(metric.data, Sum), name
            assert metric.data.is_monotonic == (kind == "counter"), name
    # What this batch carries is exported; what it does not (no rejects, no refused
    # calls) is absent.
    assert set(catalog) - set(exported) == {
        "rooftop.collector.rejected",
        "rooftop.collector.refused",
        "rooftop.collector.limited",
        "rooftop.collector.remote_write.samples",  # only with [[remote_write]]
    }


def test_standard_gpu_metrics(exported):
    util = exported["hw.gpu.utilization"]
    p = points(util, **{"hw.id": UUID0})[0]
    assert p.value == pytest.approx(0.955)
    assert dict(p.attributes) == {
        "host.name": "gpu-node-1",
        "hw.type": "gpu",  # the hardware semconv require it on every hw.* metric
        "hw.id": UUID0,
        "hw.model": "NVIDIA H100 80GB HBM3",
        "rooftop.gpu.index": 0,
        "hw.gpu.task": "general",
    }
    assert value(exported["hw.gpu.memory.usage"], **{"hw.id": UUID0}) == 70 * 2**30
    assert value(exported["hw.gpu.memory.limit"], **{"hw.id": UUID0}) == 80 * 2**30
    assert value(exported["hw.power"], **{"hw.id": UUID0, "hw.type": "gpu"}) == 650.0
    # NVML util.memory is memory-controller busy time, never hw.gpu.memory.utilization,
    # which is capacity: used / total.
    assert value(exported["hw.gpu.memory.utilization"], **{"hw.id": UUID0}) == 70 / 80
    mc = exported["rooftop.gpu.memory_controller.utilization"]
    assert value(mc, **{"hw.id": UUID0, "rooftop.source": "nvml"}) == pytest.approx(0.971)


def test_rooftop_activity_ratios_carry_their_source(exported):
    dram = exported["rooftop.gpu.dram.activity"]
    assert value(dram, **{"hw.id": UUID0, "rooftop.source": "gpm"}) == pytest.approx(0.848)
    sm = exported["rooftop.gpu.sm.activity"]
    assert value(sm, **{"hw.id": UUID0, "rooftop.source": "gpm"}) == pytest.approx(0.813)
    assert value(exported["rooftop.gpu.tensor.activity"], **{"hw.id": UUID0}) == pytest.approx(
        0.022
    )
    pipes = points(exported["rooftop.gpu.pipe.activity"], **{"hw.id": UUID0})
    assert {p.attributes["rooftop.gpu.pipe"] for p in pipes} == {"fp16", "fp32", "fp64"}
    pcie = exported["rooftop.gpu.pcie.throughput"]
    assert value(pcie, **{"hw.id": UUID0, "network.io.direction": "receive"}) == 1.5e9
    # The A100 (index 3) has no GPM: its activity series are absent, not zero.
    assert not points(dram, **{"rooftop.gpu.index": 3})
    assert points(exported["hw.gpu.utilization"], **{"rooftop.gpu.index": 3})
    # The lost GPU (index 2) reports no readings.
    assert not points(exported["hw.gpu.utilization"], **{"rooftop.gpu.index": 2})


def test_bound_is_a_state_gauge(exported):
    bound = exported["rooftop.gpu.bound"]
    gpu0 = {p.attributes["rooftop.bound"]: p.value for p in points(bound, **{"hw.id": UUID0})}
    assert gpu0 == {"memory": 1, "compute": 0, "host": 0, "mixed": 0, "idle": 0, "lost": 0,
                    "unknown": 0}
    host = points(bound, **{"rooftop.gpu.index": 1, "rooftop.bound": "host"})[0]
    assert host.value == 1 and host.attributes["rooftop.bound.cause"] == "cpu"
    others = points(bound, **{"rooftop.gpu.index": 1})
    assert all("rooftop.bound.cause" not in p.attributes for p in others if p.value == 0)
    lost = points(bound, **{"rooftop.gpu.index": 2, "rooftop.bound": "lost"})[0]
    assert lost.value == 1
    conf = exported["rooftop.gpu.bound.confidence"]
    assert value(conf, **{"rooftop.gpu.index": 1}) == pytest.approx(0.7)
    assert points(conf, **{"rooftop.gpu.index": 1})[0].attributes["rooftop.bound"] == "host"


def test_an_inaccessible_gpu_is_unknown_with_its_cause_never_lost():
    """NVML NO_PERMISSION: rooftop.gpu.bound is "unknown" with the cause "inaccessible"
    (the lost alert must not fire and drain a healthy node); no hw.status series."""
    reader = InMemoryMetricReader()
    fleet = Fleet()
    telemetry = Telemetry(fleet, readers=[reader], host_name="collector-host")
    try:
        denied = GpuSample(time_s=time.time(), gpu_index=5, gpu_uuid="GPU-0005-uuid",
                           lost=True, inaccessible="NO_PERMISSION")
        feed(fleet, telemetry, batch(1, records=[denied, gpu(2, lost=True)]))
        metrics = collect(reader)
    finally:
        telemetry.shutdown()
    bound = metrics["rooftop.gpu.bound"]
    states = {p.attributes["rooftop.bound"]: p for p in points(bound, **{"rooftop.gpu.index": 5})}
    assert {k for k, p in states.items() if p.value == 1} == {"unknown"}
    assert states["unknown"].attributes["rooftop.bound.cause"] == "inaccessible"
    assert states["lost"].value == 0
    # A truly lost GPU is still lost, with no cause.
    lost = points(bound, **{"rooftop.gpu.index": 2, "rooftop.bound": "lost"})[0]
    assert lost.value == 1 and "rooftop.bound.cause" not in lost.attributes
    assert not points(metrics["hw.status"], **{"rooftop.gpu.index": 5})


def test_engine_latency_histograms_use_fine_buckets(exported):
    tpot = exported["gen_ai.server.time_per_output_token"]
    assert tpot.unit == "s"
    (p,) = tpot.data.data_points
    assert tuple(p.explicit_bounds) == TPOT_BUCKETS_S
    assert p.explicit_bounds[0] == 0.001
    assert p.count == 1 and p.sum == pytest.approx(0.00584)
    assert dict(p.attributes) == {
        "gen_ai.operation.name": "text_completion",
        "gen_ai.provider.name": "vllm",
        "gen_ai.request.model": "meta-llama/Llama-3.1-8B-Instruct",
    }
    # 5.84 ms falls in (5 ms, 6 ms], not in one coarse first bucket.
    assert p.bucket_counts[list(TPOT_BUCKETS_S).index(0.006)] == 1
    ttft = exported["gen_ai.server.time_to_first_token"].data.data_points[0]
    assert ttft.sum == pytest.approx(0.042)
    reqs = exported["rooftop.engine.requests"]
    assert value(reqs, **{"rooftop.engine.state": "running"}) == 8
    assert value(exported["rooftop.engine.time_per_output_token"]) == pytest.approx(0.00584)


def test_agent_and_collector_self_metrics(exported):
    a = {"rooftop.agent.id": "agent-1", "host.name": "gpu-node-1"}
    assert value(exported["rooftop.agent.queued"], **a) == 3
    assert value(exported["rooftop.agent.sent"], **a) == 10
    assert (
        value(exported["rooftop.agent.dropped"], **a, **{"rooftop.drop.reason": "spool_full"}) == 2
    )
    assert value(exported["rooftop.agent.reconnects"], **a) == 1
    assert 0 <= value(exported["rooftop.agent.lag"], **a) < 5
    assert 0 <= value(exported["rooftop.agent.staleness"], **a) < 5
    assert value(exported["rooftop.collector.batches"]) == 1
    assert value(exported["rooftop.collector.samples"]) == 5
    assert exported["rooftop.collector.batch.lag"].data.data_points[0].count == 1


def test_resource_names_the_collector_host():
    reader = InMemoryMetricReader()
    telemetry = Telemetry(Fleet(), readers=[reader], host_name="collector-host")
    data = reader.get_metrics_data()
    telemetry.shutdown()
    attrs = data.resource_metrics[0].resource.attributes
    assert attrs["host.name"] == "collector-host"
    assert attrs["service.name"] == "rooftop-collector"


def test_rejections_are_counted_by_reason():
    reader = InMemoryMetricReader()
    fleet = Fleet()
    telemetry = Telemetry(fleet, readers=[reader])
    fleet.count_rejected("invalid_value")
    fleet.count_rejected("invalid_value")
    fleet.count_rejected("bad_enum")
    rejected = collect(reader)["rooftop.collector.rejected"]
    telemetry.shutdown()
    assert value(rejected, **{"rooftop.reject.reason": "invalid_value"}) == 2
    assert value(rejected, **{"rooftop.reject.reason": "bad_enum"}) == 1


@pytest.mark.slow
def test_cardinality_limit_covers_a_large_fleet():
    # 2,500 GPUs: past the SDK's default 2,000 series per instrument.
    reader = InMemoryMetricReader()
    fleet = Fleet()
    telemetry = Telemetry(fleet, readers=[reader])
    for node in range(313):
        feed(
            fleet,
            None,
            batch(
                1,
                agent_id=f"agent-{node}",
                hostname=f"node-{node}",
                records=[gpu(i, gpu_uuid=f"GPU-{node}-{i}") for i in range(8)],
                verdicts=[verdict(i, gpu_uuid=f"GPU-{node}-{i}") for i in range(8)],
            ),
        )
    exported = collect(reader)
    telemetry.shutdown()
    util = exported["hw.gpu.utilization"].data.data_points
    assert len(util) == 313 * 8
    assert all("otel.metric.overflow" not in p.attributes for p in util)
    assert len(exported["rooftop.gpu.bound"].data.data_points) == 313 * 8 * len(Bound)


def test_forgotten_gpus_disappear_from_the_export():
    reader = InMemoryMetricReader()
    clock = [time.time()]
    fleet = Fleet(clock=lambda: clock[0], forget_after_s=60)
    telemetry = Telemetry(fleet, readers=[reader])
    feed(fleet, None, batch(1, records=[gpu(0)]))
    assert points(collect(reader)["hw.gpu.utilization"])
    fleet.forget_stale(now_s=clock[0] + 120)
    assert "hw.gpu.utilization" not in collect(reader)
    telemetry.shutdown()


def test_bound_values_and_engine_providers():
    assert [bound_value(b) for b in Bound] == [
        "idle", "memory", "compute", "host", "mixed", "lost", "unknown",
    ]  # fmt: skip
    assert engine_provider("vllm:8000") == "vllm"
    assert engine_provider("sglang-0") == "sglang"
    assert engine_provider("my-server:9000") == "my-server"
    assert engine_provider("") == "unknown"


def test_prometheus_endpoint_on_port_0():
    fleet = Fleet()
    telemetry = Telemetry(fleet, prometheus_listen="127.0.0.1:0")
    telemetry.start()
    try:
        feed(fleet, telemetry, fleet_batch())
        fleet.count_rejected("bad_enum")
        fleet.count_refused("bad_token")
        fleet.count_limited(LimitReason.AGENTS)
        port = telemetry.prometheus_port
        assert port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        telemetry.shutdown()
    assert re.search(r'^hw_gpu_utilization\{.*hw_id="GPU-0000-uuid".*\} 0\.955$', text, re.M)
    assert re.search(r'^rooftop_gpu_bound\{.*rooftop_bound="memory".*\} 1\.0$', text, re.M)
    assert re.search(r"^hw_gpu_memory_usage_bytes\{", text, re.M)
    assert "gen_ai_server_time_per_output_token_seconds_bucket{" in text
    assert 'le="0.001"' in text
    assert re.search(r"^rooftop_collector_batches_total", text, re.M)
    # The doc's Prometheus column is what the endpoint really serves.
    served = set(re.findall(r"^# TYPE (\S+) ", text, re.M)) - {"target_info"}
    doc = (REPO / "docs" / "METRICS.md").read_text()
    documented = set(re.findall(r"\| `([a-z_]+)` \|$", doc, re.M))
    # Only with [[remote_write]] (tests/collector/test_remote_write.py serves it).
    assert served == documented - {"rooftop_collector_remote_write_samples_total"}


def test_prometheus_address_in_use_is_a_config_error():
    from rooftop.common.errors import ConfigError

    first = Telemetry(Fleet(), prometheus_listen="127.0.0.1:0")
    first.start()
    second = Telemetry(Fleet(), prometheus_listen=f"127.0.0.1:{first.prometheus_port}")
    try:
        with pytest.raises(ConfigError, match="prometheus.listen"):
            second.start()
    finally:
        second.shutdown()
        first.shutdown()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_otlp_export_reaches_a_real_receiver(protocol):
    receiver = GrpcOtlpReceiver() if protocol == "grpc" else HttpOtlpReceiver()
    fleet = Fleet()
    exp = OtlpExport(endpoint=receiver.endpoint, protocol=protocol, interval_s=60, insecure=True)
    telemetry = Telemetry(fleet, otlp=[exp], host_name="collector-host")
    try:
        feed(fleet, telemetry, fleet_batch())
        assert telemetry.flush(timeout_s=10)
        receiver.wait_for(lambda reqs: len(reqs) >= 1)
    finally:
        telemetry.shutdown(timeout_s=5)
        receiver.stop()
    got = receiver.metrics()
    assert receiver.resource()["host.name"] == "collector-host"
    util = got["hw.gpu.utilization"]
    assert util.unit == "1"
    dp = next(p for p in util.gauge.data_points if attributes(p.attributes)["hw.id"] == UUID0)
    assert dp.as_double == pytest.approx(0.955)
    assert attributes(dp.attributes)["host.name"] == "gpu-node-1"
    assert got["hw.gpu.memory.usage"].unit == "By"
    assert not got["hw.gpu.memory.usage"].sum.is_monotonic
    bound = got["rooftop.gpu.bound"]
    states = {
        attributes(p.attributes)["rooftop.bound"]: p.as_int
        for p in bound.gauge.data_points
        if attributes(p.attributes)["hw.id"] == UUID0
    }
    assert states["memory"] == 1 and sum(states.values()) == 1
    tpot = got["gen_ai.server.time_per_output_token"]
    assert tpot.unit == "s"
    hp = tpot.histogram.data_points[0]
    assert hp.explicit_bounds[0] == 0.001
    assert attributes(hp.attributes)["gen_ai.provider.name"] == "vllm"
    assert {m.name for m in METRICS} >= set(got)


def test_docs_metrics_table_matches_the_catalog():
    doc = (REPO / "docs" / "METRICS.md").read_text()
    rows = re.findall(r"^\| `([a-z_.]+)` \| (\w+) \| `([^`]*)` \|", doc, re.M)
    documented = {name: (instrument, unit) for name, instrument, unit in rows}
    assert len(rows) == len(documented), "each metric documented once"
    assert documented == {m.name: (m.instrument, m.unit) for m in METRICS}


def test_gpu_health_is_exported_as_hw_errors_and_hw_status(exported):
    errors = exported["hw.errors"]
    assert errors.unit == "{error}" and errors.data.is_monotonic
    assert value(errors, **{"hw.id": UUID0, "error.type": "ecc_corrected"}) == 2
    assert value(errors, **{"hw.id": UUID0, "error.type": "ecc_uncorrected"}) == 0
    assert value(errors, **{"hw.id": UUID0, "error.type": "xid"}) == 0
    assert value(errors, **{"hw.id": "GPU-0001-uuid", "error.type": "xid"}) == 1
    # Not measured (no ECC figures in the sample) is no series, never 0.
    assert not points(errors, **{"hw.id": "GPU-0003-uuid"})
    assert all(p.attributes["hw.type"] == "gpu" for p in errors.data.data_points)

    status = exported["hw.status"]
    assert not status.data.is_monotonic

    def states(uuid: str) -> dict[str, int]:
        return {p.attributes["hw.state"]: p.value for p in points(status, **{"hw.id": uuid})}

    assert states(UUID0) == {"ok": 1, "degraded": 0, "failed": 0}
    assert states("GPU-0001-uuid") == {"ok": 0, "degraded": 0, "failed": 1}  # XID 79
    assert states("GPU-0002-uuid")["failed"] == 1  # lost


def test_xid_errors_are_split_by_code_under_error_type_xid():
    """Each XID code its own hw.errors series (rooftop.gpu.xid), error.type staying "xid"
    so a sum by error.type still counts every XID; what no code accounts for (events past
    the distinct-code bound, an agent counting only the total) stays on the series with
    no code, which is 0 before any XID."""
    reader = InMemoryMetricReader()
    fleet = Fleet()
    telemetry = Telemetry(fleet, readers=[reader], host_name="collector-host")
    try:
        feed(fleet, telemetry, batch(1, records=[
            gpu(0, xid_codes=(13, 79), xid_count=5, xid_code_counts=(3, 1)),  # 1 uncounted
            gpu(1, xid_codes=(79,), xid_count=2),  # an older agent: the total only
            gpu(2, xid_codes=(), xid_count=0, xid_code_counts=()),
        ]))  # fmt: skip
        errors = collect(reader)["hw.errors"]
    finally:
        telemetry.shutdown()

    def xids(index: int) -> dict[Any, float]:
        found = points(errors, **{"rooftop.gpu.index": index, "error.type": "xid"})
        return {p.attributes.get("rooftop.gpu.xid"): p.value for p in found}

    assert xids(0) == {13: 3, 79: 1, None: 1}
    assert sum(xids(0).values()) == 5
    assert xids(1) == {None: 2}
    assert xids(2) == {None: 0}


def test_gpu_health_on_the_prometheus_endpoint():
    fleet = Fleet()
    telemetry = Telemetry(fleet, prometheus_listen="127.0.0.1:0", host_name="collector-host")
    try:
        telemetry.start()
        feed(fleet, telemetry, fleet_batch())
        port = telemetry.prometheus_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        telemetry.shutdown()
    assert re.search(
        r'^hw_errors_total\{.*error_type="xid".*hw_id="GPU-0001-uuid".*\} 1(\.0)?$', text, re.M
    )
    assert re.search(
        r'^hw_status\{.*hw_id="GPU-0001-uuid".*hw_state="failed".*\} 1(\.0)?$', text, re.M
    )
    assert re.search(r'^hw_gpu_memory_utilization\{.*hw_id="GPU-0000-uuid".*\} 0\.875$', text, re.M)
    # hw.type rides on every GPU series.
    gpu_lines = [ln for ln in text.splitlines() if 'hw_id="' in ln]
    assert gpu_lines and all('hw_type="gpu"' in ln for ln in gpu_lines)
