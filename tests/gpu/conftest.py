"""GPU tests run where NVML sees a GPU; there, torch with CUDA is required, not optional.

Without a driver or a GPU every test here skips. With a GPU, a missing torch (or one that
cannot use that GPU) fails the tests: skipping would pass a GPU host that tested
nothing. ``scripts/gpu-check.sh`` installs what they need.

The GPU under test is NVML's GPU 0, and its workloads run with
``CUDA_VISIBLE_DEVICES=<its UUID>``: CUDA numbers GPUs fastest-first and NVML by PCI
bus, so on a mixed host ``cuda:0`` can be another GPU than NVML's 0. By UUID, the
workload's ``cuda:0`` is the GPU whose samples the test reads.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

FIX = "run scripts/gpu-check.sh"

_NVML_PROBE = """
import json, pynvml
pynvml.nvmlInit()
gpus = []
for i in range(pynvml.nvmlDeviceGetCount()):
    h = pynvml.nvmlDeviceGetHandleByIndex(i)
    uuid, name = pynvml.nvmlDeviceGetUUID(h), pynvml.nvmlDeviceGetName(h)
    gpus.append([i, uuid.decode() if isinstance(uuid, bytes) else uuid,
                 name.decode() if isinstance(name, bytes) else name])
print(json.dumps(gpus))
"""

# Run with CUDA_VISIBLE_DEVICES=<UUID>: exactly that GPU must be CUDA's only device.
_TORCH_PROBE = """
try:
    import torch
except ImportError as e:
    print("missing:", e)
    raise SystemExit(0)
if not torch.cuda.is_available():
    print("nocuda:", torch.__version__, "CUDA", torch.version.cuda)
elif torch.cuda.device_count() != 1:
    print("count:", torch.cuda.device_count())
else:
    print("ok:", torch.__version__)
"""


@dataclass(frozen=True)
class GpuUnderTest:
    """The GPU the tests load: its NVML index and the UUID CUDA is given."""

    nvml_index: int
    uuid: str
    name: str

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a workload on this GPU (and only this GPU)."""
        return {**os.environ, "CUDA_VISIBLE_DEVICES": self.uuid, **extra}


def _probe(program: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # In a child: nvmlInit and CUDA init are process-wide, and torch is slow to import.
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          check=False, timeout=180, env=env)


def _nvml_gpus() -> list[GpuUnderTest] | str:
    """The GPUs NVML sees, or why there are none (no driver...)."""
    result = _probe(_NVML_PROBE)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["unknown"])[-1]
        return f"no usable NVIDIA GPU here ({last})"
    return [GpuUnderTest(int(i), uuid, name) for i, uuid, name in json.loads(result.stdout)]


def torch_problem(gpu: GpuUnderTest) -> str | None:
    """Why torch cannot run a workload on ``gpu``; None when it can."""
    result = _probe(_TORCH_PROBE, env=gpu.env())
    out = result.stdout.strip()
    if result.returncode != 0 or not out:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return f"torch cannot start on {gpu.uuid}: {last}: {FIX}"
    kind, _, detail = out.partition(": ")
    if kind == "missing":
        return f"torch is missing: {FIX} ({detail})"
    if kind == "nocuda":
        return (f"torch {detail} cannot use {gpu.name} {gpu.uuid} (a CPU-only wheel, or a "
                f"driver older than its CUDA?): {FIX}")
    if kind == "count":
        return f"CUDA_VISIBLE_DEVICES={gpu.uuid} should show torch 1 GPU, it shows {detail}"
    return None


@pytest.fixture(scope="session")
def real_gpu() -> GpuUnderTest:
    """NVML's GPU 0. Skip without a driver or GPU; fail when torch cannot use the GPU."""
    gpus = _nvml_gpus()
    if isinstance(gpus, str):
        pytest.skip(gpus)
    if not gpus:
        pytest.skip("NVML sees no GPU")
    gpu = gpus[0]
    problem = torch_problem(gpu)
    if problem:
        pytest.fail(problem, pytrace=False)
    return gpu


@pytest.fixture(scope="session")
def transformers_installed(real_gpu: GpuUnderTest) -> None:
    """Fail, on a GPU host, when transformers is not installed (the HF workload needs it)."""
    if importlib.util.find_spec("transformers") is None:
        pytest.fail(f"transformers is missing: {FIX}", pytrace=False)
