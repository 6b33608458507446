"""A stand-in for ``libnvidia-ml.so``, so the real ``pynvml`` wrappers run without a GPU.

``FakeNvmlLibrary`` imitates pynvml's *Python* API, so what pynvml itself does never
runs over it: picking the ``_v2``/``_v3`` C symbol, filling a versioned struct, the
size query of process lists, turning a return code into an ``NVMLError`` subclass, and
``NVMLError_FunctionNotFound`` for a symbol the driver does not export. Here the layer
*below* pynvml is replaced instead. ``NvmlLibraryStandIn`` is what ``pynvml.nvmlLib``
normally is (a ``ctypes.CDLL``): an object whose attributes are C function pointers.
Each is a real ctypes callback with its ``nvml.h`` signature, called by pynvml as it
calls the driver (no ``argtypes``, ``int`` result, cdecl), and it answers as the C
library does: it writes into the caller's out-params, checks struct versions
(``NVML_ERROR_ARGUMENT_VERSION_MISMATCH``), returns ``NVML_ERROR_INSUFFICIENT_SIZE``
with the needed count for a too-small process list. The GPU *state* (workloads, noise,
schedules, the GPM counter model, injected errors) is a ``FakeNvmlLibrary``: each entry
point asks it and marshals its answer into C memory, so both fakes tell the same story.

A driver profile is the set of modelled entry points a driver branch exports. Asked for
any other, the stand-in raises ``AttributeError``, as ``CDLL`` does for a missing
symbol, and pynvml's ``_nvmlGetFunctionPointer`` turns that into
``NVMLError_FunctionNotFound``, as on a host with that driver. A name the stand-in
does not model at all raises ``NotImplementedError`` instead, so an unmodelled call
fails the test loudly rather than reading as "this driver lacks it".

Which header first declares each function (``NVML_FUNCTIONS``): every ``nvml.h`` that
NVIDIA/go-nvml vendored at ``gen/nvml/nvml.h`` from CUDA 11.0 to 13.3 was searched for
``DECLDIR <name>(``; none of these functions disappears again up to 13.3. Each toolkit
ships with the first driver of one branch (11.0 GA: 450.36.06, 11.1: 455.23, 11.4:
470.42.01, 11.6: 510.39.01, 11.8: 520.61.05, 12.2: 535.54.03, 12.8: 570.x, 13.0:
580.65.06), as the CUDA release notes' driver table says; only 13.0's line was
re-checked for this module, the others are as remembered (12.0: 525.60.13). The MIG
entry points were re-checked in the go-nvml clone: all seven are in 695db45 (11.0);
``nvmlGpmMigSampleGet`` is absent from 9adb740 (11.8) and first in 399f8e0 (12.0).

=====================================================  =======  ==================
function                                               since    first nvml.h
=====================================================  =======  ==================
``nvmlInit_v2``, ``nvmlInitWithFlags``,                ≤ R450   CUDA 11.0
``nvmlShutdown``, ``nvmlErrorString``,                          (``695db45``, the
``nvmlDeviceGetCount_v2``,                                      oldest vendored;
``nvmlDeviceGetHandleByIndex_v2``, ``...GetUUID``,              all are older)
``...GetName``, ``...GetMemoryInfo``,
``...GetMax/CurrPcieLinkGeneration/Width``,
``...GetUtilizationRates``, ``...GetClockInfo``,
``...GetPowerUsage``, ``...GetTemperature``,
``...GetCurrentClocksThrottleReasons``,
``...GetTotalEccErrors``, ``...GetRemappedRows``,
``...GetRetiredPages``,
``...GetRetiredPagesPendingStatus`` (page
retirement: R319, long before 11.0),
``nvmlEventSetCreate``, ``...RegisterEvents``,
``nvmlEventSetWait_v2``, ``nvmlEventSetFree``,
``...GetComputeRunningProcesses`` (v1 struct),
``...GetMigMode``, ``...GetMaxMigDeviceCount``,
``...GetMigDeviceHandleByIndex``,
``...IsMigDeviceHandle``, ``...GetGpuInstanceId``,
``...GetComputeInstanceId``,
``...GetDeviceHandleFromMigDeviceHandle``
(MIG came with the A100, R450)
``nvmlDeviceGetComputeRunningProcesses_v2``            R455     CUDA 11.1 (7dce688)
``nvmlDeviceGetMemoryInfo_v2``,                        R510     CUDA 11.6 (7dd9b38)
``nvmlDeviceGetComputeRunningProcesses_v3``
``nvmlGpmQueryDeviceSupport``,                         R520     CUDA 11.8 (9adb740)
``nvmlGpmSampleAlloc``, ``nvmlGpmSampleFree``,
``nvmlGpmSampleGet``, ``nvmlGpmMetricsGet``
``nvmlGpmMigSampleGet``                                R525     CUDA 12.0 (399f8e0)
``nvmlDeviceGetCurrentClocksEventReasons``             R535     CUDA 12.2 (075f45f)
``nvmlDeviceGetTemperatureV``                          R570     CUDA 12.8 (f420a32)
=====================================================  =======  ==================

Profiles (``DRIVERS``): ``r470`` (CUDA 11.4 header, 15056a1), ``r510`` (11.6,
7dd9b38), ``r535`` (12.2, 075f45f), ``r580`` (13.0, 9da9e13). Not checked: the
drivers' real dynamic symbol tables (a ``.so`` may export more than its public header
declares); point releases within a branch (a profile is its branch's first CUDA
header); per-GPU support inside an exported function (that is the model's
``NotSupported``). ``NVML_GPM_METRIC_MAX`` per header (98 from 11.8 to 12.8, 210 in 13.0)
bounds the metric ids a driver knows: a larger id gets its own ``nvmlReturn`` =
``NVML_ERROR_INVALID_ARGUMENT``, as metric 249 did on R580 (``/work/shared/nvml``
probe log: "249 ret=2").

Installing is process-global (pynvml keeps its library, function-pointer cache and
init count in module globals), so ``installed()`` saves and restores all of them and
refuses to nest.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

import pynvml

from rooftop.agent.sensors.fake import FakeNvmlLibrary

__all__ = [
    "DRIVERS",
    "GPM_METRICS_GET_VERSION",
    "GPM_SUPPORT_VERSION",
    "HEADER_COMMITS",
    "MEMORY_V2_VERSION",
    "NVML_FUNCTIONS",
    "TEMPERATURE_V1_VERSION",
    "DriverProfile",
    "NvmlFunction",
    "NvmlLibraryStandIn",
    "installed",
]

HEADER_REPO = "NVIDIA/go-nvml"
HEADER_PATH = "gen/nvml/nvml.h"

# CUDA toolkit -> the NVIDIA/go-nvml commit whose gen/nvml/nvml.h is that toolkit's.
HEADER_COMMITS: Mapping[str, str] = MappingProxyType(
    {
        "11.0": "695db45bc7a0d0318fb6802745a01ce9e01fbf2f",
        "11.1": "7dce688dc647ebd848399afb905ec10f5d81f15c",
        "11.4": "15056a1f03a90db949a4e7403e9db2c6c085973b",
        "11.6": "7dd9b38bcb8c787eea0201e9a16beeb212c99bf8",
        "11.8": "9adb740457e7f46224ff0e3363bdac33c39025c2",
        "12.0": "399f8e02186d7f8e478af933a5a64d798b900be9",
        "12.2": "075f45fd6a7be7b050f19b142a4631582010d719",
        "12.8": "f420a3285a89be0f8c68649f1e2dae2b7ea9b74d",
        "13.0": "9da9e13ce380e93732a0aa8ff7f8162c7fc11413",
    }
)


def _header(cuda: str) -> str:
    return f"{HEADER_REPO}@{HEADER_COMMITS[cuda][:7]}:{HEADER_PATH} (CUDA {cuda})"


@dataclass(frozen=True, slots=True)
class NvmlFunction:
    """One C entry point of ``libnvidia-ml.so`` and the first ``nvml.h`` declaring it."""

    name: str
    since_branch: int  # first driver branch whose header declares it (450: "R450 or older")
    since_cuda: str  # the CUDA toolkit that header shipped with

    @property
    def header(self) -> str:
        """Where it first appears: ``NVIDIA/go-nvml@<commit>:gen/nvml/nvml.h (CUDA x.y)``."""
        return _header(self.since_cuda)


def _functions(since_branch: int, since_cuda: str, *names: str) -> dict[str, NvmlFunction]:
    return {name: NvmlFunction(name, since_branch, since_cuda) for name in names}


NVML_FUNCTIONS: Mapping[str, NvmlFunction] = MappingProxyType(
    {
        **_functions(
            450,
            "11.0",
            "nvmlInit_v2",
            "nvmlInitWithFlags",
            "nvmlShutdown",
            "nvmlErrorString",
            "nvmlDeviceGetCount_v2",
            "nvmlDeviceGetHandleByIndex_v2",
            "nvmlDeviceGetUUID",
            "nvmlDeviceGetName",
            "nvmlDeviceGetMemoryInfo",
            "nvmlDeviceGetMaxPcieLinkGeneration",
            "nvmlDeviceGetMaxPcieLinkWidth",
            "nvmlDeviceGetCurrPcieLinkGeneration",
            "nvmlDeviceGetCurrPcieLinkWidth",
            "nvmlDeviceGetUtilizationRates",
            "nvmlDeviceGetClockInfo",
            "nvmlDeviceGetPowerUsage",
            "nvmlDeviceGetTemperature",
            "nvmlDeviceGetCurrentClocksThrottleReasons",
            "nvmlDeviceGetTotalEccErrors",
            "nvmlDeviceGetRemappedRows",
            "nvmlDeviceGetRetiredPages",
            "nvmlDeviceGetRetiredPagesPendingStatus",
            "nvmlEventSetCreate",
            "nvmlDeviceRegisterEvents",
            "nvmlEventSetWait_v2",
            "nvmlEventSetFree",
            "nvmlDeviceGetComputeRunningProcesses",
            "nvmlDeviceGetMigMode",
            "nvmlDeviceGetMaxMigDeviceCount",
            "nvmlDeviceGetMigDeviceHandleByIndex",
            "nvmlDeviceIsMigDeviceHandle",
            "nvmlDeviceGetGpuInstanceId",
            "nvmlDeviceGetComputeInstanceId",
            "nvmlDeviceGetDeviceHandleFromMigDeviceHandle",
        ),
        **_functions(455, "11.1", "nvmlDeviceGetComputeRunningProcesses_v2"),
        **_functions(
            510, "11.6", "nvmlDeviceGetMemoryInfo_v2", "nvmlDeviceGetComputeRunningProcesses_v3"
        ),
        **_functions(
            520,
            "11.8",
            "nvmlGpmQueryDeviceSupport",
            "nvmlGpmSampleAlloc",
            "nvmlGpmSampleFree",
            "nvmlGpmSampleGet",
            "nvmlGpmMetricsGet",
        ),
        **_functions(525, "12.0", "nvmlGpmMigSampleGet"),
        **_functions(535, "12.2", "nvmlDeviceGetCurrentClocksEventReasons"),
        **_functions(570, "12.8", "nvmlDeviceGetTemperatureV"),
    }
)


@dataclass(frozen=True, slots=True)
class DriverProfile:
    """A driver branch, as the modelled entry points its ``nvml.h`` declares."""

    name: str
    branch: int
    cuda: str  # the CUDA toolkit whose nvml.h is this branch's API
    gpm_metric_max: int  # NVML_GPM_METRIC_MAX in that header; 0 without GPM

    @property
    def header(self) -> str:
        """The header the profile follows."""
        return _header(self.cuda)

    @property
    def exports(self) -> frozenset[str]:
        """The modelled C functions this driver's ``libnvidia-ml.so`` exports."""
        return frozenset(f.name for f in NVML_FUNCTIONS.values() if f.since_branch <= self.branch)


