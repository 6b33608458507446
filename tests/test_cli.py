"""agentctl diagnose / record as a user runs them (CliRunner, and real subprocesses)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import rooftop
from rooftop.agent.status import format_status, status_json
from rooftop.agent.trace import BUNDLED_RECORDINGS
from rooftop.cli import main
from rooftop.collector.fleet import decode_batch
from rooftop.common.model import Bound
from rooftop.v1 import telemetry_pb2 as pb
from tests.collector.helpers import AgentStream, batch, gpu, start_server, verdict

DATA = BUNDLED_RECORDINGS


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def diagnose_json(*args: str) -> dict:
    code, out, err = run("diagnose", "--json", *args)
    assert code == 0, err
    return json.loads(out)


def test_replay_json_has_one_item_per_gpu_with_required_keys():
    report = diagnose_json("--replay", str(DATA / "gemv_b1.jsonl"))
    (gpu,) = report["gpus"]
    assert {"gpu_index", "gpu_uuid", "verdict", "cause", "confidence", "evidence",
            "recommendations"} <= gpu.keys()
    assert gpu["verdict"] == "memory-bound"
    assert gpu["cause"] is None
    assert gpu["evidence"]["dram_pct"]["provenance"] == "gpm"
    assert gpu["recommendations"]


def test_replay_table_shows_verdict_evidence_and_advice():
    code, out, _ = run("diagnose", "--replay", str(DATA / "gemm_8192.jsonl"))
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("0 "))
    assert "compute-bound" in row
    assert "gpm" in row and "nvml" in row


def test_timeline_shows_how_the_regime_moved(tmp_path: Path):
    # GEMV then GEMM in one recording: the timeline must show both regimes in order.
    gemv = (DATA / "gemv_b16.jsonl").read_text().splitlines()
    gemm = (DATA / "gemm_8192.jsonl").read_text().splitlines()
    joined = tmp_path / "both.jsonl"
    # Both were recorded around 18:40; move the GEMM an hour later on the same timeline.
    shifted = [line.replace("T18:", "T19:") for line in gemm]
    joined.write_text("\n".join(gemv + shifted) + "\n")
    code, out, _ = run("diagnose", "--replay", str(joined), "--window", "2", "--timeline")
    assert code == 0
    timeline = out.split("timeline:")[1]
    assert timeline.index("memory-bound") < timeline.index("compute-bound")


def test_out_of_range_values_are_counted_in_output(tmp_path: Path):
    lines = (DATA / "idle.jsonl").read_text().splitlines()
    bad = json.loads(lines[3])
    bad["gpu"]["busy_pct"] = 250.0
    lines[3] = json.dumps(bad)
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = diagnose_json("--replay", str(path))
    assert report["skipped_records"] == 1
    assert report["gpus"][0]["verdict"] == "idle"
    _, out, _ = run("diagnose", "--replay", str(path))
    assert "skipped 1 record" in out


def test_malformed_trace_line_is_one_error_line_naming_file_and_line(tmp_path: Path):
    path = tmp_path / "broken.jsonl"
    path.write_text((DATA / "idle.jsonl").read_text().splitlines()[0] + "\n{oops\n")
    code, out, err = run("diagnose", "--replay", str(path))
    assert code == 1
    assert out == ""
    assert f"{path}:2: not valid JSON" in err
    assert "Traceback" not in err


def test_empty_trace_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    code, _, err = run("diagnose", "--replay", str(path))
    assert code == 1
    assert "empty trace" in err


def test_fake_h100_gemv_is_memory_bound_with_gpm_provenance():
    report = diagnose_json("--fake", "h100:gemv", "--seconds", "1.5")
    assert report["gpus"][0]["verdict"] == "memory-bound"
    assert report["gpus"][0]["evidence"]["dram_pct"]["provenance"] == "gpm"


@pytest.mark.slow
def test_fake_a100_without_gpm_falls_back_to_proxies_with_lower_confidence():
    h100 = diagnose_json("--fake", "h100:gemm", "--seconds", "1.5")["gpus"][0]
    a100 = diagnose_json("--fake", "a100:gemm", "--seconds", "1.5")["gpus"][0]
    assert a100["verdict"] == "compute-bound"
    assert a100["evidence"]["dram_pct"]["provenance"] == "proxy"
    assert a100["confidence"] < h100["confidence"]


def test_fake_gpus_each_get_a_row():
    report = diagnose_json("--fake", "h100:gemv,gemm,idle", "--seconds", "1.5")
    assert [g["verdict"] for g in report["gpus"]] == ["memory-bound", "compute-bound", "idle"]


def test_record_then_replay_gives_the_same_verdict(tmp_path: Path):
    out = tmp_path / "rec.jsonl"
    code, _, err = run("record", "--fake", "h100:gemm", "--seconds", "1.5", "--out", str(out))
    assert code == 0, err
    assert "wrote" in err
    report = diagnose_json("--replay", str(out))
    assert report["gpus"][0]["verdict"] == "compute-bound"


def test_unknown_fake_profile_is_a_usage_error_naming_it():
    code, _, err = run("diagnose", "--fake", "z900", "--seconds", "0.5")
    assert code == 2  # a bad option value: click's usage error, like --gpus 0
    assert "Invalid value for '--fake': unknown fake profile 'z900'; known: h100, a100" in err
    assert "Traceback" not in err


def _nvml_works() -> bool:
    probe = "import pynvml; pynvml.nvmlInit()"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True,
                          check=False).returncode == 0


@pytest.mark.skipif(_nvml_works(), reason="an NVIDIA driver is present here")
def test_no_driver_is_one_readable_line_pointing_at_replay():
    proc = subprocess.run([sys.executable, "-m", "rooftop", "diagnose", "--seconds", "0.5"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "--replay" in proc.stderr
    assert "driver" in proc.stderr.lower()
    assert len(proc.stderr.strip().splitlines()) <= 2
    assert proc.stdout == ""


def test_agentctl_help_and_version_run_as_a_module():
    """``python -m rooftop`` is agentctl: ``--version`` prints the installed package's
    version, ``--help`` lists every subcommand."""

    def agentctl(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "rooftop", *args], capture_output=True,
                              text=True, check=True).stdout

    assert rooftop.__version__ == importlib.metadata.version("rooftop")
    assert agentctl("--version") == f"agentctl, version {rooftop.__version__}\n"
    usage, _, commands = agentctl("--help").partition("\nCommands:\n")
    assert usage.startswith("Usage: python -m rooftop [OPTIONS] COMMAND [ARGS]...")
    assert [line.split()[0] for line in commands.splitlines() if line.strip()] == sorted(
        main.commands
    )


def test_fake_host_stall_names_the_cpu_cause():
    gpu = diagnose_json("--fake", "h100:host_stall", "--seconds", "1.5")["gpus"][0]
    assert (gpu["verdict"], gpu["cause"]) == ("host-bound", "cpu")
    assert gpu["evidence"]["process_cpu_pct"]["value"] >= 90


def test_fake_pinned_copy_names_the_pcie_cause():
    gpu = diagnose_json("--fake", "h100:pcie_copy", "--seconds", "1.5")["gpus"][0]
    assert (gpu["verdict"], gpu["cause"]) == ("host-bound", "pcie")


@pytest.mark.slow
def test_fake_alternating_gemv_gemm_is_mixed_not_host_bound():
    gpu = diagnose_json("--fake", "h100:gemv@0.5+gemm@0.5", "--seconds", "3")["gpus"][0]
    assert gpu["verdict"] == "mixed"
    assert set(gpu["regimes"]) >= {"memory-bound", "compute-bound"}


# ---- peer-supplied strings reach the terminal escaped ---------------------------------

HOSTILE_HOST = "gpu-node\x1b]0;pwned\x07\r\nINFO forged"


@pytest.fixture
def hostile_collector():
    """A real collector holding a host name with an OSC sequence, CR and LF (as a
    collector that did not validate identities would) and, through its real ingest, a
    verdict whose free-text rule and advice carry escape sequences."""
    server, fleet = start_server()
    address = f"127.0.0.1:{server.port}"
    clean = batch(1, agent_id="agent-x", boot_id="bx", hostname="placeholder",
                  records=[gpu(0)], verdicts=[verdict(0, Bound.MEMORY)])  # fmt: skip
    now = time.time()
    decoded = decode_batch(clean, received_s=now)
    fleet.apply(dataclasses.replace(decoded, hostname=HOSTILE_HOST), received_s=now)
    with AgentStream(address) as stream:
        stream.send(batch(1, agent_id="agent-y", boot_id="by", hostname="gpu-node-2",
                          records=[gpu(0)],
                          verdicts=[verdict(0, Bound.MEMORY, rule="dram > 80\x1b[2J\rX",
                                            recommendations=("FP8\x1b]0;t\x07 KV",))])
                     )  # fmt: skip
        stream.wait(lambda acks: any(a.acked_seq for a in acks))
    yield address
    server.shutdown(timeout_s=1)


@pytest.mark.parametrize("command", ["status", "diagnose"])
def test_peer_strings_are_printed_escaped_by_status_and_diagnose_collector(
    hostile_collector, command
):
    # color=True: click strips nothing, as on a terminal.
    result = CliRunner().invoke(
        main, [command, "--collector", hostile_collector, "--insecure"], color=True
    )
    assert result.exit_code == 0, result.output
    out = result.output
    # Before: the raw bytes reached the terminal (retitled it, cleared it, forged a line).
    assert not any(c in out for c in "\x1b\x07\r"), repr(out)
    assert "gpu-node\\x1b]0;pwned\\x07\\r\\nINFO forged" in out
    assert not any(line.startswith("INFO forged") for line in out.splitlines())
    if command == "diagnose":
        assert "dram > 80\\x1b[2J\\rX" in out
        assert "FP8\\x1b]0;t\\x07 KV" in out


def test_a_time_no_datetime_can_hold_is_shown_as_seconds_not_a_traceback():
    # An older collector passed absurd times through; rendering one raised ValueError.
    fs = pb.FleetStatus()
    fs.taken_time.seconds = 1_800_000_000
    node = fs.nodes.add(agent_id="a", hostname="h")
    node.last_seen_time.seconds = -10**13  # before year 1
    node.gpus.add(gpu_index=0).updated_time.seconds = 10**15
    assert "out of range" in status_json(fs, collector="c")["nodes"][0]["last_seen"]
    assert "out of range" in status_json(fs, collector="c")["nodes"][0]["gpus"][0]["updated"]
    assert format_status(fs, collector="c").count("\n") >= 2


@pytest.mark.parametrize(
    ("given", "expected"),
    [(None, "-event_engine_client"), ("", ""), ("-pick_first", "-pick_first")],
)
def test_the_agent_runs_grpc_without_its_event_engine_client_unless_the_operator_says(
    monkeypatch: pytest.MonkeyPatch, given: str | None, expected: str
):
    # gRPC reads GRPC_EXPERIMENTS once, as it is imported: the command sets it first.
    import os  # noqa: PLC0415

    import rooftop.agent.daemon  # noqa: PLC0415

    environ = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if given is not None:
        environ["GRPC_EXPERIMENTS"] = given
    monkeypatch.setattr(os, "environ", environ)
    seen: list[str | None] = []

    def run_agent(*args: object, **kwargs: object) -> int:
        seen.append(os.environ.get("GRPC_EXPERIMENTS"))
        return 0

    monkeypatch.setattr(rooftop.agent.daemon, "run_agent", run_agent)
    assert CliRunner().invoke(main, ["agent", "--fake", "h100"]).exit_code == 0
    assert seen == [expected]
