"""Per-request engine histograms at the collector: hook → receiver → stream → OTel and /metrics."""

from __future__ import annotations

import random
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client.parser import text_string_to_metric_families

from rooftop.agent.engines.receiver import HookReceiver
from rooftop.agent.hooks import Aggregator
from rooftop.agent.hooks import wire as hook_wire
from rooftop.agent.hooks.vllm import RooftopStatLogger
from rooftop.collector.config import CollectorConfig
from rooftop.collector.fleet import Fleet
from rooftop.collector.ingest import IngestServer
from rooftop.collector.otel import (
    REQUEST_DURATION_BUCKETS_S,
    TPOT_BUCKETS_S,
    TTFT_BUCKETS_S,
    Telemetry,
)
from rooftop.collector.prometheus import spread_buckets
from rooftop.common.model import EMPTY_HISTOGRAM, EngineSample, HistogramDelta
from rooftop.v1 import telemetry_pb2 as pb
from tests.agent.hooks.conftest import FakeClockNs
from tests.agent.hooks.test_hooks_vllm import (
    FinishedRequestStatsWithTtft,
    IterationStats,
    VllmConfig,
)
from tests.collector.helpers import AgentStream, batch, engine

FAMILIES = {
    "tpot": "gen_ai_server_time_per_output_token_seconds",
    "ttft": "gen_ai_server_time_to_first_token_seconds",
    "duration": "gen_ai_server_request_duration_seconds",
}
OTEL = {
    "tpot": "gen_ai.server.time_per_output_token",
    "ttft": "gen_ai.server.time_to_first_token",
    "duration": "gen_ai.server.request.duration",
}
# vLLM's own bounds for e2e_request_latency_seconds: not the collector's.
VLLM_E2E_BOUNDS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                     60.0)  # fmt: skip


@dataclass
class Collector:
    server: IngestServer
    fleet: Fleet
    telemetry: Telemetry
    reader: InMemoryMetricReader

    def send(self, *records: object, stats: pb.AgentStats | None = None) -> None:
        with AgentStream(f"127.0.0.1:{self.server.port}") as stream:
            stream.send(batch(1, records=records, stats=stats))
            stream.wait_acked(1)

    def prometheus(self) -> dict[str, dict[str, float]]:
        """{family: {sample name + sorted labels (no le, no attributes) or le: value}}."""
        url = f"http://127.0.0.1:{self.telemetry.prometheus_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        out: dict[str, dict[str, float]] = {}
        for family in text_string_to_metric_families(text):
            got = out.setdefault(family.name, {})
            for s in family.samples:
                key = s.name if "le" not in s.labels else f"le={s.labels['le']}"
                got[key] = got.get(key, 0.0) + s.value
        return out

    def otel_counts(self) -> dict[str, int]:
        data = self.reader.get_metrics_data()
        assert data is not None
        return {
            m.name: sum(p.count for p in m.data.data_points)
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name.startswith("gen_ai.")
        }


@pytest.fixture
def collector() -> Iterator[Collector]:
    """A real collector: gRPC ingest on a loopback port, OTel reader, Prometheus endpoint."""
    reader = InMemoryMetricReader()
    fleet = Fleet()
    telemetry = Telemetry(fleet, prometheus_listen="127.0.0.1:0", readers=[reader])
    telemetry.start()
    server = IngestServer(
        fleet, CollectorConfig(listen="127.0.0.1:0", insecure=True), observers=[telemetry]
    )
    server.start()
    yield Collector(server, fleet, telemetry, reader)
    server.shutdown(timeout_s=1)
    telemetry.shutdown()


@pytest.fixture
def hook_socket() -> Iterator[str]:
    path = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # AF_UNIX paths are short
    yield str(path / "hooks.sock")
    shutil.rmtree(path, ignore_errors=True)


def test_hook_buckets_are_the_collectors_export_buckets():
    # So the hook's counts add to the collector's histograms exactly as they are.
    assert hook_wire.TPOT_BOUNDS_S == TPOT_BUCKETS_S
    assert hook_wire.TTFT_BOUNDS_S == TTFT_BUCKETS_S
    assert hook_wire.REQUEST_DURATION_BOUNDS_S == REQUEST_DURATION_BUCKETS_S


def hook_requests(agg: Aggregator, clock: FakeClockNs, n: int) -> None:
    rng = random.Random(7)
    for _ in range(n):
        req = agg.start_request()
        clock.advance_ms(rng.uniform(5, 900))  # TTFT
        req.token()
        for _ in range(rng.randrange(1, 40)):
            clock.advance_ms(rng.uniform(2, 60))  # TPOT
            req.token()
        req.end()


def vllm_requests(agg: Aggregator, clock: FakeClockNs, n: int) -> None:
    del clock
    plugin = RooftopStatLogger(VllmConfig(), 0, aggregator=agg)
    rng = random.Random(7)
    for _ in range(n):
        done = FinishedRequestStatsWithTtft(
            e2e_latency=rng.uniform(0.05, 30.0),
            num_generation_tokens=50,
            mean_time_per_output_token=rng.uniform(0.002, 0.08),
            first_token_latency=rng.uniform(0.01, 2.0),
        )
        plugin.record(None, IterationStats(num_generation_tokens=50, finished_requests=[done]))