DRIVERS: Mapping[str, DriverProfile] = MappingProxyType(
    {
        "r470": DriverProfile("R470", 470, "11.4", gpm_metric_max=0),
        "r510": DriverProfile("R510", 510, "11.6", gpm_metric_max=0),
        "r535": DriverProfile("R535", 535, "12.2", gpm_metric_max=98),
        "r580": DriverProfile("R580", 580, "13.0", gpm_metric_max=210),
    }
)

# -- the C structs, laid out as nvml.h declares them (not taken from pynvml, so a
#    pynvml struct that disagreed with the header would show) ----------------------


class _Memory(ctypes.Structure):  # nvmlMemory_t
    _fields_ = [
        ("total", ctypes.c_ulonglong),
        ("free", ctypes.c_ulonglong),
        ("used", ctypes.c_ulonglong),
    ]


class _Memory_v2(ctypes.Structure):  # nvmlMemory_v2_t
    _fields_ = [
        ("version", ctypes.c_uint),
        ("total", ctypes.c_ulonglong),
        ("reserved", ctypes.c_ulonglong),
        ("free", ctypes.c_ulonglong),
        ("used", ctypes.c_ulonglong),
    ]


class _EventData(ctypes.Structure):  # nvmlEventData_t (CUDA 11.0 header, 695db45)
    _fields_ = [
        ("device", ctypes.c_void_p),
        ("eventType", ctypes.c_ulonglong),
        ("eventData", ctypes.c_ulonglong),
        ("gpuInstanceId", ctypes.c_uint),
        ("computeInstanceId", ctypes.c_uint),
    ]


