"""GpmSampler on its own, over the fake NVML library."""

from __future__ import annotations

import dataclasses

import pytest

from rooftop.agent.sensors.fake import FakeNvmlLibrary
from rooftop.agent.sensors.gpm import GPM_METRIC_FIELDS, GpmReading, GpmSampler
from rooftop.agent.sensors.nvml import NvmlBackend
from rooftop.common.errors import DeviceLost

MIB = 1024 * 1024


def open_lib(clock, workload="gemv", **kwargs):
    lib = FakeNvmlLibrary("h100", workloads=workload, clock=clock, **kwargs)
    lib.nvmlInit()
    return lib, lib.nvmlDeviceGetHandleByIndex(0)


def test_requests_every_metric_rooftop_uses(clock):
    lib, handle = open_lib(clock, noise=0)
    sampler = GpmSampler(lib, handle, clock=clock)
    assert sampler.read() is None  # first sample: nothing to compare with yet
    clock.advance(0.5)
    reading = sampler.read()
    assert isinstance(reading, GpmReading)
    assert reading.interval_s == pytest.approx(0.5)
    values = dataclasses.asdict(reading)
    assert set(GPM_METRIC_FIELDS.values()) <= set(values)
    assert all(values[f] is not None for f in GPM_METRIC_FIELDS.values())
    assert reading.sm_active_pct == pytest.approx(81.3)
    assert reading.sm_occupancy_pct == pytest.approx(11.7)
    assert reading.tensor_active_pct == pytest.approx(2.2)
    assert reading.dram_bw_pct == pytest.approx(84.8)
    assert reading.fp64_active_pct == 0.0


def test_too_soon_returns_previous_without_sampling(clock):
    lib, handle = open_lib(clock)
    sampler = GpmSampler(lib, handle, clock=clock)
    sampler.read()
    clock.advance(0.099)
    assert sampler.read() is None  # too soon after the first: still nothing
    assert lib.calls["nvmlGpmSampleGet"] == 1
    clock.advance(0.002)  # past 100 ms: allowed
    first = sampler.read()
    assert first is not None
    clock.advance(0.05)
    assert sampler.read() is first
    assert lib.calls["nvmlGpmSampleGet"] == 2
    assert lib.calls["nvmlGpmMetricsGet"] == 1


def test_buffers_ping_pong(clock):
    lib, handle = open_lib(clock)
    sampler = GpmSampler(lib, handle, clock=clock)
    for _ in range(5):
        sampler.read()
        clock.advance(0.25)
    intervals = [(t1, t2) for _, t1, t2 in lib.gpm_intervals]
    assert len(intervals) == 4
    # each computation starts where the previous ended: the newer sample is reused
    for (_, end), (start, _) in zip(intervals, intervals[1:], strict=False):
        assert start == end
    assert lib.live_gpm_samples == 2  # only two buffers, ever


def test_min_interval_is_configurable(clock):
    lib, handle = open_lib(clock)
    sampler = GpmSampler(lib, handle, clock=clock, min_interval_s=1.0)
    sampler.read()
    clock.advance(0.5)
    assert sampler.read() is None
    clock.advance(0.5)
    assert sampler.read() is not None


def test_pcie_converted_from_mib_per_s(clock):
    lib, handle = open_lib(clock, workload="pcie_copy", noise=0)
    sampler = GpmSampler(lib, handle, clock=clock)
    sampler.read()
    clock.advance(0.2)
    reading = sampler.read()
    assert reading is not None and reading.pcie_rx_bytes_per_s is not None
    assert reading.pcie_rx_bytes_per_s == pytest.approx(0.82 * 63.0e9)
    # GPM itself reported MiB/s: ~49,000, not ~52 billion
    assert reading.pcie_rx_bytes_per_s / MIB == pytest.approx(49_268, rel=1e-3)


def test_failed_metric_is_none_not_its_garbage_value(clock):
    lib, handle = open_lib(clock, workload="gemm")
    lib.inject_gpm_metric(0, lib.NVML_GPM_METRIC_ANY_TENSOR_UTIL, "not_supported")
    sampler = GpmSampler(lib, handle, clock=clock)
    sampler.read()
    clock.advance(0.2)
    reading = sampler.read()
    assert reading is not None
    assert reading.tensor_active_pct is None
    assert reading.sm_active_pct is not None


def test_window_spanning_a_change_is_time_weighted(clock):
    lib, handle = open_lib(clock, workload="gemv", noise=0)
    sampler = GpmSampler(lib, handle, clock=clock)
    sampler.read()
    clock.advance(0.1)
    lib.set_workload(0, "gemm")
    clock.advance(0.3)
    reading = sampler.read()
    assert reading is not None
    assert reading.dram_bw_pct == pytest.approx(0.25 * 84.8 + 0.75 * 25.5)


def test_without_error_mapping_nvml_errors_propagate(clock):
    lib, handle = open_lib(clock)
    sampler = GpmSampler(lib, handle, clock=clock)
    lib.inject(0, "nvmlGpmSampleGet", "gpu_is_lost")
    with pytest.raises(lib.NVMLError_GpuIsLost):
        sampler.read()


def test_through_the_backend_choke_point(clock):
    lib = FakeNvmlLibrary("h100", gpus=1, workloads="gemv", clock=clock)
    backend = NvmlBackend(lib, clock=clock)
    lib.inject(0, "nvmlGpmSampleGet", "not_supported")
    clock.advance(0.2)
    assert backend.read(0, 0.0).dram_bw_pct is None  # sample refused: absent
    lib.clear_injections()
    clock.advance(0.2)
    assert backend.read(0, 0.0).dram_bw_pct is None  # starts over: one fresh sample
    clock.advance(0.2)
    assert backend.read(0, 0.0).dram_bw_pct is not None
    lib.inject(0, "nvmlGpmSampleGet", "gpu_is_lost")
    clock.advance(0.2)
    with pytest.raises(DeviceLost):
        backend.read(0, 0.0)


def test_close_frees_and_is_idempotent(clock):
    lib, handle = open_lib(clock)
    sampler = GpmSampler(lib, handle, clock=clock)
    assert lib.live_gpm_samples == 2
    sampler.close()
    sampler.close()
    assert lib.live_gpm_samples == 0
    assert lib.calls["nvmlGpmSampleFree"] == 2
    assert not sampler.usable
    assert sampler.read() is None


def test_unusable_when_allocation_refused(clock):
    class NoAlloc(FakeNvmlLibrary):
        def nvmlGpmSampleAlloc(self):
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)

    lib = NoAlloc("h100", clock=clock)
    backend = NvmlBackend(lib, clock=clock)
    assert backend.devices()[0].has_gpm is False
    clock.advance(0.2)
    assert backend.read(0, 0.0).sm_active_pct is None
