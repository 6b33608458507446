"""GPU tests run only where a real NVIDIA driver, a GPU and torch with CUDA are present."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _real_gpu_reason() -> str | None:
    probe = (
        "import pynvml; pynvml.nvmlInit(); n = pynvml.nvmlDeviceGetCount(); "
        "import torch; assert torch.cuda.is_available(), 'torch has no CUDA'; print(n)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=False, timeout=120)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["unknown"])[-1]
        return f"no usable NVIDIA GPU here ({last})"
    if int(result.stdout.strip() or 0) < 1:
        return "NVML sees no GPU"
    return None


@pytest.fixture(scope="session")
def real_gpu() -> None:
    """Skip unless NVML initializes, sees a GPU, and torch can use CUDA."""
    reason = _real_gpu_reason()
    if reason:
        pytest.skip(reason)
