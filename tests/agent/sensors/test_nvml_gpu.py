"""NvmlBackend on a real GPU: skipped cleanly where NVML does not initialize."""

from __future__ import annotations

import time

import pytest

from rooftop.agent.sensors.nvml import NvmlBackend
from rooftop.common.errors import NvmlUnavailable

pytestmark = pytest.mark.gpu

# GPM exists from Hopper on; these names must report it.
GPM_GPUS = ("H100", "H200", "H800", "GH200", "B100", "B200", "GB200")


@pytest.fixture
def backend():
    try:
        real = NvmlBackend()  # the real pynvml: nvmlInit on this machine's driver
    except NvmlUnavailable as exc:
        pytest.skip(f"real NVML unavailable: {exc}")
    if not real.devices():
        real.close()
        pytest.skip("NVML initialized but sees no GPU")
    yield real
    real.close()


def test_real_device_gives_a_sane_sample(backend):
    info = backend.devices()[0]
    assert info.gpu_name.startswith("NVIDIA")
    assert info.gpu_uuid.startswith("GPU-")
    assert info.mem_total_bytes and info.mem_total_bytes > 1024**3
    time.sleep(0.15)  # past GPM's 100 ms since the priming sample
    sample = backend.read(0, time.time())
    assert sample.gpu_uuid == info.gpu_uuid
    assert sample.busy_pct is not None and 0 <= sample.busy_pct <= 100
    assert sample.mem_ctrl_pct is not None and 0 <= sample.mem_ctrl_pct <= 100
    assert sample.power_w is not None and 0 < sample.power_w < 2000
    assert sample.mem_used_bytes is not None and sample.mem_used_bytes <= info.mem_total_bytes
    assert sample.pcie_link_gen is not None and 1 <= sample.pcie_link_gen <= 6
    if any(name in info.gpu_name for name in GPM_GPUS):
        assert info.has_gpm
        assert sample.sm_active_pct is not None and 0 <= sample.sm_active_pct <= 100.5
        assert sample.dram_bw_pct is not None and 0 <= sample.dram_bw_pct <= 100.5
        assert sample.pcie_rx_bytes_per_s is not None and sample.pcie_rx_bytes_per_s >= 0
