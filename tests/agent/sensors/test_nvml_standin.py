"""NvmlBackend over the real pynvml wrappers, over a stand-in for libnvidia-ml.so.

pynvml's own code runs here as on a host: the C symbol it picks (``_v2``, ``_v3``),
the versioned structs it fills, the process-list size query, the ``NVMLError``
subclass a return code becomes, and ``FunctionNotFound`` for a symbol the driver
branch (R470, R510, R535, R580) does not export.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from dataclasses import dataclass
from typing import Any

import pytest

from rooftop.agent.classifier import classify
from rooftop.agent.sampler import Sampler
from rooftop.agent.sensors.fake import FakeNvmlLibrary
from rooftop.agent.sensors.gpm import GPM_METRIC_FIELDS
from rooftop.agent.sensors.nvml import HEALTH_EVERY_S, NvmlBackend
from rooftop.agent.sensors.nvml_standin import (
    DRIVERS,
    GPM_METRICS_GET_VERSION,
    GPM_SUPPORT_VERSION,
    HEADER_COMMITS,
    MEMORY_V2_VERSION,
    NVML_FUNCTIONS,
    TEMPERATURE_V1_VERSION,
    NvmlLibraryStandIn,
    installed,
)
from rooftop.agent.window import build_windows
from rooftop.common.errors import DeviceLost
from rooftop.common.health import HealthState, assess
from rooftop.common.model import Bound, GpuSample

_GiB = 1024**3
_MiB = 1024**2
# Every field GPM fills, as gpm.py names them.
GPM_FIELDS = tuple(GPM_METRIC_FIELDS.values())


@dataclass
class Host:
    """A host as the backend sees it: real pynvml, its nvmlLib the stand-in."""

    nvml: Any  # the pynvml module
    standin: NvmlLibraryStandIn
    model: FakeNvmlLibrary
    backend: NvmlBackend | None

    def handle(self, gpu: int = 0) -> Any:
        return self.nvml.nvmlDeviceGetHandleByIndex(gpu)


@pytest.fixture
def host(clock):
    """``host(driver, model)``: install a stand-in, open the real backend over it.

    Everything is closed and pynvml restored after the test, and the stand-in must not
    have failed inside (an exception in an entry point, an unmodelled function).
    """
    standins: list[NvmlLibraryStandIn] = []
    with contextlib.ExitStack() as stack:

        def make(driver: str, model: FakeNvmlLibrary, *, backend: bool = True) -> Host:
            standin = NvmlLibraryStandIn(model, driver)
            nvml = stack.enter_context(installed(standin))
            standins.append(standin)
            opened = None
            if backend:
                opened = NvmlBackend(clock=clock)  # the pynvml module as its library
                stack.callback(opened.close)
            else:
                nvml.nvmlInit()
                stack.callback(nvml.nvmlShutdown)
            return Host(nvml, standin, model, opened)

        yield make
    for standin in standins:
        assert standin.failures == []


def address(handle: Any) -> int | None:
    """Where an ``nvmlDevice_t`` (pynvml's pointer type) points."""
    return ctypes.cast(handle, ctypes.c_void_p).value


def settled_read(backend, clock, gpu=0):
    """A read 200 ms after the previous GPM sample, so GPM metrics are fresh."""
    clock.advance(0.2)
    return backend.read(gpu, time_s=1.7e9)


# -- the driver profiles -----------------------------------------------------------


def test_each_branch_adds_the_functions_its_nvml_h_first_declares():
    r470, r510, r535, r580 = (DRIVERS[k].exports for k in ("r470", "r510", "r535", "r580"))
    assert {
        "nvmlDeviceGetComputeRunningProcesses_v2",
        "nvmlDeviceGetCurrentClocksThrottleReasons",
        "nvmlDeviceGetMemoryInfo",
        "nvmlDeviceGetTemperature",
    } <= r470
    assert r510 - r470 == {
        "nvmlDeviceGetMemoryInfo_v2",
        "nvmlDeviceGetComputeRunningProcesses_v3",
    }
    assert r535 - r510 == {
        "nvmlGpmMigSampleGet",  # CUDA 12.0 (R525), not 11.8 with the rest of GPM
        "nvmlGpmQueryDeviceSupport",
        "nvmlGpmSampleAlloc",
        "nvmlGpmSampleFree",
        "nvmlGpmSampleGet",
        "nvmlGpmMetricsGet",
        "nvmlDeviceGetCurrentClocksEventReasons",
    }
    assert r580 - r535 == {"nvmlDeviceGetTemperatureV"}
    assert r580 == set(NVML_FUNCTIONS)  # nothing modelled was removed by R580
    for function in NVML_FUNCTIONS.values():
        assert function.since_cuda in HEADER_COMMITS, function
        assert HEADER_COMMITS[function.since_cuda][:7] in function.header
    assert (DRIVERS["r470"].gpm_metric_max, DRIVERS["r535"].gpm_metric_max) == (0, 98)


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_a_symbol_is_there_exactly_when_the_profile_exports_it(clock, driver):
    standin = NvmlLibraryStandIn(FakeNvmlLibrary("h100", clock=clock), driver)
    for name in NVML_FUNCTIONS:
        if name in DRIVERS[driver].exports:
            assert callable(getattr(standin, name)), name
        else:
            with pytest.raises(AttributeError):  # what pynvml turns into FunctionNotFound
                getattr(standin, name)
    assert standin.calls == {}  # looking a symbol up calls nothing


def test_a_function_the_driver_lacks_is_function_not_found_inside_pynvml(host, clock):
    h = host("r470", FakeNvmlLibrary("a100", workloads="gemv", clock=clock), backend=False)
    nvml, handle = h.nvml, h.handle()
    with pytest.raises(nvml.NVMLError_FunctionNotFound):
        nvml.nvmlGpmSampleAlloc()
    with pytest.raises(nvml.NVMLError_FunctionNotFound):
        nvml.nvmlDeviceGetMemoryInfo(handle, nvml.nvmlMemory_v2)
    # pynvml's unversioned process query needs the _v3 symbol (R510+); on R470 it
    # raises its NVMLLibraryMismatchError, which is no NVMLError at all.
    with pytest.raises(nvml.NVMLLibraryMismatchError):
        nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    assert not issubclass(nvml.NVMLLibraryMismatchError, nvml.NVMLError)
    (process,) = nvml.nvmlDeviceGetComputeRunningProcesses_v2(handle)
    assert process.pid == h.model.fake_pid(0)
    assert nvml.nvmlDeviceGetMemoryInfo(handle).total == 85_899_345_920
    # the missing functions were never reached: pynvml stopped at the symbol lookup
    assert not {n for n in h.standin.calls if n.startswith("nvmlGpm") or n.endswith("_v3")}


def test_temperature_v_is_function_not_found_before_r570(host, clock):
    h = host("r535", FakeNvmlLibrary("h100", workloads="gemm", clock=clock), backend=False)
    with pytest.raises(h.nvml.NVMLError_FunctionNotFound):
        h.nvml.nvmlDeviceGetTemperatureV(h.handle(), h.nvml.NVML_TEMPERATURE_GPU)
    assert h.nvml.nvmlDeviceGetTemperature(h.handle(), h.nvml.NVML_TEMPERATURE_GPU) > 31


def test_an_unmodelled_function_fails_loudly_not_as_function_not_found(host, clock):
    h = host("r580", FakeNvmlLibrary("h100", clock=clock), backend=False)
    with pytest.raises(NotImplementedError, match="nvmlDeviceGetFanSpeed"):
        h.nvml.nvmlDeviceGetFanSpeed(h.handle())
    # kept, so a backend that swallows every exception still fails the test
    assert [type(e) for e in h.standin.failures] == [NotImplementedError]
    h.standin.failures.clear()


# -- the backend over each driver --------------------------------------------------


@pytest.mark.parametrize(
    ("driver", "profile"),
    [("r510", "a100"), ("r535", "h100"), ("r580", "h100"), ("r535", "v100")],
)
def test_reads_what_the_python_api_fake_reads(host, clock, driver, profile):
    """Same model, same seed: the sample through pynvml's C layer is the same, value for
    value, as through the pynvml-shaped fake (where the driver has each API or an
    equivalent older one)."""
    workloads = ["gemv:0.25,gemm:0.25", "decode"]
    direct = NvmlBackend(FakeNvmlLibrary(profile, 2, workloads, clock=clock), clock=clock)
    h = host(driver, FakeNvmlLibrary(profile, 2, workloads, clock=clock))
    assert h.backend.devices() == direct.devices()
    for _ in range(6):
        clock.advance(0.15)
        for gpu in (0, 1):
            assert h.backend.read(gpu, 1.7e9) == direct.read(gpu, 1.7e9)
    direct.close()


def test_r580_h100_gemv_through_real_pynvml(host, clock):
    model = FakeNvmlLibrary("h100", gpus=2, workloads="gemv", clock=clock, noise=0)
    h = host("r580", model)
    infos = h.backend.devices()
    uuids = [model.nvmlDeviceGetUUID(model.nvmlDeviceGetHandleByIndex(i)) for i in (0, 1)]
    assert [i.gpu_uuid for i in infos] == uuids and uuids[0] != uuids[1]
    assert infos[0].gpu_name == "NVIDIA H100 80GB HBM3"
    assert (infos[0].has_gpm, infos[0].mem_total_bytes) == (True, 85_520_809_984)
    assert (infos[0].pcie_link_gen_max, infos[0].pcie_link_width_max) == (5, 16)
    s = settled_read(h.backend, clock)
    # DESIGN §2's batch-1 GEMV row
    assert (s.busy_pct, s.mem_ctrl_pct) == (96.0, 97.0)  # c_uint: rounded, as NVML does
    assert s.sm_active_pct == pytest.approx(81.3)
    assert s.dram_bw_pct == pytest.approx(84.8)
    assert s.tensor_active_pct == pytest.approx(2.2)
    assert s.mem_used_bytes == 17 * _GiB + 4 * _MiB  # memory v2: reserved not counted
    assert s.clock_event_reasons == 0
    assert [(p.pid, p.gpu_mem_bytes) for p in s.processes] == [
        (model.fake_pid(0), 17 * _GiB + 4 * _MiB)
    ]
    # on the newest driver, the newest API of each pair; the older ones never
    called = set(h.standin.calls)
    assert {
        "nvmlDeviceGetMemoryInfo_v2",
        "nvmlDeviceGetComputeRunningProcesses_v3",
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetTemperatureV",
        "nvmlGpmMetricsGet",
    } <= called
    assert not called & {
        "nvmlDeviceGetMemoryInfo",
        "nvmlDeviceGetCurrentClocksThrottleReasons",
        "nvmlDeviceGetTemperature",
    }
    h.backend.close()
    assert h.standin.calls["nvmlGpmSampleFree"] == h.standin.calls["nvmlGpmSampleAlloc"] == 4
    assert model.live_gpm_samples == 0 and not model.initialized


def test_r470_a100_degrades_field_by_field(host, clock, caplog):
    model = FakeNvmlLibrary("a100", workloads="gemv", clock=clock, noise=0)
    with caplog.at_level(logging.INFO, logger="rooftop.agent.sensors.nvml"):
        h = host("r470", model)
        s = settled_read(h.backend, clock)
    info = h.backend.devices()[0]
    assert (info.has_gpm, info.mem_total_bytes, info.pcie_link_gen_max) == (
        False,
        85_899_345_920,
        4,
    )
    assert (s.busy_pct, s.mem_ctrl_pct) == (96.0, 97.0)
    assert all(getattr(s, f) is None for f in GPM_FIELDS)
    # memory v1: driver-reserved memory counts as used
    assert s.mem_used_bytes == 17 * _GiB + 4 * _MiB + model.profile.mem_reserved_bytes
    assert s.clock_event_reasons == 0  # from the pre-12.2 "throttle reasons"
    assert s.temperature_c is not None and s.power_w is not None
    assert h.standin.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 1
    assert h.standin.calls["nvmlDeviceGetMemoryInfo"] >= 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("nvmlGpmQueryDeviceSupport: Function Not Found" in m for m in messages)
    assert any("nvmlDeviceGetMemoryInfo: Function Not Found" in m for m in messages)


@pytest.mark.parametrize("driver", ["r470", "r535", "r580"])
def test_v100_reads_retired_pages_where_it_has_no_row_remapping(host, clock, driver):
    """Pre-Ampere GPUs retire pages instead of remapping rows: NotSupported from
    nvmlDeviceGetRemappedRows turns to page retirement (the size query included), and
    a pending retirement degrades the GPU."""
    model = FakeNvmlLibrary("v100", gpus=2, workloads="gemv", clock=clock)
    model.set_retired_pages(1, single_bit=3, double_bit=1, pending=True)
    h = host(driver, model)
    s0, s1 = settled_read(h.backend, clock, 0), settled_read(h.backend, clock, 1)
    assert (s1.retired_pages_single_bit, s1.retired_pages_double_bit) == (3, 1)
    assert s1.retired_pages_pending is True
    assert (s0.retired_pages_single_bit, s0.retired_pages_double_bit) == (0, 0)
    assert s0.retired_pages_pending is False
    assert s1.remapped_rows_corrected is None and s1.remap_pending is None
    health = assess(s1)
    assert health.state is HealthState.DEGRADED
    assert health.reasons == ("page retirement pending: reset the GPU (or reload the driver) "
                              "to apply it",)
    assert assess(s0).state is HealthState.OK
    # Row remapping said NotSupported once per GPU: not asked again.
    remap_calls = h.standin.calls["nvmlDeviceGetRemappedRows"]
    model.set_retired_pages(1, single_bit=4)
    clock.advance(HEALTH_EVERY_S)
    later = settled_read(h.backend, clock, 1)
    assert (later.retired_pages_single_bit, later.retired_pages_pending) == (4, False)
    assert h.standin.calls["nvmlDeviceGetRemappedRows"] == remap_calls == 2


def test_ampere_and_later_remap_rows_and_never_ask_for_retired_pages(host, clock):
    model = FakeNvmlLibrary("h100", workloads="gemv", clock=clock)
    model.set_remapped_rows(0, 2, 0, pending=True)
    h = host("r580", model)
    s = settled_read(h.backend, clock)
    assert (s.remapped_rows_corrected, s.remap_pending) == (2, True)
    assert (s.retired_pages_single_bit, s.retired_pages_pending) == (None, None)
    assert h.standin.calls["nvmlDeviceGetRetiredPages"] == 0


def test_a_gpu_without_either_is_absent_and_asked_no_more(host, clock):
    """No ECC at all (a consumer card): both mechanisms NotSupported, fields absent."""
    model = FakeNvmlLibrary("v100", workloads="gemv", clock=clock)
    model.inject(0, "nvmlDeviceGetRetiredPages", "not_supported")
    model.inject(0, "nvmlDeviceGetRetiredPagesPendingStatus", "not_supported")
    h = host("r580", model)
    s = settled_read(h.backend, clock)
    assert (s.retired_pages_single_bit, s.retired_pages_pending) == (None, None)
    asked = h.standin.calls["nvmlDeviceGetRetiredPages"]
    clock.advance(HEALTH_EVERY_S)
    assert settled_read(h.backend, clock).busy_pct is not None
    assert h.standin.calls["nvmlDeviceGetRetiredPages"] == asked == 2


def test_r470_lists_processes_through_v2(host, clock):
    model = FakeNvmlLibrary("a100", workloads="gemv", clock=clock, noise=0)
    h = host("r470", model)
    s = settled_read(h.backend, clock)
    assert [(p.pid, p.gpu_mem_bytes) for p in s.processes] == [
        (model.fake_pid(0), 17 * _GiB + 4 * _MiB)
    ]
    assert h.standin.calls["nvmlDeviceGetComputeRunningProcesses_v2"] >= 1


def test_injected_errors_arrive_as_pynvml_error_subclasses(host, clock):
    model = FakeNvmlLibrary("h100", gpus=2, workloads="gemm", clock=clock)
    model.inject(0, "nvmlDeviceGetPowerUsage", "not_supported")
    model.inject(1, "nvmlDeviceGetUtilizationRates", "gpu_is_lost")
    h = host("r535", model)
    s = settled_read(h.backend, clock)
    assert s.power_w is None
    assert s.busy_pct is not None and s.tensor_active_pct == pytest.approx(91.9, abs=2)
    with pytest.raises(DeviceLost) as info:
        h.backend.read(1, 1.7e9)
    assert info.value.gpu_index == 1
    assert type(info.value.__cause__) is h.nvml.NVMLError_GpuIsLost


def test_process_memory_not_available_reads_none(host, clock):
    class NoProcessMemory(FakeNvmlLibrary):
        def nvmlDeviceGetComputeRunningProcesses(self, handle):
            processes = super().nvmlDeviceGetComputeRunningProcesses(handle)
            for p in processes:
                p.usedGpuMemory = None  # the C library writes NVML_VALUE_NOT_AVAILABLE
            return processes

    model = NoProcessMemory("h100", workloads="gemv", clock=clock)
    h = host("r580", model)
    (process,) = h.backend.read(0, 1.7e9).processes
    assert (process.pid, process.gpu_mem_bytes) == (model.fake_pid(0), None)


# -- what the C library does and pynvml relies on ----------------------------------


def test_struct_versions_are_nvml_h_s_and_a_wrong_one_is_refused(host, clock):
    h = host("r580", FakeNvmlLibrary("h100", workloads="gemv", clock=clock), backend=False)
    nvml, handle = h.nvml, h.handle()
    # pynvml's constants agree with NVML_STRUCT_VERSION over the header's layouts
    assert nvml.nvmlMemory_v2 == MEMORY_V2_VERSION == 0x02000028
    assert nvml.nvmlTemperature_v1 == TEMPERATURE_V1_VERSION == 0x0100000C
    assert nvml.NVML_GPM_METRICS_GET_VERSION == GPM_METRICS_GET_VERSION
    assert nvml.NVML_GPM_SUPPORT_VERSION == GPM_SUPPORT_VERSION
    unset = nvml.c_nvmlMemory_v2_t()  # version 0
    assert (
        h.standin.nvmlDeviceGetMemoryInfo_v2(handle, ctypes.byref(unset))
        == nvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
    )
    assert unset.total == 0
    with pytest.raises(nvml.NVMLError_ArgumentVersionMismatch) as info:
        nvml.nvmlDeviceGetMemoryInfo(handle, MEMORY_V2_VERSION + (1 << 24))  # "v3"
    # pynvml has no text for code 25: it asked the library's nvmlErrorString
    assert str(info.value) == "The provided version is invalid/unsupported"
    assert h.standin.calls["nvmlErrorString"] == 1
    request = nvml.c_nvmlGpmMetricsGet_t()
    request.version = GPM_METRICS_GET_VERSION + 1
    with pytest.raises(nvml.NVMLError_ArgumentVersionMismatch):
        nvml.nvmlGpmMetricsGet(request)
    assert nvml.nvmlDeviceGetMemoryInfo(handle, nvml.nvmlMemory_v2).used == 17 * _GiB + 4 * _MiB
    assert nvml.nvmlDeviceGetTemperatureV(handle, nvml.NVML_TEMPERATURE_GPU) > 31


def test_process_list_size_query(host, clock):
    model = FakeNvmlLibrary("h100", gpus=2, workloads=["gemv", "idle"], clock=clock)
    h = host("r580", model, backend=False)
    nvml = h.nvml
    v3 = h.standin.nvmlDeviceGetComputeRunningProcesses_v3
    count = ctypes.c_uint(0)
    assert v3(h.handle(0), ctypes.byref(count), None) == nvml.NVML_ERROR_INSUFFICIENT_SIZE
    assert count.value == 1  # how many there are
    # room for one but no array: only the *infoCount = 0 query may pass NULL
    assert v3(h.handle(1), ctypes.byref(count), None) == nvml.NVML_ERROR_INVALID_ARGUMENT
    count.value = 0
    assert v3(h.handle(1), ctypes.byref(count), None) == nvml.NVML_SUCCESS  # idle: none
    assert count.value == 0
    entries = (nvml.c_nvmlProcessInfo_v3_t * 3)()  # pynvml's struct: same layout
    count.value = 3
    assert v3(h.handle(0), ctypes.byref(count), entries) == nvml.NVML_SUCCESS
    assert (count.value, entries[0].pid, entries[0].gpuInstanceId) == (
        1,
        model.fake_pid(0),
        0xFFFFFFFF,
    )
    assert entries[1].pid == 0  # untouched past the count

    class ProcessInfoV1(ctypes.Structure):  # nvml.h nvmlProcessInfo_v1_t: 16 bytes
        _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]

    old = (ProcessInfoV1 * 2)()
    count.value = 2
    v1 = h.standin.nvmlDeviceGetComputeRunningProcesses
    assert v1(h.handle(0), ctypes.byref(count), old) == nvml.NVML_SUCCESS
    assert (old[0].pid, old[0].usedGpuMemory) == (model.fake_pid(0), 17 * _GiB + 4 * _MiB)
    assert old[1].pid == 0