class _Utilization(ctypes.Structure):  # nvmlUtilization_t
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


class _ProcessInfo_v1(ctypes.Structure):  # nvmlProcessInfo_v1_t: the unversioned query's
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]


class _ProcessInfo_v2(ctypes.Structure):  # nvmlProcessInfo_v2_t == nvmlProcessInfo_t (_v3)
    _fields_ = [
        ("pid", ctypes.c_uint),
        ("usedGpuMemory", ctypes.c_ulonglong),
        ("gpuInstanceId", ctypes.c_uint),
        ("computeInstanceId", ctypes.c_uint),
    ]


class _Temperature_v1(ctypes.Structure):  # nvmlTemperature_v1_t
    _fields_ = [
        ("version", ctypes.c_uint),
        ("sensorType", ctypes.c_uint),  # nvmlTemperatureSensors_t
        ("temperature", ctypes.c_int),
    ]


class _GpmSupport(ctypes.Structure):  # nvmlGpmSupport_t
    _fields_ = [("version", ctypes.c_uint), ("isSupportedDevice", ctypes.c_uint)]


class _GpmSampleSt(ctypes.Structure):  # struct nvmlGpmSample_st: opaque
    pass


class _GpmMetricInfo(ctypes.Structure):
    _fields_ = [
        ("shortName", ctypes.c_char_p),
        ("longName", ctypes.c_char_p),
        ("unit", ctypes.c_char_p),
    ]


class _GpmMetric(ctypes.Structure):  # nvmlGpmMetric_t
    _fields_ = [
        ("metricId", ctypes.c_uint),
        ("nvmlReturn", ctypes.c_int),  # nvmlReturn_t
        ("value", ctypes.c_double),
        ("metricInfo", _GpmMetricInfo),
    ]


class _GpmMetricsGetHead(ctypes.Structure):  # the fixed part of nvmlGpmMetricsGet_t
    _fields_ = [
        ("version", ctypes.c_uint),
        ("numMetrics", ctypes.c_uint),
        ("sample1", ctypes.POINTER(_GpmSampleSt)),
        ("sample2", ctypes.POINTER(_GpmSampleSt)),
    ]


@functools.cache
def _metrics_get_type(count: int) -> type[ctypes.Structure]:
    # nvmlGpmMetricsGet_t up to its first `count` metrics: the caller's array is as
    # long as *its* NVML_GPM_METRIC_MAX, which need not be this driver's.
    return type(
        "_GpmMetricsGet",
        (ctypes.Structure,),
        {"_fields_": [*_GpmMetricsGetHead._fields_, ("metrics", _GpmMetric * count)]},
    )


def _struct_version(struct: type[ctypes.Structure], version: int) -> int:
    """``NVML_STRUCT_VERSION(data, ver)`` of nvml.h: ``sizeof(struct) | ver << 24``."""
    return ctypes.sizeof(struct) | version << 24


