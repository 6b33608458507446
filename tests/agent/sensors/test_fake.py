"""The fake NVML library: shaped like pynvml, steerable, deterministic."""

from __future__ import annotations

import ctypes

import pytest

from rooftop.agent.sensors import fake
from rooftop.agent.sensors.fake import (
    FAKE_PID_BASE,
    FAKE_PROFILES,
    FAKE_WORKLOADS,
    WORKLOADS,
    FakeHostSensor,
    FakeNvmlLibrary,
    fake_backend,
    parse_workload,
)
from rooftop.agent.sensors.nvml import NvmlBackend
from rooftop.common.model import invalid_reason


def test_names_exposed_for_the_cli():
    assert {"h100", "a100"} <= set(FAKE_PROFILES)
    expected = {"idle", "gemv", "gemm", "host_stall", "decode", "prefill", "pcie_copy"}
    assert expected | {"hf_generate"} <= set(FAKE_WORKLOADS)


def test_workloads_reproduce_the_measured_table():
    table = {  # DESIGN §2: util.gpu, util.memory, SM, occupancy, tensor, DRAM
        "gemv": (95.5, 97.1, 81.3, 11.7, 2.2, 84.8),
        "gemm": (98.1, 33.2, 94.7, 14.0, 91.9, 25.5),
        "host_stall": (1.1, 0, 0.6, 0.1, 0, 0),
        "hf_generate": (4.5, 1.0, 0.9, 0.1, 0.0, 0.8),
    }
    for name, row in table.items():
        w = WORKLOADS[name]
        got = (
            w.busy_pct,
            w.mem_ctrl_pct,
            w.sm_active_pct,
            w.sm_occupancy_pct,
            w.tensor_active_pct,
            w.dram_bw_pct,
        )
        assert got == row, name
    assert WORKLOADS["pcie_copy"].pcie_rx_link_frac == pytest.approx(0.82)
    assert WORKLOADS["host_stall"].process_cpu_pct == pytest.approx(100)


def test_errors_are_real_pynvml_errors():
    lib = FakeNvmlLibrary("h100", driver_missing=True)
    with pytest.raises(lib.NVMLError_LibraryNotFound) as info:
        lib.nvmlInit()
    assert isinstance(info.value, lib.NVMLError)
    assert info.value.value == lib.NVML_ERROR_LIBRARY_NOT_FOUND


def test_calls_before_init_are_uninitialized():
    lib = FakeNvmlLibrary("h100")
    with pytest.raises(lib.NVMLError_Uninitialized):
        lib.nvmlDeviceGetCount()
    lib.nvmlInit()
    assert lib.nvmlDeviceGetCount() == 1
    lib.nvmlShutdown()
    with pytest.raises(lib.NVMLError_Uninitialized):
        lib.nvmlShutdown()


def test_unimplemented_functions_fail_loudly():
    lib = FakeNvmlLibrary("h100")
    with pytest.raises(AttributeError):
        _ = lib.nvmlDeviceGetFanSpeed  # must not fall through to the real library
    assert lib.NVML_CLOCK_SM == 1  # constants do come from pynvml


def test_returns_pynvml_shaped_objects(clock):
    lib = FakeNvmlLibrary("h100", workloads="gemm", clock=clock)
    lib.nvmlInit()
    h = lib.nvmlDeviceGetHandleByIndex(0)
    assert isinstance(lib.nvmlDeviceGetUtilizationRates(h), lib.c_nvmlUtilization_t)
    assert isinstance(lib.nvmlDeviceGetMemoryInfo(h), lib.c_nvmlMemory_t)
    mem = lib.nvmlDeviceGetMemoryInfo(h, version=lib.nvmlMemory_v2)
    assert isinstance(mem, lib.c_nvmlMemory_v2_t)
    assert mem.total == mem.reserved + mem.used + mem.free
    assert isinstance(lib.nvmlGpmSampleAlloc(), lib.c_nvmlGpmSample_t)
    with pytest.raises(lib.NVMLError_ArgumentVersionMismatch):
        lib.nvmlDeviceGetMemoryInfo(h, version=7)


