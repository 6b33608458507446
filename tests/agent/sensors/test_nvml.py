"""NvmlBackend, the real code, over the fake NVML library."""

from __future__ import annotations

import logging

import pytest

from rooftop.agent.sensors.base import GpuBackend
from rooftop.agent.sensors.fake import FakeNvmlLibrary, fake_backend
from rooftop.agent.sensors.nvml import NvmlBackend, map_nvml_errors
from rooftop.common.errors import DeviceLost, NvmlUnavailable, SensorError
from rooftop.common.model import GpuSample

GPM_FIELDS = (
    "sm_active_pct",
    "sm_occupancy_pct",
    "tensor_active_pct",
    "fp16_active_pct",
    "fp32_active_pct",
    "fp64_active_pct",
    "dram_bw_pct",
    "pcie_rx_bytes_per_s",
    "pcie_tx_bytes_per_s",
)
SLOW_FUNCTIONS = (
    "nvmlDeviceGetPcieThroughput",
    "nvmlDeviceGetProcessUtilization",
    "nvmlDeviceGetTotalEnergyConsumption",
)


def backend_over(lib, clock):
    return NvmlBackend(lib, clock=clock)


def settled_read(backend, clock, gpu=0):
    """A read 200 ms after the previous GPM sample, so GPM metrics are fresh."""
    clock.advance(0.2)
    return backend.read(gpu, time_s=1.7e9)


def read_every_gpu(backend: GpuBackend, time_s: float) -> list[GpuSample]:
    """What the sampler does with any ``GpuBackend``: one read per device it lists."""
    return [backend.read(info.gpu_index, time_s) for info in backend.devices()]


def test_is_a_gpu_backend(clock):
    """Used only through the protocol's methods, it gives one ``GpuSample`` per device,
    stamped with the caller's time and named as ``devices()`` names the GPU."""
    backend = fake_backend("h100", gpus=2, clock=clock)
    infos = backend.devices()
    samples = read_every_gpu(backend, time_s=1.7e9)
    assert [type(s) for s in samples] == [GpuSample, GpuSample]
    got = [(s.gpu_index, s.gpu_uuid, s.gpu_name, s.mem_total_bytes, s.time_s) for s in samples]
    assert got == [(i.gpu_index, i.gpu_uuid, i.gpu_name, i.mem_total_bytes, 1.7e9) for i in infos]
    assert samples[0].gpu_uuid != samples[1].gpu_uuid
    backend.close()


def test_devices_static_info(clock):
    backend = fake_backend("h100", gpus=2, clock=clock)
    infos = backend.devices()
    assert [i.gpu_index for i in infos] == [0, 1]
    assert infos[0].gpu_name == "NVIDIA H100 80GB HBM3"
    assert infos[0].gpu_uuid.startswith("GPU-")
    assert infos[0].gpu_uuid != infos[1].gpu_uuid
    assert infos[0].has_gpm is True
    assert infos[0].mem_total_bytes == 85_520_809_984
    assert (infos[0].pcie_link_gen_max, infos[0].pcie_link_width_max) == (5, 16)
    # read once: asking again does not call NVML again
    calls = sum(backend.library.calls.values())
    backend.devices()
    assert sum(backend.library.calls.values()) == calls


def test_gemv_lands_in_the_right_fields(clock):
    backend = fake_backend("h100", workloads="gemv", clock=clock)
    s = settled_read(backend, clock)
    assert s.time_s == 1.7e9
    assert s.gpu_name == "NVIDIA H100 80GB HBM3"
    assert s.busy_pct == pytest.approx(95.5, abs=2)
    assert s.mem_ctrl_pct == pytest.approx(97.1, abs=2)
    assert s.sm_active_pct == pytest.approx(81.3, abs=2)
    assert s.sm_occupancy_pct == pytest.approx(11.7, abs=1)
    assert s.tensor_active_pct == pytest.approx(2.2, abs=1)
    assert s.dram_bw_pct == pytest.approx(84.8, abs=2)
    assert s.power_w is not None and 100 < s.power_w <= 700
    assert s.sm_clock_mhz == 1980
    assert s.temperature_c is not None
    assert (s.pcie_link_gen, s.pcie_link_width) == (5, 16)
    assert s.mem_total_bytes == 85_520_809_984
    assert s.mem_used_bytes is not None and s.mem_used_bytes > 16 * 1024**3
    assert len(s.processes) == 1
    assert s.processes[0].pid == backend.library.fake_pid(0)
    assert s.processes[0].gpu_mem_bytes is not None


