"""``status --by`` and ``diagnose --collector --by``: rows per workload, namespace, node."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from rooftop.agent.workload_view import format_workloads, workload_rows, workloads_json
from rooftop.cli import main
from rooftop.collector.fleet import Fleet, decode_batch
from rooftop.collector.query import fleet_status
from rooftop.common.model import Bound, Cause, PodRef
from rooftop.v1 import telemetry_pb2 as pb
from tests.collector.helpers import H100, AgentStream, batch, engine, gpu, start_server, verdict

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
VLLM = PodRef("vllm-0", "serving", "vllm")
TRAINER = PodRef("trainer-7d9f8b6c5d-x2k4p", "research", "pytorch")


def fleet_batch(seq: int = 1, trainer: PodRef = TRAINER) -> pb.Batch:
    return batch(
        seq,
        records=[
            gpu(0, pods=(VLLM,)),
            gpu(1, pods=(VLLM,)),
            gpu(2, pods=(trainer,)),
            gpu(3),  # NVML's process 4242 only
            gpu(
                0,
                mig_uuid="MIG-7",
                gpu_instance_id=1,
                gpu_name=f"{H100} MIG 3g.40gb",
                pods=(PodRef("embed-0", "batch", "t\x1b[2Jei"),),
            ),  # fmt: skip
            engine(gpu_indices=(0, 1), pid=None, tpot_p50_ms=5.6, tpot_p99_ms=9.5),
        ],
        verdicts=[
            verdict(0, Bound.MEMORY, recommendations=("FP8 KV cache",)),
            verdict(1, Bound.MEMORY, recommendations=("FP8 KV cache",)),
            verdict(2, Bound.COMPUTE, recommendations=("FP8 GEMMs",)),
            verdict(3, Bound.HOST, cause=Cause.CPU, recommendations=("CUDA graphs",)),
        ],
    )


def status_of(*batches: pb.Batch) -> pb.FleetStatus:
    fleet = Fleet()
    for b in batches:
        now = time.time()
        fleet.apply(decode_batch(b, received_s=now), received_s=now)
    return fleet_status(fleet.snapshot(), detail=True)


def test_one_row_per_workload_with_gpus_verdicts_tpot_against_its_floor_and_advice():
    text = format_workloads(status_of(fleet_batch()), collector="c:1")
    lines = text.splitlines()
    assert lines[0] == "Rooftop workloads — collector c:1: 4 workload(s), 5 GPU(s) on 1 node(s)"
    assert lines[1].split() == ["WORKLOAD", "NAMESPACE", "GPUS", "VERDICTS", "TPOT", "p50",
                                "TPOT", "p99", "FLOOR", "PODS", "DO", "FIRST"]  # fmt: skip
    rows = {ln.split()[0]: ln for ln in lines[2:6]}
    llama = rows[f"model/{LLAMA}"]
    # Llama 3.1 8B on an H100 SXM: 4.5 ms per token at batch 1 (DESIGN §4).
    assert llama.split()[1:] == ["serving", "2", "2", "memory-bound", "5.6", "ms", "9.5", "ms",
                                 "4.5", "ms", "vllm-0/vllm", "FP8", "KV", "cache"]  # fmt: skip
    assert rows["deployment/trainer"].split()[1:5] == ["research", "1", "1", "compute-bound"]
    assert "CUDA graphs" in rows["gpu-node-1:pid"]
    # A MIG instance's pod; its container name escaped, never sent to the terminal raw.
    assert "embed-0/t\\x1b[2Jei" in rows["statefulset/embed"]
    assert "\x1b" not in text


def test_rows_by_namespace_and_by_node():
    fs = status_of(fleet_batch())
    assert [(r.key, r.gpus) for r in workload_rows(fs, "namespace")] == [
        ("(none)", 1),
        ("batch", 1),
        ("research", 1),
        ("serving", 2),
    ]
    (node,) = workload_rows(fs, "node")
    assert (node.key, node.gpus, node.dominant) == ("gpu-node-1", 5, Bound.MEMORY)
    text = format_workloads(fs, collector="c:1", by="node")
    assert "serving/vllm-0/vllm" in text  # by node, each pod says its namespace


def test_json_rows_follow_a_pod_that_moves():
    moved = PodRef("trainer-7d9f8b6c5d-q9w8z", "research", "pytorch")
    doc = workloads_json(status_of(fleet_batch(1), fleet_batch(2, moved)), collector="c:1")
    row = {r["key"]: r for r in doc["rows"]}["deployment/trainer"]
    assert row["pods"] == [{"pod": moved.pod, "namespace": "research", "container": "pytorch"}]
    assert (row["kind"], row["name"], row["namespace"]) == ("deployment", "trainer", "research")
    assert (row["gpus"], row["devices"], row["dominant"]) == (1, ["gpu-node-1:2"], "compute-bound")


@pytest.fixture
def served() -> Iterator[str]:
    server, _fleet = start_server()
    address = f"127.0.0.1:{server.port}"
    with AgentStream(address) as s:
        s.send(fleet_batch())
        s.wait_acked(1)
    yield address
    server.shutdown(timeout_s=1)


@pytest.mark.parametrize("command", [["status"], ["diagnose"]])
def test_status_and_diagnose_by_workload_ask_the_collector(served: str, command: list[str]):
    args = [*command, "--collector", served, "--insecure", "--by", "workload"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Rooftop workloads — collector {served}: 4 workload(s)")
    assert "deployment/trainer" in result.output
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert {r["key"] for r in json.loads(result.output)["rows"]} >= {"deployment/trainer"}


def test_by_without_a_collector_is_one_usage_line():
    result = CliRunner().invoke(main, ["diagnose", "--by", "workload", "--fake", "h100"])
    assert result.exit_code == 2
    assert "--by needs --collector" in result.output
    result = CliRunner().invoke(main, ["status", "--by", "pod", "--collector", "x:1"])
    assert result.exit_code == 2
    assert "'pod' is not one of 'workload', 'namespace', 'node'" in result.output