@pytest.mark.parametrize("source", [hook_requests, vllm_requests], ids=["hooks", "vllm"])
def test_n_requests_are_n_observations_at_receiver_and_collector(collector, hook_socket, source):
    n = 37
    clock = FakeClockNs()
    agg = Aggregator(
        engine_id="vllm-test", socket_path=hook_socket, clock_ns=clock, autostart=False
    )
    with HookReceiver(hook_socket) as receiver:
        # Over three summaries, so requests from several intervals add up.
        for part in (10, 20, n - 30):
            source(agg, clock, part)
            assert agg.flush()
        receiver.flush()
        samples = receiver.drain()
    assert len(samples) == 3
    for field in ("tpot_hist", "ttft_hist", "request_duration_hist"):
        assert sum(getattr(s, field).count for s in samples) == n, field

    collector.send(*samples)
    prom = collector.prometheus()
    for key, family in FAMILIES.items():
        assert prom[family][family + "_count"] == n, key
        assert prom[family]["le=+Inf"] == n, key
        want_sum = sum(getattr(s, f"{field_of(key)}").sum_s for s in samples)
        assert prom[family][family + "_sum"] == pytest.approx(want_sum), key
    counts = collector.otel_counts()
    assert {OTEL[k]: n for k in OTEL} == {k: counts.get(k) for k in OTEL.values()}


def field_of(key: str) -> str:
    return {"tpot": "tpot_hist", "ttft": "ttft_hist", "duration": "request_duration_hist"}[key]


def test_engine_bounds_are_rebucketed_onto_the_collectors(collector):
    # A scraped vLLM histogram's increase, in vLLM's own bounds.
    counts = (3, 5, 0, 2, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 1)  # one above 60 s
    hist = HistogramDelta(VLLM_E2E_BOUNDS_S, counts, 0.2 * 3 + 0.4 * 5 + 0.9 * 2 + 4 * 4 + 90, 15)
    collector.send(engine(tpot_ms=None, ttft_ms=None, request_duration_hist=hist))
    family = FAMILIES["duration"]
    got = collector.prometheus()[family]
    assert got[family + "_count"] == 15
    assert got[family + "_sum"] == pytest.approx(hist.sum_s)
    # Where both have a bound, the cumulative counts agree: nothing moved across it.
    cumulative = 0
    for bound, count in zip(VLLM_E2E_BOUNDS_S, counts, strict=False):
        cumulative += count
        if bound in REQUEST_DURATION_BUCKETS_S:
            assert got[f"le={bound}"] == cumulative, bound
    assert got["le=81.92"] == 14 and got["le=+Inf"] == 15
    assert collector.otel_counts()[OTEL["duration"]] == 15


def test_interval_means_count_only_where_no_per_request_histogram_came(collector):
    old_agent = engine(engine_id="vllm-old", tpot_ms=6.0, ttft_ms=50.0)
    # Measured per request, none finished: its interval mean must not count as one.
    new_agent = engine(
        engine_id="vllm-new",
        model="other-model",
        tpot_ms=7.0,
        ttft_ms=60.0,
        tpot_hist=EMPTY_HISTOGRAM,
        ttft_hist=EMPTY_HISTOGRAM,
        request_duration_hist=EMPTY_HISTOGRAM,
    )
    collector.send(old_agent, new_agent)
    prom = collector.prometheus()
    assert prom[FAMILIES["tpot"]][FAMILIES["tpot"] + "_count"] == 1  # the old agent's
    assert prom[FAMILIES["ttft"]][FAMILIES["ttft"] + "_count"] == 1
    assert FAMILIES["duration"] not in prom


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (HistogramDelta((0.1,), (1,), 0.1, 1), "bucket counts for 1 bounds"),
        (HistogramDelta((0.1,), (1, 1), 0.1, 5), "not the sum"),
        # More requests in one engine sample than any engine finishes in a second.
        (HistogramDelta((), (100_001,), 1.0, 100_001), "over 100000"),
    ],
)
def test_impossible_histograms_are_left_out_not_exported(collector, caplog, bad, why):
    collector.send(engine(tpot_ms=None, ttft_ms=None, tpot_hist=bad))
    assert FAMILIES["tpot"] not in collector.prometheus()
    assert "tpot_hist not exported" in caplog.text and why in caplog.text
    assert OTEL["tpot"] not in collector.otel_counts()


def test_agent_scrape_errors_arrive_in_band_and_are_exported(collector):
    collector.send(engine(), stats=pb.AgentStats(sent=1, engine_scrape_errors=4))
    prom = collector.prometheus()
    (value,) = prom["rooftop_agent_engine_scrape_errors"].values()
    assert value == 4
    assert collector.fleet.snapshot().agents[0].stats.engine_scrape_errors == 4


@pytest.mark.parametrize("seed", range(20))
def test_spread_buckets_keeps_each_bucket_and_the_sum(seed):
    rng = random.Random(seed)
    bounds = tuple(sorted(rng.sample([round(0.001 * 1.7**i, 6) for i in range(30)], 12)))
    values = [rng.expovariate(1 / rng.choice(bounds)) for _ in range(rng.randrange(1, 60))]
    counts = [0] * (len(bounds) + 1)
    for v in values:
        counts[next((i for i, b in enumerate(bounds) if v <= b), len(bounds))] += 1
    spread = spread_buckets(bounds, counts, sum(values))
    again = [0] * (len(bounds) + 1)
    for v, n in spread:
        again[next((i for i, b in enumerate(bounds) if v <= b), len(bounds))] += n
    assert again == counts
    assert sum(v * n for v, n in spread) == pytest.approx(sum(values))


def test_engine_sample_histograms_survive_the_protobuf_round_trip():
    from rooftop.common.codec import record_from_proto, record_to_proto

    hist = HistogramDelta((0.1, 0.2), (1, 0, 2), 0.75, 3)
    for sample in (
        EngineSample(1.5, "e", tpot_hist=hist, ttft_hist=EMPTY_HISTOGRAM),
        EngineSample(1.5, "e"),  # an older agent's: no histograms at all
    ):
        assert record_from_proto(record_to_proto(sample)) == sample