def test_gemm_lands_in_the_right_fields(clock):
    backend = fake_backend("h100", workloads="gemm", clock=clock)
    s = settled_read(backend, clock)
    assert s.busy_pct == pytest.approx(98.1, abs=2)
    assert s.mem_ctrl_pct == pytest.approx(33.2, abs=2)
    assert s.sm_active_pct == pytest.approx(94.7, abs=2)
    assert s.sm_occupancy_pct == pytest.approx(14.0, abs=1)
    assert s.tensor_active_pct == pytest.approx(91.9, abs=2)
    assert s.dram_bw_pct == pytest.approx(25.5, abs=2)
    # at the power cap: the clock-event bitmask says so
    assert s.clock_event_reasons is not None
    assert s.clock_event_reasons & backend.library.nvmlClocksEventReasonSwPowerCap


def test_idle_reads_zero_not_absent(clock):
    backend = fake_backend("h100", workloads="idle", clock=clock)
    s = settled_read(backend, clock)
    assert s.busy_pct == 0.0
    assert s.mem_ctrl_pct == 0.0
    assert s.dram_bw_pct == 0.0
    assert s.tensor_active_pct == 0.0
    assert s.processes == ()
    assert s.clock_event_reasons == backend.library.nvmlClocksEventReasonGpuIdle


def test_memory_v2_excludes_reserved(clock):
    lib = FakeNvmlLibrary("h100", workloads="idle", clock=clock)
    s = backend_over(lib, clock).read(0, 0.0)
    assert s.mem_used_bytes == 0  # v1 would count ~519 MiB reserved as used


def test_a100_has_util_but_no_gpm(clock):
    backend = fake_backend("a100", workloads="gemv", clock=clock)
    assert backend.devices()[0].has_gpm is False
    assert backend.devices()[0].pcie_link_gen_max == 4
    s = settled_read(backend, clock)
    assert s.gpu_name == "NVIDIA A100-SXM4-80GB"
    assert s.busy_pct is not None and s.busy_pct > 90
    assert s.mem_ctrl_pct is not None and s.mem_ctrl_pct > 90
    for field in GPM_FIELDS:
        assert getattr(s, field) is None, field
    # no GPM sampling attempted where the device says it has none
    assert backend.library.calls["nvmlGpmSampleGet"] == 0


def test_not_supported_field_is_absent_and_logged_once(clock, caplog):
    lib = FakeNvmlLibrary("h100", workloads="gemv", clock=clock)
    lib.inject(0, "nvmlDeviceGetTemperature", "not_supported")
    backend = backend_over(lib, clock)
    with caplog.at_level(logging.INFO, logger="rooftop.agent.sensors.nvml"):
        samples = [settled_read(backend, clock) for _ in range(3)]
    assert all(s.temperature_c is None for s in samples)
    assert all(s.busy_pct is not None and s.power_w is not None for s in samples)
    assert all(s.dram_bw_pct is not None for s in samples)
    messages = [
        r.getMessage() for r in caplog.records if "nvmlDeviceGetTemperature" in r.getMessage()
    ]
    assert len(messages) == 1
    assert lib.calls["nvmlDeviceGetTemperature"] == 3  # asked each time, logged once


def test_unexpected_error_is_absent_and_warned(clock, caplog):
    lib = FakeNvmlLibrary("h100", workloads="gemv", clock=clock)
    lib.inject(0, "nvmlDeviceGetPowerUsage", "unknown")
    backend = backend_over(lib, clock)
    with caplog.at_level(logging.INFO, logger="rooftop.agent.sensors.nvml"):
        s = backend.read(0, 0.0)
    assert s.power_w is None
    assert [r.levelno for r in caplog.records if "PowerUsage" in r.getMessage()] == [
        logging.WARNING
    ]


def test_gpu_lost_on_one_gpu_only(clock):
    lib = FakeNvmlLibrary("h100", gpus=2, workloads="gemm", clock=clock)
    backend = backend_over(lib, clock)
    lib.inject(1, "nvmlDeviceGetUtilizationRates", "gpu_is_lost")
    with pytest.raises(DeviceLost) as info:
        backend.read(1, 0.0)
    assert info.value.gpu_index == 1
    assert backend.read(0, 0.0).busy_pct is not None


def test_gpu_lost_everywhere_during_gpm(clock):
    lib = FakeNvmlLibrary("h100", gpus=2, workloads="gemm", clock=clock)
    backend = backend_over(lib, clock)
    lib.inject(0, "*", "gpu_is_lost")
    clock.advance(0.2)  # so read() takes a GPM sample first
    with pytest.raises(DeviceLost) as info:
        backend.read(0, 0.0)
    assert info.value.gpu_index == 0
    assert lib.calls["nvmlGpmSampleGet"] >= 3  # it was the GPM call that found out
    assert settled_read(backend, clock, gpu=1).tensor_active_pct is not None


