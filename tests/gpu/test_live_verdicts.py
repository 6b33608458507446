"""Known workloads on a real GPU, diagnosed by the live sensors through the real CLI.

Marked ``gpu``: skipped cleanly on machines without an NVIDIA GPU (CI). On the H100 each
workload runs in its own process while ``agentctl diagnose --json`` samples it, and the
verdict must match what the workload is known to be.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
WORKLOAD_S = 12.0


def run_under_diagnose(kind: str, tmp_path: Path) -> dict:
    work = subprocess.Popen([sys.executable, str(HERE / "workloads.py"), kind, str(WORKLOAD_S)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert work.stdout is not None
        assert work.stdout.readline().strip() == "ready"
        trace = tmp_path / f"{kind}.jsonl"
        rec = subprocess.run(
            [sys.executable, "-m", "rooftop", "record", "--seconds", "4", "--out", str(trace)],
            capture_output=True, text=True, check=True,
        )
        assert trace.stat().st_size > 0, rec.stderr
        out = subprocess.run(
            [sys.executable, "-m", "rooftop", "diagnose", "--replay", str(trace), "--json"],
            capture_output=True, text=True, check=True,
        )
    finally:
        work.kill()
        work.wait()
    report = json.loads(out.stdout)
    return next(g for g in report["gpus"] if g["gpu_index"] == 0)


@pytest.mark.parametrize(
    ("kind", "verdict", "cause"),
    [
        ("gemv", "memory-bound", None),
        ("gemm", "compute-bound", None),
        ("host_stall", "host-bound", "cpu"),
        ("idle", "idle", None),
    ],
)
def test_known_workload_gets_its_verdict(real_gpu, tmp_path, kind, verdict, cause):
    gpu0 = run_under_diagnose(kind, tmp_path)
    assert gpu0["verdict"] == verdict, gpu0
    if cause is not None:
        assert gpu0["cause"] == cause, gpu0
    if kind in ("gemv", "gemm"):
        assert gpu0["evidence"]["dram_pct"]["provenance"] == "gpm"


def test_live_diagnose_json_covers_every_gpu(real_gpu):
    out = subprocess.run([sys.executable, "-m", "rooftop", "diagnose", "--seconds", "1", "--json"],
                         capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    import pynvml

    pynvml.nvmlInit()
    try:
        assert len(report["gpus"]) == pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
