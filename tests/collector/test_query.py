"""The fleet status: ``rooftop.collector.query`` (pure and over gRPC) and the CLI that reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rooftop.agent.credentials import ClientAuth
from rooftop.agent.fleet_query import query_fleet_status
from rooftop.agent.status import (
    STALE_AFTER_S,
    diagnosis_json,
    format_diagnosis,
    format_status,
    status_json,
)
from rooftop.cli import main
from rooftop.collector.fleet import Fleet, decode_batch
from rooftop.collector.ingest import IngestServer
from rooftop.collector.query import fleet_status
from rooftop.common.errors import Rejected, Retryable
from rooftop.common.model import Bound, Cause, GpuSample
from rooftop.common.wire import QUERY_SERVICE
from rooftop.v1 import telemetry_pb2 as pb
from tests.agent.test_fleet_query import status_rows
from tests.collector.helpers import AgentStream, batch, engine, gpu, start_server, verdict


def node1_batch(seq: int = 1) -> pb.Batch:
    return batch(
        seq,
        records=[gpu(0), gpu(1), gpu(2, lost=True), engine()],
        verdicts=[verdict(0, Bound.MEMORY), verdict(1, Bound.HOST, cause=Cause.CPU)],
        stats=pb.AgentStats(queued=4, dropped_spool_full=2, dropped_corrupt=1, reconnects=3),
    )


def node2_batch() -> pb.Batch:
    return batch(1, agent_id="agent-2", boot_id="b2", hostname="gpu-node-0",
                 records=[gpu(0)], verdicts=[verdict(0, Bound.COMPUTE)])  # fmt: skip


def applied(*batches: pb.Batch, clock: float | None = None) -> Fleet:
    fleet = Fleet(clock=(lambda: clock) if clock is not None else time.time)
    for b in batches:
        now = time.time()
        fleet.apply(decode_batch(b, received_s=now), received_s=now)
    return fleet


def test_nodes_gpus_verdicts_engines_and_counts():
    fleet = applied(node1_batch(), node2_batch())
    fleet.count_refused("bad_token")
    fleet.count_rejected("bad_enum")
    fs = fleet_status(fleet.snapshot(), acked=lambda key: {("agent-1", "boot-1"): 7}.get(key, 0))
    assert [n.hostname for n in fs.nodes] == ["gpu-node-0", "gpu-node-1"]  # sorted
    n = fs.nodes[1]
    assert (n.agent_id, n.boot_id, n.acked_seq, n.batches) == ("agent-1", "boot-1", 7, 1)
    assert n.stats.dropped_spool_full == 2 and n.stats.reconnects == 3 and n.stats.queued == 4
    assert n.HasField("lag_s") and 0 <= n.lag_s < 5
    assert [g.gpu_index for g in n.gpus] == [0, 1, 2]
    g0, g1, g2 = n.gpus
    assert g0.verdict.verdict == "memory-bound" and g0.engine.tpot_ms == 5.84  # by pid
    assert g1.verdict.cause == "cpu"
    assert not g2.HasField("verdict") and g2.sample.lost  # lost shows without detail
    assert not g0.HasField("sample")  # no detail: no samples...
    assert not g0.verdict.evidence and not g0.verdict.recommendations  # ...short verdicts
    assert [e.engine_id for e in n.engines] == ["vllm:8000"]
    assert dict(fs.collector.refused) == {"bad_token": 1}
    assert dict(fs.collector.rejected) == {"bad_enum": 1}
    assert fs.collector.batches == 2 and fs.collector.version


def test_detail_and_node_filter():
    snap = applied(node1_batch(), node2_batch()).snapshot()
    fs = fleet_status(snap, node="gpu-node-1", detail=True)
    (n,) = fs.nodes
    assert n.gpus[0].sample.busy_pct == 95.5
    assert n.gpus[0].verdict.evidence[0].name == "dram_pct"
    assert n.gpus[0].verdict.recommendations == ["FP8 KV cache"]
    assert [n.agent_id for n in fleet_status(snap, node="agent-2").nodes] == ["agent-2"]
    assert not fleet_status(snap, node="nope").nodes


def test_diagnose_from_the_collector_says_a_failed_gpu_first():
    failing = batch(
        1,
        records=[gpu(0), gpu(1, xid_codes=(79,), xid_count=1), gpu(2, lost=True)],
        verdicts=[verdict(0, Bound.MEMORY), verdict(1, Bound.IDLE)],
    )
    fs = fleet_status(applied(failing).snapshot(), detail=True)
    lines = format_diagnosis(fs, collector="c:1").splitlines()
    assert lines[0] == "GPU 1 (NVIDIA H100 80GB HBM3) FAILED: XID 79: GPU has fallen off the bus"
    assert lines[1].startswith("Rooftop diagnosis — ")
    # A plain lost GPU keeps its LOST line, not a second one.
    assert sum("GPU 2" in line for line in lines) == 1


def test_format_status_marks_stale_nodes():
    fleet = applied(node1_batch(), clock=time.time() + STALE_AFTER_S + 5)
    fs = fleet_status(fleet.snapshot())
    text = format_status(fs, collector="c:1")
    assert "STALE" in text
    doc = status_json(fs, collector="c:1")
    assert doc["nodes"][0]["stale"] is True
    assert doc["nodes"][0]["dropped"] == 3
    assert doc["nodes"][0]["gpus"][2] | {"lost": True} == doc["nodes"][0]["gpus"][2]


@pytest.fixture
def served() -> Iterator[tuple[IngestServer, str]]:
    server, _fleet = start_server()
    address = f"127.0.0.1:{server.port}"
    with AgentStream(address) as s:
        s.send(node1_batch(), node2_batch())
        s.wait(lambda acks: {a.boot_id for a in acks if a.acked_seq} >= {"boot-1", "b2"})
    yield server, address
    server.shutdown(timeout_s=1)


def test_query_over_grpc_and_health(served):
    _server, address = served
    fs = query_fleet_status(address, ClientAuth(insecure=True), detail=True)
    assert [n.acked_seq for n in fs.nodes] == [1, 1]
    with pytest.raises(Rejected, match="NOT_FOUND: no node 'nope'"):
        query_fleet_status(address, ClientAuth(insecure=True), node="nope")
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=QUERY_SERVICE), timeout=5
        )
    assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_query_of_an_unreachable_collector_is_retryable():
    with pytest.raises(Retryable, match="UNAVAILABLE"):
        query_fleet_status("127.0.0.1:1", ClientAuth(insecure=True), timeout_s=2)


@pytest.mark.parametrize("command", [["status", "--collector"], ["diagnose", "--collector"]],
                         ids=["status", "diagnose --collector"])
def test_tls_query_of_a_plaintext_collector_says_to_add_insecure_without_grpc_logs(
    served, command: list[str]
):
    """Without --insecure the CLI speaks TLS; a plaintext collector answers in HTTP/2. The
    user once got gRPC's C-core handshake log line; now one line saying what to add."""
    _server, address = served
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROOFTOP_", "GRPC_"))}
    proc = subprocess.run([sys.executable, "-m", "rooftop", *command, address, "--timeout", "5"],
                          capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 1
    assert proc.stderr == (f"agentctl: error: the collector at {address} speaks plaintext, "
                           "not TLS: add --insecure (or set ROOFTOP_INSECURE=1)\n")
    assert proc.stdout == ""
    again = subprocess.run([sys.executable, "-m", "rooftop", *command, address, "--insecure"],
                           capture_output=True, text=True, env=env, check=False)
    assert again.returncode == 0, again.stderr  # and the advice works


def test_agentctl_status(served, monkeypatch):
    _server, address = served
    result = CliRunner().invoke(main, ["status", "--collector", address, "--insecure"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"Rooftop fleet — collector {address} (rooftop ")
    assert "2 node(s), 4 GPU(s)" in lines[0]
    assert lines[1].split() == ["NODE", "AGENT", "SEEN", "STREAM", "LAG", "QUEUED", "DROPPED",
                                "RECONN", "GPU", "VERDICT", "CAUSE", "CONF", "TPOT",
                                "TTFT"]  # fmt: skip
    row = status_rows(result.output)[1]  # gpu-node-1's first GPU
    assert [row[k] for k in ("NODE", "AGENT", "QUEUED", "DROPPED", "RECONN")] == [
        "gpu-node-1", "agent-1", "4", "3", "3"]
    assert [row[k] for k in ("GPU", "VERDICT", "CAUSE", "CONF", "TPOT", "TTFT")] == [
        "0", "memory-bound", "-", "0.90", "5.8 ms", "42 ms"]
    assert lines[4].split()[:3] == ["1", "host-bound", "cpu"]
    assert lines[5].split()[:2] == ["2", "lost"]
    assert "refused: none" in result.output
    monkeypatch.setenv("ROOFTOP_COLLECTOR", address)
    result = CliRunner().invoke(main, ["status", "--insecure", "--json", "--node", "agent-2"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["collector"] == address
    assert [n["agent_id"] for n in doc["nodes"]] == ["agent-2"]
    assert doc["nodes"][0]["gpus"][0]["verdict"] == "compute-bound"


def test_diagnose_collector_json_carries_each_gpus_health_and_the_inaccessible_apart():
    failing = batch(
        1,
        records=[gpu(0), gpu(1, xid_codes=(79,), xid_count=1), gpu(2, lost=True),
                 GpuSample(time_s=time.time(), gpu_index=3, gpu_uuid="GPU-0003-uuid",
                           lost=True, inaccessible="NO_PERMISSION")],
        verdicts=[verdict(0, Bound.MEMORY), verdict(1, Bound.IDLE)],
    )
    fs = fleet_status(applied(failing).snapshot(), detail=True)
    (node,) = diagnosis_json(fs, collector="c:1")["nodes"]
    # As the agent-side `diagnose --json`: failed first, then unknown, then ok.
    health = {h["gpu_index"]: h for h in node["health"]}
    assert [h["gpu_index"] for h in node["health"]][:2] == [1, 2]
    assert health[1]["state"] == "failed" and health[1]["xid_codes"] == [79]
    assert health[1]["reasons"][0] == "XID 79: GPU has fallen off the bus"
    assert health[3]["state"] == "unknown"
    assert "not accessible to the agent (NVML NO_PERMISSION)" in health[3]["reasons"][0]
    assert health[0] == {"gpu_index": 0, "state": "ok", "reasons": [], "xid_codes": []}
    # Inaccessible is not lost: listed apart, and its status verdict is "unknown".
    assert node["lost_gpus"] == [2] and node["inaccessible_gpus"] == [3]
    doc = status_json(fs, collector="c:1")
    gpus = {g["gpu_index"]: g for g in doc["nodes"][0]["gpus"]}
    assert (gpus[3]["verdict"], gpus[3]["lost"], gpus[3]["inaccessible"]) == (
        "unknown", False, "NO_PERMISSION")
    assert (gpus[2]["verdict"], gpus[2]["lost"], gpus[2]["inaccessible"]) == ("lost", True, None)


def test_an_inaccessible_gpu_is_not_lost_in_the_short_status_either():
    denied = GpuSample(time_s=time.time(), gpu_index=3, lost=True, inaccessible="NO_PERMISSION")
    fs = fleet_status(applied(batch(1, records=[gpu(0), denied])).snapshot())
    (g3,) = [g for g in fs.nodes[0].gpus if g.gpu_index == 3]
    assert g3.sample.inaccessible == "NO_PERMISSION"
    row = next(line for line in format_status(fs, collector="c:1").splitlines()
               if " 3 " in f" {line} " and "unknown" in line)
    assert "inaccessible" in row and "lost" not in row


def test_agentctl_diagnose_from_the_collector(served):
    _server, address = served
    result = CliRunner().invoke(
        main, ["diagnose", "--collector", address, "--insecure", "--node", "gpu-node-1"]
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith(f"Rooftop diagnosis — gpu-node-1 (agent-1) via collector {address}")
    assert "GPU  verdict" in out and "do first" in out
    assert "5.8 ms" in out  # the engine's TPOT, attributed to GPU 0 by the collector
    assert "FP8 KV cache" in out
    assert "GPU 2 NVIDIA H100 80GB HBM3: LOST — NVML reports the GPU lost" in out
    result = CliRunner().invoke(main, ["diagnose", "--collector", address, "--insecure", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert [n["hostname"] for n in doc["nodes"]] == ["gpu-node-0", "gpu-node-1"]
    g0 = doc["nodes"][1]["gpus"][0]
    assert g0["verdict"] == "memory-bound" and g0["evidence"]["tpot_ms"]["provenance"] == "engine"
    assert doc["nodes"][1]["lost_gpus"] == [2] == doc["nodes"][1]["gpus_without_verdict"]


def test_diagnose_collector_usage_errors(served):
    _server, address = served
    result = CliRunner().invoke(main, ["diagnose", "--collector", address, "--fake", "h100"])
    assert result.exit_code == 2 and "excludes --replay and --fake" in result.output
    result = CliRunner().invoke(main, ["diagnose", "--node", "x", "--fake", "h100"])
    assert result.exit_code == 2 and "--node needs --collector" in result.output
    result = CliRunner().invoke(main, ["diagnose", "--collector", "--insecure"])
    assert result.exit_code == 2 and "ROOFTOP_COLLECTOR" in result.output
    result = CliRunner().invoke(main, ["diagnose", "--collector", address, "--insecure",
                                       "--node", "nope"])  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.startswith(f"agentctl: error: {address}: NOT_FOUND: no node 'nope'")


def test_an_inaccessible_gpu_is_said_so_never_lost_with_reset_advice():
    inaccessible = gpu(3, lost=True, inaccessible="NO_PERMISSION")
    lost = gpu(2, lost=True)
    fleet = applied(batch(1, records=[gpu(0), lost, inaccessible]))
    out = format_diagnosis(fleet_status(fleet.snapshot(), detail=True), collector="c:1")
    line3 = next(line for line in out.splitlines() if "GPU 3" in line)
    assert "NOT ACCESSIBLE to the agent (NVML NO_PERMISSION)" in line3
    assert "/dev/nvidia3" in line3 and "LOST" not in line3
    assert any("GPU 2" in line and "LOST" in line for line in out.splitlines())