def test_gpu_lost_at_startup_is_listed_and_reads_lost(clock):
    lib = FakeNvmlLibrary("h100", gpus=2, workloads="gemv", clock=clock)
    lib.inject(0, "nvmlDeviceGetHandleByIndex", "gpu_is_lost")
    backend = backend_over(lib, clock)
    assert [i.gpu_index for i in backend.devices()] == [0, 1]
    with pytest.raises(DeviceLost):
        backend.read(0, 0.0)
    assert settled_read(backend, clock, gpu=1).dram_bw_pct is not None


def test_driver_missing_is_one_readable_line(clock):
    lib = FakeNvmlLibrary("h100", driver_missing=True, clock=clock)
    with pytest.raises(NvmlUnavailable) as info:
        NvmlBackend(lib, clock=clock)
    message = str(info.value)
    assert "\n" not in message
    assert "NVIDIA driver not found" in message
    assert "--fake h100" in message and "--replay" in message


def test_map_nvml_errors(clock):
    lib = FakeNvmlLibrary("h100")
    with pytest.raises(NvmlUnavailable, match="not loaded"), map_nvml_errors():
        raise lib.NVMLError(lib.NVML_ERROR_DRIVER_NOT_LOADED)
    with pytest.raises(NvmlUnavailable, match="NVML failed: Timeout"), map_nvml_errors():
        raise lib.NVMLError(lib.NVML_ERROR_TIMEOUT)
    with pytest.raises(DeviceLost) as info, map_nvml_errors(gpu_index=3):
        raise lib.NVMLError(lib.NVML_ERROR_GPU_IS_LOST)
    assert info.value.gpu_index == 3


def test_failed_construction_releases_nvml(clock):
    lib = FakeNvmlLibrary("h100", clock=clock)
    lib.inject(0, "nvmlDeviceGetUUID", "gpu_is_lost")  # handled: device listed as lost

    class CountFails(FakeNvmlLibrary):
        def nvmlDeviceGetCount(self):
            self.calls["nvmlDeviceGetCount"] += 1
            raise self.NVMLError(self.NVML_ERROR_UNKNOWN)

    broken = CountFails("h100", clock=clock)
    with pytest.raises(NvmlUnavailable):
        NvmlBackend(broken, clock=clock)
    assert not broken.initialized  # the init reference was given back


def test_gpm_waits_100ms_between_samples(clock):
    lib = FakeNvmlLibrary("h100", workloads="gemv", clock=clock)
    backend = backend_over(lib, clock)  # takes the first GPM sample now
    assert backend.read(0, 0.0).dram_bw_pct is None  # 0 ms after it: nothing yet
    clock.advance(0.010)
    assert backend.read(0, 0.0).dram_bw_pct is None  # 10 ms: still too close
    assert lib.calls["nvmlGpmMetricsGet"] == 0
    clock.advance(0.2)
    first = backend.read(0, 0.0)
    assert first.dram_bw_pct is not None
    assert lib.calls["nvmlGpmMetricsGet"] == 1
    clock.advance(0.010)
    again = backend.read(0, 0.0)  # too soon: the previous metrics, not new ones
    assert lib.calls["nvmlGpmMetricsGet"] == 1
    assert again.dram_bw_pct == first.dram_bw_pct
    for _ in range(20):
        clock.advance(0.03)
        backend.read(0, 0.0)
    assert lib.gpm_intervals
    assert all(t2 - t1 >= 0.1 for _, t1, t2 in lib.gpm_intervals)


def test_gpm_follows_a_workload_change(clock):
    lib = FakeNvmlLibrary("h100", workloads="gemv", clock=clock)
    backend = backend_over(lib, clock)
    assert settled_read(backend, clock).dram_bw_pct == pytest.approx(84.8, abs=2)
    lib.set_workload(0, "gemm")
    gemm = settled_read(backend, clock)
    assert gemm.dram_bw_pct == pytest.approx(25.5, abs=2)
    assert gemm.tensor_active_pct == pytest.approx(91.9, abs=2)


def test_one_gpm_metric_failing_leaves_only_that_field_absent(clock):
    lib = FakeNvmlLibrary("h100", workloads="gemm", clock=clock)
    lib.inject_gpm_metric(0, lib.NVML_GPM_METRIC_FP64_UTIL, "not_supported")
    lib.inject_gpm_metric(0, lib.NVML_GPM_METRIC_DRAM_BW_UTIL, "unknown")
    s = settled_read(backend_over(lib, clock), clock)
    assert s.fp64_active_pct is None
    assert s.dram_bw_pct is None
    assert s.tensor_active_pct == pytest.approx(91.9, abs=2)
    assert s.sm_active_pct is not None and s.pcie_rx_bytes_per_s is not None


def test_gpm_metrics_get_not_supported_leaves_nvml_fields(clock):
    lib = FakeNvmlLibrary("h100", workloads="gemm", clock=clock)
    lib.inject(0, "nvmlGpmMetricsGet", "not_supported")
    s = settled_read(backend_over(lib, clock), clock)
    assert all(getattr(s, f) is None for f in GPM_FIELDS)
    assert s.busy_pct is not None


