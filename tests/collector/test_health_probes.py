"""/healthz and /readyz beside /metrics: what deploy/k8s's collector probes ask.

A real collector on loopback ports; the probes must mean something: ready only while
ingest serves, live only while ingest's event loop answers.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from rooftop.collector import ingest
from rooftop.collector.config import CollectorConfig
from rooftop.collector.prometheus import PrometheusServer
from rooftop.collector.service import Collector


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture
def collector() -> Iterator[Collector]:
    config = CollectorConfig(listen="127.0.0.1:0", insecure=True, prometheus_listen="127.0.0.1:0")
    collector = Collector(config.validated())
    collector.start()
    yield collector
    collector.shutdown(timeout_s=1)


def port_of(collector: Collector) -> int:
    port = collector.telemetry.prometheus_port
    assert port is not None
    return port


def test_probes_pass_while_ingest_serves(collector: Collector):
    port = port_of(collector)
    assert get(port, "/healthz") == (200, "ok\n")
    assert get(port, "/readyz") == (200, "ok\n")
    status, body = get(port, "/metrics")
    assert status == 200 and "# TYPE" in body  # scrapes unchanged
    assert get(port, "/nope")[0] == 404


def test_not_ready_and_not_live_once_ingest_stopped(collector: Collector):
    port = port_of(collector)
    collector.ingest.shutdown(timeout_s=0.1)
    assert get(port, "/readyz") == (503, "ingest stopped\n")
    assert get(port, "/healthz") == (503, "ingest stopped\n")


def test_a_wedged_ingest_loop_fails_liveness(collector: Collector):
    port = port_of(collector)
    loop = collector.ingest._loop
    assert loop is not None
    release = threading.Event()
    loop.call_soon_threadsafe(release.wait, 10)  # a handler that blocks the loop
    try:
        assert get(port, "/healthz") == (
            503,
            "ingest event loop did not answer within 1 s\n",
        )
    finally:
        release.set()
    assert get(port, "/healthz") == (200, "ok\n")  # answers again: live again


def test_a_batch_stuck_on_the_apply_thread_fails_liveness(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(ingest, "_APPLY_STUCK_S", 0.2)  # 10 s in production
    port = port_of(collector)
    loop, applier = collector.ingest._loop, collector.ingest._applier
    assert loop is not None
    release = threading.Event()
    # A batch whose apply never returns (a wedged exporter): every ack waits behind it.
    stuck = asyncio.run_coroutine_threadsafe(applier.run(lambda: release.wait(10)), loop)
    try:
        deadline = time.monotonic() + 5
        while applier.busy_s() <= 0.3 and time.monotonic() < deadline:
            time.sleep(0.02)
        for path in ("/healthz", "/readyz"):
            status, body = get(port, path)
            assert status == 503
            assert body.startswith("ingest apply thread has been on one batch for "), body
    finally:
        release.set()
    stuck.result(10)
    assert get(port, "/healthz") == (200, "ok\n")  # the batch finished: live again


def test_a_failing_check_answers_503_with_its_reason():
    calls = []

    def check() -> str | None:
        calls.append(1)
        return "not yet" if len(calls) == 1 else None

    server = PrometheusServer("127.0.0.1", 0, lambda names: "", checks={"/readyz": check})
    try:
        assert get(server.port, "/readyz") == (503, "not yet\n")
        assert get(server.port, "/readyz") == (200, "ok\n")
        assert get(server.port, "/healthz")[0] == 404  # only the paths it was given
    finally:
        server.close()
