"""The real GPU backend: NVML (``nvidia-ml-py``, imported as ``pynvml``) plus GPM.

Every NVML getter goes through one choke point, ``NvmlBackend._call`` (nvitop's
``nvmlQuery``): a field the GPU cannot measure (NotSupported, NoPermission,
FunctionNotFound) comes back ``None`` — absent, never 0 — and is logged once per
(function, error); a lost GPU raises ``DeviceLost`` for that GPU only.

``read()`` is the fast loop, so it makes only cheap scalar calls (1-22 µs each on an
H100) and one GPM sample (43-258 µs). Slow calls — ``nvmlDeviceGetPcieThroughput``
(21.7 ms: it measures a 20 ms window), process utilization (2.5-5.5 ms), total energy
(6 ms) — are never made here; PCIe rates come from GPM. Nothing shells out to
``nvidia-smi``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pynvml

from rooftop.agent.sensors.base import Clock, GpuInfo
from rooftop.agent.sensors.gpm import GpmSampler
from rooftop.common.errors import DeviceLost, NvmlUnavailable, SensorError
from rooftop.common.model import GpuProcess, GpuSample

__all__ = ["NvmlBackend", "map_nvml_errors"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

_NO_GPU_HINT = "use --replay FILE or --fake h100 to run without a GPU"

# NVML's answer for "this GPU / driver / user cannot give you that value": the field
# is absent from the sample rather than an error.
_ABSENT_CODES = frozenset(
    {
        pynvml.NVML_ERROR_NOT_SUPPORTED,
        pynvml.NVML_ERROR_NO_PERMISSION,
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    }
)
# A GPU that fell off the bus, or needs a reset before it answers again, yields no
# data at all: report it lost rather than as a GPU whose every field is absent.
_LOST_CODES = frozenset({pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_RESET_REQUIRED})

_INIT_MESSAGES = {
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: (
        "NVIDIA driver not found (libnvidia-ml.so.1 could not be loaded)"
    ),
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: "NVIDIA driver is not loaded (NVML: Driver Not Loaded)",
    pynvml.NVML_ERROR_NO_PERMISSION: "no permission to use NVML (check access to /dev/nvidia*)",
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH: (
        "NVML library and NVIDIA kernel driver versions differ (driver updated without a "
        "reboot?)"
    ),
}

# Beyond this many distinct (function, error) pairs, stop remembering (and logging).
_MAX_LOGGED = 256

# pynvml maps NVML_VALUE_NOT_AVAILABLE to None in process lists; older ones did not.
_NOT_AVAILABLE_ULL = 2**64 - 1


@contextlib.contextmanager
def map_nvml_errors(gpu_index: int | None = None) -> Iterator[None]:
    """Turn ``pynvml.NVMLError`` into Rooftop's exception tree.

    Args:
        gpu_index: the GPU the wrapped calls concern; with it, GpuIsLost becomes
            ``DeviceLost(gpu_index)``. Without it (init, device count) every NVML
            error means NVML as a whole is unusable.

    Raises:
        NvmlUnavailable: NVML cannot be used, with one readable line saying why.
        DeviceLost: the GPU ``gpu_index`` is lost.
    """
    try:
        yield
    except pynvml.NVMLError as err:
        code = err.value
        if gpu_index is not None and code in _LOST_CODES:
            raise DeviceLost(gpu_index, str(err)) from err
        reason = _INIT_MESSAGES.get(code) or f"NVML failed: {err} (NVML error {code})"
        raise NvmlUnavailable(reason, _NO_GPU_HINT) from err


class _DeviceCall:
    """The backend's choke point bound to one GPU index."""

    __slots__ = ("_backend", "_gpu_index")

    def __init__(self, backend: NvmlBackend, gpu_index: int) -> None:
        self._backend = backend
        self._gpu_index = gpu_index

    def __call__(self, fn: Callable[..., T], /, *args: Any) -> T | None:
        return self._backend._call(self._gpu_index, fn, *args)


@dataclass(slots=True)
class _Device:
    info: GpuInfo
    handle: Any
    call: _DeviceCall
    gpm: GpmSampler | None = None
    lost_detail: str | None = None  # set when the GPU was lost at startup
    # Newer NVML APIs first; fall back for good once the driver says no.
    memory_v2: bool = True
    clock_event_reasons: bool = True


