"""GpmSampler on its own, over the fake NVML library."""

from __future__ import annotations

import dataclasses
import random

import pytest

from rooftop.agent.sampler import Sampler
from rooftop.agent.sensors.fake import FakeNvmlLibrary
from rooftop.agent.sensors.gpm import GPM_METRIC_FIELDS, GpmReading, GpmSampler
from rooftop.agent.sensors.nvml import NvmlBackend
from rooftop.agent.window import build_windows
from rooftop.common.errors import DeviceLost
from rooftop.common.model import GpuSample

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


def test_too_soon_is_stale_without_sampling(clock):
    lib, handle = open_lib(clock)
    sampler = GpmSampler(lib, handle, clock=clock)
    sampler.read()
    clock.advance(0.099)
    assert sampler.read() is None  # too soon after the first: still nothing
    assert lib.calls["nvmlGpmSampleGet"] == 1
    clock.advance(0.002)  # past 100 ms: allowed
    first = sampler.read()
    assert first is not None
    assert not first.stale
    clock.advance(0.05)
    # Too soon: the previous reading again, marked stale, never passed off as new.
    assert sampler.read() == dataclasses.replace(first, stale=True)
    assert lib.calls["nvmlGpmSampleGet"] == 2
    assert lib.calls["nvmlGpmMetricsGet"] == 1
    clock.advance(0.06)
    second = sampler.read()  # the next fresh reading covers the whole gap
    assert second is not None and not second.stale
    assert second.interval_s == pytest.approx(0.11)


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


def test_the_reused_request_carries_no_status_or_value_from_an_earlier_read(clock):
    # One request struct serves every read: each read's statuses and values are its own.
    lib, handle = open_lib(clock, workload="gemm")
    sampler = GpmSampler(lib, handle, clock=clock)
    sampler.read()
    clock.advance(0.2)
    first = sampler.read()
    assert first is not None and first.tensor_active_pct is not None
    lib.inject_gpm_metric(0, lib.NVML_GPM_METRIC_ANY_TENSOR_UTIL, "not_supported")
    clock.advance(0.2)
    failed = sampler.read()
    assert failed is not None
    assert failed.tensor_active_pct is None  # not the first read's value
    assert failed.sm_active_pct is not None
    lib.clear_injections()
    clock.advance(0.2)
    again = sampler.read()
    assert again is not None and again.tensor_active_pct is not None
    # the ping-pong samples went into the one request in turn
    intervals = [(t1, t2) for _, t1, t2 in lib.gpm_intervals]
    assert [round(t2 - t1, 3) for t1, t2 in intervals] == [0.2, 0.2, 0.2]


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


def test_at_10_hz_with_jitter_no_reading_enters_a_window_twice(clock):
    """The CLI's default rate: ticks ~100 ms apart, jittered around GPM's minimum gap.

    A sample's GPM figures are fresh (one NVML metrics computation each, never shared
    with another fresh sample) or marked stale, and the window holds only fresh ones.
    """
    lib = FakeNvmlLibrary("h100", workloads="gemv", clock=clock)
    backend = NvmlBackend(lib, clock=clock)
    sampler = Sampler(backend, clock=lambda: 1.7e9 + clock())
    rng = random.Random(11)
    samples = []
    for _ in range(100):
        clock.advance(0.1 + rng.uniform(-0.005, 0.005))
        samples += [r for r in sampler.tick() if isinstance(r, GpuSample)]
    (window,) = build_windows(samples)[0, ""]
    in_window = [(t.dram_pct, t.compute_pct, t.sm_active_pct) for t in window.ticks]
    assert len(in_window) == len(set(in_window))  # before the fix: a third were repeats
    assert len(in_window) == len(lib.gpm_intervals)  # one tick per fresh computation
    assert window.dram_pct == pytest.approx(84.8, abs=2)
    fresh = [s for s in samples if s.dram_bw_pct is not None and not s.gpm_stale]
    assert [t.time_s for t in window.ticks] == [s.time_s for s in fresh]
    stale = [s for s in samples if s.gpm_stale]
    assert 0.2 < len(stale) / len(samples) < 0.5  # the jitter did bite
    readings = {(s.dram_bw_pct, s.sm_active_pct) for s in fresh}
    # A stale sample repeats a fresh one, and says so.
    assert {(s.dram_bw_pct, s.sm_active_pct) for s in stale} <= readings
