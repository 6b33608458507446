"""A REAL Prometheus server scrapes the collector; a verdict is read back via its HTTP API.

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
from rooftop.collector.service import Collector
from rooftop.common.model import Bound, Cause
from tests.collector.helpers import AgentStream, batch, engine, gpu, verdict
from tests.support import PROMETHEUS, prometheus_server, require_tool


@pytest.fixture(autouse=True)
def _needs_prometheus() -> None:
    """Skips without a prometheus binary; FAILS under CI (tests.support.require_tool)."""
    require_tool("prometheus", PROMETHEUS)


@pytest.fixture
def collector() -> Iterator[Collector]:
    config = CollectorConfig(
        listen="127.0.0.1:0", insecure=True, prometheus_listen="127.0.0.1:0"
    ).validated()
    c = Collector(config)
    c.start()
    yield c
    c.shutdown(timeout_s=2)


@pytest.fixture
def prometheus(collector: Collector, tmp_path: Path) -> Iterator[str]:
    port = collector.telemetry.prometheus_port
    assert port is not None
    with prometheus_server(tmp_path, port) as base:
        yield base


def query(base: str, promql: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            body = json.load(resp)
    except OSError:
        return []  # not up yet
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_query(base: str, promql: str, timeout_s: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = query(base, promql)
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"prometheus returned nothing for {promql!r} in {timeout_s} s")


@pytest.mark.slow
def test_prometheus_scrapes_verdicts_from_the_collector(collector: Collector, prometheus: str):
    with AgentStream(f"127.0.0.1:{collector.ingest.port}") as stream:
        stream.send(
            batch(
                1,
                records=[gpu(0), gpu(1), engine()],
                verdicts=[verdict(0, Bound.MEMORY), verdict(1, Bound.HOST, cause=Cause.CPU)],
            )
        )
        stream.wait_acked(1)

    up = wait_query(prometheus, 'up{job="rooftop"} == 1')
    assert up[0]["value"][1] == "1"

    memory = wait_query(prometheus, 'rooftop_gpu_bound{rooftop_bound="memory"} == 1')
    assert len(memory) == 1
    labels = memory[0]["metric"]
    assert labels["hw_id"] == "GPU-0000-uuid"
    assert labels["host_name"] == "gpu-node-1"
    assert labels["rooftop_gpu_index"] == "0"

    host = wait_query(
        prometheus, "rooftop_gpu_bound == 1 and on(hw_id) rooftop_gpu_bound_confidence"
    )
    causes = {r["metric"]["hw_id"]: r["metric"].get("rooftop_bound_cause") for r in host}
    assert causes == {"GPU-0000-uuid": None, "GPU-0001-uuid": "cpu"}

    zeros = wait_query(prometheus, 'rooftop_gpu_bound{hw_id="GPU-0000-uuid"} == 0')
    assert {r["metric"]["rooftop_bound"] for r in zeros} == {
        "idle", "compute", "host", "mixed", "lost", "unknown",
    }  # fmt: skip

    util = wait_query(prometheus, 'hw_gpu_utilization{hw_id="GPU-0000-uuid"}')
    assert float(util[0]["value"][1]) == pytest.approx(0.955)

    tpot = wait_query(prometheus, 'gen_ai_server_time_per_output_token_seconds_bucket{le="0.006"}')
    assert float(tpot[0]["value"][1]) == 1


@pytest.mark.slow
def test_a_scrape_job_with_name_params_stores_only_those_families(
    collector: Collector, tmp_path: Path
):
    # Prometheus sends `params: {'name[]': [...]}` URL-encoded; the collector must read
    # it as the families to render (no metric_relabel_configs here to hide a miss).
    with AgentStream(f"127.0.0.1:{collector.ingest.port}") as stream:
        stream.send(batch(1, records=[gpu(0)], verdicts=[verdict(0, Bound.MEMORY)]))
        stream.wait_acked(1)
    port = collector.telemetry.prometheus_port
    assert port is not None
    names = ("rooftop_gpu_bound", "rooftop_gpu_bound_confidence")
    with prometheus_server(tmp_path, port, scrape_names=names) as base:
        wait_query(base, 'rooftop_gpu_bound{rooftop_bound="memory"} == 1')
        stored = wait_query(base, 'count by (__name__) ({job="rooftop"})')
    scraped = {r["metric"]["__name__"] for r in stored}
    # Prometheus adds its own per-scrape series (up, scrape_*) to every target.
    assert {n for n in scraped if not n.startswith(("up", "scrape_"))} == set(names)
