"""Several collectors: an agent whose stream closed leaves this collector's export.

A real collector (ingest + Prometheus endpoint + Query) with a clock the test moves:
the agent streams, its stream closes (it moved to another collector), and after
``disconnected_series_s`` its GPU series leave ``/metrics`` while the fleet status
still lists the node, disconnected, and its staleness goes on (a dead agent alerts).
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from rooftop.collector.config import CollectorConfig
from rooftop.collector.fleet import Fleet, decode_batch
from rooftop.collector.service import Collector
from rooftop.v1 import telemetry_pb2 as pb
from rooftop.v1 import telemetry_pb2_grpc
from tests.collector.helpers import AgentStream, batch, gpu, scrape, verdict
from tests.support import wait_for

NOW_S = 1_800_000_000.0
GPU_SERIES = 'hw_id="GPU-0000-uuid"'


class Clock:
    def __init__(self) -> None:
        self.now_s = NOW_S

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def collector(clock: Clock) -> Iterator[Collector]:
    config = CollectorConfig(
        listen="127.0.0.1:0",
        insecure=True,
        prometheus_listen="127.0.0.1:0",
        prometheus_dcgm_names=True,
        disconnected_series_s=5.0,
    ).validated()
    c = Collector(config, clock=clock)
    c.start()
    yield c
    c.shutdown(timeout_s=2)


def gpu_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if GPU_SERIES in line or 'UUID="GPU-0000' in line]


def node(c: Collector) -> pb.NodeStatus:
    with grpc.insecure_channel(f"127.0.0.1:{c.ingest.port}") as channel:
        status = telemetry_pb2_grpc.QueryStub(channel).GetFleetStatus(pb.FleetStatusRequest())
    (only,) = status.nodes
    return only


def stream_once(c: Collector, seq: int, clock: Clock) -> AgentStream:
    stream = AgentStream(f"127.0.0.1:{c.ingest.port}")
    stream.send(batch(seq, records=[gpu(0, time_s=clock.now_s)], verdicts=[verdict(0)]))
    stream.wait_acked(seq)
    return stream


def test_a_closed_stream_takes_the_gpu_series_away_after_disconnected_series_s(
    collector: Collector, clock: Clock
):
    stream = stream_once(collector, 1, clock)
    lines = gpu_lines(scrape(collector))
    assert any(line.startswith("DCGM_FI_") for line in lines)  # and the OTel names
    assert any(line.startswith("rooftop_gpu_bound") for line in lines)
    assert node(collector).connected
    stream.close()  # the agent moved to another collector
    wait_for(lambda: not node(collector).connected)
    clock.now_s += 4.0  # within disconnected_series_s: still exported
    assert gpu_lines(scrape(collector))
    clock.now_s += 1.0
    text = scrape(collector)
    assert gpu_lines(text) == []
    assert 'rooftop_agent_staleness_seconds{host_name="gpu-node-1"' in text  # still alerts
    status = node(collector)  # the node stays in the fleet status, marked
    assert not status.connected
    assert status.disconnected_time.ToSeconds() == int(NOW_S)
    assert [g.gpu_uuid for g in status.gpus] == ["GPU-0000-uuid"]

    with stream_once(collector, 2, clock):  # back: the series return
        assert gpu_lines(scrape(collector))
        status = node(collector)
        assert status.connected and not status.HasField("disconnected_time")


def test_a_second_stream_of_the_same_agent_keeps_it_connected(
    collector: Collector, clock: Clock
):
    # A reconnect can overlap the old stream's end: the old one closing must not
    # take the series of the agent away while the new one streams.
    first = stream_once(collector, 1, clock)
    with stream_once(collector, 2, clock):
        first.close()
        wait_for(lambda: collector.fleet.counts().streams == 1)
        clock.now_s += 60.0
        assert gpu_lines(scrape(collector))
        assert node(collector).connected


def test_an_agent_that_never_streamed_here_is_never_left_out():
    # Direct OTLP and in-process fleets apply batches without a stream.
    now = [NOW_S]
    fleet = Fleet(clock=lambda: now[0], disconnected_series_s=1.0)
    fleet.apply(decode_batch(batch(1, records=[gpu(0, time_s=NOW_S)]), received_s=NOW_S),
                received_s=NOW_S)
    now[0] += 100.0
    assert len(fleet.export_snapshot().gpus) == 1
    fleet.agent_connected("agent-1")
    fleet.agent_disconnected("agent-1", NOW_S + 100.0)
    assert len(fleet.export_snapshot().gpus) == 1  # not yet disconnected_series_s
    now[0] += 1.0
    assert fleet.export_snapshot().gpus == ()
    assert len(fleet.snapshot().gpus) == 1  # the fleet keeps it (Query)
