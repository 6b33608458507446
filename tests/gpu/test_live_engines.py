"""Engine hooks on a real GPU: HF generate is host-bound, graph-captured decode is not.

Marked ``gpu``: skipped without an NVIDIA GPU; on a GPU host a missing torch or
transformers fails them (see conftest). The workload runs in its own process on the GPU
under test (CUDA_VISIBLE_DEVICES=<its UUID>) and reports TPOT through
``rooftop.agent.hooks`` to the socket that a live ``agentctl diagnose`` listens on,
explicitly tied to that GPU's NVML index by $ROOFTOP_ENGINE_GPUS.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

HERE = Path(__file__).resolve().parent


def live_diagnose_under(gpu, kind: str, tmp_path: Path, *extra: str) -> dict:
    # The engine hooks name GPUs by NVML index (what the agent samples), CUDA by UUID.
    env = gpu.env(ROOFTOP_HOOK_SOCKET=str(tmp_path / "hooks.sock"),
                  ROOFTOP_ENGINE_GPUS=str(gpu.nvml_index), ROOFTOP_HOOK_INTERVAL_S="0.5")
    diagnose = subprocess.Popen(
        [sys.executable, "-m", "rooftop", "diagnose", "--seconds", "8", "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    work = subprocess.Popen([sys.executable, str(HERE / "workloads.py"), kind, "20"],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        out, err = diagnose.communicate(timeout=120)
    finally:
        work.kill()
        work.wait()
    assert diagnose.returncode == 0, err
    return next(g for g in json.loads(out)["gpus"] if g["gpu_uuid"] == gpu.uuid)


def test_hf_generate_with_streamer_is_host_bound_with_tpot(real_gpu, transformers_installed,
                                                           tmp_path):
    loaded = live_diagnose_under(real_gpu, "hf_generate", tmp_path)
    assert loaded["verdict"] == "host-bound", loaded
    assert loaded["evidence"]["tpot_ms"]["value"] > 5


def test_graph_captured_8b_decode_is_memory_bound_and_mbu_matches_gpm(real_gpu, tmp_path):
    loaded = live_diagnose_under(real_gpu, "graph_decode", tmp_path, "--model", "llama-3-8b")
    assert loaded["verdict"] == "memory-bound", loaded
    evidence = loaded["evidence"]
    assert evidence["dram_pct"]["provenance"] == "gpm"
    app_mbu, gpm_dram = evidence["app_mbu_pct"]["value"], evidence["dram_pct"]["value"]
    assert abs(app_mbu - gpm_dram) <= 10, (app_mbu, gpm_dram)