def test_gpm_metrics_fill_the_real_struct(clock):
    lib = FakeNvmlLibrary("h100", workloads="gemv", clock=clock, noise=0)
    lib.nvmlInit()
    h = lib.nvmlDeviceGetHandleByIndex(0)
    s1, s2 = lib.nvmlGpmSampleAlloc(), lib.nvmlGpmSampleAlloc()
    lib.nvmlGpmSampleGet(h, s1)
    clock.advance(0.2)
    lib.nvmlGpmSampleGet(h, s2)
    req = lib.c_nvmlGpmMetricsGet_t()
    req.version = lib.NVML_GPM_METRICS_GET_VERSION
    req.numMetrics = 2
    req.sample1, req.sample2 = s1, s2
    req.metrics[0].metricId = lib.NVML_GPM_METRIC_DRAM_BW_UTIL
    req.metrics[1].metricId = lib.NVML_GPM_METRIC_NVLINK_L0_RX_PER_SEC  # not modelled
    lib.nvmlGpmMetricsGet(req)
    assert req.metrics[0].nvmlReturn == 0
    assert req.metrics[0].value == pytest.approx(84.8)
    assert req.metrics[1].nvmlReturn == lib.NVML_ERROR_NOT_SUPPORTED
    # samples in the wrong order are refused
    req.sample1, req.sample2 = s2, s1
    with pytest.raises(lib.NVMLError_InvalidArgument):
        lib.nvmlGpmMetricsGet(req)
    lib.nvmlGpmSampleFree(s1)
    with pytest.raises(lib.NVMLError_InvalidArgument):
        lib.nvmlGpmSampleFree(s1)  # double free
    with pytest.raises(lib.NVMLError_InvalidArgument):
        lib.nvmlGpmSampleGet(h, ctypes.cast(None, lib.c_nvmlGpmSample_t))


def test_a100_says_no_gpm(clock):
    lib = FakeNvmlLibrary("a100", clock=clock)
    lib.nvmlInit()
    h = lib.nvmlDeviceGetHandleByIndex(0)
    assert lib.nvmlGpmQueryDeviceSupport(h).isSupportedDevice == 0
    with pytest.raises(lib.NVMLError_NotSupported):
        lib.nvmlGpmSampleGet(h, lib.nvmlGpmSampleAlloc())


def test_schedule_alternates_on_the_clock(clock):
    lib = FakeNvmlLibrary("h100", workloads="gemv:2,gemm:2", clock=clock)
    seen = []
    for _ in range(9):
        seen.append(lib.workload(0))
        clock.advance(1.0)
    assert seen == ["gemv", "gemv", "gemm", "gemm", "gemv", "gemv", "gemm", "gemm", "gemv"]


def test_alternating_gpm_window_blends(clock):
    lib = FakeNvmlLibrary("h100", workloads="gemv:2,gemm:2", clock=clock, noise=0)
    backend = NvmlBackend(lib, clock=clock)
    clock.advance(4.0)  # one whole period since the priming sample
    s = backend.read(0, 0.0)
    assert s.dram_bw_pct == pytest.approx((84.8 + 25.5) / 2)


def test_set_workload_at_runtime(clock):
    lib = FakeNvmlLibrary("h100", gpus=2, workloads=["idle", "gemm"], clock=clock)
    assert [lib.workload(0), lib.workload(1)] == ["idle", "gemm"]
    lib.set_workload(0, "decode")
    assert lib.workload(0) == "decode"
    assert lib.workload(1) == "gemm"
    with pytest.raises(ValueError, match="unknown fake workload"):
        lib.set_workload(0, "train")


def test_parse_workload():
    assert parse_workload("gemm") == "gemm"
    assert parse_workload("gemv:2, gemm:1.5") == (("gemv", 2.0), ("gemm", 1.5))
    for bad in ("gemv:0", "gemv:x", "gemv,gemm", "nope", "gemv:inf"):
        with pytest.raises(ValueError):
            parse_workload(bad)


