"""A REAL Prometheus receives the collector's remote write: every 10 Hz sample, once.

Needs the ``prometheus`` binary (``.ci/install-prometheus.sh`` installs Debian's).
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from rooftop.collector.config import CollectorConfig
from rooftop.collector.remote_write import RemoteWrite
from rooftop.collector.service import Collector
from rooftop.common.model import Bound
from tests.collector.helpers import batch, gpu, verdict
from tests.collector.test_remote_write import send, ten_hz
from tests.support import PROMETHEUS, prometheus_server, require_tool

pytestmark = pytest.mark.slow

SERIES = 'rooftop_gpu_dram_activity{hw_id="GPU-0000-uuid"}'


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[str]:
    require_tool("prometheus", PROMETHEUS)
    # The out-of-order window: what makes a batch re-applied by another collector after
    # a failover a no-op there (docs/OPERATOR-GUIDE.md recommends it).
    with prometheus_server(
        tmp_path, None, remote_write_receiver=True, out_of_order_window="30m"
    ) as base:
        yield base


def collector_writing_to(base: str, **remote: object) -> Collector:
    rw = RemoteWrite(url=f"{base}/api/v1/write", batch_send_deadline_s=0.05, **remote)  # type: ignore[arg-type]
    config = CollectorConfig(
        listen="127.0.0.1:0", insecure=True, prometheus_listen="", remote_write=(rw,)
    ).validated()
    c = Collector(config)
    c.start()
    return c


def points(base: str, selector: str) -> list[tuple[float, str]]:
    """The raw samples Prometheus holds for ``selector`` over the last hour."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": f"{selector}[1h]"})
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                body = json.load(resp)
            result = body["data"]["result"]
            if result:
                return [(float(t), v) for t, v in result[0]["values"]]
        except OSError:
            pass  # not up yet
        if time.monotonic() > deadline:
            return []
        time.sleep(0.2)


def wait_ready(base: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("prometheus did not become ready")


def test_a_10hz_agent_lands_10_points_per_second_and_a_replay_changes_nothing(
    prometheus: str,
) -> None:
    wait_ready(prometheus)
    start = time.time() - 120
    samples = ten_hz(start, 50)  # 5 s of an 8-GPU-style agent at 10 Hz (2 GPUs)
    v = verdict(0, Bound.MEMORY, window_start_s=start, window_end_s=start + 5)
    first = collector_writing_to(prometheus)
    try:
        send(first, batch(1, records=samples[:50]), batch(2, records=samples[50:], verdicts=[v]))
        assert first.remote_writers[0].stats().rejected == 0
    finally:
        first.shutdown(timeout_s=5)

    got = points(prometheus, SERIES)
    times = [t for t, _ in got]
    assert len(times) == 50
    assert times == sorted(times)
    # 10 points per second, each at the time the agent measured it.
    assert [round(b - a, 3) for a, b in zip(times, times[1:], strict=False)] == [0.1] * 49
    assert times[0] == pytest.approx(start, abs=1e-3)
    bound = points(prometheus, 'rooftop_gpu_bound{hw_id="GPU-0000-uuid",rooftop_bound="memory"}')
    assert bound == [(pytest.approx(start + 5, abs=1e-3), "1")]

    # A failover: another collector, with no memory of what the first sent, applies the
    # same batches again and writes them. Prometheus ends up with exactly the same data.
    second = collector_writing_to(prometheus)
    try:
        send(second, batch(1, records=samples[:50]), batch(2, records=samples[50:], verdicts=[v]))
        stats = second.remote_writers[0].stats()
        assert stats.sent > 0 and stats.rejected == 0
    finally:
        second.shutdown(timeout_s=5)
    assert points(prometheus, SERIES) == got
    one_gpu = gpu(0, start + 10)  # and new samples still land after the replay
    third = collector_writing_to(prometheus)
    try:
        send(third, batch(1, boot_id="boot-3", records=[one_gpu]))
    finally:
        third.shutdown(timeout_s=5)
    assert len(points(prometheus, SERIES)) == 51


def names_held(base: str) -> list[str]:
    """Every metric name Prometheus holds (it scrapes nothing here: only what was written)."""
    with urllib.request.urlopen(f"{base}/api/v1/label/__name__/values", timeout=5) as resp:
        return sorted(json.load(resp)["data"])


def test_prometheus_receives_only_the_included_series_each_sample_at_its_time(
    prometheus: str,
) -> None:
    wait_ready(prometheus)
    start = time.time() - 60
    samples = ten_hz(start, 30)
    v = verdict(0, Bound.MEMORY, window_start_s=start, window_end_s=start + 3)
    c = collector_writing_to(
        prometheus, include=("rooftop_gpu_bound*", "rooftop_gpu_dram_*"), exclude=("*_confidence",)
    )
    try:
        send(c, batch(1, records=samples, verdicts=[v]))
        assert c.remote_writers[0].stats().rejected == 0
    finally:
        c.shutdown(timeout_s=5)

    got = points(prometheus, SERIES)  # waits for the data to be queryable
    assert names_held(prometheus) == ["rooftop_gpu_bound", "rooftop_gpu_dram_activity"]
    # Every 10 Hz sample of the one gauge kept, at the time the agent measured it.
    assert [t for t, _ in got] == [pytest.approx(start + k * 0.1, abs=1e-3) for k in range(30)]
    bound = points(prometheus, 'rooftop_gpu_bound{hw_id="GPU-0000-uuid",rooftop_bound="memory"}')
    assert bound == [(pytest.approx(start + 3, abs=1e-3), "1")]
