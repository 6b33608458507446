"""GPU performance monitoring (GPM, Hopper and later): true pipe and DRAM activity.

GPM metrics are computed from two counter samples taken some time apart. NVML does
not enforce a minimum gap, but metrics from samples closer than ~100 ms are noise,
so ``GpmSampler`` enforces it: asked again too soon, it takes no sample and hands
back the previous reading marked ``stale``. At the CLI's 10 Hz, tick jitter puts
about a third of ticks under 100 ms; unmarked, a repeated reading under a new
timestamp would enter a window as a new measurement (windows skip stale ticks, a
gauge may show them as the latest value). The two sample buffers are used ping-pong:
the newer sample of one computation is the older of the next.

Call sequence (DESIGN §2): ``nvmlGpmSampleAlloc`` ×2, ``nvmlGpmSampleGet``, fill
``c_nvmlGpmMetricsGet_t``, ``nvmlGpmMetricsGet``, read ``.value`` only where that
metric's own ``nvmlReturn`` is 0, ``nvmlGpmSampleFree`` on close.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import pynvml

from rooftop.agent.sensors.base import Clock
from rooftop.common.errors import SensorError

__all__ = [
    "GPM_METRIC_FIELDS",
    "GPM_MIN_INTERVAL_S",
    "GpmReading",
    "GpmSampler",
    "NvmlCall",
]

T = TypeVar("T")

# Below this gap GPM counter deltas are too short to mean anything (NVML docs).
GPM_MIN_INTERVAL_S = 0.1

_BYTES_PER_MIB = 1024 * 1024

# GPM metric id -> GpmReading field. PCIe metrics come in MiB/s and are converted.
GPM_METRIC_FIELDS: dict[int, str] = {
    pynvml.NVML_GPM_METRIC_SM_UTIL: "sm_active_pct",
    pynvml.NVML_GPM_METRIC_SM_OCCUPANCY: "sm_occupancy_pct",
    pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: "tensor_active_pct",
    pynvml.NVML_GPM_METRIC_FP16_UTIL: "fp16_active_pct",
    pynvml.NVML_GPM_METRIC_FP32_UTIL: "fp32_active_pct",
    pynvml.NVML_GPM_METRIC_FP64_UTIL: "fp64_active_pct",
    pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL: "dram_bw_pct",
    pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC: "pcie_tx_bytes_per_s",
    pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC: "pcie_rx_bytes_per_s",
}
_MIB_PER_S_METRICS = frozenset(
    {pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC, pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC}
)

# Plain attribute access on the GPM structs, past pynvml's _PrintableStructure
# __getattribute__/__setattr__ overrides (a Python call per access, there to turn bytes
# into str): ~40 accesses per GPU per tick, and every field used here is a number.
_get = object.__getattribute__
_set = object.__setattr__


class NvmlCall(Protocol):
    """The NVML choke point: call ``fn(*args)``; ``None`` where the value is absent."""

    def __call__(self, fn: Callable[..., T], /, *args: Any) -> T | None:
        """Call ``fn(*args)``, mapping NVML errors (see ``NvmlBackend._call``)."""
        ...


def _direct_call(fn: Callable[..., T], /, *args: Any) -> T | None:
    """No error mapping: NVML errors propagate (for standalone use)."""
    return fn(*args)


@dataclass(frozen=True, slots=True)
class GpmReading:
    """GPM metrics over one interval; ``None`` where GPM did not return that metric.

    ``stale``: a repeat of the previous reading (asked too soon for a new one), not a
    new measurement.
    """

    interval_s: float
    sm_active_pct: float | None = None
    sm_occupancy_pct: float | None = None
    tensor_active_pct: float | None = None
    fp16_active_pct: float | None = None
    fp32_active_pct: float | None = None
    fp64_active_pct: float | None = None
    dram_bw_pct: float | None = None
    pcie_rx_bytes_per_s: float | None = None
    pcie_tx_bytes_per_s: float | None = None
    stale: bool = False


class GpmSampler:
    """GPM metrics for one device, never from samples closer than ``min_interval_s``.

    Args:
        nvml: the ``pynvml`` module, or a fake with the same API.
        handle: the NVML device handle.
        call: the NVML choke point every call goes through (the backend's, which
            maps NotSupported to ``None`` and GpuIsLost to ``DeviceLost``).
        clock: monotonic seconds; injectable for tests.
        min_interval_s: the smallest gap between the two samples of a computation.
        gpu_instance_id: sample this MIG GPU instance of ``handle`` (the parent GPU)
            with ``nvmlGpmMigSampleGet``, instead of the whole GPU.
    """

    def __init__(
        self,
        nvml: Any,
        handle: Any,
        *,
        call: NvmlCall = _direct_call,
        clock: Clock = time.monotonic,
        min_interval_s: float = GPM_MIN_INTERVAL_S,
        gpu_instance_id: int | None = None,
    ) -> None:
        self._nvml = nvml
        self._gpu_instance_id = gpu_instance_id
        self._handle = handle
        self._call = call
        self._clock = clock
        self._min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._samples: list[Any] = []
        try:
            for _ in range(2):
                sample = call(nvml.nvmlGpmSampleAlloc)
                if sample is None:
                    # Allocation refused: free what we got and run without GPM.
                    self._free_samples()
                    break
                self._samples.append(sample)
        except BaseException:
            self._free_samples()
            raise
        self._newest = 0  # index of the buffer holding the newest sample
        self._newest_time_s: float | None = None
        self._last: GpmReading | None = None
        self._closed = False
        # One request struct for the sampler's life, its metric ids set once: NVML reads
        # the ids and the two samples and writes each metric's status and value, so only
        # the samples change between calls (a struct and 11 field writes a tick less per GPU).
        self._request: Any = None

    @property
    def usable(self) -> bool:
        """Whether both sample buffers were allocated and the sampler is open."""
        return len(self._samples) == 2 and not self._closed

    def read(self) -> GpmReading | None:
        """Take a GPM sample and return the metrics since the previous one.

        Returns:
            Fresh metrics over the interval between the two newest samples, each
            interval handed out fresh once. Called less than ``min_interval_s`` after
            the last sample, no sample is taken and the previous reading comes back
            marked ``stale`` (the next fresh one covers the whole gap); ``None`` on the
            first call and after a failed sample.
        """
        with self._lock:
            if not self.usable:
                return None
            now_s = self._clock()
            if self._newest_time_s is not None and now_s - self._newest_time_s < (
                self._min_interval_s
            ):
                last = self._last
                return None if last is None else dataclasses.replace(last, stale=True)
            older = self._newest
            newer = 1 - older
            if self._gpu_instance_id is None:
                got = self._call(self._nvml.nvmlGpmSampleGet, self._handle, self._samples[newer])
            else:
                got = self._call(self._nvml.nvmlGpmMigSampleGet, self._handle,
                                 self._gpu_instance_id, self._samples[newer])
            if got is None:
                # No sample: the buffers no longer hold a usable pair; start over.
                self._newest_time_s = None
                self._last = None
                return None
            previous_time_s = self._newest_time_s
            self._newest, self._newest_time_s = newer, now_s
            if previous_time_s is None:
                return None
            self._last = self._metrics(
                self._samples[older], self._samples[newer], now_s - previous_time_s
            )
            return self._last

    def _metrics(self, sample1: Any, sample2: Any, interval_s: float) -> GpmReading | None:
        request = self._request
        if request is None:
            request = self._nvml.c_nvmlGpmMetricsGet_t()
            request.version = self._nvml.NVML_GPM_METRICS_GET_VERSION
            request.numMetrics = len(GPM_METRIC_FIELDS)
            metrics = _get(request, "metrics")  # once, not once per metric
            for i, metric_id in enumerate(GPM_METRIC_FIELDS):
                _set(metrics[i], "metricId", metric_id)
            self._request = request
        _set(request, "sample1", sample1)
        _set(request, "sample2", sample2)
        result = self._call(self._nvml.nvmlGpmMetricsGet, request)
        if result is None:
            return None
        values: dict[str, Any] = {}  # floats, by GpmReading field name
        metrics = _get(result, "metrics")
        for i in range(len(GPM_METRIC_FIELDS)):
            metric = metrics[i]
            # Each metric carries its own status: one unsupported metric must not
            # poison the others, and a failed metric's value is garbage, not 0.
            if _get(metric, "nvmlReturn") != pynvml.NVML_SUCCESS:
                continue
            metric_id = _get(metric, "metricId")
            field = GPM_METRIC_FIELDS.get(metric_id)
            if field is None:
                continue
            value = float(_get(metric, "value"))
            if metric_id in _MIB_PER_S_METRICS:
                value *= _BYTES_PER_MIB
            values[field] = value
        return GpmReading(interval_s=interval_s, **values)

    def close(self) -> None:
        """Free the sample buffers (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._free_samples()

    def _free_samples(self) -> None:
        samples, self._samples = self._samples, []
        for sample in samples:
            # Best effort: a lost GPU cannot free anything, and shutdown must go on.
            with contextlib.suppress(SensorError, pynvml.NVMLError):
                self._call(self._nvml.nvmlGpmSampleFree, sample)
