"""One OTLP settings type: the agent's [otlp] and the collector's [[otlp]] read the same
keys and values, refuse the same mistakes, and honour OTEL_EXPORTER_OTLP_* as the
OpenTelemetry specification orders them (docs/METRICS.md, "OTLP export")."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rooftop.agent.config import load_config as load_agent
from rooftop.collector.config import load_config as load_collector
from rooftop.collector.fleet import Fleet
from rooftop.collector.otel import Telemetry
from rooftop.common.errors import ConfigError
from rooftop.common.otlp import OTLP_KEYS, OtlpExport, env_names, otlp_exports, parse_otlp_table
from tests.collector.otlp_receiver import HttpOtlpReceiver

ROOT = Path(__file__).resolve().parents[2]

TABLE = """endpoint = "https://otel.example:4318/"
protocol = "http/protobuf"
interval_s = 30
timeout_s = 2.5
headers = { "X-Api-Key" = "k", "x-tenant" = "t1" }
"""
EXPECTED = OtlpExport(
    endpoint="https://otel.example:4318/v1/metrics",
    protocol="http/protobuf",
    interval_s=30.0,
    timeout_s=2.5,
    headers=(("x-api-key", "k"), ("x-tenant", "t1")),
)


def agent_otlp(tmp_path: Path, table: str, env: dict[str, str] | None = None) -> OtlpExport | None:
    path = tmp_path / "agent.toml"
    path.write_text(f"[otlp]\n{table}" if table else "")
    return load_agent(path, env=env or {}).otlp


def collector_otlp(tmp_path: Path, table: str, env: dict[str, str] | None = None,
                   header: str = "[[otlp]]") -> tuple[OtlpExport, ...]:
    path = tmp_path / "collector.toml"
    path.write_text("[collector]\ninsecure = true\n" + (f"{header}\n{table}" if table else ""))
    return load_collector(path, env=env or {}).otlp


def test_the_same_otlp_table_is_read_alike_by_agent_and_collector(tmp_path: Path):
    assert agent_otlp(tmp_path, TABLE) == EXPECTED
    assert collector_otlp(tmp_path, TABLE) == (EXPECTED,)
    assert collector_otlp(tmp_path, TABLE, header="[otlp]") == (EXPECTED,)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('endpoint = "x:1"\nprotocol = "http"\n',
         "otlp.protocol: 'http' is not an OTLP protocol name; use 'http/protobuf'"),
        ('endpoint = "http://x:1"\nprotocol = "http/json"\n',
         "otlp.protocol: 'http/json' is not supported"),
        ('endpoint = "x:1"\nheaders = ["x-api-key=s3cret"]\n',
         r'otlp.headers: a list of "key=value" strings is no longer read; headers is a table: '
         r'headers = { "x-api-key" = "..." }'),
        ('endpoint = "x:1"\nprotocl = "grpc"\n', "unknown key otlp.protocl"),
        ('endpoint = "x:1"\ninterval_s = 0\n', "otlp.interval_s: must be > 0 seconds"),
        ('endpoint = "x:1"\ntimeout_s = true\n', "otlp.timeout_s: expected a number of seconds"),
        ('endpoint = "x:1"\nprotocol = "http/protobuf"\n',
         "otlp.endpoint: http/protobuf needs an http:// or https:// URL"),
        ('endpoint = "http://x:1"\nprotocol = "http/protobuf"\ninsecure = true\n',
         "otlp.insecure: applies to grpc only"),
        ('endpoint = "https://x:1"\ninsecure = true\n',
         "otlp.insecure: plaintext contradicts the https:// endpoint"),
        ('endpoint = "x:1"\nheaders = { "bad name" = "v" }\n',
         "otlp.headers: 'bad name' is not a valid header name"),
        ("interval_s = 5\n", "otlp.endpoint: required (or set OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"),
    ],
)
def test_both_roles_refuse_the_same_mistake_with_the_same_message(tmp_path: Path, table: str,
                                                                  message: str):
    errors = []
    for load in (agent_otlp, collector_otlp):
        with pytest.raises(ConfigError) as caught:
            load(tmp_path, table)
        errors.append(re.sub(r"^\S+\.toml:\d+: ", "", str(caught.value)))
    assert errors[0] == errors[1]
    assert message in errors[0] or re.search(message, errors[0]), errors[0]
    assert "s3cret" not in errors[0]  # header values may be secrets


def test_environment_fills_every_key_the_table_leaves_out():
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_HEADERS": "api-key=a%20b%3Dc, X-Tenant = t1",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",  # milliseconds
        "OTEL_METRIC_EXPORT_INTERVAL": "60000",  # milliseconds
    }
    assert parse_otlp_table({}, env=env) == OtlpExport(
        endpoint="http://otel:4318/v1/metrics",  # the generic endpoint is a base URL
        protocol="http/protobuf",
        interval_s=60.0,
        timeout_s=2.5,
        headers=(("api-key", "a b=c"), ("x-tenant", "t1")),
    )


def test_metrics_specific_variables_win_over_generic_ones():
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://generic:4318",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://metrics:9090/custom/path",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1000",
        "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT": "3000",
        "OTEL_EXPORTER_OTLP_HEADERS": "a=generic",
        "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "a=metrics",
    }
    exp = parse_otlp_table({}, env=env)
    # The metrics-specific endpoint is used as is: no /v1/metrics appended.
    assert exp.endpoint == "http://metrics:9090/custom/path"
    assert (exp.protocol, exp.timeout_s, exp.headers) == ("http/protobuf", 3.0, (("a", "metrics"),))


def test_the_file_wins_over_the_environment(tmp_path: Path):
    env = {
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://env:4318/v1/metrics",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        "OTEL_METRIC_EXPORT_INTERVAL": "1",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=from-env",
    }
    assert agent_otlp(tmp_path, TABLE, env) == EXPECTED
    assert collector_otlp(tmp_path, TABLE, env) == (EXPECTED,)
    partial = agent_otlp(tmp_path, 'endpoint = "grpc-host:4317"\n', env)
    assert partial == OtlpExport("grpc-host:4317", interval_s=0.001, timeout_s=0.001,
                                 headers=(("x-api-key", "from-env"),))


def test_an_endpoint_variable_alone_turns_the_export_on_in_both_roles(tmp_path: Path):
    assert agent_otlp(tmp_path, "") is None and collector_otlp(tmp_path, "") == ()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "otel:4317", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    expected = OtlpExport("otel:4317", insecure=True)
    assert agent_otlp(tmp_path, "", env) == expected
    assert collector_otlp(tmp_path, "", env) == (expected,)


def test_insecure_variable_counts_only_for_a_grpc_endpoint_without_a_scheme():
    env = {"OTEL_EXPORTER_OTLP_INSECURE": "true"}
    assert parse_otlp_table({"endpoint": "otel:4317"}, env=env).plaintext
    tls = parse_otlp_table({"endpoint": "https://otel:4317"}, env=env)
    assert not tls.insecure and not tls.plaintext
    assert parse_otlp_table({"endpoint": "http://otel:4317"}, env={}).plaintext  # the scheme


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}, "OTEL_EXPORTER_OTLP_TIMEOUT: expected millis"),
        ({"OTEL_METRIC_EXPORT_INTERVAL": "-5"}, "OTEL_METRIC_EXPORT_INTERVAL: must be > 0 milli"),
        ({"OTEL_EXPORTER_OTLP_INSECURE": "maybe"}, "OTEL_EXPORTER_OTLP_INSECURE: expected true or"),
        ({"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/json"},
         "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL: 'http/json' is not supported"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "a=1,s3cret"},
         "OTEL_EXPORTER_OTLP_HEADERS: entry 2 is not key=value"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT": "otel:1"},
         "OTEL_EXPORTER_OTLP_ENDPOINT: http/protobuf needs an http:// or https:// URL"),
    ],
)
def test_a_bad_environment_value_names_the_variable(tmp_path: Path, env: dict[str, str],
                                                    message: str):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318", **env}
    for load in (agent_otlp, collector_otlp):
        with pytest.raises(ConfigError) as caught:
            load(tmp_path, "", env)
        assert str(caught.value).startswith(message), caught.value
        assert "s3cret" not in str(caught.value)


def test_the_agents_former_rooftop_otlp_variables_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"ROOFTOP_OTLP_ENDPOINT is no longer read.*"
                                          r"OTEL_EXPORTER_OTLP_ENDPOINT"):
        load_agent(env={"ROOFTOP_OTLP_ENDPOINT": "otel:4317"})


def test_the_agent_takes_one_export_the_collector_several():
    tables = [{"endpoint": "a:1"}, {"endpoint": "b:2"}]
    assert [e.endpoint for e in otlp_exports(tables, env={}, many=True)] == ["a:1", "b:2"]
    with pytest.raises(ConfigError, match=r"write \[otlp\], not \[\[otlp\]\]"):
        otlp_exports(tables, env={}, many=False)
    with pytest.raises(ConfigError, match=r"^otlp\[1\]\.protocol: "):
        otlp_exports([{"endpoint": "a:1"}, {"endpoint": "b:2", "protocol": "udp"}],
                     env={}, many=True)


def test_an_environment_configured_http_export_reaches_the_metrics_path(tmp_path: Path):
    receiver = HttpOtlpReceiver()  # answers on /v1/metrics only
    base = receiver.endpoint.removesuffix("/v1/metrics")
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": base, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
           "OTEL_METRIC_EXPORT_INTERVAL": "60000"}
    (export,) = collector_otlp(tmp_path, "", env)
    telemetry = Telemetry(Fleet(), otlp=[export], host_name="h")
    try:
        assert telemetry.flush(timeout_s=10)
        receiver.wait_for(lambda reqs: len(reqs) >= 1)
    finally:
        telemetry.shutdown(timeout_s=5)
        receiver.stop()
    assert receiver.resource()["host.name"] == "h"


def test_metrics_doc_table_lists_every_key_its_default_and_variables():
    doc = (ROOT / "docs" / "METRICS.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*)$", doc, re.M))
    assert [k for k in rows if k in OTLP_KEYS] == list(OTLP_KEYS)
    defaults = {"protocol": '`"grpc"`', "interval_s": "`10.0`", "timeout_s": "`10.0`",
                "insecure": "`false`"}
    for key in OTLP_KEYS:
        cells = rows[key].split(" | ")
        if key in defaults:
            assert cells[0] == defaults[key]
            assert repr(getattr(OtlpExport("x:1"), key)).lower().strip("'") in cells[0].lower()
        for var in env_names(key):
            assert f"`{var}`" in cells[-1], (key, var)
