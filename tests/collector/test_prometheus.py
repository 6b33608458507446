"""The native Prometheus endpoint, held to what the OpenTelemetry exporter writes.

The oracle: the SDK's own ``PrometheusMetricReader`` on the same ``Telemetry``
(same instruments, same callbacks, same fleet). Every sample the oracle writes,
the endpoint writes, with the same name, labels and value; HELP and TYPE match.
"""

from __future__ import annotations

import gzip
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from rooftop.collector.fleet import Fleet, decode_batch
from rooftop.collector.otel import Telemetry
from rooftop.collector.prometheus import Family, format_value, metric_name, render
from rooftop.common.model import Bound, Cause, PodRef
from rooftop.v1 import telemetry_pb2 as pb
from tests.collector.helpers import batch, engine, gpu, verdict

NOW_S = 1_790_000_000.0

Samples = set[tuple[str, frozenset[tuple[str, str]], float]]


def fed_fleet() -> tuple[Fleet, list[tuple[object, float]]]:
    """Three nodes: GPUs of every verdict (one lost), engines, agent stats, drops,
    odd host names; the decoded batches, for the histograms."""
    fleet = Fleet(clock=lambda: NOW_S, forget_after_s=1e9)
    decoded = []
    hosts = ["node-1", 'we"ird\\host', "node-3"]
    for n, host in enumerate(hosts):
        t = NOW_S - 1 - n
        records = [
            # Health: ECC and XID counts (hw.errors), a failed GPU 0 on node-3 (hw.status).
            gpu(0, time_s=t, xid_count=n, xid_codes=(79,) if n == 2 else (),
                ecc_corrected_aggregate=5 * n, ecc_uncorrected_aggregate=0),
            # Kubernetes: GPU 1 shared by two pods (k8s.* attributes joined by ",").
            gpu(1, time_s=t, dram_bw_pct=20.0, busy_pct=12.5, sm_clock_mhz=1410.0,
                pods=(PodRef(f"llm-{n}", "serving", "vllm"), PodRef("probe", "ops", "x"))),
            gpu(2, time_s=t, lost=True) if n == 1 else gpu(2, time_s=t, tensor_active_pct=None),
            engine(time_s=t, engine_id=f"vllm:{8000 + n}", tpot_ms=4.0 + n, ttft_ms=30.0 * n),
            engine(time_s=t, engine_id="sglang:30000", tpot_ms=None, ttft_ms=None),
        ]
        verdicts = [
            verdict(0, Bound.MEMORY),
            verdict(1, Bound.HOST, cause=Cause.CPU, confidence=0.75),
            verdict(2, Bound.COMPUTE),
        ]
        stats = pb.AgentStats(queued=3 + n, sent=10 * n, acked=9 * n, reconnects=n,
                              dropped_spool_full=n, dropped_corrupt=2 * n)  # fmt: skip
        b = batch(1, agent_id=f"agent-{n}", hostname=host, records=records,
                  verdicts=verdicts, stats=stats)  # fmt: skip
        d = decode_batch(b, received_s=NOW_S)
        fleet.apply(d, received_s=NOW_S)
        decoded.append((d, NOW_S))
    # A clone of node-1 (same host name, same GPU uuids) under another agent id: the
    # same label sets twice, which must stay one series each, as the exporter makes them.
    clone = batch(1, agent_id="agent-clone", hostname="node-1",
                  records=[gpu(0, time_s=NOW_S - 1, power_w=300.0)],
                  verdicts=[verdict(0, Bound.IDLE)])  # fmt: skip
    fleet.apply(decode_batch(clone, received_s=NOW_S), received_s=NOW_S)
    fleet.count_refused("tls_cert_expired")
    fleet.count_refused("bad_token")
    return fleet, decoded