MEMORY_V2_VERSION = _struct_version(_Memory_v2, 2)  # nvmlMemory_v2
TEMPERATURE_V1_VERSION = _struct_version(_Temperature_v1, 1)  # nvmlTemperature_v1
GPM_METRICS_GET_VERSION = 1  # a plain #define in nvml.h, not NVML_STRUCT_VERSION
GPM_SUPPORT_VERSION = 1

_NOT_AVAILABLE_ULL = 2**64 - 1  # NVML_VALUE_NOT_AVAILABLE in an unsigned long long

# nvmlErrorString for the codes pynvml has no text of its own for (it asks the library
# only then): the enum comments of nvml.h 13.0. The real library's wording may differ.
_ERROR_TEXT: Mapping[int, str] = MappingProxyType(
    {
        19: "An operation cannot be performed because the GPU is currently in use",
        21: "No data",
        22: "The requested vgpu operation is not available on target device, because ECC "
        "is enabled",
        23: "Ran out of critical resources, other than memory",
        24: "Ran out of critical resources, other than memory",
        25: "The provided version is invalid/unsupported",
        26: "The requested functionality has been deprecated",
        27: "The system is not ready for the request",
        28: "No GPUs were found",
        29: "Resource not in correct state to perform requested operation",
        30: "Reset not supported for given device/parameters",
    }
)

_F = TypeVar("_F", bound=Callable[..., Any])
_CT = TypeVar("_CT")

# C name -> (restype, argtypes) of the entry points implemented below.
_SIGNATURES: dict[str, tuple[Any, tuple[Any, ...]]] = {}

_PTR = ctypes.c_void_p  # any pointer argument: the entry point casts it as C would
_UINT = ctypes.c_uint


def _c_function(*argtypes: Any, restype: Any = ctypes.c_int) -> Callable[[_F], _F]:
    """Register a method ``_c_<name>`` as the C function ``<name>`` with this signature."""

    def register(method: _F) -> _F:
        _SIGNATURES[method.__name__.removeprefix("_c_")] = (restype, argtypes)
        return method

    return register


def _error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


def _at(address: int | None, ctype: type[_CT]) -> _CT:
    """The ``ctype`` the caller's pointer points at; NULL is an invalid argument."""
    if not address:
        raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
    value: _CT = ctype.from_address(address)  # type: ignore[attr-defined]
    return value


def _write_string(address: int | None, length: int, text: str) -> None:
    data = text.encode() + b"\0"
    if not address:
        raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
    if length < len(data):
        raise _error(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)
    ctypes.memmove(address, data, len(data))


