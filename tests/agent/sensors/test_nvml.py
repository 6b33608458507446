"""NvmlBackend, the real code, over the fake NVML library."""

from __future__ import annotations

import logging

import pytest

from rooftop.agent.classifier import classify
from rooftop.agent.diagnose import diagnose_records
from rooftop.agent.diagnose import sample as diagnose_sample
from rooftop.agent.sampler import Sampler
from rooftop.agent.sensors.base import GpuBackend
from rooftop.agent.sensors.fake import FakeHostSensor, FakeNvmlLibrary, fake_backend
from rooftop.agent.sensors.gpm import GPM_METRIC_FIELDS
from rooftop.agent.sensors.nvml import (
    REOPEN_EVERY_S,
    RETRY_NEWER_S,
    NvmlBackend,
    map_nvml_errors,
)
from rooftop.agent.window import build_windows
from rooftop.common.codec import record_from_proto, record_to_proto
from rooftop.common.errors import DeviceLost, NvmlUnavailable, SensorError
from rooftop.common.model import Bound, GpuSample, HostSample
from tests.support import wait_for

# Every field GPM fills, as gpm.py names them.
GPM_FIELDS = tuple(GPM_METRIC_FIELDS.values())
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
    lib.inject(0, "nvmlDeviceGetPowerUsage", "not_supported")
    backend = backend_over(lib, clock)
    with caplog.at_level(logging.INFO, logger="rooftop.agent.sensors.nvml"):
        samples = [settled_read(backend, clock) for _ in range(3)]
    assert all(s.power_w is None for s in samples)
    assert all(s.busy_pct is not None and s.temperature_c is not None for s in samples)
    assert all(s.dram_bw_pct is not None for s in samples)
    messages = [
        r.getMessage() for r in caplog.records if "nvmlDeviceGetPowerUsage" in r.getMessage()
    ]
    assert len(messages) == 1
    assert lib.calls["nvmlDeviceGetPowerUsage"] == 3  # asked each time, logged once
    assert backend.errors == {("nvmlDeviceGetPowerUsage", "NVMLError_NotSupported"): 3}


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


def test_a_gpu_that_failed_to_open_at_start_is_sampled_once_it_answers(clock):
    lib = FakeNvmlLibrary("h100", gpus=2, workloads="gemv", clock=clock)
    lib.inject(1, "nvmlDeviceGetHandleByIndex", "unknown", times=1)  # a transient error
    backend = backend_over(lib, clock)
    sampler = Sampler(backend, clock=lambda: 1.7e9)
    assert backend.devices()[1].gpu_uuid == ""
    (_, lost) = sampler.tick()
    assert isinstance(lost, GpuSample) and lost.lost and lost.xid_count is None
    clock.advance(REOPEN_EVERY_S - 1)
    with pytest.raises(DeviceLost):
        backend.read(1, 0.0)  # not yet asked again
    clock.advance(1)
    (_, back) = sampler.tick()
    assert isinstance(back, GpuSample) and not back.lost
    assert back.gpu_uuid == lib.nvmlDeviceGetUUID(lib.nvmlDeviceGetHandleByIndex(1))
    assert sampler.devices[1].gpu_uuid == back.gpu_uuid and sampler.devices[1].has_gpm
    assert settled_read(backend, clock, gpu=1).dram_bw_pct is not None
    # Its XID events are watched from now on, as the others' are.
    lib.raise_xid(1, 79)
    wait_for(lambda: backend.xid_tally(1) == ((79,), 1))
    backend.close()


def test_a_gpu_still_failing_is_asked_again_once_per_interval(clock):
    lib = FakeNvmlLibrary("h100", gpus=2, workloads="gemv", clock=clock)
    lib.inject(1, "nvmlDeviceGetHandleByIndex", "gpu_is_lost")
    backend = backend_over(lib, clock)
    asked = lib.calls["nvmlDeviceGetHandleByIndex"]
    for _ in range(3):  # ticks within one interval: no call
        with pytest.raises(DeviceLost):
            backend.read(1, 0.0)
        clock.advance(REOPEN_EVERY_S / 4)
    assert lib.calls["nvmlDeviceGetHandleByIndex"] == asked
    clock.advance(REOPEN_EVERY_S)
    for _ in range(3):
        with pytest.raises(DeviceLost, match="GPU is lost"):
            backend.read(1, 0.0)
    assert lib.calls["nvmlDeviceGetHandleByIndex"] == asked + 1
    assert [i.gpu_uuid == "" for i in backend.devices()] == [False, True]
    backend.close()


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
    again = backend.read(0, 0.0)  # too soon: the previous metrics, marked stale
    assert lib.calls["nvmlGpmMetricsGet"] == 1
    assert (again.dram_bw_pct, again.gpm_stale) == (first.dram_bw_pct, True)
    assert first.gpm_stale is False
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


# ---- issue 11 item 2: no NVML call takes a tick down ---------------------------------


