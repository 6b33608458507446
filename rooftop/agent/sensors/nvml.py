"""The real GPU backend: NVML (``nvidia-ml-py``, imported as ``pynvml``) plus GPM.

Every NVML getter goes through one choke point, ``NvmlBackend._call`` (nvitop's
``nvmlQuery``): a field the GPU cannot measure (NotSupported, NoPermission,
FunctionNotFound) comes back ``None`` — absent, never 0 — and is logged once per
(function, error); so does any other exception the library raises (pynvml's
``NVMLLibraryMismatchError`` is not an ``NVMLError``): one call costs its field, never
the tick. A lost GPU raises ``DeviceLost`` for that GPU only; a GPU this user may not
open (NoPermission on its handle) raises ``DeviceInaccessible``.

Unprivileged (the systemd unit and the k8s manifest run the agent as a non-root user
with no capabilities): NoPermission on one call is logged once as a WARNING naming the
privilege that call needs (``_privilege_for``) and costs that field only. GPM denied
(the driver's ``RmProfilingAdminOnly``, set by ``NVreg_RestrictProfilingToAdminUsers``)
turns GPM off for that GPU for good — it comes back only with a module reload and an
agent restart — so its windows use NVML proxies at lower confidence, never a verdict
built from missing GPM fields.

Where a newer NVML API has an older equivalent (memory info v2 / v1, clock-event /
throttle reasons, ``nvmlDeviceGetTemperatureV`` / ``nvmlDeviceGetTemperature``), the
newer one is preferred; only the driver saying it lacks it (NotSupported,
FunctionNotFound, ArgumentVersionMismatch) makes the older one stick. After any other
error the older one stands in and the newer one is tried again ``RETRY_NEWER_S`` later.

``read()`` is the fast loop, so it makes only cheap scalar calls (1-22 µs each on an
H100) and one GPM sample (43-258 µs). Slow calls — ``nvmlDeviceGetPcieThroughput``
(21.7 ms: it measures a 20 ms window), process utilization (2.5-5.5 ms), total energy
(6 ms) — are never made here; PCIe rates come from GPM. Nothing shells out to
``nvidia-smi``.

MIG: a GPU in MIG mode is listed with ``mig_mode`` set, followed by one device per MIG
instance (``nvmlDeviceGetMigDeviceHandleByIndex``), named by its ``MIG-...`` UUID and
read with ``read(gpu_index, time_s, mig_uuid=...)``. An instance answers util rates
(NotSupported on A100 and H100), memory and processes; board-level figures (power,
clocks, temperature, PCIe) belong to the parent. On Hopper+ GPM is sampled per GPU
instance (``nvmlGpmMigSampleGet`` on the parent handle); the parent in MIG mode runs
no GPM of its own, its activity being its instances'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pynvml

from rooftop.agent.sensors.base import Clock, GpuInfo
from rooftop.agent.sensors.gpm import GpmReading, GpmSampler, NvmlCall
from rooftop.agent.sensors.xid import XidWatcher
from rooftop.common.errors import DeviceInaccessible, DeviceLost, NvmlUnavailable, SensorError
from rooftop.common.model import GpuProcess, GpuSample

__all__ = ["HEALTH_EVERY_S", "REOPEN_EVERY_S", "RETRY_NEWER_S", "NvmlBackend", "map_nvml_errors"]

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
# No handle because this user may not open the GPU: it is not lost, it needs access.
_INACCESSIBLE_CODES = {pynvml.NVML_ERROR_NO_PERMISSION: "NO_PERMISSION"}
# The driver or GPU does not have this API: no point asking again. Every other error
# (Unknown, Timeout, a busy driver...) may pass, so a fallback it causes must not stick.
_PERMANENT_CODES = frozenset(
    {
        pynvml.NVML_ERROR_NOT_SUPPORTED,
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
        pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
    }
)
# After a transient error, how long the older API stands in before the newer is retried:
# long enough that a persisting error costs one extra call per GPU every 10 s, short
# enough that a window or two later the better figure is back.
RETRY_NEWER_S = 10.0
# ECC, row-remap and page-retirement counters are read this often per GPU, not every
# tick: they change on a scale of hours, and five more calls per GPU per tick would buy
# nothing.
HEALTH_EVERY_S = 5.0
# A GPU that could not be opened at start (a transient error, a reset under way, a GPU
# off the bus) is tried again this often, from read(): one failing call per interval,
# and a GPU that comes back is sampled without restarting the agent.
REOPEN_EVERY_S = 30.0
# (GpuSample field, nvmlMemoryErrorType_t, nvmlEccCounterType_t) by pynvml constant name.
_ECC_COUNTERS = (
    ("ecc_corrected_volatile", "NVML_MEMORY_ERROR_TYPE_CORRECTED", "NVML_VOLATILE_ECC"),
    ("ecc_uncorrected_volatile", "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", "NVML_VOLATILE_ECC"),
    ("ecc_corrected_aggregate", "NVML_MEMORY_ERROR_TYPE_CORRECTED", "NVML_AGGREGATE_ECC"),
    ("ecc_uncorrected_aggregate", "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", "NVML_AGGREGATE_ECC"),
)

# (GpuSample field, nvmlPageRetirementCause_t) by pynvml constant name.
_RETIREMENT_CAUSES = (
    ("retired_pages_single_bit", "NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS"),
    ("retired_pages_double_bit", "NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR"),
)

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

# What NoPermission on an NVML call means the agent lacks, by function-name prefix
# (first match wins); the one-time warning names it so the operator knows the fix.
_GPM_PRIVILEGE = (
    "CAP_SYS_ADMIN, or the nvidia module option NVreg_RestrictProfilingToAdminUsers=0 "
    "(RmProfilingAdminOnly: 1 in /proc/driver/nvidia/params); GPM is off for this GPU "
    "until the agent restarts after the fix, and its verdicts use NVML proxies at lower "
    "confidence"
)
_PRIVILEGES = (
    ("nvmlGpm", _GPM_PRIVILEGE),
    (
        "nvmlDeviceGetComputeRunningProcesses",
        "root, or the agent in the host pid namespace (hostPID), to list other users' "
        "processes and their GPU memory",
    ),
    (
        "nvmlDeviceGetMemoryInfo",
        "root to read a MIG parent's memory (its instances still report their own)",
    ),
)
_DEFAULT_PRIVILEGE = "read/write access to /dev/nvidiactl and /dev/nvidiaN"

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
        # Straight to _attempt (what _call does): ~90 calls a tick on 8 GPUs.
        return self._backend._attempt(self._gpu_index, fn, *args)[0]


@dataclass(slots=True)
class _Newer:
    """A newer NVML API tried before its older equivalent, on one GPU."""

    missing: bool = False  # the driver said it lacks it: the older API for good
    retry_at_s: float = -math.inf  # after a transient error: the older API until then


@dataclass(slots=True)
class _Device:
    info: GpuInfo
    handle: Any
    call: _DeviceCall
    gpm: GpmSampler | None = None
    gpm_retry_at_s: float | None = None  # GPM support query failed transiently: ask again
    lost_detail: str | None = None  # set when the GPU was lost at startup
    inaccessible: str | None = None  # NVML's error name when this user may not open it
    newer: dict[str, _Newer] = field(default_factory=dict)  # keyed by API ("memory", ...)
    parent_handle: Any = None  # a MIG instance's parent GPU: GPM is sampled through it
    gpm_denied: bool = False  # a GPM call said NoPermission: no GPM until a restart
    # The driver said the GPU lacks row remapping (pre-Ampere) / page retirement too:
    # stop asking, and read page retirement instead / nothing.
    no_row_remapping: bool = False
    no_page_retirement: bool = False
    reopen_at_s: float | None = None  # lost at start: when read() tries to open it again


class NvmlBackend:
    """``GpuBackend`` over NVML: one consistent ``GpuSample`` per GPU per ``read``.

    Args:
        nvml: the ``pynvml`` module (default) or a library with the same API, such
            as ``rooftop.agent.sensors.fake.FakeNvmlLibrary``; it must raise
            ``pynvml.NVMLError`` instances.
        clock: monotonic seconds, used to space GPM samples; injectable for tests.
        xid_events: take critical XID events from an NVML event set as each GPU is
            read (``rooftop.agent.sensors.xid``: a non-blocking look, at most twice a
            second); off for a caller that times the loop's NVML calls and must not
            count those looks among them.

    Raises:
        NvmlUnavailable: no driver or library, or NVML init failed.
    """

    def __init__(
        self, nvml: Any = None, clock: Clock = time.monotonic, *, xid_events: bool = True
    ) -> None:
        self._nvml: Any = pynvml if nvml is None else nvml
        self._clock = clock
        self._errors: Counter[tuple[str, str]] = Counter()
        self._logged_lock = threading.Lock()
        self._closed = False
        with map_nvml_errors():
            self._nvml.nvmlInit()
        try:
            with map_nvml_errors():
                count = int(self._nvml.nvmlDeviceGetCount())
            self._devices = tuple(self._open(i) for i in range(count))
            # MIG instances, by MIG UUID, in enumeration order under their parent.
            self._mig: dict[str, _Device] = {}
            for parent in self._devices:
                if parent.info.mig_mode:
                    for instance in self._open_mig(parent):
                        self._mig[instance.info.mig_uuid] = instance
        except BaseException:
            # Init is reference-counted: a failed constructor must not leak a count.
            with contextlib.suppress(pynvml.NVMLError):
                self._nvml.nvmlShutdown()
            raise
        self._infos = self._all_infos()
        # ECC and row-remap counters change rarely: read every HEALTH_EVERY_S, per GPU.
        self._health_cache: dict[int, tuple[float, dict[str, Any]]] = {}
        self._xid: XidWatcher | None = None
        if xid_events:
            readable = [
                (d.info.gpu_index, d.handle)
                for d in self._devices
                if d.handle is not None and d.lost_detail is None and d.inaccessible is None
            ]
            self._xid = XidWatcher(self._nvml, readable, self._attempt, self._count_error)

    def _all_infos(self) -> tuple[GpuInfo, ...]:
        """Every device in index order, each MIG parent followed by its instances."""
        out: list[GpuInfo] = []
        for device in self._devices:
            out.append(device.info)
            out.extend(
                m.info for m in self._mig.values() if m.info.gpu_index == device.info.gpu_index
            )
        return tuple(out)

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
            The value, or ``None`` where NVML cannot give it, for whatever reason
            (counted per function and error type, logged once).

        Raises:
            DeviceLost: NVML says the GPU is lost.
        """
        return self._attempt(gpu_index, fn, *args)[0]

    def _attempt(
        self, gpu_index: int, fn: Callable[..., T], /, *args: Any
    ) -> tuple[T | None, Exception | None]:
        """``_call``, also handing back the error that made the value ``None``."""
        try:
            return fn(*args), None
        except pynvml.NVMLError as err:
            if err.value in _LOST_CODES:
                raise DeviceLost(gpu_index, str(err)) from err
            self._count_error(_fn_name(fn), err)
            return None, err
        except Exception as err:  # noqa: BLE001 — the library boundary, see below
            # pynvml raises more than NVMLError (NVMLLibraryMismatchError from
            # nvmlDeviceGetComputeRunningProcesses on a driver without _v3; a ctypes or
            # struct error on a driver it does not know): one call's failure costs its
            # field, never the whole tick of every GPU.
            self._count_error(_fn_name(fn), err)
            return None, err

    @property
    def errors(self) -> dict[tuple[str, str], int]:
        """Failed calls so far, per (function, error type): what made fields absent."""
        with self._logged_lock:
            return dict(self._errors)

    def _count_error(self, fn_name: str, err: Exception) -> None:
        key = (fn_name, _error_name(err))
        with self._logged_lock:
            first = key not in self._errors
            if first and len(self._errors) >= _MAX_LOGGED:
                return  # bounded: a pathological library must not grow memory
            self._errors[key] += 1
        if not first:
            return
        if _no_permission(err):
            logger.warning(
                "NVML %s: no permission (NVML NO_PERMISSION) as this user; field reported "
                "absent. It needs %s",
                fn_name,
                _privilege_for(fn_name),
            )
        elif isinstance(err, pynvml.NVMLError):
            level = logging.INFO if err.value in _ABSENT_CODES else logging.WARNING
            logger.log(
                level, "NVML %s: %s (error %d); field reported absent", fn_name, err, err.value
            )
        else:
            logger.warning(
                "NVML %s raised %s: %s; field reported absent", fn_name, type(err).__name__, err
            )

    def _newer_first(
        self,
        device: _Device,
        api: str,
        newer: tuple[Callable[..., Any] | None, tuple[Any, ...]],
        older: tuple[Callable[..., Any] | None, tuple[Any, ...]],
    ) -> Any:
        """The newer API's value; the older API's while the newer is missing or failing.

        Only a permanent error (the driver lacks the API) retires the newer API; after
        any other error it is tried again ``RETRY_NEWER_S`` later. NoPermission on the
        newer gives ``None`` without asking the older (it needs the same privilege).
        """
        gpu_index = device.info.gpu_index
        state = device.newer.get(api)
        if state is None:  # not setdefault(api, _Newer()): that builds one per call
            state = device.newer[api] = _Newer()
        newer_fn, newer_args = newer
        if newer_fn is not None and not state.missing:
            now_s = self._clock()
            if now_s >= state.retry_at_s:
                value, error = self._attempt(gpu_index, newer_fn, *newer_args)
                if value is not None:
                    return value
                if _no_permission(error):
                    # The older call needs the same privilege: asking it would only
                    # add a second warning for the same missing right.
                    state.retry_at_s = now_s + RETRY_NEWER_S
                    return None
                if _permanent(error):
                    state.missing = True
                else:
                    state.retry_at_s = now_s + RETRY_NEWER_S
        older_fn, older_args = older
        return self._attempt(gpu_index, older_fn, *older_args)[0] if older_fn else None

    # -- discovery ---------------------------------------------------------------

    def _open(self, gpu_index: int) -> _Device:
        nvml = self._nvml
        call = _DeviceCall(self, gpu_index)
        unknown = GpuInfo(gpu_index, "", "", False)
        try:
            handle, error = self._attempt(gpu_index, nvml.nvmlDeviceGetHandleByIndex, gpu_index)
        except DeviceLost as err:
            return _Device(unknown, None, call, lost_detail=str(err))
        if handle is None:
            code = error.value if isinstance(error, pynvml.NVMLError) else None
            if code in _INACCESSIBLE_CODES:
                return _Device(unknown, None, call, inaccessible=_INACCESSIBLE_CODES[code])
            return _Device(unknown, None, call, lost_detail="no NVML handle")
        device = _Device(unknown, handle, call)
        try:
            uuid = _text(call(nvml.nvmlDeviceGetUUID, handle))
            name = _text(call(nvml.nvmlDeviceGetName, handle))
            device.info = GpuInfo(gpu_index, uuid, name, False)
            memory = self._memory_info(device)
            mig_mode = _mig_enabled(call(getattr(nvml, "nvmlDeviceGetMigMode", _no_mig), handle))
            if not mig_mode:
                # In MIG mode GPM is read per GPU instance (see the module docstring).
                self._start_gpm(device)
            device.info = GpuInfo(
                gpu_index=gpu_index,
                gpu_uuid=uuid,
                gpu_name=name,
                has_gpm=device.gpm is not None,
                mem_total_bytes=int(memory.total) if memory is not None else None,
                pcie_link_gen_max=_int(call(nvml.nvmlDeviceGetMaxPcieLinkGeneration, handle)),
                pcie_link_width_max=_int(call(nvml.nvmlDeviceGetMaxPcieLinkWidth, handle)),
                mig_mode=mig_mode,
            )
        except DeviceLost as err:
            if device.gpm is not None:
                device.gpm.close()
                device.gpm = None
            device.lost_detail = str(err)
        return device

    def _reopen(self, device: _Device) -> _Device:
        """``device`` (lost at start) opened again if ``REOPEN_EVERY_S`` has passed.

        The fresh device replaces it, with its MIG instances, XID watch and GpuInfo
        (``devices()`` changes: the sampler reads it every tick). Until then, or while
        it still fails, ``device`` itself, its ``lost_detail`` the latest reason.
        """
        now_s = self._clock()
        if device.reopen_at_s is None:  # the first read after the failure at start
            device.reopen_at_s = now_s + REOPEN_EVERY_S
        if now_s < device.reopen_at_s:
            return device
        device.reopen_at_s = now_s + REOPEN_EVERY_S
        gpu_index = device.info.gpu_index
        fresh = self._open(gpu_index)
        instances = self._open_mig(fresh) if fresh.info.mig_mode else []
        if fresh.lost_detail is not None:  # still, or again while listing its instances
            device.lost_detail = fresh.lost_detail
            return device
        devices = list(self._devices)
        devices[gpu_index] = fresh
        self._devices = tuple(devices)
        for instance in instances:
            self._mig[instance.info.mig_uuid] = instance
        self._infos = self._all_infos()
        self._health_cache.pop(gpu_index, None)
        if fresh.inaccessible is not None:  # it answers, but not to this user: say that
            logger.warning("GPU %d: answers again, but %s to this user", gpu_index,
                           fresh.inaccessible)  # fmt: skip
            return fresh
        if self._xid is not None:
            self._xid.watch(gpu_index, fresh.handle)
        logger.warning(
            "GPU %d (%s): opened after failing at start; sampled from now on",
            gpu_index,
            fresh.info.gpu_uuid or "no UUID",
        )
        return fresh

    def _open_mig(self, parent: _Device) -> list[_Device]:
        """The MIG instances of ``parent`` (a GPU in MIG mode); none if it was lost."""
        nvml, call, handle = self._nvml, parent.call, parent.handle
        out: list[_Device] = []
        try:
            slots = _int(call(nvml.nvmlDeviceGetMaxMigDeviceCount, handle)) or 0
            for slot in range(slots):
                mig_handle = call(_mig_handle, nvml, handle, slot)
                if mig_handle is None:
                    continue  # an empty slot: instances need not be contiguous
                mig_uuid = _text(call(nvml.nvmlDeviceGetUUID, mig_handle))
                if not mig_uuid:
                    continue  # without its UUID the instance cannot be named or read
                info = GpuInfo(
                    gpu_index=parent.info.gpu_index,
                    gpu_uuid=parent.info.gpu_uuid,
                    gpu_name=_text(call(nvml.nvmlDeviceGetName, mig_handle)),
                    has_gpm=False,
                    mig_uuid=mig_uuid,
                    gpu_instance_id=_int(call(nvml.nvmlDeviceGetGpuInstanceId, mig_handle)),
                    compute_instance_id=_int(
                        call(nvml.nvmlDeviceGetComputeInstanceId, mig_handle)
                    ),
                )
                device = _Device(info, mig_handle, call, parent_handle=handle)
                memory = self._memory_info(device)
                self._start_gpm(device)
                device.info = dataclasses.replace(
                    info,
                    has_gpm=device.gpm is not None,
                    mem_total_bytes=int(memory.total) if memory is not None else None,
                )
                out.append(device)
        except DeviceLost:
            for device in out:
                if device.gpm is not None:
                    device.gpm.close()
            parent.lost_detail = parent.lost_detail or "lost while listing its MIG instances"
            return []
        return out

    def _start_gpm(self, device: _Device) -> None:
        """Set up GPM if the GPU has it; after a transient error, plan to ask again."""
        nvml, handle = self._nvml, device.handle
        gpu_instance_id: int | None = None
        if device.parent_handle is not None:
            # A MIG instance: GPM is per GPU instance, sampled through the parent.
            handle, gpu_instance_id = device.parent_handle, device.info.gpu_instance_id
            if gpu_instance_id is None or not hasattr(nvml, "nvmlGpmMigSampleGet"):
                return
        device.gpm_retry_at_s = None
        query = getattr(nvml, "nvmlGpmQueryDeviceSupport", None)
        if query is None:
            return
        support, error = self._attempt(device.info.gpu_index, query, handle)
        if _no_permission(error):
            device.gpm_denied = True  # profiling restricted: asking again cannot help
            return
        if support is None:
            # One Unknown or Timeout at startup must not leave a Hopper GPU on proxies
            # for the agent's whole life.
            if not (isinstance(error, pynvml.NVMLError) and error.value in _PERMANENT_CODES):
                device.gpm_retry_at_s = self._clock() + RETRY_NEWER_S
            return
        if not support.isSupportedDevice:
            return
        gpm = GpmSampler(
            nvml,
            handle,
            call=self._gpm_call(device),
            clock=self._clock,
            gpu_instance_id=gpu_instance_id,
        )
        if not gpm.usable:
            gpm.close()
            return
        device.gpm = gpm
        # Prime: the first sample is taken now, so the first read() at least 100 ms from
        # now already has metrics.
        gpm.read()
        self._drop_denied_gpm(device)

    def _gpm_call(self, device: _Device) -> NvmlCall:
        """The choke point for ``device``'s GPM calls, noting a NoPermission answer."""
        gpu_index = device.info.gpu_index

        def call(fn: Callable[..., T], /, *args: Any) -> T | None:
            value, error = self._attempt(gpu_index, fn, *args)
            if _no_permission(error):
                device.gpm_denied = True
            return value

        return call

    def _drop_denied_gpm(self, device: _Device) -> None:
        """Turn GPM off for good on a GPU whose GPM calls this user may not make.

        Profiling restricted to admins holds until the nvidia module is reloaded, so
        retrying would cost a failed call per tick and buy nothing; without GPM the
        windows fall back to NVML proxies (lower confidence, ``proxy`` provenance).
        """
        if not device.gpm_denied or device.gpm is None:
            return
        device.gpm.close()
        device.gpm = None
        self._set_has_gpm(device, False)

    def _read_gpm(self, device: _Device) -> GpmReading | None:
        """This tick's GPM reading; ``None`` without GPM, or once GPM was denied."""
        gpm = device.gpm.read() if device.gpm is not None else None
        if device.gpm_denied:
            self._drop_denied_gpm(device)
            return None
        return gpm

    def _retry_gpm(self, device: _Device) -> None:
        if device.gpm_retry_at_s is None or self._clock() < device.gpm_retry_at_s:
            return
        self._start_gpm(device)
        if device.gpm is not None:
            self._set_has_gpm(device, True)

    def _set_has_gpm(self, device: _Device, has_gpm: bool) -> None:
        """Record that ``device`` gained or lost GPM, in what ``devices()`` reports."""
        if device.info.has_gpm != has_gpm:
            device.info = dataclasses.replace(device.info, has_gpm=has_gpm)
            self._infos = self._all_infos()

    def devices(self) -> tuple[GpuInfo, ...]:
        """The GPUs on this host, in index order, each MIG parent followed by its instances.

        Read at construction, and again when a GPU that failed to open then opens
        (``REOPEN_EVERY_S``): the sampler asks every tick.
        """
        return self._infos

    # -- the fast loop -----------------------------------------------------------

    def read(self, gpu_index: int, time_s: float, mig_uuid: str = "") -> GpuSample:
        """One consistent snapshot of ``gpu_index``, stamped ``time_s`` (epoch seconds).

        Args:
            gpu_index: NVML index of the GPU (a MIG instance's parent).
            time_s: the sample's timestamp (Unix epoch seconds).
            mig_uuid: read this MIG instance of ``gpu_index`` instead of the GPU.

        Returns:
            The sample; fields the GPU cannot measure are ``None``. GPM fields are
            ``None`` without GPM and until two GPM samples ≥ 100 ms apart exist; read
            sooner than 100 ms after the last GPM sample, they repeat the previous
            reading and ``gpm_stale`` is set.

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
            device = self._reopen(device)
            if device.lost_detail is not None:
                raise DeviceLost(gpu_index, device.lost_detail)
        if device.inaccessible is not None:
            raise DeviceInaccessible(gpu_index, device.inaccessible)
        if mig_uuid:
            instance = self._mig.get(mig_uuid)
            if instance is None or instance.info.gpu_index != gpu_index:
                raise SensorError(f"no MIG instance {mig_uuid} on GPU {gpu_index}")
            return self._read_mig(instance, time_s)
        nvml, call, handle = self._nvml, device.call, device.handle

        self._retry_gpm(device)
        gpm = self._read_gpm(device)
        util = call(nvml.nvmlDeviceGetUtilizationRates, handle)
        memory = self._memory_info(device)
        sm_clock_mhz = call(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM)
        power_mw = call(nvml.nvmlDeviceGetPowerUsage, handle)
        temperature_c = self._temperature(device)
        reasons = self._clock_event_reasons(device)
        link_gen = call(nvml.nvmlDeviceGetCurrPcieLinkGeneration, handle)
        link_width = call(nvml.nvmlDeviceGetCurrPcieLinkWidth, handle)
        processes = self._compute_processes(device)

        info = device.info
        return GpuSample(
            time_s=time_s,
            gpu_index=gpu_index,
            gpu_uuid=info.gpu_uuid,
            gpu_name=info.gpu_name,
            **_activity(util, gpm),
            pcie_rx_bytes_per_s=gpm.pcie_rx_bytes_per_s if gpm else None,
            pcie_tx_bytes_per_s=gpm.pcie_tx_bytes_per_s if gpm else None,
            pcie_link_gen=_int(link_gen),
            pcie_link_width=_int(link_width),
            power_w=power_mw / 1000.0 if power_mw is not None else None,
            sm_clock_mhz=_float(sm_clock_mhz),
            mem_used_bytes=int(memory.used) if memory is not None else None,
            mem_total_bytes=int(memory.total) if memory is not None else info.mem_total_bytes,
            temperature_c=temperature_c,
            clock_event_reasons=reasons,
            processes=_processes(processes),
            **self._health(device),
        )

    def _read_mig(self, device: _Device, time_s: float) -> GpuSample:
        """A MIG instance's snapshot: activity and memory only (the rest is the parent's)."""
        nvml, call, handle, info = self._nvml, device.call, device.handle, device.info
        self._retry_gpm(device)
        gpm = self._read_gpm(device)
        # NotSupported on A100 and H100 instances alike; asked so a driver that adds it
        # is used, and absent (never 0) until then.
        util = call(nvml.nvmlDeviceGetUtilizationRates, handle)
        memory = self._memory_info(device)
        processes = self._compute_processes(device)
        return GpuSample(
            time_s=time_s,
            gpu_index=info.gpu_index,
            gpu_uuid=info.gpu_uuid,
            gpu_name=info.gpu_name,
            **_activity(util, gpm),
            mem_used_bytes=int(memory.used) if memory is not None else None,
            mem_total_bytes=int(memory.total) if memory is not None else info.mem_total_bytes,
            processes=_processes(processes),
            mig_uuid=info.mig_uuid,
            gpu_instance_id=info.gpu_instance_id,
            compute_instance_id=info.compute_instance_id,
        )

    def xid_tally(self, gpu_index: int) -> tuple[tuple[int, ...], int | None]:
        """Critical XID codes seen on ``gpu_index`` and their count (None: not watched).

        Also for a GPU that can no longer be read: XID 79 comes just before NVML
        calls the GPU lost, and the sampler's lost sample must still say so.
        """
        return self._xid.tally(gpu_index) if self._xid is not None else ((), None)

    def xid_fields(self, gpu_index: int) -> dict[str, Any]:
        """The GpuSample XID fields of ``gpu_index``: codes, count and count per code."""
        if self._xid is None:
            return {"xid_codes": (), "xid_count": None}
        codes, count, by_code = self._xid.tally_by_code(gpu_index)
        return {"xid_codes": codes, "xid_count": count, "xid_code_counts": by_code}

    def _health(self, device: _Device) -> dict[str, Any]:
        """GpuSample health fields: XIDs now; ECC, row remaps or retired pages as last read."""
        gpu_index = device.info.gpu_index
        now_s = self._clock()
        cached = self._health_cache.get(gpu_index)
        if cached is None or now_s - cached[0] >= HEALTH_EVERY_S:
            cached = (now_s, self._read_health_counters(device))
            self._health_cache[gpu_index] = cached
        return {**self.xid_fields(gpu_index), **cached[1]}

    def _read_health_counters(self, device: _Device) -> dict[str, Any]:
        nvml, call, handle = self._nvml, device.call, device.handle
        out: dict[str, Any] = {}
        ecc = getattr(nvml, "nvmlDeviceGetTotalEccErrors", None)
        if ecc is not None:
            for name, kind, counter in _ECC_COUNTERS:
                out[name] = _int(call(ecc, handle, getattr(nvml, kind), getattr(nvml, counter)))
        remapped = getattr(nvml, "nvmlDeviceGetRemappedRows", None)
        rows, error = None, None
        if remapped is not None and not device.no_row_remapping:
            rows, error = self._attempt(device.info.gpu_index, remapped, handle)
            # NotSupported: a GPU before Ampere (V100, T4), which retires pages instead.
            device.no_row_remapping = rows is None and _permanent(error)
        if rows is not None:
            corrected, uncorrected, pending, failed = rows
            out["remapped_rows_corrected"] = int(corrected)
            out["remapped_rows_uncorrected"] = int(uncorrected)
            out["remap_pending"] = bool(pending)
            out["remap_failed"] = bool(failed)
        elif remapped is None or device.no_row_remapping:
            out.update(self._retired_pages(device))
        return out

    def _retired_pages(self, device: _Device) -> dict[str, Any]:
        """Page retirement, on a GPU without row remapping (pre-Ampere): GpuSample fields.

        Pages retired for multiple single-bit ECC errors and for a double-bit one, and
        whether a retirement waits for the next reset. A GPU that lacks this too (no
        ECC: a consumer card) is not asked again.
        """
        if device.no_page_retirement:
            return {}
        nvml, handle, gpu_index = self._nvml, device.handle, device.info.gpu_index
        out: dict[str, Any] = {}
        errors: list[Exception | None] = []
        pages = getattr(nvml, "nvmlDeviceGetRetiredPages", None)
        if pages is not None:
            for name, cause in _RETIREMENT_CAUSES:
                found, error = self._attempt(gpu_index, pages, handle, getattr(nvml, cause))
                out[name] = len(found) if found is not None else None
                errors.append(error)
        status = getattr(nvml, "nvmlDeviceGetRetiredPagesPendingStatus", None)
        if status is not None:
            pending, error = self._attempt(gpu_index, status, handle)
            out["retired_pages_pending"] = bool(pending) if pending is not None else None
            errors.append(error)
        device.no_page_retirement = all(e is not None and _permanent(e) for e in errors)
        return out

    def _memory_info(self, device: _Device) -> Any:
        nvml, handle = self._nvml, device.handle
        version = getattr(nvml, "nvmlMemory_v2", None)
        # v2 separates driver-reserved memory from "used"; v1 lumps it in.
        return self._newer_first(
            device,
            "memory",
            (nvml.nvmlDeviceGetMemoryInfo if version is not None else None, (handle, version)),
            (nvml.nvmlDeviceGetMemoryInfo, (handle,)),
        )

    def _clock_event_reasons(self, device: _Device) -> int | None:
        nvml, handle = self._nvml, device.handle
        # Renamed in NVML 12.x; the old "throttle" name goes away in CUDA 14.
        reasons = self._newer_first(
            device,
            "clock_event_reasons",
            (getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None), (handle,)),
            (getattr(nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None), (handle,)),
        )
        return _int(reasons)

    def _compute_processes(self, device: _Device) -> Any:
        nvml, handle = self._nvml, device.handle
        # pynvml's unversioned call resolves only the _v3 symbol (R510+); on R455-R495
        # it raises NVMLLibraryMismatchError, and those drivers answer through _v2.
        return self._newer_first(
            device,
            "processes",
            (nvml.nvmlDeviceGetComputeRunningProcesses, (handle,)),
            (getattr(nvml, "nvmlDeviceGetComputeRunningProcesses_v2", None), (handle,)),
        )

    def _temperature(self, device: _Device) -> float | None:
        nvml, handle = self._nvml, device.handle
        sensor = nvml.NVML_TEMPERATURE_GPU
        # nvmlDeviceGetTemperature is deprecated and goes away in CUDA 14; drivers before
        # nvmlDeviceGetTemperatureV (nvmlTemperature_t) have only the old one.
        temperature = self._newer_first(
            device,
            "temperature",
            (getattr(nvml, "nvmlDeviceGetTemperatureV", None), (handle, sensor)),
            (getattr(nvml, "nvmlDeviceGetTemperature", None), (handle, sensor)),
        )
        return _float(temperature)

    # -- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        """Free GPM samples and shut NVML down (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for device in (*self._devices, *self._mig.values()):
            if device.gpm is not None:
                device.gpm.close()
        if self._xid is not None:
            self._xid.close()  # its event set goes before NVML does
        # Shutdown is reference-counted in NVML; a failure here changes nothing.
        with contextlib.suppress(pynvml.NVMLError):
            self._nvml.nvmlShutdown()


def _fn_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", repr(fn))


def _error_name(err: Exception) -> str:
    # pynvml maps each known code to its own class (NVMLError_NotSupported); a code it
    # does not know stays a bare NVMLError, so the code tells those apart.
    name = type(err).__name__
    if isinstance(err, pynvml.NVMLError) and type(err) is pynvml.NVMLError:
        return f"{name}({err.value})"
    return name


def _no_mig(handle: Any) -> None:
    """Stands in for ``nvmlDeviceGetMigMode`` in a library without it: no MIG."""
    return None


def _mig_enabled(mode: Any) -> bool:
    """Whether ``nvmlDeviceGetMigMode``'s [current, pending] says MIG is on now."""
    if mode is None:
        return False
    current = mode[0] if isinstance(mode, (list, tuple)) else mode
    return bool(int(current) == pynvml.NVML_DEVICE_MIG_ENABLE)


def _mig_handle(nvml: Any, parent: Any, slot: int) -> Any:
    """The MIG device in ``slot`` of ``parent``; ``None`` for an empty slot.

    NotFound is NVML's ordinary answer for a slot no instance occupies, so it is no
    error to count or log.
    """
    try:
        return nvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, slot)
    except pynvml.NVMLError as err:
        if err.value == pynvml.NVML_ERROR_NOT_FOUND:
            return None
        raise