class NvmlLibraryStandIn:
    """``libnvidia-ml.so`` of one driver branch, over a ``FakeNvmlLibrary``'s GPUs.

    Args:
        model: the simulated GPUs (workloads, injected errors, GPM counters).
        driver: a key of ``DRIVERS`` (``"r470"``, ``"r510"``, ``"r535"``, ``"r580"``)
            or a ``DriverProfile``.

    Attributes ``nvml*`` are C function pointers (see the module docstring); install
    the stand-in with ``installed()``. ``calls`` counts the C calls by exported name;
    ``failures`` keeps any exception raised inside an entry point (it cannot cross
    into C, so the call returned ``NVML_ERROR_UNKNOWN``) and every request for a
    function the stand-in does not model: a test should find it empty.
    """

    def __init__(self, model: FakeNvmlLibrary, driver: str | DriverProfile = "r580") -> None:
        if isinstance(driver, str):
            if driver not in DRIVERS:
                raise ValueError(f"unknown driver {driver!r}; known: {', '.join(DRIVERS)}")
            driver = DRIVERS[driver]
        self.model = model
        self.driver = driver
        self.calls: Counter[str] = Counter()
        self.failures: list[Exception] = []
        self._lock = threading.Lock()
        self._pointers: dict[str, Any] = {}
        self._callbacks: list[Any] = []  # ctypes must keep each callback alive
        # GPU index, or (parent address, slot) of a MIG device -> its driver struct
        self._device_structs: dict[Hashable, ctypes.Array[ctypes.c_char]] = {}
        self._handles: dict[int, Any] = {}  # device struct address -> the model's handle
        self._mig_parents: dict[int, int] = {}  # MIG device address -> its parent's
        # nvmlEventSet_t address -> the model's event set (and the buffer it points at)
        self._event_sets: dict[int, Any] = {}
        self._event_structs: dict[int, ctypes.Array[ctypes.c_char]] = {}
        self._error_strings: dict[int, ctypes.Array[ctypes.c_char]] = {}

    @property
    def exports(self) -> frozenset[str]:
        """The C functions this driver exports (of those the stand-in models)."""
        return self.driver.exports

    def __getattr__(self, name: str) -> Any:
        # How pynvml finds a C function: getattr(nvmlLib, name), AttributeError
        # meaning "this driver has no such symbol".
        if not name.startswith("nvml"):
            raise AttributeError(name)
        if name not in NVML_FUNCTIONS:
            unmodelled = NotImplementedError(
                f"the NVML stand-in does not model {name!r}: add it to NVML_FUNCTIONS with "
                "the first nvml.h that declares it"
            )
            # Kept too: a backend that swallows every exception as "field absent" must
            # not hide that the test ran against a library missing a function.
            self.failures.append(unmodelled)
            raise unmodelled
        if name not in self.driver.exports:
            raise AttributeError(f"{self.driver.name} libnvidia-ml.so has no symbol {name!r}")
        with self._lock:
            pointer = self._pointers.get(name)
            if pointer is None:
                pointer = self._pointers[name] = self._export(name)
            return pointer

    def _export(self, name: str) -> Any:
        restype, argtypes = _SIGNATURES[name]
        implementation = getattr(self, f"_c_{name}")
        # A failure inside a function returning a pointer reads as NULL, not as an int.
        failed = None if restype is ctypes.c_void_p else pynvml.NVML_ERROR_UNKNOWN

        def entry_point(*args: Any) -> Any:
            self.calls[name] += 1
            try:
                result = implementation(*args)
            except pynvml.NVMLError as err:
                return int(err.value)
            except Exception as exc:  # noqa: BLE001 - nothing may unwind into C; kept for the test
                self.failures.append(exc)
                return failed
            return pynvml.NVML_SUCCESS if result is None else result

        callback = ctypes.CFUNCTYPE(restype, *argtypes)(entry_point)
        self._callbacks.append(callback)
        # What CDLL hands out: a cdecl pointer returning int, without argtypes, so
        # pynvml's arguments get ctypes' default conversions as with the real driver.
        address = ctypes.cast(callback, ctypes.c_void_p).value
        assert address is not None  # a live callback has an address
        return ctypes.CFUNCTYPE(ctypes.c_int)(address)

    # -- handles -----------------------------------------------------------------

    def _device_address(self, key: Hashable, handle: Any) -> int:
        """The ``nvmlDevice_t`` of ``key`` (a GPU index; a MIG device's (parent, slot)).

        Each device, MIG devices included, has its own driver struct, so a MIG device's
        handle is never its parent's, and asking twice gives the same handle, as in C.
        """
        struct = self._device_structs.get(key)
        if struct is None:
            # The driver's per-device struct the opaque nvmlDevice_t points at.
            struct = self._device_structs[key] = ctypes.create_string_buffer(8)
        address = ctypes.addressof(struct)
        self._handles[address] = handle
        return address

    def _device(self, address: int | None) -> Any:
        handle = self._handles.get(address) if address else None
        if handle is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return handle

    # -- init --------------------------------------------------------------------

    @_c_function()
    def _c_nvmlInit_v2(self) -> None:
        self.model.nvmlInit()

    @_c_function(_UINT)
    def _c_nvmlInitWithFlags(self, flags: int) -> None:
        # NO_GPUS / NO_ATTACH change nothing a simulated GPU could show.
        self.model.nvmlInit()

    @_c_function()
    def _c_nvmlShutdown(self) -> None:
        self.model.nvmlShutdown()

    @_c_function(ctypes.c_int, restype=ctypes.c_void_p)
    def _c_nvmlErrorString(self, result: int) -> int:
        text = _ERROR_TEXT.get(result) or pynvml.NVMLError._errcode_to_string.get(
            result, "Unknown Error"
        )
        buffer = self._error_strings.get(result)
        if buffer is None:
            # A const char* the library owns: it must outlive the call.
            buffer = self._error_strings[result] = ctypes.create_string_buffer(text.encode())
        return ctypes.addressof(buffer)

    # -- devices -----------------------------------------------------------------

    @_c_function(_PTR)
    def _c_nvmlDeviceGetCount_v2(self, count: int | None) -> None:
        _at(count, ctypes.c_uint).value = self.model.nvmlDeviceGetCount()

    @_c_function(_UINT, _PTR)
    def _c_nvmlDeviceGetHandleByIndex_v2(self, index: int, device: int | None) -> None:
        out = _at(device, ctypes.c_void_p)
        out.value = self._device_address(index, self.model.nvmlDeviceGetHandleByIndex(index))

    @_c_function(_PTR, _PTR, _UINT)
    def _c_nvmlDeviceGetUUID(self, device: int | None, uuid: int | None, length: int) -> None:
        _write_string(uuid, length, self.model.nvmlDeviceGetUUID(self._device(device)))

    @_c_function(_PTR, _PTR, _UINT)
    def _c_nvmlDeviceGetName(self, device: int | None, name: int | None, length: int) -> None:
        _write_string(name, length, self.model.nvmlDeviceGetName(self._device(device)))

    @_c_function(_PTR, _PTR)
    def _c_nvmlDeviceGetMemoryInfo(self, device: int | None, memory: int | None) -> None:
        out = _at(memory, _Memory)
        got = self.model.nvmlDeviceGetMemoryInfo(self._device(device))
        out.total, out.free, out.used = got.total, got.free, got.used

    @_c_function(_PTR, _PTR)
    def _c_nvmlDeviceGetMemoryInfo_v2(self, device: int | None, memory: int | None) -> None:
        out = _at(memory, _Memory_v2)
        if out.version != MEMORY_V2_VERSION:
            raise _error(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        got = self.model.nvmlDeviceGetMemoryInfo(self._device(device), out.version)
        out.total, out.reserved, out.free, out.used = got.total, got.reserved, got.free, got.used

    def _uint(self, address: int | None, value: int) -> None:
        _at(address, ctypes.c_uint).value = int(value)

    @_c_function(_PTR, _PTR)
    def _c_nvmlDeviceGetMaxPcieLinkGeneration(self, device: int | None, gen: int | None) -> None:
        self._uint(gen, self.model.nvmlDeviceGetMaxPcieLinkGeneration(self._device(device)))

    @_c_function(_PTR, _PTR)
    def _c_nvmlDeviceGetMaxPcieLinkWidth(self, device: int | None, width: int | None) -> None:
        self._uint(width, self.model.nvmlDeviceGetMaxPcieLinkWidth(self._device(device)))

    @_c_function(_PTR, _PTR)
    def _c_nvmlDeviceGetCurrPcieLinkGeneration(self, device: int | None, gen: int | None) -> None:
        self._uint(gen, self.model.nvmlDeviceGetCurrPcieLinkGeneration(self._device(device)))

    @_c_function(_PTR, _PTR)
    def _c_nvmlDeviceGetCurrPcieLinkWidth(self, device: int | None, width: int | None) -> None:
        self._uint(width, self.model.nvmlDeviceGetCurrPcieLinkWidth(self._device(device)))

    @_c_function(_PTR, _PTR, _PTR)
    def _c_nvmlDeviceGetMigMode(
        self, device: int | None, current: int | None, pending: int | None
    ) -> None:
        mode = self.model.nvmlDeviceGetMigMode(self._device(device))
        self._uint(current, mode[0])
        self._uint(pending, mode[1])

    @_c_function(_PTR, _PTR)
    def _c_nvmlDeviceGetMaxMigDeviceCount(self, device: int | None, count: int | None) -> None:
        self._uint(count, self.model.nvmlDeviceGetMaxMigDeviceCount(self._device(device)))

    @_c_function(_PTR, _UINT, _PTR)
    def _c_nvmlDeviceGetMigDeviceHandleByIndex(
        self, device: int | None, index: int, mig_device: int | None
    ) -> None:
        out = _at(mig_device, ctypes.c_void_p)
        parent = self._device(device)
        # NVML_ERROR_NOT_FOUND for an empty slot comes from the model, as an NVMLError.
        mig = self.model.nvmlDeviceGetMigDeviceHandleByIndex(parent, index)
        assert device is not None  # _device refused NULL
        address = self._device_address((device, index), mig)
        self._mig_parents[address] = device
        out.value = address

    @_c_function(_PTR, _PTR)
    def _c_nvmlDeviceIsMigDeviceHandle(self, device: int | None, is_mig: int | None) -> None:
        self._uint(is_mig, bool(self.model.nvmlDeviceIsMigDeviceHandle(self._device(device))))

    @_c_function(_PTR, _PTR)
    def _c_nvmlDeviceGetGpuInstanceId(self, device: int | None, gpu_id: int | None) -> None:
        self._uint(gpu_id, self.model.nvmlDeviceGetGpuInstanceId(self._device(device)))

    @_c_function(_PTR, _PTR)
    def _c_nvmlDeviceGetComputeInstanceId(self, device: int | None, ci_id: int | None) -> None:
        self._uint(ci_id, self.model.nvmlDeviceGetComputeInstanceId(self._device(device)))

    @_c_function(_PTR, _PTR)
    def _c_nvmlDeviceGetDeviceHandleFromMigDeviceHandle(
        self, mig_device: int | None, device: int | None
    ) -> None:
        out = _at(device, ctypes.c_void_p)
        # The model refuses a handle that is no MIG device (NVML_ERROR_INVALID_ARGUMENT).
        self.model.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self._device(mig_device))
        assert mig_device is not None  # _device refused NULL
        # The parent's own nvmlDevice_t: the handle nvmlDeviceGetHandleByIndex gave.
        out.value = self._mig_parents[mig_device]

    # -- the fast getters --------------------------------------------------------

    @_c_function(_PTR, _PTR)
    def _c_nvmlDeviceGetUtilizationRates(self, device: int | None, util: int | None) -> None:
        out = _at(util, _Utilization)
        got = self.model.nvmlDeviceGetUtilizationRates(self._device(device))
        out.gpu, out.memory = got.gpu, got.memory

    @_c_function(_PTR, _UINT, _PTR)
    def _c_nvmlDeviceGetClockInfo(self, device: int | None, kind: int, clock: int | None) -> None:
        self._uint(clock, self.model.nvmlDeviceGetClockInfo(self._device(device), kind))

    @_c_function(_PTR, _PTR)
    def _c_nvmlDeviceGetPowerUsage(self, device: int | None, power: int | None) -> None:
        self._uint(power, self.model.nvmlDeviceGetPowerUsage(self._device(device)))

    @_c_function(_PTR, _UINT, _PTR)
    def _c_nvmlDeviceGetTemperature(
        self, device: int | None, sensor: int, temp: int | None
    ) -> None:
        self._uint(temp, self.model.nvmlDeviceGetTemperature(self._device(device), sensor))

    @_c_function(_PTR, _PTR)
    def _c_nvmlDeviceGetTemperatureV(self, device: int | None, temperature: int | None) -> None:
        out = _at(temperature, _Temperature_v1)
        if out.version != TEMPERATURE_V1_VERSION:
            raise _error(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        handle = self._device(device)
        # A model without its own TemperatureV counts (and injects errors into) this
        # call as nvmlDeviceGetTemperature.
        model_v = getattr(self.model, "nvmlDeviceGetTemperatureV", None)
        if model_v is not None:
            out.temperature = model_v(handle, out.sensorType, out.version)
        else:
            out.temperature = self.model.nvmlDeviceGetTemperature(handle, out.sensorType)

    @_c_function(_PTR, _PTR)
    def _c_nvmlDeviceGetCurrentClocksEventReasons(
        self, device: int | None, reasons: int | None
    ) -> None:
        value = self.model.nvmlDeviceGetCurrentClocksEventReasons(self._device(device))
        _at(reasons, ctypes.c_ulonglong).value = value

    @_c_function(_PTR, _PTR)
    def _c_nvmlDeviceGetCurrentClocksThrottleReasons(
        self, device: int | None, reasons: int | None
    ) -> None:
        value = self.model.nvmlDeviceGetCurrentClocksThrottleReasons(self._device(device))
        _at(reasons, ctypes.c_ulonglong).value = value

    def _processes(
        self, device: int | None, count: int | None, infos: int | None, entry: type[Any]
    ) -> None:
        """The size query of nvml.h: ``*infoCount`` in, how many there are out."""
        processes = self.model.nvmlDeviceGetComputeRunningProcesses(self._device(device))
        capacity = _at(count, ctypes.c_uint)
        if capacity.value < len(processes):
            capacity.value = len(processes)
            raise _error(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)
        if capacity.value and not infos:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        base = infos or 0  # not NULL whenever there is a process to write
        for i, process in enumerate(processes):
            out = entry.from_address(base + i * ctypes.sizeof(entry))
            used = process.usedGpuMemory
            out.pid = process.pid
            out.usedGpuMemory = _NOT_AVAILABLE_ULL if used is None else used
            if hasattr(out, "gpuInstanceId"):
                out.gpuInstanceId = process.gpuInstanceId
                out.computeInstanceId = process.computeInstanceId
        capacity.value = len(processes)

    @_c_function(_PTR, _PTR, _PTR)
    def _c_nvmlDeviceGetComputeRunningProcesses(
        self, device: int | None, count: int | None, infos: int | None
    ) -> None:
        self._processes(device, count, infos, _ProcessInfo_v1)

    @_c_function(_PTR, _PTR, _PTR)
    def _c_nvmlDeviceGetComputeRunningProcesses_v2(
        self, device: int | None, count: int | None, infos: int | None
    ) -> None:
        self._processes(device, count, infos, _ProcessInfo_v2)

    @_c_function(_PTR, _PTR, _PTR)
    def _c_nvmlDeviceGetComputeRunningProcesses_v3(
        self, device: int | None, count: int | None, infos: int | None
    ) -> None:
        self._processes(device, count, infos, _ProcessInfo_v2)

    # -- health: ECC, row remapping, XID events ----------------------------------

    @_c_function(_PTR, _UINT, _UINT, _PTR)
    def _c_nvmlDeviceGetTotalEccErrors(
        self, device: int | None, error_type: int, counter_type: int, count: int | None
    ) -> None:
        value = self.model.nvmlDeviceGetTotalEccErrors(
            self._device(device), error_type, counter_type
        )
        _at(count, ctypes.c_ulonglong).value = value

    @_c_function(_PTR, _PTR, _PTR, _PTR, _PTR)
    def _c_nvmlDeviceGetRemappedRows(
        self,
        device: int | None,
        corrected: int | None,
        uncorrected: int | None,
        pending: int | None,
        failed: int | None,
    ) -> None:
        rows = self.model.nvmlDeviceGetRemappedRows(self._device(device))
        for address, value in zip((corrected, uncorrected, pending, failed), rows, strict=True):
            self._uint(address, value)

    @_c_function(_PTR, _UINT, _PTR, _PTR)
    def _c_nvmlDeviceGetRetiredPages(
        self, device: int | None, cause: int, count: int | None, addresses: int | None
    ) -> None:
        """The size query of nvml.h: ``*pageCount`` 0 (or too small) asks how many."""
        pages = self.model.nvmlDeviceGetRetiredPages(self._device(device), cause)
        capacity = _at(count, ctypes.c_uint)
        if capacity.value < len(pages):
            capacity.value = len(pages)
            raise _error(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)
        if pages and not addresses:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        for i, page in enumerate(pages):
            assert addresses is not None  # refused above when there is a page to write
            ctypes.c_ulonglong.from_address(addresses + i * 8).value = page
        capacity.value = len(pages)

    @_c_function(_PTR, _PTR)
    def _c_nvmlDeviceGetRetiredPagesPendingStatus(
        self, device: int | None, pending: int | None
    ) -> None:
        # nvmlEnableState_t: NVML_FEATURE_ENABLED (1) while a retirement is pending.
        self._uint(pending, self.model.nvmlDeviceGetRetiredPagesPendingStatus(self._device(device)))

    def _event_set(self, address: int | None) -> Any:
        event_set = self._event_sets.get(address) if address else None
        if event_set is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return event_set

    @_c_function(_PTR)
    def _c_nvmlEventSetCreate(self, out: int | None) -> None:
        target = _at(out, ctypes.c_void_p)
        event_set = self.model.nvmlEventSetCreate()
        # The opaque nvmlEventSet_t points at a struct of the driver's: a buffer here.
        struct = ctypes.create_string_buffer(8)
        address = ctypes.addressof(struct)
        self._event_sets[address] = event_set
        self._event_structs[address] = struct
        target.value = address

    @_c_function(_PTR, ctypes.c_ulonglong, _PTR)
    def _c_nvmlDeviceRegisterEvents(
        self, device: int | None, event_types: int, event_set: int | None
    ) -> None:
        self.model.nvmlDeviceRegisterEvents(
            self._device(device), event_types, self._event_set(event_set)
        )

    @_c_function(_PTR, _PTR, _UINT)
    def _c_nvmlEventSetWait_v2(
        self, event_set: int | None, data: int | None, timeout_ms: int
    ) -> None:
        out = _at(data, _EventData)
        got = self.model.nvmlEventSetWait_v2(self._event_set(event_set), timeout_ms)
        out.device = self._device_address(got.device.index, got.device)
        out.eventType = got.eventType
        out.eventData = got.eventData
        out.gpuInstanceId = got.gpuInstanceId
        out.computeInstanceId = got.computeInstanceId

    @_c_function(_PTR)
    def _c_nvmlEventSetFree(self, event_set: int | None) -> None:
        self.model.nvmlEventSetFree(self._event_set(event_set))
        assert event_set is not None  # _event_set refused NULL
        del self._event_sets[event_set]
        self._event_structs.pop(event_set, None)

    # -- GPM ---------------------------------------------------------------------

    @_c_function(_PTR, _PTR)
    def _c_nvmlGpmQueryDeviceSupport(self, device: int | None, support: int | None) -> None:
        out = _at(support, _GpmSupport)
        if out.version != GPM_SUPPORT_VERSION:
            raise _error(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        got = self.model.nvmlGpmQueryDeviceSupport(self._device(device))
        out.isSupportedDevice = got.isSupportedDevice

    @_c_function(_PTR)
    def _c_nvmlGpmSampleAlloc(self, sample: int | None) -> None:
        out = _at(sample, ctypes.c_void_p)
        out.value = ctypes.cast(self.model.nvmlGpmSampleAlloc(), ctypes.c_void_p).value

    @_c_function(_PTR)
    def _c_nvmlGpmSampleFree(self, sample: int | None) -> None:
        self.model.nvmlGpmSampleFree(ctypes.c_void_p(sample))

    @_c_function(_PTR, _PTR)
    def _c_nvmlGpmSampleGet(self, device: int | None, sample: int | None) -> None:
        self.model.nvmlGpmSampleGet(self._device(device), ctypes.c_void_p(sample))

    @_c_function(_PTR, _UINT, _PTR)
    def _c_nvmlGpmMigSampleGet(
        self, device: int | None, gpu_instance_id: int, sample: int | None
    ) -> None:
        self.model.nvmlGpmMigSampleGet(
            self._device(device), gpu_instance_id, ctypes.c_void_p(sample)
        )

    @_c_function(_PTR)
    def _c_nvmlGpmMetricsGet(self, metrics_get: int | None) -> None:
        head = _at(metrics_get, _GpmMetricsGetHead)
        if head.version != GPM_METRICS_GET_VERSION:
            raise _error(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        if head.numMetrics > self.driver.gpm_metric_max:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        request = _at(metrics_get, _metrics_get_type(head.numMetrics))
        self.model.nvmlGpmMetricsGet(request)
        for metric in request.metrics:
            # An id past this driver's NVML_GPM_METRIC_MAX is one it has never heard of.
            if metric.metricId >= self.driver.gpm_metric_max:
                metric.nvmlReturn = pynvml.NVML_ERROR_INVALID_ARGUMENT
                metric.value = 0.0


_installed: list[NvmlLibraryStandIn] = []
_installed_lock = threading.Lock()

# pynvml's module-level state that installing swaps (checked, so a pynvml that
# renamed one fails here, not by quietly loading the real driver).
_PYNVML_STATE = ("nvmlLib", "_nvmlGetFunctionPointer_cache", "_nvmlLib_refcount", "libLoadLock")


@contextlib.contextmanager
def installed(standin: NvmlLibraryStandIn) -> Iterator[Any]:
    """Make the real ``pynvml`` resolve every C function in ``standin``.

    Inside, ``NvmlBackend()`` (the ``pynvml`` module as its library) runs over the
    stand-in. pynvml loads ``libnvidia-ml.so.1`` only while its ``nvmlLib`` is None,
    so setting it bypasses the loader; the function-pointer cache is emptied so no
    pointer of another library survives. On exit the library, the cache, pynvml's init
    count and its error-text cache (which ``nvmlErrorString`` fills) are restored.

    Args:
        standin: the library to install.

    Yields:
        The ``pynvml`` module (its ``NVMLError_*`` classes, constants and wrappers).

    Raises:
        RuntimeError: a stand-in is installed already, or this pynvml keeps its state
            elsewhere than this function knows.
    """
    missing = [name for name in _PYNVML_STATE if not hasattr(pynvml, name)]
    if missing or not hasattr(pynvml.NVMLError, "_errcode_to_string"):
        raise RuntimeError(f"this pynvml has no {', '.join(missing) or '_errcode_to_string'}")
    with _installed_lock:
        if _installed:
            raise RuntimeError("an NVML stand-in is installed in pynvml already")
        _installed.append(standin)
    cache: dict[str, Any] = pynvml._nvmlGetFunctionPointer_cache
    texts: dict[int, str] = pynvml.NVMLError._errcode_to_string
    with pynvml.libLoadLock:
        saved = (pynvml.nvmlLib, dict(cache), pynvml._nvmlLib_refcount, dict(texts))
        pynvml.nvmlLib = standin
        cache.clear()
        pynvml._nvmlLib_refcount = 0
    try:
        yield pynvml
    finally:
        with pynvml.libLoadLock:
            library, saved_cache, refcount, saved_texts = saved
            pynvml.nvmlLib = library
            cache.clear()
            cache.update(saved_cache)
            pynvml._nvmlLib_refcount = refcount
            texts.clear()
            texts.update(saved_texts)
        with _installed_lock:
            _installed.clear()