@pytest.mark.parametrize(
    ("driver", "metric_id", "expected"),
    [
        ("r580", 249, "NVML_ERROR_INVALID_ARGUMENT"),  # past R580's 210: as the H100 probe saw
        ("r535", 100, "NVML_ERROR_INVALID_ARGUMENT"),  # past R535's 98
        ("r580", 100, "NVML_ERROR_NOT_SUPPORTED"),  # an id R580 knows; the model has no value
    ],
)
def test_a_gpm_metric_id_past_the_drivers_max_fails_alone(host, clock, driver, metric_id, expected):
    h = host(driver, FakeNvmlLibrary("h100", workloads="gemv", clock=clock), backend=False)
    nvml, handle = h.nvml, h.handle()
    samples = [nvml.nvmlGpmSampleAlloc(), nvml.nvmlGpmSampleAlloc()]
    nvml.nvmlGpmSampleGet(handle, samples[0])
    clock.advance(0.2)
    nvml.nvmlGpmSampleGet(handle, samples[1])
    request = nvml.c_nvmlGpmMetricsGet_t()
    request.version = nvml.NVML_GPM_METRICS_GET_VERSION
    request.numMetrics = 2
    request.sample1, request.sample2 = samples
    request.metrics[0].metricId = nvml.NVML_GPM_METRIC_DRAM_BW_UTIL
    request.metrics[1].metricId = metric_id
    nvml.nvmlGpmMetricsGet(request)
    assert request.metrics[0].nvmlReturn == nvml.NVML_SUCCESS
    assert request.metrics[0].value == pytest.approx(84.8, abs=2)
    assert request.metrics[1].nvmlReturn == getattr(nvml, expected)
    for sample in samples:
        nvml.nvmlGpmSampleFree(sample)