def _mismatch(lib):
    # What pynvml 13.x raises from nvmlDeviceGetComputeRunningProcesses on a driver
    # without _v3: not an NVMLError.
    return lib.NVMLLibraryMismatchError(
        "Unversioned function called and the pyNVML version does not match the NVML lib "
        "version. Either use matching pyNVML and NVML lib versions or use a versioned "
        "function such as nvmlDeviceGetComputeRunningProcesses_v2"
    )


def _runtime_error(lib):
    return RuntimeError("a library bug")


@pytest.mark.parametrize(("make_error", "error_name"), [
    (_mismatch, "NVMLLibraryMismatchError"),
    (_runtime_error, "RuntimeError"),
])
def test_any_library_exception_costs_its_field_not_the_tick(clock, caplog, make_error,
                                                            error_name):
    lib = FakeNvmlLibrary("h100", gpus=2, workloads="gemv", clock=clock)
    backend = backend_over(lib, clock)
    lib.inject(1, "nvmlDeviceGetPowerUsage", make_error(lib))
    sampler = Sampler(backend, FakeHostSensor(lib), clock=lambda: 1.7e9 + clock())
    ticks = []
    with caplog.at_level(logging.INFO, logger="rooftop.agent.sensors.nvml"):
        for _ in range(3):
            clock.advance(0.2)
            ticks.append(sampler.tick())  # raised on GPU 1 before the fix: no tick at all
    for records in ticks:
        gpu0, gpu1, host = records
        assert isinstance(host, HostSample)
        assert gpu0.power_w is not None
        assert gpu1.power_w is None  # the one field that failed: absent
        assert not gpu1.lost
        assert gpu1.busy_pct is not None and gpu1.dram_bw_pct is not None
        assert [p.pid for p in gpu1.processes] == [lib.fake_pid(1)]
        assert gpu1.temperature_c is not None and gpu1.mem_used_bytes is not None
    messages = [r.getMessage() for r in caplog.records
                if "nvmlDeviceGetPowerUsage" in r.getMessage()]
    assert len(messages) == 1 and error_name in messages[0]
    assert backend.errors == {("nvmlDeviceGetPowerUsage", error_name): 3}


def test_a_driver_without_v3_process_queries_is_asked_once_then_not_again(clock, caplog):
    # pynvml's unversioned process query raises NVMLLibraryMismatchError where the driver
    # lacks _v3: that is permanent, so the backend stops asking (and uses _v2 where the
    # library has it: tests/agent/sensors/test_nvml_standin.py, R470).
    lib = FakeNvmlLibrary("h100", gpus=1, workloads="gemv", clock=clock)
    backend = backend_over(lib, clock)
    lib.inject(0, "nvmlDeviceGetComputeRunningProcesses", _mismatch(lib))
    sampler = Sampler(backend, FakeHostSensor(lib), clock=lambda: 1.7e9 + clock())
    for _ in range(3):
        clock.advance(20.0)  # past every retry interval
        gpu0, _host = sampler.tick()
        assert gpu0.processes == () and gpu0.busy_pct is not None
    assert backend.errors == {("nvmlDeviceGetComputeRunningProcesses",
                               "NVMLLibraryMismatchError"): 1}


def test_diagnose_survives_a_library_exception():
    backend = fake_backend("h100", gpus=1, workloads="gemv")
    lib = backend.library
    lib.inject(0, "nvmlDeviceGetComputeRunningProcesses", _mismatch(lib))
    records = diagnose_sample(backend, FakeHostSensor(lib), seconds=0.45, rate_hz=10)
    backend.close()
    samples = [r for r in records if isinstance(r, GpuSample)]
    assert len(samples) >= 4 and all(not s.lost and s.processes == () for s in samples)
    (verdicts,) = diagnose_records(records).values()
    assert verdicts[-1].verdict is Bound.MEMORY


def test_no_permission_gpu_is_inaccessible_not_lost(clock, caplog):
    lib = FakeNvmlLibrary("h100", gpus=2, workloads="gemm", clock=clock)
    lib.inject(1, "nvmlDeviceGetHandleByIndex", "no_permission")
    backend = backend_over(lib, clock)
    sampler = Sampler(backend, clock=lambda: 1.7e9 + clock())
    records = []
    with caplog.at_level(logging.WARNING, logger="rooftop.agent.sampler"):
        for _ in range(5):
            clock.advance(0.2)
            records += sampler.tick()
    windows = build_windows(records)
    good, denied = classify(windows[0, ""][0]), classify(windows[1, ""][0])
    assert good.verdict is Bound.COMPUTE
    assert denied.verdict is Bound.UNKNOWN  # never "lost": that alerts and drains the node
    assert "GPU 1 is not accessible to this user (NVML NO_PERMISSION)" in denied.rule
    assert "/dev/nvidia1" in denied.rule
    assert "lost" not in denied.rule
    advice = " ".join(denied.recommendations).lower()
    assert "reset" not in advice and "drain" not in advice
    assert "/dev/nvidia1" in advice
    # The sampler says it once, in the same words.
    warnings = [r.getMessage() for r in caplog.records if "GPU 1" in r.getMessage()]
    assert len(warnings) == 1 and "not accessible to this user" in warnings[0]
    # The sample says why there is no data, and so do recordings and the stream.
    sample = next(r for r in records if isinstance(r, GpuSample) and r.gpu_index == 1)
    assert (sample.lost, sample.inaccessible) == (True, "NO_PERMISSION")
    assert record_from_proto(record_to_proto(sample)) == sample