@pytest.fixture
def pair() -> Iterator[tuple[Telemetry, CollectorRegistry]]:
    """A Telemetry with its native endpoint, and the SDK exporter as the oracle."""
    fleet, decoded = fed_fleet()
    oracle = CollectorRegistry(auto_describe=True)
    telemetry = Telemetry(
        fleet,
        prometheus_listen="127.0.0.1:0",
        readers=[PrometheusMetricReader(registry=oracle, scope_info_enabled=False)],
        host_name="collector-host",
        clock=lambda: NOW_S + 5,
    )
    for d, received_s in decoded:
        telemetry.observe_batch(d, received_s)  # type: ignore[arg-type]
    telemetry.start()
    yield telemetry, oracle
    telemetry.shutdown(timeout_s=1)


def samples(text: str) -> tuple[Samples, dict[str, tuple[str, str]]]:
    """Every sample (name, labels without empty values, value); each family's help/type."""
    out: Samples = set()
    meta: dict[str, tuple[str, str]] = {}
    for family in text_string_to_metric_families(text):
        meta[family.name] = (family.documentation, family.type)
        for s in family.samples:
            labels = frozenset((k, v) for k, v in s.labels.items() if v != "")
            out.add((s.name, labels, s.value))
    return out, meta


def scrape(telemetry: Telemetry, headers: dict[str, str] | None = None) -> tuple[bytes, dict]:
    url = f"http://127.0.0.1:{telemetry.prometheus_port}/metrics"
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.read(), dict(resp.headers)


def test_the_endpoint_writes_exactly_what_the_opentelemetry_exporter_writes(pair):
    telemetry, oracle = pair
    body, headers = scrape(telemetry)
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    series = [line.rsplit(" ", 1)[0] for line in text.splitlines() if not line.startswith("#")]
    assert len(series) == len(set(series)), "a label set written twice"
    native, native_meta = samples(text)
    expected, expected_meta = samples(generate_latest(oracle).decode())
    # The instance id is random per Resource; both come from the same one.
    assert native == expected
    assert native_meta == expected_meta
    # And the fleet really is in there: a sanity check on the oracle itself.
    names = {name for name, _, _ in native}
    assert {"rooftop_gpu_bound", "hw_gpu_memory_usage_bytes", "rooftop_agent_dropped_total",
            "gen_ai_server_time_per_output_token_seconds_bucket", "target_info",
            "rooftop_collector_refused_total"} <= names  # fmt: skip
    assert {"k8s_pod_name", "k8s_namespace_name", "k8s_container_name"} <= {
        k for _, labels, _ in native for k, _ in labels}
    assert len(native) > 300


def test_label_values_with_quotes_and_backslashes_survive(pair):
    telemetry, _ = pair
    native, _ = samples(scrape(telemetry)[0].decode())
    hosts = {dict(labels).get("host_name") for _, labels, _ in native}
    assert 'we"ird\\host' in hosts