def test_pcie_mib_per_s_becomes_bytes_per_s(clock):
    lib = FakeNvmlLibrary("h100", workloads="pcie_copy", clock=clock, noise=0)
    s = settled_read(backend_over(lib, clock), clock)
    # the fake reports 82 % of 63 GB/s in MiB/s, as GPM does; we must give bytes/s
    assert s.pcie_rx_bytes_per_s == pytest.approx(0.82 * 63.0e9, rel=1e-9)
    assert s.busy_pct == 99 and s.sm_active_pct == 0.0


def test_read_never_calls_slow_functions(clock):
    backend = fake_backend("h100", gpus=2, workloads=["pcie_copy", "gemv"], clock=clock)
    lib = backend.library
    for _ in range(10):
        clock.advance(0.1)
        for gpu in (0, 1):
            backend.read(gpu, 0.0)
    assert lib.calls["nvmlDeviceGetUtilizationRates"] == 20
    for name in SLOW_FUNCTIONS:
        assert lib.calls[name] == 0, name
    # and the fake would have counted them had they been called
    lib.nvmlDeviceGetPcieThroughput(lib.nvmlDeviceGetHandleByIndex(0), lib.NVML_PCIE_UTIL_RX_BYTES)
    assert lib.calls["nvmlDeviceGetPcieThroughput"] == 1


def test_memory_info_falls_back_to_v1(clock):
    class OldDriver(FakeNvmlLibrary):
        def nvmlDeviceGetMemoryInfo(self, handle, version=None):
            if version:
                self.calls["nvmlDeviceGetMemoryInfo_v2"] += 1
                raise self.NVMLError(self.NVML_ERROR_FUNCTION_NOT_FOUND)
            return super().nvmlDeviceGetMemoryInfo(handle)

    lib = OldDriver("h100", workloads="idle", clock=clock)
    backend = backend_over(lib, clock)
    first = backend.read(0, 0.0)
    backend.read(0, 0.0)
    assert first.mem_total_bytes == 85_520_809_984
    assert first.mem_used_bytes == lib.profile.mem_reserved_bytes  # v1 counts reserved
    assert lib.calls["nvmlDeviceGetMemoryInfo_v2"] == 1  # tried once, then v1 for good


def test_clock_event_reasons_fall_back_to_throttle_reasons(clock):
    class OldDriver(FakeNvmlLibrary):
        def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
            self.calls["nvmlDeviceGetCurrentClocksEventReasons"] += 1
            raise self.NVMLError(self.NVML_ERROR_FUNCTION_NOT_FOUND)

    lib = OldDriver("h100", workloads="gemm", clock=clock)
    backend = backend_over(lib, clock)
    assert backend.read(0, 0.0).clock_event_reasons == lib.nvmlClocksEventReasonSwPowerCap
    backend.read(0, 0.0)
    assert lib.calls["nvmlDeviceGetCurrentClocksEventReasons"] == 1
    assert lib.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 2


def test_process_memory_not_available_is_none(clock):
    class Windowsish(FakeNvmlLibrary):
        def nvmlDeviceGetComputeRunningProcesses(self, handle):
            procs = super().nvmlDeviceGetComputeRunningProcesses(handle)
            for p in procs:
                p.usedGpuMemory = None  # how pynvml reports NVML_VALUE_NOT_AVAILABLE
            return procs

    lib = Windowsish("h100", workloads="gemv", clock=clock)
    (proc,) = backend_over(lib, clock).read(0, 0.0).processes
    assert proc.pid == lib.fake_pid(0)
    assert proc.gpu_mem_bytes is None


def test_close_is_idempotent_and_releases_everything(clock):
    backend = fake_backend("h100", gpus=3, clock=clock)
    lib = backend.library
    assert lib.live_gpm_samples == 6
    backend.close()
    backend.close()
    assert lib.live_gpm_samples == 0
    assert not lib.initialized
    assert lib.calls["nvmlShutdown"] == 1
    with pytest.raises(SensorError, match="closed"):
        backend.read(0, 0.0)


def test_context_manager_closes(clock):
    with fake_backend("h100", clock=clock) as backend:
        lib = backend.library
        assert lib.initialized
    assert not lib.initialized


def test_unknown_gpu_index(clock):
    backend = fake_backend("h100", gpus=1, clock=clock)
    with pytest.raises(SensorError, match="no GPU 4"):
        backend.read(4, 0.0)


def test_real_pynvml_without_a_driver_says_so_in_one_line():
    try:
        backend = NvmlBackend()  # the real pynvml module
    except NvmlUnavailable as exc:
        assert "\n" not in str(exc)
        assert "--fake h100" in str(exc)
        return
    backend.close()
    pytest.skip("an NVIDIA driver is present here (covered by test_nvml_gpu.py)")