def test_lost_gpu_still_advises_a_reset(clock):
    lib = FakeNvmlLibrary("h100", gpus=1, workloads="gemm", clock=clock)
    lib.inject(0, "nvmlDeviceGetHandleByIndex", "gpu_is_lost")
    sampler = Sampler(backend_over(lib, clock), clock=lambda: 1.7e9 + clock())
    (window,) = build_windows(sampler.tick())[0, ""]
    v = classify(window)
    assert v.verdict is Bound.LOST and "GpuIsLost" in v.rule
    assert any("reset" in r for r in v.recommendations)


def test_memory_v2_comes_back_after_a_transient_error(clock):
    lib = FakeNvmlLibrary("h100", workloads="idle", clock=clock)
    backend = backend_over(lib, clock)
    reserved = lib.profile.mem_reserved_bytes
    assert backend.read(0, 0.0).mem_used_bytes == 0  # v2: reserved apart
    lib.inject(0, "nvmlDeviceGetMemoryInfo", "unknown", times=1)
    assert backend.read(0, 0.0).mem_used_bytes == reserved  # v2 failed once: v1 stands in
    clock.advance(1.0)
    assert backend.read(0, 0.0).mem_used_bytes == reserved  # not retried at once
    clock.advance(RETRY_NEWER_S)
    assert backend.read(0, 0.0).mem_used_bytes == 0  # v2 again, for good
    clock.advance(RETRY_NEWER_S)
    assert backend.read(0, 0.0).mem_used_bytes == 0


def test_clock_event_reasons_come_back_after_a_transient_error(clock):
    lib = FakeNvmlLibrary("h100", workloads="gemm", clock=clock)
    backend = backend_over(lib, clock)
    lib.inject(0, "nvmlDeviceGetCurrentClocksEventReasons", "timeout", times=1)
    power_cap = lib.nvmlClocksEventReasonSwPowerCap
    assert backend.read(0, 0.0).clock_event_reasons == power_cap  # from throttle reasons
    clock.advance(RETRY_NEWER_S)
    assert backend.read(0, 0.0).clock_event_reasons == power_cap
    clock.advance(RETRY_NEWER_S)
    backend.read(0, 0.0)
    assert lib.calls["nvmlDeviceGetCurrentClocksEventReasons"] == 3  # 1 failed, 2 answered
    assert lib.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 1  # only in between


def test_gpm_comes_back_after_a_transient_error_at_startup(clock):
    lib = FakeNvmlLibrary("h100", workloads="gemv", clock=clock)
    lib.inject(0, "nvmlGpmQueryDeviceSupport", "unknown", times=1)
    backend = backend_over(lib, clock)
    assert backend.devices()[0].has_gpm is False
    assert settled_read(backend, clock).dram_bw_pct is None
    clock.advance(RETRY_NEWER_S)
    backend.read(0, 0.0)  # GPM set up again, first sample taken
    assert settled_read(backend, clock).dram_bw_pct == pytest.approx(84.8, abs=2)
    assert backend.devices()[0].has_gpm is True


def test_temperature_comes_from_temperature_v(clock):
    # A CUDA 14 driver: the deprecated nvmlDeviceGetTemperature is gone.
    lib = FakeNvmlLibrary("h100", workloads="gemm", clock=clock)
    lib.inject(0, "nvmlDeviceGetTemperature", "function_not_found")
    backend = backend_over(lib, clock)
    temperatures = [settled_read(backend, clock).temperature_c for _ in range(2)]
    handle = lib.nvmlDeviceGetHandleByIndex(0)
    expected = lib.nvmlDeviceGetTemperatureV(handle, lib.NVML_TEMPERATURE_GPU)
    assert temperatures == [expected, expected]
    assert expected > lib.profile.temperature_idle_c
    assert lib.calls["nvmlDeviceGetTemperature"] == 0


def test_temperature_falls_back_where_the_driver_lacks_temperature_v(clock):
    lib = FakeNvmlLibrary("h100", workloads="gemm", clock=clock)
    lib.inject(0, "nvmlDeviceGetTemperatureV", "function_not_found")
    backend = backend_over(lib, clock)
    first = backend.read(0, 0.0).temperature_c
    clock.advance(RETRY_NEWER_S)
    second = backend.read(0, 0.0).temperature_c
    assert first == second and first is not None and first > lib.profile.temperature_idle_c
    assert lib.calls["nvmlDeviceGetTemperatureV"] == 1  # the driver lacks it: not again
    assert lib.calls["nvmlDeviceGetTemperature"] == 2