def test_gzip_when_asked_and_404_elsewhere(pair):
    telemetry, _ = pair
    body, headers = scrape(telemetry, {"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body).decode() == telemetry.prometheus_text()
    url = f"http://127.0.0.1:{telemetry.prometheus_port}/other"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=10)
    assert info.value.code == 404
    info.value.close()


def test_a_scrape_with_name_params_gets_only_those_families(pair):
    telemetry, _ = pair
    url = f"http://127.0.0.1:{telemetry.prometheus_port}/metrics?"
    query = "name[]=rooftop_gpu_bound&name[]=rooftop_collector_refused_total&name[]=nope"
    with urllib.request.urlopen(url + query, timeout=10) as resp:
        native, meta = samples(resp.read().decode())
    assert set(meta) == {"rooftop_gpu_bound", "rooftop_collector_refused"}
    everything, _ = samples(scrape(telemetry)[0].decode())
    # The same series those families have in the whole exposition, no fewer.
    wanted = ("rooftop_gpu_bound", "rooftop_collector_refused_total")
    kept = {s for s in everything if s[0] in wanted}
    assert native == kept and len(kept) > 10
    # A counter asked for without its _total suffix, and a histogram by its name.
    with urllib.request.urlopen(
        url + "name[]=rooftop_collector_refused&name[]=rooftop_collector_batch_lag_seconds",
        timeout=10,
    ) as resp:
        _, meta = samples(resp.read().decode())
    assert set(meta) == {"rooftop_collector_refused", "rooftop_collector_batch_lag_seconds"}
    # A histogram by one of its series' names; target_info only when named.
    with urllib.request.urlopen(
        url + "name[]=rooftop_collector_batch_lag_seconds_bucket&name[]=target_info", timeout=10
    ) as resp:
        _, meta = samples(resp.read().decode())
    assert set(meta) == {"rooftop_collector_batch_lag_seconds", "target_info"}


def test_the_operator_guides_name_params_get_those_families_only(pair):
    telemetry, _ = pair
    guide = (Path(__file__).parents[2] / "docs" / "OPERATOR-GUIDE.md").read_text()
    (listed,) = re.findall(r"'name\[\]': \[([^\]]+)\]", guide)
    names = [n.strip() for n in listed.split(",")]
    query = urllib.parse.urlencode([("name[]", n) for n in names])
    url = f"http://127.0.0.1:{telemetry.prometheus_port}/metrics?{query}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        _, meta = samples(resp.read().decode())
    assert sorted(meta) == sorted(names)


def test_histograms_are_cumulative_with_count_and_sum():
    from rooftop.collector.prometheus import NativeHistogram

    h = NativeHistogram("rooftop.collector.batch.lag", "s", "lag", (0.1, 1.0))
    assert h.lines() == []  # nothing before the first observation, as the SDK does
    for value in (0.05, 0.1, 0.5, 7.0):
        h.record(value, {})
    text = "\n".join(h.lines())
    assert 'rooftop_collector_batch_lag_seconds_bucket{le="0.1"} 2.0' in text
    assert 'rooftop_collector_batch_lag_seconds_bucket{le="1.0"} 3.0' in text
    assert 'rooftop_collector_batch_lag_seconds_bucket{le="+Inf"} 4.0' in text
    assert "rooftop_collector_batch_lag_seconds_count 4.0" in text
    assert "rooftop_collector_batch_lag_seconds_sum 7.65" in text


@pytest.mark.parametrize(
    "value",
    [
        0,
        1,
        0.955,
        1e-7,
        2.384185791015625e-07,
        1.98e9,
        7.516192768e10,
        123456789.0,
        1234567.5,
        -3.5,
        math.inf,
        -math.inf,
        1e22,
    ],  # fmt: skip
)
def test_values_are_written_as_prometheus_client_writes_them(value):
    assert format_value(value) == floatToGoString(value)


def test_nan_is_written_as_nan():
    assert format_value(math.nan) == "NaN"


@pytest.mark.parametrize(
    ("name", "unit", "expected"),
    [
        ("hw.gpu.memory.usage", "By", "hw_gpu_memory_usage_bytes"),
        ("rooftop.gpu.pcie.throughput", "By/s", "rooftop_gpu_pcie_throughput_bytes_per_second"),
        ("hw.gpu.utilization", "1", "hw_gpu_utilization"),
        ("rooftop.collector.refused", "{call}", "rooftop_collector_refused"),
        ("rooftop.gpu.sm.clock", "Hz", "rooftop_gpu_sm_clock_hertz"),
    ],
)
def test_metric_names_take_the_unit_suffix(name, unit, expected):
    assert metric_name(name, unit) == expected


def test_a_family_over_the_series_limit_is_cut_and_logged_once(caplog):
    class P:
        def __init__(self, i: int) -> None:
            self.value = float(i)
            self.attributes = {"i": str(i)}

    family = Family("rooftop.test.wide", "gauge", "1", "wide", lambda: [P(i) for i in range(10)])
    for _ in range(2):
        text = render([family], max_series=4)
    assert text.count("rooftop_test_wide{") == 4
    assert len([r for r in caplog.records if "over max_series_per_metric" in r.message]) == 1


def test_staleness_is_read_at_scrape_time(pair):
    telemetry, _ = pair
    native, _ = samples(scrape(telemetry)[0].decode())
    staleness = {v for n, _, v in native if n == "rooftop_agent_staleness_seconds"}
    assert staleness == {5.0}  # clock NOW_S + 5, every agent last seen at NOW_S
