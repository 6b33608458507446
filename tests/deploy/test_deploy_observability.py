"""The Grafana dashboard and the Prometheus alerts in deploy/, against the real collector.

Every metric and label name the dashboard and the rules use must be one a real
collector exports: it is started in-process, fed a complete batch over a real gRPC
stream (GPU, engine and agent-stats samples, verdicts, a duplicate, a gap and a poison
batch), and its /metrics text is scraped. ``promtool`` (Debian's ``prometheus``
package, .ci/install-prometheus.sh) checks and unit-tests the rules; a real
Prometheus server evaluates every dashboard query and the rules on the real output.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from rooftop.collector.config import CollectorConfig
from rooftop.collector.service import Collector
from rooftop.common.model import Bound, Cause, GpuSample, PodRef
from rooftop.v1 import telemetry_pb2 as pb
from tests.collector.helpers import H100, AgentStream, batch, engine, gpu, verdict
from tests.support import PROMETHEUS, PROMTOOL, prometheus_server, require_tool

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "rooftop.json"
RULES = REPO / "deploy" / "prometheus" / "rooftop-alerts.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "rooftop-alerts.test.yml"


# Without the binary a test skips, saying why; under CI it FAILS (tests.support.require_tool).
@pytest.fixture
def _needs_promtool() -> None:
    require_tool("promtool", PROMTOOL)


@pytest.fixture
def _needs_prometheus() -> None:
    require_tool("prometheus", PROMETHEUS)


needs_promtool = pytest.mark.usefixtures("_needs_promtool")
needs_prometheus = pytest.mark.usefixtures("_needs_prometheus")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PROMTOOL), *args], capture_output=True, text=True, timeout=120, check=False
    )


# --- PromQL names ---------------------------------------------------------------------

_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan", "atan2",
}  # fmt: skip
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GRAFANA_VAR = re.compile(r"\$(?:\{[^}]*\}|\w+)")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")


def _strip(expr: str) -> str:
    expr = _STRING.sub('""', expr)
    return _GRAFANA_VAR.sub(" ", expr)


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions,
    aggregations, keywords, label names (in ``{}`` or ``by (...)``) nor durations."""
    text = _strip(expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = _LABEL_LISTS.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name = match.group(1)
        if text[match.end() :].lstrip().startswith("(") or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def label_names(expr: str) -> set[str]:
    """Label names a PromQL expression matches on or groups by."""
    text = _strip(expr)
    labels = set()
    for body in re.findall(r"\{([^}]*)\}", text):
        labels |= set(_MATCHER.findall(body))
    for group in _LABEL_LISTS.findall(text):
        labels |= {g.strip() for g in group.split(",") if g.strip()}
    return labels


def test_name_extraction_finds_metrics_and_leaves_the_rest():
    expr = (
        'histogram_quantile(0.99, sum by (le, model) (rate(foo_seconds_bucket{a=~"$host"}'
        "[$__rate_interval]))) > 2 * on (host) group_left() bar_total offset 5m "
        'and ignoring (x) baz unless absent(qux{b="and"}) or 1e3 > bool inf'
    )
    assert metric_names(expr) == {"foo_seconds_bucket", "bar_total", "baz", "qux"}
    assert label_names(expr) == {"le", "model", "a", "host", "x", "b"}


# --- what the dashboard and the rules use ---------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows keep theirs inside
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    exprs = [
        (f"panel {p['title']!r} {t['refId']}", t["expr"])
        for p in dashboard_panels()
        for t in p.get("targets", [])
    ]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert match, f"variable {var['name']}: expected label_values(SELECTOR, LABEL)"
            exprs.append((f"variable {var['name']}", f"count by ({match[2]}) ({match[1]})"))
    return exprs


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def rule_exprs() -> list[tuple[str, str]]:
    return [(f"rule {r.get('alert') or r.get('record')}", r["expr"]) for r in rules()]


def concrete(expr: str) -> str:
    """A dashboard query with Grafana's variables filled in as "all"."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
    # Grafana variables only as whole regex matcher values: "all" is then ".*".
    variables = {v["name"] for v in dashboard()["templating"]["list"]}
    whole = re.sub(r'=~"\$(\w+)"', lambda m: '=~""' if m[1] in variables else m[0], expr)
    assert "$" not in whole, expr
    return _GRAFANA_VAR.sub(".*", expr)


# --- a real collector with everything in it -------------------------------------------


LLM_POD = (PodRef(pod="llm-0", namespace="inference", container="vllm"),)


def fed_collector() -> Collector:
    """A started collector that has applied samples of every kind, a duplicate, a gap, a
    poison batch and refused a call, so every metric family it has is on /metrics."""
    config = CollectorConfig(listen="127.0.0.1:0", insecure=True, prometheus_listen="127.0.0.1:0")
    collector = Collector(config.validated())
    collector.start()
    try:
        records = [
            # graph-captured decode: DRAM 0.848, tensor 0.022; held by a pod (k8s_* labels)
            gpu(0, pods=LLM_POD),
            # ... with a row remap pending: health degraded (hw.status), ECC counted.
            gpu(1, dram_bw_pct=20.0, tensor_active_pct=5.0, busy_pct=30.0,
                remap_pending=True, ecc_corrected_aggregate=3, xid_count=0),
            # ... one the agent may not open (NVML NO_PERMISSION): no data, not lost.
            GpuSample(time_s=time.time(), gpu_index=2, gpu_uuid="GPU-0002-uuid",
                      gpu_name=H100, lost=True, inaccessible="NO_PERMISSION"),
            engine(),  # 8 running, 2 waiting
        ]
        verdicts = [verdict(0, Bound.MEMORY), verdict(1, Bound.HOST, cause=Cause.CPU)]
        stats = pb.AgentStats(queued=1, sent=1, dropped_spool_full=0)
        with AgentStream(f"127.0.0.1:{collector.ingest.port}") as stream:
            stream.send(batch(1, records=records, verdicts=verdicts, stats=stats))
            stream.wait_acked(1)
            stream.send(batch(2, records=[pb.TraceRecord()]))  # poison: an empty record
            stream.wait(lambda acks: any(a.rejected_seq == 2 for a in acks))
            stream.send(batch(1, records=records, verdicts=verdicts, stats=stats))  # duplicate
            stream.wait(lambda acks: len(acks) >= 3)
        # A reconnected agent resuming past seq 3: its spool dropped it (a gap, counted).
        with AgentStream(f"127.0.0.1:{collector.ingest.port}") as stream:
            stream.send(batch(4, records=[gpu(0, pods=LLM_POD)], verdicts=verdicts, stats=stats))
            stream.wait_acked(4)
        # A token sent to this plaintext collector: refused before any handler, counted.
        metadata = [("authorization", "Bearer leaked")]
        with AgentStream(f"127.0.0.1:{collector.ingest.port}", metadata=metadata) as stream:
            stream.send(batch(5, records=[gpu(0)]))
            stream.wait_done()
            assert stream.error is not None
    except BaseException:
        collector.shutdown(timeout_s=2)
        raise
    return collector


def scrape(collector: Collector) -> str:
    url = f"http://127.0.0.1:{collector.telemetry.prometheus_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


@pytest.fixture(scope="module")
def exported() -> tuple[set[str], set[str]]:
    """(metric names, label names) on a fully fed collector's real /metrics."""
    collector = fed_collector()
    try:
        text = scrape(collector)
    finally:
        collector.shutdown(timeout_s=2)
    names: set[str] = set()
    labels: set[str] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.add(sample.name)
            labels |= set(sample.labels)
    assert "rooftop_collector_rejected_total" in names  # the poison batch made it
    assert "rooftop_collector_refused_total" in names  # and the refused call
    return names, labels


def test_every_metric_used_is_one_the_collector_exports(exported: tuple[set[str], set[str]]):
    names, _ = exported
    used = dashboard_exprs() + rule_exprs()
    unknown = {(where, n) for where, expr in used for n in metric_names(expr) if n not in names}
    assert not unknown, f"not exported by the collector: {sorted(unknown)}"
    assert {n for _, e in used for n in metric_names(e)}, "no metric found at all"


def test_every_label_used_is_one_the_collector_exports(exported: tuple[set[str], set[str]]):
    _, labels = exported
    used = dashboard_exprs() + rule_exprs()
    # job and instance come from Prometheus' scrape, not from the collector.
    unknown = {
        (where, label)
        for where, expr in used
        for label in label_names(expr)
        if label not in labels | {"job", "instance"}
    }
    assert not unknown, f"labels the collector does not export: {sorted(unknown)}"


# --- the dashboard's shape --------------------------------------------------------------


def test_dashboard_model():
    model = dashboard()
    assert model["schemaVersion"] >= 36 and model["uid"] and model["title"]
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"host", "gpu"} <= set(variables)
    # Kubernetes: namespace, workload and pod, by the labels the collector exports.
    for name, label in (("namespace", "k8s_namespace_name"), ("workload", "rooftop_workload_name"),
                        ("pod", "k8s_pod_name")):  # fmt: skip
        var = variables[name]
        assert var["query"]["query"].endswith(f", {label})"), name
        assert var["includeAll"] and var["allValue"] == ".*", name  # All keeps non-k8s GPUs
    panels = dashboard_panels()
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    graphs = [p for p in panels if p["type"] != "row"]
    for panel in graphs:
        where = f"panel {panel.get('title')!r}"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, where
        assert panel["targets"], where
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), where
        for target in panel["targets"]:
            assert target["expr"].strip(), where
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], where
    by_type = {p["type"] for p in graphs}
    assert "state-timeline" in by_type
    every = " ".join(t["expr"] for p in graphs for t in p["targets"])
    for needed in (
        "rooftop_gpu_bound",
        "rooftop_gpu_dram_activity",
        "rooftop_gpu_tensor_activity",
        "hw_gpu_utilization",
        "gen_ai_server_time_per_output_token_seconds_bucket",
        "gen_ai_server_time_to_first_token_seconds_bucket",
        "rooftop_engine_time_per_output_token_seconds",
        "rooftop_agent_dropped_total",
        "rooftop_agent_lag_seconds",
        "rooftop_collector_rejected_total",
        "rooftop_collector_duplicates_total",
        "rooftop_collector_refused_total",
        "rooftop_workload_bound",
    ):
        assert needed in every, f"the dashboard shows no {needed}"
    # Every per-GPU query follows the namespace and pod variables as well as host and GPU.
    for panel in graphs:
        for target in panel["targets"]:
            if '$gpu"' in target["expr"]:
                assert 'k8s_namespace_name=~"$namespace"' in target["expr"], panel["title"]
                assert 'k8s_pod_name=~"$pod"' in target["expr"], panel["title"]


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path):
    """promtool parses every dashboard query (as a recording rule)."""
    group = {
        "name": "dashboard",
        "rules": [
            {"record": f"rooftop:dashboard_query_{i}", "expr": concrete(expr)}
            for i, (_, expr) in enumerate(dashboard_exprs())
        ],
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [group]}, sort_keys=False))
    proc = promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- the rules, with promtool -----------------------------------------------------------


