"""Remote write 1.0 from a real collector to a loopback receiver: every sample at its time."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterator

import pytest

from rooftop.collector.remote_write import _labels, _time_series, redacted_url
from rooftop.collector.service import Collector
from rooftop.common.model import Bound, GpuSample
from rooftop.prompb import remote_pb2
from tests.collector.helpers import AgentStream, as_columns, batch, gpu, scrape, verdict
from tests.collector.remote_write_receiver import Receiver, start_collector

DRAM = "rooftop_gpu_dram_activity"
POWER = "hw_power_watts"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def collector(receiver: Receiver) -> Iterator[Collector]:
    c = start_collector(receiver)
    yield c
    c.shutdown(timeout_s=2)


def ten_hz(start_s: float, n: int, gpus: int = 2, **metrics: object) -> list[GpuSample]:
    """``n`` ticks at 10 Hz of ``gpus`` GPUs, in the order an agent batches them."""
    return [gpu(i, start_s + k * 0.1, **metrics) for k in range(n) for i in range(gpus)]


def send(c: Collector, *batches: object, boot: str = "boot-1") -> None:
    with AgentStream(f"127.0.0.1:{c.ingest.port}") as stream:
        for b in batches:
            stream.send(b)  # type: ignore[arg-type]
        stream.wait_acked(max(b.seq for b in batches))  # type: ignore[attr-defined]
    assert c.flush(10)


def series_labels(text: str, name: str) -> list[dict[str, str]]:
    """The label sets of ``name`` in a Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        m = re.match(rf"{name}{{(.*)}} ", line)
        if m:
            out.append(dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1))))
    return out


def test_every_gpu_sample_arrives_with_its_own_timestamp(
    collector: Collector, receiver: Receiver
) -> None:
    start = time.time() - 30
    samples = ten_hz(start, 30)
    send(collector, batch(1, records=samples))

    dram = [(labels, t, v) for labels, t, v in receiver.points() if labels["__name__"] == DRAM]
    gpu0 = sorted(t for labels, t, _ in dram if labels["hw_id"] == "GPU-0000-uuid")
    # 30 ticks at 10 Hz: 30 points, each at the time the agent measured it (ms).
    assert gpu0 == [round((start + k * 0.1) * 1000) for k in range(30)]
    assert [v for _, _, v in dram] == [pytest.approx(0.848)] * 60
    assert collector.remote_writers[0].stats().sent >= 60


def test_remote_written_series_carry_the_prometheus_endpoints_names_and_labels(
    collector: Collector, receiver: Receiver
) -> None:
    send(collector, batch(1, records=ten_hz(time.time() - 5, 3)))
    text = scrape(collector)
    for name in (DRAM, POWER, "hw_gpu_utilization"):
        scraped = sorted(series_labels(text, name), key=lambda d: sorted(d.items()))
        written = {
            tuple(sorted((k, v) for k, v in labels.items() if k != "__name__"))
            for labels, _, _ in receiver.points()
            if labels["__name__"] == name
        }
        assert scraped, name
        assert written == {tuple(sorted(d.items())) for d in scraped}, name


def test_a_verdict_is_written_at_its_window_end(collector: Collector, receiver: Receiver) -> None:
    v = verdict(0, Bound.MEMORY, window_end_s=time.time() - 2, window_start_s=time.time() - 7)
    send(collector, batch(1, records=[gpu(0, time.time() - 3)], verdicts=[v]))
    bound = [
        (labels["rooftop_bound"], t, value)
        for labels, t, value in receiver.points()
        if labels["__name__"] == "rooftop_gpu_bound"
    ]
    assert ("memory", round(v.window_end_s * 1000), 1.0) in bound
    assert ("compute", round(v.window_end_s * 1000), 0.0) in bound


def test_requests_are_snappy_protobuf_with_the_remote_write_headers(
    collector: Collector, receiver: Receiver
) -> None:
    send(collector, batch(1, records=[gpu(0, time.time() - 1)]))
    headers, request = receiver.requests[0]
    assert headers["Content-Encoding"] == "snappy"
    assert headers["Content-Type"] == "application/x-protobuf"
    assert headers["X-Prometheus-Remote-Write-Version"] == "0.1.0"
    for ts in request.timeseries:
        names = [label.name for label in ts.labels]
        assert names == sorted(names)  # the protocol requires sorted labels