def _text(value: Any) -> str:
    # pynvml before 11.5 returned bytes for strings.
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _permanent(error: BaseException | None) -> bool:
    """Whether ``error`` says the driver lacks an API (so asking again is pointless)."""
    if isinstance(error, pynvml.NVMLLibraryMismatchError):
        return True  # pynvml wants a versioned symbol this driver does not export
    return isinstance(error, pynvml.NVMLError) and error.value in _PERMANENT_CODES


def _no_permission(error: BaseException | None) -> bool:
    """Whether ``error`` is NVML saying this user lacks the privilege for the call."""
    return isinstance(error, pynvml.NVMLError) and error.value == pynvml.NVML_ERROR_NO_PERMISSION


def _privilege_for(fn_name: str) -> str:
    """The privilege an NVML call denied with NoPermission needs, for the operator."""
    for prefix, privilege in _PRIVILEGES:
        if fn_name.startswith(prefix):
            return privilege
    return _DEFAULT_PRIVILEGE


def _activity(util: Any, gpm: Any) -> dict[str, Any]:
    """The activity fields of a sample, from NVML's utilization rates and a GPM reading.

    Shared by a whole GPU's read and a MIG instance's (whose PCIe is its parent's, so
    PCIe stays with the whole-GPU read); absent (None) where unmeasured.
    """
    return {
        "busy_pct": _float(util.gpu) if util is not None else None,
        "mem_ctrl_pct": _float(util.memory) if util is not None else None,
        "sm_active_pct": gpm.sm_active_pct if gpm else None,
        "sm_occupancy_pct": gpm.sm_occupancy_pct if gpm else None,
        "tensor_active_pct": gpm.tensor_active_pct if gpm else None,
        "fp16_active_pct": gpm.fp16_active_pct if gpm else None,
        "fp32_active_pct": gpm.fp32_active_pct if gpm else None,
        "fp64_active_pct": gpm.fp64_active_pct if gpm else None,
        "dram_bw_pct": gpm.dram_bw_pct if gpm else None,
        "gpm_stale": gpm.stale if gpm else False,
    }


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