@needs_promtool
def test_promtool_checks_the_rules():
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules())} rules found" in proc.stdout


@needs_promtool
def test_promtool_unit_tests_pass():
    proc = promtool("test", "rules", str(RULE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {t["alertname"] for case in cases for t in case["alert_rule_test"]}
    assert {"RooftopGpuMemoryBound", "RooftopAgentSilent", "RooftopGpuLost",
            "RooftopGpuInaccessible"} <= tested


@needs_promtool
def test_promtool_unit_tests_catch_a_lost_alert_that_fires_for_an_inaccessible_gpu(
    tmp_path: Path,
):
    """A lost rule that also takes "unknown" fires on the GPU the agent may not open: the
    unit tests fail (operators would drain a healthy node)."""
    text = RULES.read_text()
    lost = 'expr: rooftop_gpu_bound{rooftop_bound="lost"} == 1'
    assert text.count(lost) == 1
    (tmp_path / RULES.name).write_text(
        text.replace(lost, 'expr: rooftop_gpu_bound{rooftop_bound=~"lost|unknown"} == 1')
    )
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    proc = promtool("test", "rules", str(tmp_path / RULE_TESTS.name))
    assert proc.returncode != 0
    assert "RooftopGpuLost" in proc.stdout + proc.stderr


@needs_promtool
def test_promtool_unit_tests_catch_a_weakened_rule(tmp_path: Path):
    """Drop the 2:1 ratio to 1:1 and the unit tests fail (a GPU at 0.55 vs 0.40 fires)."""
    text = RULES.read_text()
    assert text.count(">= 2 * rooftop_gpu_tensor_activity") == 1
    (tmp_path / RULES.name).write_text(
        text.replace(">= 2 * rooftop_gpu_tensor", ">= 1 * rooftop_gpu_tensor")
    )
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    proc = promtool("test", "rules", str(tmp_path / RULE_TESTS.name))
    assert proc.returncode != 0
    assert "RooftopGpuMemoryBound" in proc.stdout + proc.stderr


# --- a real Prometheus on the real collector --------------------------------------------


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            body = json.load(resp)
    except OSError:
        return None  # not up yet
    assert body["status"] == "success", body
    return body["data"]


def wait_for(what: str, fn: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Collector, str]]:
    """A fed collector scraped every second by a real Prometheus loaded with the rules."""
    require_tool("prometheus", PROMETHEUS)
    tmp = tmp_path_factory.mktemp("prometheus")
    collector = fed_collector()
    shutil.copy(RULES, tmp / RULES.name)
    port = collector.telemetry.prometheus_port
    assert port is not None
    try:
        with prometheus_server(tmp, port, rule_file=tmp / RULES.name) as base:
            yield collector, base
    finally:
        collector.shutdown(timeout_s=2)


@needs_prometheus
@pytest.mark.slow
def test_every_dashboard_query_returns_data_from_the_real_collector(live: tuple[Collector, str]):
    """Names and labels are right together: a selector with a wrong label value or a
    label the series lacks would come back empty."""
    _, base = live
    for where, expr in dashboard_exprs():
        query = concrete(expr)
        wait_for(f"{where}: {query}", lambda q=query: instant(base, q))


def instant(base: str, promql: str) -> list[dict[str, Any]]:
    """An instant query's result vector ([] while Prometheus is not up yet)."""
    data = api(base, "query", query=promql)
    return data["result"] if data else []


def alerts(base: str) -> list[dict[str, Any]]:
    data = api(base, "alerts")
    return data["alerts"] if data else []


@needs_prometheus
@pytest.mark.slow
def test_rules_fire_on_the_real_collector_output(live: tuple[Collector, str]):
    collector, base = live

    def active(name: str) -> list[dict[str, Any]]:
        return [a for a in alerts(base) if a["labels"]["alertname"] == name]

    # GPU 0: memory-bound, DRAM 0.848 vs tensor 0.022, 8 requests running -> pending (for 10m).
    (memory,) = wait_for("memory-bound pending", lambda: active("RooftopGpuMemoryBound"))
    assert memory["labels"]["hw_id"] == "GPU-0000-uuid" and memory["state"] == "pending"
    # GPU 1: host-bound (cpu) with 2 requests waiting -> pending (for 5m).
    (host,) = wait_for("host-bound pending", lambda: active("RooftopGpuHostBoundWithQueue"))
    assert host["labels"]["hw_id"] == "GPU-0001-uuid"
    assert host["labels"]["rooftop_bound_cause"] == "cpu"
    # The first poison batch creates the rejected counter at 1: still an alert.
    (rejected,) = wait_for("rejected", lambda: active("RooftopCollectorRejectingBatches"))
    assert rejected["labels"]["rooftop_reject_reason"] == "empty_record"
    assert rejected["state"] == "firing"
    (refusing,) = wait_for("refused", lambda: active("RooftopCollectorRefusingCredentials"))
    assert refusing["labels"]["rooftop_refuse_reason"] == "token_over_plaintext"
    assert not active("RooftopAgentSamplesDropped") and not active("RooftopAgentSilent")
    # GPU 2: NVML refuses the agent -> "unknown", cause inaccessible: its own alert
    # (pending, for 5m), never the lost one.
    (denied,) = wait_for("inaccessible pending", lambda: active("RooftopGpuInaccessible"))
    assert denied["labels"]["hw_id"] == "GPU-0002-uuid"
    assert not active("RooftopGpuLost")

    # The agent's spool overflows: its dropped counter rises from 0 to 3.
    dropped_total = 'rooftop_agent_dropped_total{rooftop_drop_reason="spool_full"}'
    wait_for("dropped counter scraped", lambda: instant(base, dropped_total))
    time.sleep(1.5)  # a second scrape of the 0
    with AgentStream(f"127.0.0.1:{collector.ingest.port}") as stream:
        stream.send(batch(5, stats=pb.AgentStats(queued=0, sent=5, dropped_spool_full=3)))
        stream.wait_acked(5)
    (dropped,) = wait_for("dropped alert", lambda: active("RooftopAgentSamplesDropped"))
    assert dropped["labels"]["rooftop_drop_reason"] == "spool_full"
    assert dropped["labels"]["rooftop_agent_id"] == "agent-1"