class NvmlBackend:
    """``GpuBackend`` over NVML: one consistent ``GpuSample`` per GPU per ``read``.

    Args:
        nvml: the ``pynvml`` module (default) or a library with the same API, such
            as ``rooftop.agent.sensors.fake.FakeNvmlLibrary``; it must raise
            ``pynvml.NVMLError`` instances.
        clock: monotonic seconds, used to space GPM samples; injectable for tests.

    Raises:
        NvmlUnavailable: no driver or library, or NVML init failed.
    """

    def __init__(self, nvml: Any = None, clock: Clock = time.monotonic) -> None:
        self._nvml: Any = pynvml if nvml is None else nvml
        self._clock = clock
        self._logged: set[tuple[str, int]] = set()
        self._logged_lock = threading.Lock()
        self._closed = False
        with map_nvml_errors():
            self._nvml.nvmlInit()
        try:
            with map_nvml_errors():
                count = int(self._nvml.nvmlDeviceGetCount())
            self._devices = tuple(self._open(i) for i in range(count))
        except BaseException:
            # Init is reference-counted: a failed constructor must not leak a count.
            with contextlib.suppress(pynvml.NVMLError):
                self._nvml.nvmlShutdown()
            raise
        self._infos = tuple(d.info for d in self._devices)

    @property
    def library(self) -> Any:
        """The NVML library in use (``pynvml``, or a ``FakeNvmlLibrary`` to steer)."""
        return self._nvml

    def __enter__(self) -> NvmlBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the choke point ---------------------------------------------------------

    def _call(self, gpu_index: int, fn: Callable[..., T], /, *args: Any) -> T | None:
        """Call one NVML getter for ``gpu_index``.

        Returns:
            The value, or ``None`` where NVML cannot give it (logged once per
            function and error).

        Raises:
            DeviceLost: NVML says the GPU is lost.
        """
        try:
            return fn(*args)
        except pynvml.NVMLError as err:
            code = err.value
            if code in _LOST_CODES:
                raise DeviceLost(gpu_index, str(err)) from err
            self._log_once(getattr(fn, "__name__", repr(fn)), code, err)
            return None

    def _log_once(self, fn_name: str, code: int, err: pynvml.NVMLError) -> None:
        # NVMLError instances define __eq__ without __hash__: key by the code.
        key = (fn_name, code)
        with self._logged_lock:
            if key in self._logged or len(self._logged) >= _MAX_LOGGED:
                return
            self._logged.add(key)
        level = logging.INFO if code in _ABSENT_CODES else logging.WARNING
        logger.log(level, "NVML %s: %s (error %d); field reported absent", fn_name, err, code)

    # -- discovery ---------------------------------------------------------------

    def _open(self, gpu_index: int) -> _Device:
        nvml = self._nvml
        call = _DeviceCall(self, gpu_index)
        try:
            handle = call(nvml.nvmlDeviceGetHandleByIndex, gpu_index)
        except DeviceLost as err:
            return _Device(GpuInfo(gpu_index, "", "", False), None, call, lost_detail=str(err))
        if handle is None:
            return _Device(
                GpuInfo(gpu_index, "", "", False), None, call, lost_detail="no NVML handle"
            )
        device = _Device(GpuInfo(gpu_index, "", "", False), handle, call)
        try:
            uuid = _text(call(nvml.nvmlDeviceGetUUID, handle))
            name = _text(call(nvml.nvmlDeviceGetName, handle))
            device.info = GpuInfo(gpu_index, uuid, name, False)
            memory = self._memory_info(device)
            query = getattr(nvml, "nvmlGpmQueryDeviceSupport", None)
            support = call(query, handle) if query is not None else None
            has_gpm = bool(support is not None and support.isSupportedDevice)
            if has_gpm:
                device.gpm = GpmSampler(nvml, handle, call=call, clock=self._clock)
                has_gpm = device.gpm.usable
                # Prime: the first sample is taken now, so the first read() at least
                # 100 ms from now already has metrics.
                device.gpm.read()
            device.info = GpuInfo(
                gpu_index=gpu_index,
                gpu_uuid=uuid,
                gpu_name=name,
                has_gpm=has_gpm,
                mem_total_bytes=int(memory.total) if memory is not None else None,
                pcie_link_gen_max=_int(call(nvml.nvmlDeviceGetMaxPcieLinkGeneration, handle)),
                pcie_link_width_max=_int(call(nvml.nvmlDeviceGetMaxPcieLinkWidth, handle)),
            )
        except DeviceLost as err:
            if device.gpm is not None:
                device.gpm.close()
                device.gpm = None
            device.lost_detail = str(err)
        return device

    def devices(self) -> tuple[GpuInfo, ...]:
        """The GPUs on this host, in index order (read once, at construction)."""
        return self._infos

    # -- the fast loop -----------------------------------------------------------

    def read(self, gpu_index: int, time_s: float) -> GpuSample:
        """One consistent snapshot of ``gpu_index``, stamped ``time_s`` (epoch seconds).

        Args:
            gpu_index: NVML index of the GPU.
            time_s: the sample's timestamp (Unix epoch seconds).

        Returns:
            The sample; fields the GPU cannot measure are ``None``. GPM fields are
            ``None`` without GPM and until two GPM samples ≥ 100 ms apart exist.

        Raises:
            DeviceLost: the GPU is lost; the other GPUs can still be read.
            SensorError: no such GPU, or the backend is closed.
        """
        if self._closed:
            raise SensorError("NVML backend is closed")
        if not 0 <= gpu_index < len(self._devices):
            raise SensorError(f"no GPU {gpu_index} (this host has {len(self._devices)})")
        device = self._devices[gpu_index]
        if device.lost_detail is not None:
            raise DeviceLost(gpu_index, device.lost_detail)
        nvml, call, handle = self._nvml, device.call, device.handle

        gpm = device.gpm.read() if device.gpm is not None else None
        util = call(nvml.nvmlDeviceGetUtilizationRates, handle)
        memory = self._memory_info(device)
        sm_clock_mhz = call(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM)
        power_mw = call(nvml.nvmlDeviceGetPowerUsage, handle)
        temperature_c = call(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
        reasons = self._clock_event_reasons(device)
        link_gen = call(nvml.nvmlDeviceGetCurrPcieLinkGeneration, handle)
        link_width = call(nvml.nvmlDeviceGetCurrPcieLinkWidth, handle)
        processes = call(nvml.nvmlDeviceGetComputeRunningProcesses, handle)

        info = device.info
        return GpuSample(
            time_s=time_s,
            gpu_index=gpu_index,
            gpu_uuid=info.gpu_uuid,
            gpu_name=info.gpu_name,
            busy_pct=_float(util.gpu) if util is not None else None,
            mem_ctrl_pct=_float(util.memory) if util is not None else None,
            sm_active_pct=gpm.sm_active_pct if gpm else None,
            sm_occupancy_pct=gpm.sm_occupancy_pct if gpm else None,
            tensor_active_pct=gpm.tensor_active_pct if gpm else None,
            fp16_active_pct=gpm.fp16_active_pct if gpm else None,
            fp32_active_pct=gpm.fp32_active_pct if gpm else None,
            fp64_active_pct=gpm.fp64_active_pct if gpm else None,
            dram_bw_pct=gpm.dram_bw_pct if gpm else None,
            pcie_rx_bytes_per_s=gpm.pcie_rx_bytes_per_s if gpm else None,
            pcie_tx_bytes_per_s=gpm.pcie_tx_bytes_per_s if gpm else None,
            pcie_link_gen=_int(link_gen),
            pcie_link_width=_int(link_width),
            power_w=power_mw / 1000.0 if power_mw is not None else None,
            sm_clock_mhz=_float(sm_clock_mhz),
            mem_used_bytes=int(memory.used) if memory is not None else None,
            mem_total_bytes=int(memory.total) if memory is not None else info.mem_total_bytes,
            temperature_c=_float(temperature_c),
            clock_event_reasons=_int(reasons),
            processes=_processes(processes),
        )

    def _memory_info(self, device: _Device) -> Any:
        nvml, call = self._nvml, device.call
        version = getattr(nvml, "nvmlMemory_v2", None)
        if device.memory_v2 and version is not None:
            # v2 separates driver-reserved memory from "used"; v1 lumps it in.
            memory = call(nvml.nvmlDeviceGetMemoryInfo, device.handle, version)
            if memory is not None:
                return memory
        device.memory_v2 = False
        return call(nvml.nvmlDeviceGetMemoryInfo, device.handle)

    def _clock_event_reasons(self, device: _Device) -> int | None:
        nvml, call = self._nvml, device.call
        # Renamed in NVML 12.x; the old "throttle" name goes away in CUDA 14.
        events = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if device.clock_event_reasons and events is not None:
            reasons: int | None = call(events, device.handle)
            if reasons is not None:
                return reasons
        device.clock_event_reasons = False
        throttle = getattr(nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        return call(throttle, device.handle) if throttle is not None else None

    # -- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        """Free GPM samples and shut NVML down (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for device in self._devices:
            if device.gpm is not None:
                device.gpm.close()
        # Shutdown is reference-counted in NVML; a failure here changes nothing.
        with contextlib.suppress(pynvml.NVMLError):
            self._nvml.nvmlShutdown()


def _text(value: Any) -> str:
    # pynvml before 11.5 returned bytes for strings.
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _processes(processes: Any) -> tuple[GpuProcess, ...]:
    if not processes:
        return ()
    out = []
    for proc in processes:
        used = getattr(proc, "usedGpuMemory", None)
        if used is not None and int(used) >= _NOT_AVAILABLE_ULL:
            used = None  # NVML_VALUE_NOT_AVAILABLE: NVML could not say (e.g. WDDM, MIG)
        out.append(GpuProcess(pid=int(proc.pid), gpu_mem_bytes=None if used is None else int(used)))
    return tuple(out)