# -- MIG -----------------------------------------------------------------------------


def test_mig_handles_have_c_semantics(host, clock):
    model = FakeNvmlLibrary("h100-mig", workloads=["gemv", "idle"], clock=clock)
    h = host("r580", model, backend=False)
    nvml, parent = h.nvml, h.handle()
    assert nvml.nvmlDeviceGetMigMode(parent) == [1, 1]  # current, pending
    assert nvml.nvmlDeviceGetMaxMigDeviceCount(parent) == 7
    first, second = (nvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, i) for i in (0, 1))
    assert len({address(parent), address(first), address(second)}) == 3  # a handle of its own
    assert address(nvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, 0)) == address(first)
    with pytest.raises(nvml.NVMLError_NotFound):  # an empty slot
        nvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, 2)
    with pytest.raises(nvml.NVMLError_InvalidArgument):  # a MIG device has no MIG devices
        nvml.nvmlDeviceGetMigDeviceHandleByIndex(first, 0)
    assert nvml.nvmlDeviceIsMigDeviceHandle(first).value == 1
    assert nvml.nvmlDeviceIsMigDeviceHandle(parent).value == 0
    assert [nvml.nvmlDeviceGetGpuInstanceId(m) for m in (first, second)] == [1, 2]
    assert nvml.nvmlDeviceGetComputeInstanceId(second) == 0
    with pytest.raises(nvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceGetGpuInstanceId(parent)
    back = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(second)
    assert address(back) == address(parent)  # the parent's own nvmlDevice_t
    with pytest.raises(nvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(parent)
    mig_uuids = [
        model.nvmlDeviceGetUUID(
            model.nvmlDeviceGetMigDeviceHandleByIndex(model.nvmlDeviceGetHandleByIndex(0), i)
        )
        for i in (0, 1)
    ]
    assert [nvml.nvmlDeviceGetUUID(m) for m in (first, second)] == mig_uuids
    assert all(u.startswith("MIG-") for u in mig_uuids)
    assert nvml.nvmlDeviceGetName(first) == "NVIDIA H100 80GB HBM3 MIG 3g.40gb"
    assert nvml.nvmlDeviceGetMemoryInfo(first, nvml.nvmlMemory_v2).total == 40_768_634_880
    with pytest.raises(nvml.NVMLError_NotSupported):  # no util rates in MIG mode
        nvml.nvmlDeviceGetUtilizationRates(first)
    (process,) = nvml.nvmlDeviceGetComputeRunningProcesses(first)
    assert (process.pid, process.gpuInstanceId, process.computeInstanceId) == (
        model.fake_pid(0),
        1,
        0,
    )
    assert nvml.nvmlDeviceGetComputeRunningProcesses(second) == []
    # GPM: per GPU instance, through the parent; a GPU instance id it lacks is refused
    sample = nvml.nvmlGpmSampleAlloc()
    with pytest.raises(nvml.NVMLError_InvalidArgument):
        nvml.nvmlGpmMigSampleGet(parent, 7, sample)
    nvml.nvmlGpmMigSampleGet(parent, 2, sample)
    nvml.nvmlGpmSampleFree(sample)
    assert h.standin.calls["nvmlGpmMigSampleGet"] == 2


@pytest.mark.parametrize("driver", ["r535", "r580"])
@pytest.mark.parametrize("profile", ["a100-mig", "h100-mig"])
def test_mig_instances_read_what_the_python_api_fake_reads(host, clock, driver, profile):
    """MIG enumeration and reads through pynvml's C layer equal the pynvml-shaped fake's,
    field for field: the parent and each instance by its MIG UUID."""
    workloads = ["gemv", "gemm"]
    direct = NvmlBackend(FakeNvmlLibrary(profile, 1, workloads, clock=clock), clock=clock)
    h = host(driver, FakeNvmlLibrary(profile, 1, workloads, clock=clock))
    infos = h.backend.devices()
    assert infos == direct.devices()
    parent, *instances = infos
    assert parent.mig_mode and not parent.mig_uuid
    model_parent = h.model.nvmlDeviceGetHandleByIndex(0)
    assert [i.mig_uuid for i in instances] == [
        h.model.nvmlDeviceGetUUID(h.model.nvmlDeviceGetMigDeviceHandleByIndex(model_parent, k))
        for k in (0, 1)
    ]
    assert [(i.gpu_instance_id, i.compute_instance_id) for i in instances] == [(1, 0), (2, 0)]
    assert {(i.gpu_index, i.gpu_uuid) for i in instances} == {(0, parent.gpu_uuid)}
    assert all(i.has_gpm is (profile == "h100-mig") for i in instances)
    # all 7 slots asked once; the 5 empty ones answered NotFound, which is no error
    assert h.standin.calls["nvmlDeviceGetMigDeviceHandleByIndex"] == 7
    assert not any(fn == "_mig_handle" for fn, _ in h.backend.errors)
    for _ in range(3):
        clock.advance(0.2)
        for mig_uuid in ("", *(i.mig_uuid for i in instances)):
            assert h.backend.read(0, 1.7e9, mig_uuid) == direct.read(0, 1.7e9, mig_uuid)
    if profile == "h100-mig":
        # GPM per GPU instance, sampled through the parent; the parent samples none
        assert h.standin.calls["nvmlGpmMigSampleGet"] >= 2 * 4
        assert h.standin.calls["nvmlGpmSampleGet"] == 0
        gemv, gemm = (h.backend.read(0, 1.7e9, i.mig_uuid) for i in instances)
        assert gemv.dram_bw_pct is not None and gemv.dram_bw_pct > 80
        assert gemm.tensor_active_pct is not None and gemm.tensor_active_pct > 80
    else:
        assert h.standin.calls["nvmlGpmMigSampleGet"] == 0
    direct.close()


def test_a100_mig_instance_through_real_pynvml_is_unknown(host, clock):
    h = host("r580", FakeNvmlLibrary("a100-mig", workloads="gemv", clock=clock))
    sampler = Sampler(h.backend, clock=lambda: 1.7e9 + clock())
    records = []
    for _ in range(10):
        clock.advance(0.2)
        records += sampler.tick()
    instance = next(s for s in records if isinstance(s, GpuSample) and s.mig_uuid)
    assert instance.busy_pct is None  # util rates: NVML_ERROR_NOT_SUPPORTED
    assert all(getattr(instance, f) is None for f in GPM_FIELDS)
    windows = build_windows(records)
    key = next(k for k in windows if k.mig_uuid)
    verdict = classify(windows[key][0])
    assert verdict.verdict is Bound.UNKNOWN
    assert verdict.rule.startswith("no activity signal: util.gpu not supported")
    assert h.standin.calls["nvmlDeviceGetUtilizationRates"] >= 10


def test_before_r525_mig_instances_have_no_gpm(host, clock):
    h = host("r510", FakeNvmlLibrary("h100-mig", workloads="gemv", clock=clock))
    _, *instances = h.backend.devices()
    assert [i.gpu_instance_id for i in instances] == [1, 2]
    assert not any(i.has_gpm for i in instances)
    clock.advance(0.2)
    sample = h.backend.read(0, 1.7e9, instances[0].mig_uuid)
    assert sample.mem_total_bytes == 40_768_634_880 and sample.dram_bw_pct is None
    assert "nvmlGpmMigSampleGet" not in h.standin.calls


# -- installing --------------------------------------------------------------------


def test_installing_leaves_pynvml_as_it_was(clock):
    first = NvmlLibraryStandIn(FakeNvmlLibrary("h100", clock=clock), "r580")
    with installed(first) as nvml:
        pass
    # as if the real library had been loaded before: a pointer pynvml cached from it
    cached = nvml._nvmlGetFunctionPointer_cache
    cached["nvmlDeviceGetCount_v2"] = real_pointer = object()
    before = (nvml.nvmlLib, dict(cached), nvml._nvmlLib_refcount)
    texts = dict(nvml.NVMLError._errcode_to_string)
    standin = NvmlLibraryStandIn(FakeNvmlLibrary("h100", workloads="gemv", clock=clock), "r580")
    with installed(standin) as nvml:
        with pytest.raises(RuntimeError, match="already"), installed(first):
            pass
        backend = NvmlBackend(clock=clock)
        str(nvml.NVMLError(nvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH))  # asks nvmlErrorString
        assert nvml.nvmlLib is standin and nvml._nvmlLib_refcount == 1
        assert cached["nvmlDeviceGetCount_v2"] is not real_pointer
        pointers = set(map(id, nvml._nvmlGetFunctionPointer_cache.values()))
        assert len(pointers) > 10
        backend.close()
    after = (nvml.nvmlLib, dict(nvml._nvmlGetFunctionPointer_cache), nvml._nvmlLib_refcount)
    assert after == before
    assert not pointers & set(map(id, nvml._nvmlGetFunctionPointer_cache.values()))
    assert dict(nvml.NVMLError._errcode_to_string) == texts
    assert standin.failures == []
    del cached["nvmlDeviceGetCount_v2"]