def test_a_resent_batch_writes_nothing_again_and_is_counted(
    collector: Collector, receiver: Receiver
) -> None:
    samples = ten_hz(time.time() - 20, 10)
    send(collector, batch(1, records=samples))
    before = sorted(receiver.points(), key=repr)
    # The same samples again under a new boot (an agent that resent its spool after a
    # restart): the receiver would refuse them as out of order; none is sent.
    send(collector, batch(1, boot_id="boot-2", records=samples), boot="boot-2")
    assert sorted(receiver.points(), key=repr) == before
    stats = collector.remote_writers[0].stats()
    assert stats.resent == stats.sent
    assert stats.rejected == 0


def test_stale_gpm_readings_are_not_written_under_a_new_timestamp(
    collector: Collector, receiver: Receiver
) -> None:
    t = time.time() - 5
    fresh = gpu(0, t)
    stale = dataclasses.replace(gpu(0, t + 0.1), gpm_stale=True)
    send(collector, batch(1, records=[fresh, stale]))
    times = {
        n: sorted(ts for labels, ts, _ in receiver.points() if labels["__name__"] == n)
        for n in (DRAM, POWER)
    }
    assert times[DRAM] == [round(t * 1000)]  # GPM: the fresh reading only
    assert times[POWER] == [round(t * 1000), round((t + 0.1) * 1000)]  # NVML: both


def test_server_errors_are_retried_and_client_errors_dropped_and_counted(
    receiver: Receiver,
) -> None:
    c = start_collector(receiver, min_backoff_s=0.01, max_backoff_s=0.02)
    try:
        receiver.script = [503, 500, 429]
        send(c, batch(1, records=[gpu(0, time.time() - 3)]))
        stats = c.remote_writers[0].stats()
        assert stats.retries == 3
        assert receiver.posts == 4
        assert stats.sent > 0 and stats.rejected == 0

        receiver.script = [400]
        send(c, batch(2, records=[gpu(0, time.time() - 2)]))
        stats = c.remote_writers[0].stats()
        assert stats.rejected > 0  # refused as malformed: dropped, not retried
        assert receiver.posts == 5
    finally:
        c.shutdown(timeout_s=2)


def test_a_full_queue_drops_the_oldest_samples_and_counts_them(receiver: Receiver) -> None:
    # A receiver that keeps failing: the queue fills, the oldest go, the count says so.
    receiver.script = [503] * 1000
    c = start_collector(receiver, queue_max_samples=50, max_samples_per_send=10, min_backoff_s=0.05)
    try:
        with AgentStream(f"127.0.0.1:{c.ingest.port}") as stream:
            for seq in range(1, 21):
                stream.send(batch(seq, records=ten_hz(time.time() - 60 + seq, 5)))
            stream.wait_acked(20)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and c.remote_writers[0].stats().dropped_queue_full == 0:
            time.sleep(0.05)
        stats = c.remote_writers[0].stats()
        assert stats.queued == 200
        assert stats.dropped_queue_full >= 200 - 50 - 10
    finally:
        receiver.script = []
        c.shutdown(timeout_s=2)


def test_the_outputs_counters_are_on_the_prometheus_endpoint(
    collector: Collector, receiver: Receiver
) -> None:
    send(collector, batch(1, records=ten_hz(time.time() - 5, 2)))
    text = scrape(collector)
    sent = [
        line
        for line in text.splitlines()
        if line.startswith("rooftop_collector_remote_write_samples_total{")
        and 'rooftop_remote_write_outcome="sent"' in line
    ]
    assert len(sent) == 1
    assert f'url_full="{receiver.url}"' in sent[0]
    assert float(sent[0].rsplit(" ", 1)[1]) == collector.remote_writers[0].stats().sent > 0


def test_a_password_in_the_url_never_reaches_labels_or_logs() -> None:
    assert redacted_url("https://user:hunter2@mimir:443/api/v1/push") == (
        "https://user:***@mimir:443/api/v1/push"
    )
    assert redacted_url("http://prom:9090/api/v1/write") == "http://prom:9090/api/v1/write"