def test_seeded_noise_repeats(clock):
    def run(seed):
        backend = fake_backend("h100", workloads="gemv", seed=seed, clock=clock)
        out = []
        for _ in range(5):
            clock.advance(0.2)
            s = backend.read(0, 0.0)
            out.append((s.busy_pct, s.dram_bw_pct, s.power_w))
        return out

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_noise_keeps_samples_valid(clock):
    for name in FAKE_WORKLOADS:
        backend = fake_backend("h100", gpus=2, workloads=name, seed=3, clock=clock)
        for _ in range(5):
            clock.advance(0.15)
            for gpu in (0, 1):
                s = backend.read(gpu, 1.7e9)
                assert invalid_reason(s) is None, (name, invalid_reason(s))


def test_inject_validates_and_clears(clock):
    lib = FakeNvmlLibrary("h100", clock=clock)
    with pytest.raises(ValueError, match="does not implement"):
        lib.inject(0, "nvmlDeviceGetTemprature", "not_supported")
    with pytest.raises(ValueError, match="unknown error"):
        lib.inject(0, "nvmlDeviceGetTemperature", "on_fire")
    with pytest.raises(ValueError, match="no fake GPU"):
        lib.inject(5, "nvmlDeviceGetTemperature", "not_supported")
    lib.inject(0, "nvmlDeviceGetTemperature", "not_supported")
    lib.nvmlInit()
    h = lib.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(lib.NVMLError_NotSupported):
        lib.nvmlDeviceGetTemperature(h, lib.NVML_TEMPERATURE_GPU)
    lib.clear_injections()
    assert lib.nvmlDeviceGetTemperature(h, lib.NVML_TEMPERATURE_GPU) > 0


def test_fake_backend_for_the_cli():
    backend = fake_backend("h100", gpus=8)
    try:
        assert isinstance(backend, NvmlBackend)
        assert len(backend.devices()) == 8
        assert len({d.gpu_uuid for d in backend.devices()}) == 8
        assert isinstance(backend.library, FakeNvmlLibrary)
    finally:
        backend.close()


def test_fake_pids_are_not_real_pids(clock):
    lib = FakeNvmlLibrary("h100", gpus=2, clock=clock)
    assert lib.fake_pid(0) >= 2**22 and lib.fake_pid(0) == FAKE_PID_BASE


def test_fake_host_sensor_reports_the_stalled_process(clock):
    backend = fake_backend("h100", gpus=2, workloads=["host_stall", "idle"], clock=clock)
    sample = backend.read(0, 0.0)
    (proc,) = sample.processes
    host = FakeHostSensor(backend.library)
    hs = host.read(1.0, {proc.pid: (0,), 12345: (1,)})
    assert [p.pid for p in hs.processes] == [proc.pid]  # unknown pid skipped
    assert hs.processes[0].cpu_pct == pytest.approx(100, abs=2)
    assert hs.processes[0].gpu_indices == (0,)
    assert backend.read(1, 0.0).processes == ()  # idle GPU: no process


def test_gpm_intervals_keep_the_newest_and_stay_bounded_over_a_long_run(clock, monkeypatch):
    # A daemon on the fake (the demo, the benches) computes GPM for every GPU every
    # tick; the list of intervals once grew without end (~36 MB an hour at 10 Hz).
    monkeypatch.setattr(fake, "GPM_INTERVALS_KEPT", 5, raising=False)
    backend = fake_backend("h100", 1, "gemv", clock=clock)
    try:
        for n in range(40):
            clock.advance(0.2)
            backend.read(0, float(n))
        intervals = backend.library.gpm_intervals
        assert 5 <= len(intervals) <= 10
        assert intervals[-1][2] == clock()  # the newest is kept
        assert [t1 for _, t1, _ in intervals] == sorted(t1 for _, t1, _ in intervals)
    finally:
        backend.close()
