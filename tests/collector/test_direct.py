"""Direct OTLP mode: the agent exports what the collector would, by the same code.

Compared against the collector's own export: the same batches through both (in
memory), and a real agent streaming to a real collector while also exporting
directly, each to its own OTLP receiver (tests/collector/otlp_receiver.py, built on
the official opentelemetry-proto services): same names, units, kinds, attributes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from rooftop.agent.config import load_config
from rooftop.agent.daemon import Agent
from rooftop.cli import direct_otlp_sink
from rooftop.collector.config import CollectorConfig
from rooftop.collector.direct import DIRECT_METRICS, DirectExporter
from rooftop.collector.fleet import Fleet, decode_batch
from rooftop.collector.otel import METRICS, Telemetry
from rooftop.collector.service import Collector
from rooftop.common.errors import ConfigError
from rooftop.common.model import Bound, Cause
from rooftop.common.otlp import OtlpExport
from rooftop.v1 import telemetry_pb2 as pb
from tests.collector.helpers import batch, engine, gpu, verdict
from tests.collector.otlp_receiver import GrpcOtlpReceiver, HttpOtlpReceiver, attributes


def batches() -> list[pb.Batch]:
    return [
        batch(1, records=[gpu(0), gpu(1, busy_pct=99.0), gpu(2, lost=True), engine()],
              verdicts=[verdict(0, Bound.MEMORY), verdict(1, Bound.HOST, cause=Cause.CPU)]),
        batch(2, records=[gpu(0), engine(tpot_ms=4.9, ttft_ms=30.0)]),
    ]  # fmt: skip


def collected(reader: InMemoryMetricReader) -> dict[str, Any]:
    data = reader.get_metrics_data()
    assert data is not None
    return {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics
            for m in sm.metrics}  # fmt: skip


def shape(metric: Any) -> tuple[str, str, frozenset[tuple[tuple[str, Any], ...]]]:
    """Name, unit and the set of attribute sets: what must match, values aside."""
    attrs = frozenset(tuple(sorted(dict(p.attributes).items())) for p in metric.data.data_points)
    return metric.unit, type(metric.data).__name__, attrs


def test_same_names_units_and_attributes_as_the_collector_in_memory():
    collector_reader, direct_reader = InMemoryMetricReader(), InMemoryMetricReader()
    fleet = Fleet()
    telemetry = Telemetry(fleet, readers=[collector_reader], host_name="h")
    direct = DirectExporter(None, readers=[direct_reader], host_name="h")
    try:
        for b in batches():
            now = time.time()
            decoded = decode_batch(b, received_s=now)
            fleet.apply(decoded, received_s=now)
            telemetry.observe_batch(decoded, now)
            direct.observe(b)
        theirs, ours = collected(collector_reader), collected(direct_reader)
    finally:
        telemetry.shutdown()
        direct.shutdown()
    expected = {n for n in theirs if n in DIRECT_METRICS}
    assert set(ours) == expected
    # Everything a GPU, verdict or engine produces is there, histograms included.
    produced = {"hw.gpu.utilization", "rooftop.gpu.bound", "rooftop.gpu.dram.activity",
                "gen_ai.server.time_per_output_token", "rooftop.engine.requests"}  # fmt: skip
    assert produced <= set(ours)
    for name in expected:
        assert shape(ours[name]) == shape(theirs[name]), name
    tpot = ours["gen_ai.server.time_per_output_token"].data.data_points[0]
    assert tpot.count == 2 and tpot.explicit_bounds[0] == 0.001  # the collector's buckets
    # The pipeline's own metrics describe agent -> collector: not exported directly.
    assert not [n for n in ours if n.startswith(("rooftop.agent.", "rooftop.collector."))]
    assert set(DIRECT_METRICS) < {m.name for m in METRICS}


def _agent_config(tmp_path: Path, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "agent_id": "node-a",
        "backend": "fake:h100",
        "fake_gpus": 2,
        "host_sensor": False,
        "rate_hz": 20.0,
        "window_s": 0.5,
        "batch_interval_s": 0.1,
        "spool_dir": tmp_path / "spool",
        **overrides,
    }
    return load_config(env={}, overrides=values)


def _points(receiver: Any) -> dict[str, tuple[str, str, frozenset[Any]]]:
    out = {}
    for name, m in receiver.metrics().items():
        kind = m.WhichOneof("data")
        pts = getattr(m, kind).data_points
        attrs = frozenset(tuple(sorted(attributes(p.attributes).items())) for p in pts)
        out[name] = (m.unit, kind, attrs)
    return out


def test_a_real_agent_exports_what_its_collector_exports(tmp_path):
    via_collector, direct = GrpcOtlpReceiver(), GrpcOtlpReceiver()
    export = OtlpExport(endpoint=via_collector.endpoint, interval_s=0.3, insecure=True)
    collector = Collector(CollectorConfig(listen="127.0.0.1:0", insecure=True,
                                          prometheus_listen="", otlp=(export,)))  # fmt: skip
    collector.start()
    agent = None
    try:
        address = f"127.0.0.1:{collector.ingest.port}"
        agent = Agent(_agent_config(tmp_path, collectors=[address], insecure=True,
                                    otlp=OtlpExport(direct.endpoint, interval_s=0.3,
                                                    insecure=True)),
                      env={}, direct_otlp=direct_otlp_sink)  # fmt: skip
        agent.start()
        for receiver in (direct, via_collector):
            receiver.wait_for(lambda _r, rec=receiver: "rooftop.gpu.bound" in rec.metrics())
        agent.shutdown(5)  # final flush: the collector has every batch, direct exported
        agent = None
        assert collector.flush(10)
        theirs, ours = _points(via_collector), _points(direct)
        resource = direct.resource()
    finally:
        if agent is not None:
            agent.shutdown(5)
        collector.shutdown(5)
        via_collector.stop()
        direct.stop()
    assert set(ours) == {n for n in theirs if n in DIRECT_METRICS}
    assert {"hw.gpu.utilization", "hw.gpu.memory.usage", "rooftop.gpu.bound",
            "rooftop.gpu.sm.activity"} <= set(ours)  # fmt: skip
    for name, got in ours.items():
        assert got == theirs[name], name
    hosts = {dict(a)["host.name"] for a in ours["hw.gpu.utilization"][2]}
    assert len(hosts) == 1 and len(ours["hw.gpu.utilization"][2]) == 2  # one node, 2 GPUs
    assert resource["service.name"] == "rooftop-agent"


def test_direct_only_over_http_without_a_collector(tmp_path):
    receiver = HttpOtlpReceiver()
    otlp = OtlpExport(receiver.endpoint, protocol="http/protobuf", interval_s=0.3)
    agent = Agent(_agent_config(tmp_path, otlp=otlp, hostname="gpu-node-7"), env={},
                  direct_otlp=direct_otlp_sink)  # fmt: skip
    try:
        assert agent.spool is None and agent.streamer is None  # nothing to stream to
        agent.start()
        receiver.wait_for(lambda _r: "rooftop.gpu.bound" in receiver.metrics())
    finally:
        agent.shutdown(5)
        receiver.stop()
    got = receiver.metrics()
    assert got["hw.gpu.utilization"].unit == "1"
    # The resource names the node, as the series do (in a pod, not the pod's own name).
    assert receiver.resource()["host.name"] == "gpu-node-7"
    assert not (tmp_path / "spool").exists()


def test_otlp_table_in_the_agent_config(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(
        'agent_id = "n"\n[otlp]\nendpoint = "http://127.0.0.1:4318"\nprotocol = "http/protobuf"\n'
        'interval_s = 5\nheaders = { "x-api-key" = "abc", "X-Tenant" = "t1" }\n'
    )
    cfg = load_config(path, env={})
    assert cfg.otlp == OtlpExport(
        "http://127.0.0.1:4318/v1/metrics", protocol="http/protobuf", interval_s=5.0,
        headers=(("x-api-key", "abc"), ("x-tenant", "t1")),
    )  # fmt: skip
    assert load_config(env={}).otlp is None
    path.write_text('[otlp]\nendpoint = "x:1"\nprotocol = "thrift"\n')
    with pytest.raises(ConfigError, match=r"agent\.toml:3: otlp\.protocol: 'thrift' is not"):
        load_config(path, env={})
    path.write_text('[otlp]\nendpiont = "x:1"\n')
    with pytest.raises(ConfigError, match=r"agent\.toml:2: unknown key otlp\.endpiont"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match="collectors.*or an \\[otlp\\] endpoint"):
        Agent(load_config(env={}, overrides={"backend": "fake:h100"}), env={})


def test_the_agent_refuses_an_otlp_endpoint_without_a_sink_to_export_it(tmp_path):
    cfg = _agent_config(tmp_path, otlp=OtlpExport("127.0.0.1:4317", insecure=True))
    with pytest.raises(ConfigError, match="direct OTLP export is not available"):
        Agent(cfg, env={})