@pytest.mark.parametrize(
    "ts_ms",
    [0, 1, 127, 128, 2**35 - 1, 2**35, 1_796_534_488_416, 2**42 - 1, 2**42, 2**62, -1],
)
def test_the_hand_encoded_write_request_parses_as_prompb_at_every_timestamp_width(
    ts_ms: int,
) -> None:
    key = (("__name__", "hw_power_watts"), ("host_name", "nöde-1"), ("hw_id", "GPU-1"))
    body = _time_series(_labels(key), {ts_ms: 650.25, ts_ms + 100: -0.0})
    request = remote_pb2.WriteRequest.FromString(body + body)
    assert len(request.timeseries) == 2
    ts = request.timeseries[0]
    assert [(label.name, label.value) for label in ts.labels] == list(key)
    assert [(s.timestamp, s.value) for s in ts.samples] == [(ts_ms, 650.25), (ts_ms + 100, -0.0)]


@pytest.mark.parametrize("columns", [False, True], ids=["records", "columns"])
def test_only_the_included_metrics_are_sent_and_counted(receiver: Receiver, columns: bool) -> None:
    c = start_collector(
        receiver, include=("rooftop_gpu_bound*", "hw_power_*"), exclude=("*_confidence",)
    )
    try:
        start = time.time() - 20
        v = verdict(0, Bound.MEMORY, window_start_s=start, window_end_s=start + 1)
        sent = batch(1, records=ten_hz(start, 10), verdicts=[v])
        send(c, as_columns(sent) if columns else sent)
        got = list(receiver.points())
        assert {labels["__name__"] for labels, _, _ in got} == {"rooftop_gpu_bound", POWER}
        gpu0 = sorted(
            t for lb, t, _ in got if lb["__name__"] == POWER and lb["hw_id"] == "GPU-0000-uuid"
        )
        assert gpu0 == [round((start + k * 0.1) * 1000) for k in range(10)]
        stats = c.remote_writers[0].stats()
        # sent counts what was sent; a left-out series is no outcome at all (never
        # dropped, rejected or resent), while queued still counts the records taken in.
        assert stats.sent == len(got)
        assert stats.queued == 21
        assert (stats.rejected, stats.resent, stats.dropped_queue_full) == (0, 0, 0)
        # Nothing was built for the left-out series: no label set of theirs is cached.
        cached = {key[0][1] for keys in c.remote_writers[0]._keys.values() for key in keys}
        assert cached == {POWER}
    finally:
        c.shutdown(timeout_s=2)


def test_verdicts_alone_are_sent_with_the_gpu_name_label_from_the_samples(
    receiver: Receiver,
) -> None:
    c = start_collector(receiver, include=("rooftop_gpu_bound",))
    try:
        t = time.time() - 10
        v = verdict(0, Bound.COMPUTE, window_start_s=t - 5, window_end_s=t)
        send(c, batch(1, records=[gpu(0, t - 1)], verdicts=[v]))
        got = list(receiver.points())
        assert {labels["__name__"] for labels, _, _ in got} == {"rooftop_gpu_bound"}
        assert {t_ms for _, t_ms, _ in got} == {round(t * 1000)}
        compute = [value for lb, _, value in got if lb["rooftop_bound"] == "compute"]
        assert compute == [1.0]
        # The endpoint's labels, the model included: learnt from the GPU's samples,
        # which are read for it though none of their series is sent.
        assert {lb["hw_model"] for lb, _, _ in got} == {gpu(0).gpu_name} != {""}
    finally:
        c.shutdown(timeout_s=2)


def test_excluded_gauges_leave_the_rest_of_a_gpu_sample_unchanged(
    collector: Collector, receiver: Receiver
) -> None:
    # The same samples through a filtered writer: the series it keeps hold exactly
    # the points the unfiltered one sends (a filter only removes whole series).
    samples = ten_hz(time.time() - 30, 5)
    send(collector, batch(1, records=samples))
    full = sorted((sorted(lb.items()), t, v) for lb, t, v in receiver.points())
    other = Receiver()
    c = start_collector(other, exclude=("hw_*", "rooftop_gpu_pipe_activity"))
    try:
        send(c, batch(1, records=samples))
        kept = sorted((sorted(lb.items()), t, v) for lb, t, v in other.points())
    finally:
        c.shutdown(timeout_s=2)
        other.close()

    def name(p: tuple[list[tuple[str, str]], int, float]) -> str:
        return dict(p[0])["__name__"]

    assert kept == [p for p in full if not name(p).startswith("hw_")
                    and name(p) != "rooftop_gpu_pipe_activity"]
    assert {name(p) for p in kept} >= {DRAM, "rooftop_gpu_sm_activity"}
