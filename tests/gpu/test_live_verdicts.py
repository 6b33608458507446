"""Known workloads on a real GPU, diagnosed by the live sensors through the real CLI.

Marked ``gpu``: skipped cleanly on machines without an NVIDIA GPU (CI); on a GPU host
without torch they fail (see conftest). On the H100 each workload runs in its own
process on the GPU under test (picked by UUID) while ``agentctl record`` samples every
GPU, and that GPU's verdict must match what the workload is known to be.
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


def run_under_diagnose(gpu, kind: str, tmp_path: Path) -> dict:
    work = subprocess.Popen([sys.executable, str(HERE / "workloads.py"), kind, str(WORKLOAD_S)],
                            stdout=subprocess.PIPE, text=True, env=gpu.env())
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
    # By UUID: the GPU the workload ran on, whatever index either numbering gives it.
    return next(g for g in report["gpus"] if g["gpu_uuid"] == gpu.uuid)


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
    loaded = run_under_diagnose(real_gpu, kind, tmp_path)
    assert loaded["gpu_index"] == real_gpu.nvml_index, loaded
    assert loaded["verdict"] == verdict, loaded
    if cause is not None:
        assert loaded["cause"] == cause, loaded
    if kind in ("gemv", "gemm"):
        assert loaded["evidence"]["dram_pct"]["provenance"] == "gpm"


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
