"""A fake NVML library, so the real ``NvmlBackend`` runs on machines without a GPU.

``FakeNvmlLibrary`` exposes the part of the ``pynvml`` API that ``NvmlBackend`` and
``GpmSampler`` use, with the same function names and signatures, returning objects
shaped like pynvml's (the real ctypes structs where pynvml returns them), raising
real ``pynvml.NVMLError`` instances and filling the real ``c_nvmlGpmMetricsGet_t``.
Only NVML is faked: every line of the backend runs as it would on a GPU.

Profiles: ``h100`` (GPM, PCIe gen5 x16), ``a100`` (no GPM, gen4 x16) and ``v100``
(Volta: no GPM, gen3 x16, page retirement instead of row remapping); ``a100-mig``
and ``h100-mig`` are the same GPUs in MIG mode with two 3g.40gb instances each
(GPU instances 1 and 2). In MIG mode util rates are NotSupported on the GPU and its
instances, board-level calls (power, clocks, temperature, PCIe) on an instance handle
are NotSupported, and GPM (H100 only) is per GPU instance through
``nvmlGpmMigSampleGet``. Workloads, ``set_workload``, ``fake_pid`` and GPM samples
address *units*: a GPU, or on a MIG profile one instance (unit = gpu × instances +
slot); a MIG parent's board figures follow its first instance. Workloads
reproduce the H100 measurements of DESIGN §2 (``gemv``, ``gemm``, ``host_stall``,
``decode``, ``prefill``, ``pcie_copy``, ``hf_generate``, ``spin``, ``idle``) with
small seeded noise. A workload spec is a name (``"gemv"``) or a repeating schedule
(``"gemv:2,gemm:2"``: 2 s of each, in turn, on the injected clock). GPM metrics are
the time-weighted mean of the workload between the two samples, as real GPM counter
deltas are, so a schedule or a ``set_workload`` mid-interval blends honestly.

Errors: ``inject(gpu, "nvmlDeviceGetTemperature", "not_supported")``, ``"gpu_is_lost"``
(``"*"`` for every call on that GPU), an exception instance to raise as it is (pynvml's
``NVMLLibraryMismatchError``), ``times=1`` for a transient error, ``inject_gpm_metric``
for one metric's own ``nvmlReturn``, and ``driver_missing=True`` for
``NVMLError_LibraryNotFound`` at init. ``unprivileged=True`` is a non-root agent on a
host with profiling restricted to admins (the driver default): GPM samples and a MIG
parent's memory info answer NoPermission (``_UNPRIVILEGED_DENIED``).

Health: ECC counters answer on every profile, row remapping on Ampere and later
(``h100``, ``a100``), page retirement before (``v100``); the other one answers
NotSupported, as NVML does. All are zero until ``add_ecc_errors`` /
``set_remapped_rows`` / ``set_retired_pages``; ``raise_xid(gpu, 79)`` delivers a critical
XID event to every event set that registered the GPU (``nvmlEventSetWait_v2`` really
blocks, up to its timeout, on a condition of its own).

Processes on a busy fake GPU get pids above Linux's PID_MAX_LIMIT (2**22), so they
never collide with a real process; ``FakeHostSensor`` reports their CPU use (a
``host_stall`` process spins at ~100 % of one core).
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from types import MappingProxyType
from typing import Any

import pynvml

from rooftop.agent.sensors.base import Clock
from rooftop.agent.sensors.gpm import GPM_METRIC_FIELDS
from rooftop.agent.sensors.nvml import NvmlBackend
from rooftop.common.model import HostProcess, HostSample

__all__ = [
    "FAKE_PID_BASE",
    "FAKE_PROFILES",
    "FAKE_WORKLOADS",
    "PROFILES",
    "WORKLOADS",
    "FakeHostSensor",
    "FakeMigInstance",
    "FakeNvmlLibrary",
    "FakeProfile",
    "FakeWorkload",
    "GPM_INTERVALS_KEPT",
    "Schedule",
    "fake_backend",
    "parse_workload",
]

# Linux never hands out a pid at or above PID_MAX_LIMIT (2**22 on 64-bit).
FAKE_PID_BASE = 2**22 + 1000

_GiB = 1024**3
_MiB = 1024**2


@dataclass(frozen=True, slots=True)
class FakeMigInstance:
    """One MIG instance of a fake GPU in MIG mode (one compute instance, id 0)."""

    name: str  # the MIG profile, e.g. "3g.40gb"
    gpu_instance_id: int
    mem_total_bytes: int


@dataclass(frozen=True, slots=True)
class FakeProfile:
    """A GPU model as NVML describes it."""

    name: str
    mem_total_bytes: int
    mem_reserved_bytes: int  # driver-reserved, reported apart by memory info v2
    has_gpm: bool
    pcie_link_gen_max: int
    pcie_link_width_max: int
    pcie_link_bytes_per_s: float  # per direction, at max gen and width
    sm_clock_max_mhz: int
    sm_clock_idle_mhz: int
    mem_clock_mhz: int
    power_idle_w: float
    power_max_w: float
    temperature_idle_c: float
    temperature_max_c: float
    mig_instances: tuple[FakeMigInstance, ...] = ()  # non-empty: the GPU is in MIG mode
    # Ampere and later remap DRAM rows; older GPUs retire pages instead. NVML answers
    # NotSupported for the other mechanism's calls.
    row_remapping: bool = True


_MIG_3G_40GB = (
    FakeMigInstance("3g.40gb", gpu_instance_id=1, mem_total_bytes=40_768_634_880),
    FakeMigInstance("3g.40gb", gpu_instance_id=2, mem_total_bytes=40_768_634_880),
)
# Real NVML allows up to 7 MIG devices per GPU; unused slots answer NotFound.
_MIG_SLOTS = 7
_NOT_MIG = 0xFFFFFFFF  # gpuInstanceId / computeInstanceId of a process outside MIG
# On a MIG instance handle these answer NotSupported: they belong to the whole board.
# What a non-root agent is refused where the driver restricts profiling to admins
# (RmProfilingAdminOnly, the default): GPM counter samples. A MIG parent's memory
# info is refused too (handled in _check: it depends on the handle).
_UNPRIVILEGED_DENIED = frozenset({"nvmlGpmSampleGet", "nvmlGpmMigSampleGet"})

_BOARD_ONLY = frozenset(
    {
        "nvmlDeviceGetClockInfo",
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetTemperatureV",
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetCurrentClocksThrottleReasons",
        "nvmlDeviceGetCurrPcieLinkGeneration",
        "nvmlDeviceGetCurrPcieLinkWidth",
        "nvmlDeviceGetMaxPcieLinkGeneration",
        "nvmlDeviceGetMaxPcieLinkWidth",
        "nvmlDeviceGetPcieThroughput",
        "nvmlDeviceGetTotalEnergyConsumption",
        "nvmlDeviceGetMigMode",
        "nvmlDeviceGetMaxMigDeviceCount",
    }
)


PROFILES: Mapping[str, FakeProfile] = MappingProxyType(
    {
        "h100": FakeProfile(
            name="NVIDIA H100 80GB HBM3",
            mem_total_bytes=85_520_809_984,
            mem_reserved_bytes=544_604_160,
            has_gpm=True,
            pcie_link_gen_max=5,
            pcie_link_width_max=16,
            pcie_link_bytes_per_s=63.0e9,
            sm_clock_max_mhz=1980,
            sm_clock_idle_mhz=345,
            mem_clock_mhz=2619,
            power_idle_w=70.0,
            power_max_w=700.0,
            temperature_idle_c=31.0,
            temperature_max_c=68.0,
        ),
        "a100": FakeProfile(
            name="NVIDIA A100-SXM4-80GB",
            mem_total_bytes=85_899_345_920,
            mem_reserved_bytes=480_247_808,
            has_gpm=False,
            pcie_link_gen_max=4,
            pcie_link_width_max=16,
            pcie_link_bytes_per_s=31.5e9,
            sm_clock_max_mhz=1410,
            sm_clock_idle_mhz=210,
            mem_clock_mhz=1593,
            power_idle_w=60.0,
            power_max_w=400.0,
            temperature_idle_c=30.0,
            temperature_max_c=66.0,
        ),
        # Volta (and Turing): no GPM, no MIG, no row remapping: dynamic page retirement.
        "v100": FakeProfile(
            name="Tesla V100-SXM2-32GB",
            mem_total_bytes=34_359_738_368,
            mem_reserved_bytes=0,
            has_gpm=False,
            pcie_link_gen_max=3,
            pcie_link_width_max=16,
            pcie_link_bytes_per_s=15.75e9,
            sm_clock_max_mhz=1530,
            sm_clock_idle_mhz=135,
            mem_clock_mhz=877,
            power_idle_w=40.0,
            power_max_w=300.0,
            temperature_idle_c=30.0,
            temperature_max_c=70.0,
            row_remapping=False,
        ),
    }
)
PROFILES = MappingProxyType(
    {
        **PROFILES,
        "a100-mig": dataclasses.replace(PROFILES["a100"], mig_instances=_MIG_3G_40GB),
        "h100-mig": dataclasses.replace(PROFILES["h100"], mig_instances=_MIG_3G_40GB),
    }
)
FAKE_PROFILES: tuple[str, ...] = tuple(PROFILES)


@dataclass(frozen=True, slots=True)
class FakeWorkload:
    """What a GPU reads while running one kind of work (percentages 0-100)."""

    busy_pct: float  # NVML util.gpu
    mem_ctrl_pct: float  # NVML util.memory
    sm_active_pct: float
    sm_occupancy_pct: float
    tensor_active_pct: float
    dram_bw_pct: float
    fp16_active_pct: float = 0.0
    fp32_active_pct: float = 0.0
    fp64_active_pct: float = 0.0
    pcie_rx_link_frac: float = 0.001  # share of the profile's per-direction link capacity
    pcie_tx_link_frac: float = 0.001
    power_frac: float = 0.0  # 0 = idle power, 1 = board power limit
    sm_clock_frac: float = 1.0  # of the max SM clock; 0 = the idle clock
    mem_used_bytes: int = 1 * _GiB
    process_cpu_pct: float | None = 100.0  # of one core; None = no process on the GPU
    clock_event_reasons: int = 0


# The six positional columns are DESIGN §2's H100 table, in its order: util.gpu,
# util.memory, SM_UTIL, SM_OCCUPANCY, ANY_TENSOR_UTIL, DRAM_BW_UTIL. The rest is plausible.
# fmt: off
WORKLOADS: Mapping[str, FakeWorkload] = MappingProxyType(
    {
        "idle": FakeWorkload(
            0, 0, 0, 0, 0, 0,
            pcie_rx_link_frac=0.0,
            pcie_tx_link_frac=0.0,
            sm_clock_frac=0.0,
            mem_used_bytes=0,
            process_cpu_pct=None,
            clock_event_reasons=pynvml.nvmlClocksEventReasonGpuIdle,
        ),
        # batch-1 GEMV at 2.77 TB/s: SMs "busy" waiting on memory, pipes nearly idle.
        "gemv": FakeWorkload(
            95.5, 97.1, 81.3, 11.7, 2.2, 84.8,
            fp16_active_pct=0.9,
            fp32_active_pct=0.4,
            power_frac=0.72,
            mem_used_bytes=17 * _GiB,
        ),
        # bf16 8192^3 GEMM at 678 TFLOP/s: tensor pipes saturated, at the power cap.
        "gemm": FakeWorkload(
            98.1, 33.2, 94.7, 14.0, 91.9, 25.5,
            fp16_active_pct=0.6,
            fp32_active_pct=0.5,
            power_frac=0.99,
            sm_clock_frac=0.89,
            clock_event_reasons=pynvml.nvmlClocksEventReasonSwPowerCap,
        ),
        # tiny GEMV with a CPU loop between: the GPU waits on a process pinned at 100 %.
        "host_stall": FakeWorkload(
            1.1, 0, 0.6, 0.1, 0, 0,
            pcie_rx_link_frac=0.0005,
            pcie_tx_link_frac=0.0005,
            power_frac=0.04,
        ),
        # graph-captured 8B decode: DRAM 74-79 %, little compute.
        "decode": FakeWorkload(
            97.0, 94.0, 79.0, 12.0, 15.0, 76.0,
            fp16_active_pct=2.0,
            fp32_active_pct=1.0,
            power_frac=0.68,
            mem_used_bytes=72 * _GiB,
            process_cpu_pct=85.0,
        ),
        # 2048-token prefill: compute 65 %, DRAM 27 %.
        "prefill": FakeWorkload(
            98.0, 35.0, 92.0, 18.0, 65.0, 27.0,
            fp16_active_pct=3.0,
            fp32_active_pct=2.0,
            power_frac=0.9,
            sm_clock_frac=0.95,
            mem_used_bytes=72 * _GiB,
            process_cpu_pct=60.0,
        ),
        # pinned host-to-device copy: busy 99 %, SMs idle, 82 % of the PCIe link.
        "pcie_copy": FakeWorkload(
            99.0, 2.0, 0, 0, 0, 1.6,
            pcie_rx_link_frac=0.82,
            pcie_tx_link_frac=0.004,
            power_frac=0.16,
            mem_used_bytes=8 * _GiB,
            process_cpu_pct=99.0,
        ),
        # HF transformers eager generate, 1.1B, batch 1 (TPOT 78 ms): Python-bound.
        "hf_generate": FakeWorkload(
            4.5, 1.0, 0.9, 0.1, 0.0, 0.8,
            fp16_active_pct=0.1,
            fp32_active_pct=0.05,
            power_frac=0.12,
            mem_used_bytes=3 * _GiB,
        ),
        # one-block spin kernel: util.gpu is a duty cycle and reads 99 %.
        "spin": FakeWorkload(99.0, 0, 0.75, 0.01, 0, 0, fp32_active_pct=0.01, power_frac=0.1),
    }
)
# fmt: on
FAKE_WORKLOADS: tuple[str, ...] = tuple(WORKLOADS)

Schedule = tuple[tuple[str, float], ...]
"""A repeating schedule: (workload name, seconds) in turn."""

# The percentage metrics, named as GpmSampler names them (PCIe is scaled by the link).
_GPM_FIELDS: Mapping[int, str] = MappingProxyType(
    {mid: name for mid, name in GPM_METRIC_FIELDS.items() if name.endswith("_pct")}
)
_GPM_PCIE = MappingProxyType(
    {
        pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC: "pcie_rx_link_frac",
        pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC: "pcie_tx_link_frac",
    }
)
_AVERAGED = (*_GPM_FIELDS.values(), *_GPM_PCIE.values())
# GPM computations ``FakeNvmlLibrary.gpm_intervals`` keeps (the newest).
GPM_INTERVALS_KEPT = 10_000

_ERRORS: Mapping[str, int] = MappingProxyType(
    {
        "not_supported": pynvml.NVML_ERROR_NOT_SUPPORTED,
        "gpu_is_lost": pynvml.NVML_ERROR_GPU_IS_LOST,
        "no_permission": pynvml.NVML_ERROR_NO_PERMISSION,
        "function_not_found": pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
        "reset_required": pynvml.NVML_ERROR_RESET_REQUIRED,
        "unknown": pynvml.NVML_ERROR_UNKNOWN,
        "timeout": pynvml.NVML_ERROR_TIMEOUT,
    }
)


def parse_workload(spec: str) -> str | Schedule:
    """Parse a workload spec: a name, or ``"name:seconds,name:seconds,..."``.

    Args:
        spec: e.g. ``"gemv"`` or ``"gemv:2,gemm:2"`` (alternate every 2 s).

    Returns:
        The workload name, or the schedule.

    Raises:
        ValueError: unknown workload name or a malformed duration.
    """
    spec = spec.strip()
    if ":" not in spec and "," not in spec:
        _check_workload(spec)
        return spec
    schedule = []
    for part in spec.split(","):
        name, sep, seconds = part.strip().partition(":")
        _check_workload(name)
        try:
            duration_s = float(seconds) if sep else math.nan
        except ValueError:
            duration_s = math.nan
        if not duration_s > 0 or math.isinf(duration_s):
            raise ValueError(f"bad duration in workload schedule {spec!r}: use name:seconds")
        schedule.append((name, duration_s))
    return tuple(schedule)


def _check_workload(name: str) -> None:
    if name not in WORKLOADS:
        raise ValueError(f"unknown fake workload {name!r}; known: {', '.join(FAKE_WORKLOADS)}")


@dataclass(frozen=True, slots=True)
class _Handle:
    """A fake ``nvmlDevice_t``: a GPU, or (``mig`` set) the MIG device in that slot."""

    index: int
    mig: int | None = None


@dataclass(slots=True, eq=False)
class _EventSet:
    """A fake ``nvmlEventSet_t``: per GPU, the event types registered; events to hand out."""

    types: dict[int, int] = dataclass_field(default_factory=dict)
    handles: dict[int, _Handle] = dataclass_field(default_factory=dict)
    pending: list[tuple[int, int]] = dataclass_field(default_factory=list)  # (gpu, xid)


@dataclass(frozen=True, slots=True)
class _EventData:
    """What ``nvmlEventSetWait_v2`` returns (pynvml's ``c_nvmlEventData_t`` fields)."""

    device: _Handle
    eventType: int  # noqa: N815 — pynvml's field name
    eventData: int  # noqa: N815 — the XID for nvmlEventTypeXidCriticalError
    gpuInstanceId: int = 0xFFFFFFFF  # noqa: N815 — not MIG
    computeInstanceId: int = 0xFFFFFFFF  # noqa: N815


@dataclass(slots=True)
class _GpmSample:
    buffer: ctypes.Array[ctypes.c_char]  # keeps the address the handle points at alive
    gpu: int | None = None
    time_s: float | None = None


class FakeNvmlLibrary:
    """The subset of ``pynvml`` that Rooftop uses, over simulated GPUs.

    Args:
        profile: a key of ``PROFILES`` (``"h100"``, ``"a100"``, ``"a100-mig"``, ...).
        gpus: how many GPUs.
        workloads: one spec for every GPU, or one per GPU (see ``parse_workload``), or
            on a MIG profile one per unit (instance); default idle.
        seed: seeds the measurement noise (per GPU), so runs repeat.
        clock: monotonic seconds; share it with the backend so GPM intervals agree.
        driver_missing: ``nvmlInit`` raises ``NVMLError_LibraryNotFound``.
        noise: scale of the noise (0 for exact table values).
        unprivileged: answer as NVML does a non-root user on a host that restricts
            profiling to admins: NoPermission for GPM samples and MIG-parent memory.

    ``calls`` counts every call by function name; ``gpm_intervals`` lists the
    (gpu, sample1 time, sample2 time) of the latest GPM metrics computations (up to
    ``GPM_INTERVALS_KEPT``: a daemon on the fake runs for days).
    Constants, struct types and error classes come from the real ``pynvml``.
    """

    nvmlMemory_v2 = pynvml.nvmlMemory_v2

    def __init__(
        self,
        profile: str = "h100",
        gpus: int = 1,
        workloads: str | Sequence[str] | None = None,
        *,
        seed: int = 0,
        clock: Clock = time.monotonic,
        driver_missing: bool = False,
        noise: float = 1.0,
        unprivileged: bool = False,
    ) -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown fake profile {profile!r}; known: {', '.join(FAKE_PROFILES)}")
        if gpus < 0:
            raise ValueError("gpus must be >= 0")
        self.profile = PROFILES[profile]
        self.gpus = gpus
        self._per_gpu = max(1, len(self.profile.mig_instances))
        self.units = gpus * self._per_gpu
        self.driver_missing = driver_missing
        self.unprivileged = unprivileged
        self._clock = clock
        self._noise = noise
        self._lock = threading.RLock()
        self._init_count = 0
        self._rngs = [random.Random(seed * 1_000_003 + i) for i in range(self.units)]
        self._uuids = [
            f"GPU-{uuid.UUID(int=random.Random(f'uuid:{seed}:{i}').getrandbits(128), version=4)}"
            for i in range(gpus)
        ]
        self._mig_uuids = [
            f"MIG-{uuid.UUID(int=random.Random(f'mig:{seed}:{u}').getrandbits(128), version=4)}"
            for u in range(self.units)
        ]
        self._boot_s = clock()
        if workloads is None:
            specs: Sequence[str] = ["idle"] * self.units
        elif isinstance(workloads, str):
            specs = [workloads] * self.units
        else:
            specs = list(workloads)
            if len(specs) == gpus and self.units != gpus:
                # One per GPU on a MIG profile: every instance of a GPU runs its spec.
                specs = [spec for spec in specs for _ in range(self._per_gpu)]
            if len(specs) != self.units:
                raise ValueError(f"{len(specs)} workloads given for {gpus} GPUs")
        # Per GPU: (start time, workload name or schedule), in time order.
        self._timeline: list[list[tuple[float, str | Schedule]]] = [
            [(self._boot_s, parse_workload(spec))] for spec in specs
        ]
        # (gpu, function) -> NVML error code, or the exception to raise as it is;
        # with a count in _injected_left, only that many calls fail (a transient error).
        self._injected: dict[tuple[int, str], int | Exception] = {}
        self._injected_left: dict[tuple[int, str], int] = {}
        self._metric_errors: dict[tuple[int, int], int] = {}
        self._gpm_samples: dict[int, _GpmSample] = {}
        self.calls: Counter[str] = Counter()
        self.gpm_intervals: list[tuple[int, float, float]] = []
        # Health. ECC counts per GPU: [corrected, uncorrected] x [volatile, aggregate];
        # row remapping per GPU: (corrected, uncorrected, pending, failed).
        self._ecc: list[dict[tuple[int, int], int]] = [{} for _ in range(gpus)]
        self._remap: list[tuple[int, int, bool, bool]] = [(0, 0, False, False)] * gpus
        # Page retirement per GPU (pre-Ampere): retired page addresses by
        # nvmlPageRetirementCause_t, and whether a retirement is pending.
        self._retired: list[dict[int, list[int]]] = [{} for _ in range(gpus)]
        self._retired_pending: list[bool] = [False] * gpus
        # XID events: each event set's registered GPUs and its undelivered events. The
        # condition has its own lock: a waiting event thread must never hold _lock.
        self._event_cond = threading.Condition()
        self._event_sets: dict[int, _EventSet] = {}

    def __getattr__(self, name: str) -> Any:
        # Constants (NVML_*), ctypes structs (c_*) and error classes (NVMLError*) are
        # pynvml's own; an nvml* function the fake lacks must fail loudly, not fall
        # through to the real library.
        if name.startswith(("NVML", "c_", "nvmlClocks")):
            return getattr(pynvml, name)
        raise AttributeError(f"FakeNvmlLibrary has no {name!r}")

    # -- steering ----------------------------------------------------------------

    def set_workload(self, gpu: int, spec: str) -> None:
        """From now on, run ``spec`` (a workload name or schedule) on unit ``gpu``."""
        parsed = parse_workload(spec)
        with self._lock:
            self._unit(gpu)
            now_s = self._clock()
            timeline = self._timeline[gpu]
            # Keep only what a live GPM sample may still need to integrate over.
            sample_times_s = [
                s.time_s
                for s in self._gpm_samples.values()
                if s.gpu == gpu and s.time_s is not None
            ]
            horizon_s = min([*sample_times_s, now_s])
            while len(timeline) > 1 and timeline[1][0] <= horizon_s:
                timeline.pop(0)
            timeline.append((now_s, parsed))

    def workload(self, gpu: int) -> str:
        """The name of the workload running on unit ``gpu`` now."""
        with self._lock:
            self._unit(gpu)
            return self._active(gpu, self._clock())[0]

    def inject(
        self, gpu: int, function_name: str, error: str | int | Exception, times: int | None = None
    ) -> None:
        """Make ``function_name`` (``"*"``: every call) on ``gpu`` raise ``error``.

        Args:
            gpu: the GPU index.
            function_name: a pynvml function name the fake implements, or ``"*"``.
            error: ``"not_supported"``, ``"gpu_is_lost"``, ``"no_permission"``,
                ``"function_not_found"``, ``"reset_required"``, ``"unknown"``,
                ``"timeout"``, an ``NVML_ERROR_*`` code, or an exception to raise as it
                is (pynvml raises more than ``NVMLError``: ``NVMLLibraryMismatchError``).
            times: fail only the next ``times`` calls, then answer again (a transient
                error); ``None``: until ``clear_injections``.
        """
        if function_name != "*" and not callable(getattr(type(self), function_name, None)):
            raise ValueError(f"FakeNvmlLibrary does not implement {function_name!r}")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 (or None: every call)")
        with self._lock:
            self._gpu(gpu)
            key = (gpu, function_name)
            self._injected[key] = error if isinstance(error, Exception) else self._error_code(error)
            if times is None:
                self._injected_left.pop(key, None)
            else:
                self._injected_left[key] = times

    def inject_gpm_metric(self, gpu: int, metric_id: int, error: str | int) -> None:
        """Make one GPM metric of ``gpu`` come back with its own ``nvmlReturn`` = ``error``."""
        with self._lock:
            self._gpu(gpu)
            self._metric_errors[(gpu, metric_id)] = self._error_code(error)

    def clear_injections(self, gpu: int | None = None) -> None:
        """Remove injected errors (of ``gpu``, or all)."""
        with self._lock:
            self._injected = {
                k: v for k, v in self._injected.items() if gpu is not None and k[0] != gpu
            }
            self._injected_left = {
                k: v for k, v in self._injected_left.items() if k in self._injected
            }
            self._metric_errors = {
                k: v for k, v in self._metric_errors.items() if gpu is not None and k[0] != gpu
            }

    def raise_xid(self, gpu: int, xid: int) -> None:
        """Deliver a critical XID event (``79``: fell off the bus) for ``gpu``.

        Every event set that registered ``gpu`` for ``nvmlEventTypeXidCriticalError``
        gets it; a waiting ``nvmlEventSetWait_v2`` returns it at once.
        """
        self._gpu(gpu)
        with self._event_cond:
            for event_set in self._event_sets.values():
                if event_set.types.get(gpu, 0) & pynvml.nvmlEventTypeXidCriticalError:
                    event_set.pending.append((gpu, xid))
            self._event_cond.notify_all()

    def add_ecc_errors(self, gpu: int, corrected: int = 0, uncorrected: int = 0) -> None:
        """Count ECC errors on ``gpu``: volatile and aggregate counters both grow."""
        with self._lock:
            self._gpu(gpu)
            counts = self._ecc[gpu]
            for kind, n in (
                (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, corrected),
                (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, uncorrected),
            ):
                for counter in (pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC):
                    counts[(kind, counter)] = counts.get((kind, counter), 0) + n

    def set_remapped_rows(
        self,
        gpu: int,
        corrected: int = 0,
        uncorrected: int = 0,
        *,
        pending: bool = False,
        failed: bool = False,
    ) -> None:
        """Set what ``nvmlDeviceGetRemappedRows`` answers for ``gpu``."""
        with self._lock:
            self._gpu(gpu)
            self._remap[gpu] = (corrected, uncorrected, pending, failed)

    def set_retired_pages(
        self, gpu: int, single_bit: int = 0, double_bit: int = 0, *, pending: bool = False
    ) -> None:
        """Set how many pages ``gpu`` retired per cause, and whether one is pending.

        Only a GPU without row remapping (``v100``) answers page retirement calls.
        """
        with self._lock:
            self._gpu(gpu)
            self._retired[gpu] = {
                pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS: [
                    0x1_0000_0000 + 0x1000 * i for i in range(single_bit)
                ],
                pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR: [
                    0x2_0000_0000 + 0x1000 * i for i in range(double_bit)
                ],
            }
            self._retired_pending[gpu] = pending

    @property
    def live_gpm_samples(self) -> int:
        """GPM sample buffers allocated and not yet freed."""
        with self._lock:
            return len(self._gpm_samples)

    @property
    def initialized(self) -> bool:
        """Whether ``nvmlInit`` has been called more often than ``nvmlShutdown``."""
        return self._init_count > 0

    def fake_pid(self, gpu: int) -> int:
        """The pid of the fake process on ``gpu`` (above any real Linux pid)."""
        return FAKE_PID_BASE + gpu

    def process_cpu_pct(self, pid: int) -> float | None:
        """CPU use (% of one core) of a fake GPU process now; None if not running."""
        gpu = pid - FAKE_PID_BASE
        with self._lock:
            if not 0 <= gpu < self.units:
                return None
            workload = WORKLOADS[self._active(gpu, self._clock())[0]]
            if workload.process_cpu_pct is None:
                return None
            return self._noisy(gpu, workload.process_cpu_pct, hi=100.0)

    # -- init / devices ----------------------------------------------------------

    def nvmlInit(self) -> None:
        """Initialize (reference-counted), or fail as a host without a driver does."""
        with self._lock:
            self.calls["nvmlInit"] += 1
            if self.driver_missing:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
            self._init_count += 1

    def nvmlShutdown(self) -> None:
        """Drop one init reference."""
        with self._lock:
            self._check("nvmlShutdown")
            self._init_count -= 1

    def nvmlDeviceGetCount(self) -> int:
        """Number of GPUs."""
        with self._lock:
            self._check("nvmlDeviceGetCount")
            return self.gpus

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        """A device handle."""
        with self._lock:
            self._check("nvmlDeviceGetHandleByIndex", gpu=index)
            return _Handle(index)

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        """``GPU-<uuid>`` (``MIG-<uuid>`` for a MIG device), stable for a seed."""
        with self._lock:
            unit = self._check("nvmlDeviceGetUUID", handle)
            return self._mig_uuids[unit] if handle.mig is not None else self._uuids[handle.index]

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        """Product name; a MIG device's names its MIG profile, as NVML does."""
        with self._lock:
            self._check("nvmlDeviceGetName", handle)
            if handle.mig is not None:
                return f"{self.profile.name} MIG {self.profile.mig_instances[handle.mig].name}"
            return self.profile.name

    # -- MIG ---------------------------------------------------------------------

    def nvmlDeviceGetMigMode(self, handle: _Handle) -> list[int]:
        """``[current, pending]``: 1 on a MIG profile, else 0."""
        with self._lock:
            self._check("nvmlDeviceGetMigMode", handle)
            mode = pynvml.NVML_DEVICE_MIG_ENABLE if self.profile.mig_instances else 0
            return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: _Handle) -> int:
        """MIG device slots: 7 on a MIG-capable GPU (some may be empty)."""
        with self._lock:
            self._check("nvmlDeviceGetMaxMigDeviceCount", handle)
            return _MIG_SLOTS

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: _Handle, index: int) -> _Handle:
        """The MIG device in slot ``index``; NotFound for an empty slot."""
        with self._lock:
            self._check("nvmlDeviceGetMigDeviceHandleByIndex", device)
            if device.mig is not None or not self.profile.mig_instances:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            if not 0 <= index < len(self.profile.mig_instances):
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
            return _Handle(device.index, index)

    def nvmlDeviceIsMigDeviceHandle(self, device: _Handle) -> bool:
        """Whether ``device`` is a MIG device handle."""
        with self._lock:
            self._check("nvmlDeviceIsMigDeviceHandle", device)
            return device.mig is not None

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, migDevice: _Handle) -> _Handle:  # noqa: N803
        """The parent GPU of a MIG device."""
        with self._lock:
            self._check("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", migDevice)
            if migDevice.mig is None:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return _Handle(migDevice.index)

    def nvmlDeviceGetGpuInstanceId(self, device: _Handle) -> int:
        """The GPU instance of a MIG device."""
        with self._lock:
            self._check("nvmlDeviceGetGpuInstanceId", device)
            if device.mig is None:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return self.profile.mig_instances[device.mig].gpu_instance_id

    def nvmlDeviceGetComputeInstanceId(self, device: _Handle) -> int:
        """The compute instance of a MIG device (one per GPU instance here: 0)."""
        with self._lock:
            self._check("nvmlDeviceGetComputeInstanceId", device)
            if device.mig is None:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return 0

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle, version: int | None = None) -> Any:
        """Memory info: ``c_nvmlMemory_t``, or ``c_nvmlMemory_v2_t`` given a version."""
        with self._lock:
            unit = self._check("nvmlDeviceGetMemoryInfo", handle)
            p = self.profile
            total, reserved = p.mem_total_bytes, p.mem_reserved_bytes
            if handle.mig is not None:
                total, reserved = p.mig_instances[handle.mig].mem_total_bytes, 0
                units = [unit]
            else:
                # A MIG parent's memory holds every instance's.
                units = [handle.index * self._per_gpu + k for k in range(self._per_gpu)]
            used = 0
            for u in units:
                used_u = WORKLOADS[self._active(u, self._clock())[0]].mem_used_bytes
                used += used_u + (4 * _MiB if used_u else 0)  # a CUDA context's own
            if not version:
                used_v1 = used + reserved  # v1 counts reserved as used
                return pynvml.c_nvmlMemory_t(total=total, free=total - used_v1, used=used_v1)
            if version != pynvml.nvmlMemory_v2:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
            return pynvml.c_nvmlMemory_v2_t(
                version=version,
                total=total,
                reserved=reserved,
                free=total - reserved - used,
                used=used,
            )

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: _Handle) -> int:
        """Max PCIe generation of the link."""
        with self._lock:
            self._check("nvmlDeviceGetMaxPcieLinkGeneration", handle)
            return self.profile.pcie_link_gen_max

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: _Handle) -> int:
        """Max PCIe width of the link."""
        with self._lock:
            self._check("nvmlDeviceGetMaxPcieLinkWidth", handle)
            return self.profile.pcie_link_width_max

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: _Handle) -> int:
        """Current PCIe generation: an idle GPU drops its link to gen 1 to save power."""
        with self._lock:
            gpu = self._check("nvmlDeviceGetCurrPcieLinkGeneration", handle)
            idle = self._active(gpu, self._clock())[0] == "idle"
            return 1 if idle else self.profile.pcie_link_gen_max

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: _Handle) -> int:
        """Current PCIe width."""
        with self._lock:
            self._check("nvmlDeviceGetCurrPcieLinkWidth", handle)
            return self.profile.pcie_link_width_max

    # -- fast getters ------------------------------------------------------------

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> Any:
        """``c_nvmlUtilization_t``: integer ``gpu`` and ``memory`` percentages."""
        with self._lock:
            gpu = self._check("nvmlDeviceGetUtilizationRates", handle)
            if self.profile.mig_instances:
                # NVML has no util rates in MIG mode, on the GPU or on an instance.
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            w = WORKLOADS[self._active(gpu, self._clock())[0]]
            return pynvml.c_nvmlUtilization_t(
                gpu=round(self._noisy(gpu, w.busy_pct)),
                memory=round(self._noisy(gpu, w.mem_ctrl_pct)),
            )

    def nvmlDeviceGetClockInfo(self, handle: _Handle, type: int) -> int:  # noqa: A002
        """Current clock in MHz (``NVML_CLOCK_SM``, ``_GRAPHICS``, ``_MEM``)."""
        with self._lock:
            gpu = self._check("nvmlDeviceGetClockInfo", handle)
            p = self.profile
            if type == pynvml.NVML_CLOCK_MEM:
                return p.mem_clock_mhz
            if type not in (pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_GRAPHICS):
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            frac = WORKLOADS[self._active(gpu, self._clock())[0]].sm_clock_frac
            return p.sm_clock_idle_mhz if frac == 0 else round(frac * p.sm_clock_max_mhz)

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        """Board power in milliwatts."""
        with self._lock:
            gpu = self._check("nvmlDeviceGetPowerUsage", handle)
            return round(self._power_w(gpu, noisy=True) * 1000)

    def nvmlDeviceGetTemperature(self, handle: _Handle, sensor: int) -> int:
        """GPU temperature in °C."""
        with self._lock:
            gpu = self._check("nvmlDeviceGetTemperature", handle)
            return self._temperature_c(gpu, sensor)

    def _temperature_c(self, gpu: int, sensor: int) -> int:
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        p = self.profile
        frac = WORKLOADS[self._active(gpu, self._clock())[0]].power_frac
        return round(p.temperature_idle_c + frac * (p.temperature_max_c - p.temperature_idle_c))

    def nvmlDeviceGetTemperatureV(
        self, handle: _Handle, sensor: int, version: int = pynvml.nvmlTemperature_v1
    ) -> int:
        """GPU temperature in °C through ``nvmlTemperature_t`` (replaces the deprecated call)."""
        with self._lock:
            unit = self._check("nvmlDeviceGetTemperatureV", handle)
            if version != pynvml.nvmlTemperature_v1:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
            return self._temperature_c(unit, sensor)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: _Handle) -> int:
        """Why clocks are below max now (bitmask of ``nvmlClocksEventReason*``)."""
        with self._lock:
            gpu = self._check("nvmlDeviceGetCurrentClocksEventReasons", handle)
            return WORKLOADS[self._active(gpu, self._clock())[0]].clock_event_reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: _Handle) -> int:
        """The pre-12.x name of ``nvmlDeviceGetCurrentClocksEventReasons``."""
        with self._lock:
            gpu = self._check("nvmlDeviceGetCurrentClocksThrottleReasons", handle)
            return WORKLOADS[self._active(gpu, self._clock())[0]].clock_event_reasons

    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list[Any]:
        """Compute processes, as pynvml's friendly objects (``pid``, ``usedGpuMemory``)."""
        with self._lock:
            gpu = self._check("nvmlDeviceGetComputeRunningProcesses", handle)
            w = WORKLOADS[self._active(gpu, self._clock())[0]]
            if w.process_cpu_pct is None or (self.profile.mig_instances and handle.mig is None):
                # On a MIG profile a process is listed on the instance it runs in.
                return []
            mig = self.profile.mig_instances[handle.mig] if handle.mig is not None else None
            return [
                pynvml.nvmlFriendlyObject(
                    {
                        "pid": self.fake_pid(gpu),
                        "usedGpuMemory": w.mem_used_bytes + 4 * _MiB,
                        "gpuInstanceId": mig.gpu_instance_id if mig else _NOT_MIG,
                        "computeInstanceId": 0 if mig else _NOT_MIG,
                    }
                )
            ]

    # -- health -------------------------------------------------------------------

    def nvmlDeviceGetTotalEccErrors(
        self,
        handle: _Handle,
        errorType: int,  # noqa: N803
        counterType: int,  # noqa: N803
    ) -> int:
        """ECC errors of one kind (corrected / uncorrected) and counter (volatile / aggregate)."""
        with self._lock:
            gpu = self._check("nvmlDeviceGetTotalEccErrors", handle)
            return self._ecc[gpu].get((errorType, counterType), 0)

    def nvmlDeviceGetRemappedRows(self, handle: _Handle) -> tuple[int, int, int, int]:
        """``(corrRows, uncRows, isPending, failureOccurred)``, as pynvml returns them."""
        with self._lock:
            gpu = self._check("nvmlDeviceGetRemappedRows", handle)
            if not self.profile.row_remapping:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            corrected, uncorrected, pending, failed = self._remap[gpu]
            return corrected, uncorrected, int(pending), int(failed)

    def nvmlDeviceGetRetiredPages(self, handle: _Handle, sourceFilter: int) -> list[int]:  # noqa: N803
        """Addresses of the pages retired for one cause (pre-Ampere; NotSupported after)."""
        with self._lock:
            gpu = self._check("nvmlDeviceGetRetiredPages", handle)
            if self.profile.row_remapping:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            if sourceFilter not in (
                pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
                pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
            ):
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return list(self._retired[gpu].get(sourceFilter, ()))

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: _Handle) -> int:
        """``NVML_FEATURE_ENABLED`` (1) while a retirement waits for a reset, else 0."""
        with self._lock:
            gpu = self._check("nvmlDeviceGetRetiredPagesPendingStatus", handle)
            if self.profile.row_remapping:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return int(self._retired_pending[gpu])

    def nvmlEventSetCreate(self) -> _EventSet:
        """A new, empty event set."""
        with self._lock:
            self._check("nvmlEventSetCreate")
        event_set = _EventSet()
        with self._event_cond:
            self._event_sets[id(event_set)] = event_set
        return event_set

    def nvmlDeviceRegisterEvents(
        self,
        handle: _Handle,
        eventTypes: int,  # noqa: N803
        eventSet: _EventSet,  # noqa: N803
    ) -> None:
        """Have ``eventSet`` receive ``eventTypes`` events of the GPU."""
        with self._lock:
            gpu = self._check("nvmlDeviceRegisterEvents", handle)
        with self._event_cond:
            if id(eventSet) not in self._event_sets:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            eventSet.types[gpu] = eventSet.types.get(gpu, 0) | eventTypes
            eventSet.handles[gpu] = handle

    def nvmlEventSetWait_v2(self, eventSet: _EventSet, timeoutms: int) -> _EventData:  # noqa: N803
        """The next event, waiting up to ``timeoutms``; ``NVMLError_Timeout`` when none came.

        Not counted in ``calls``: the backend looks at its XID event set at its own pace
        (at most twice a second, whichever read comes), not once per read.
        """
        deadline_s = time.monotonic() + timeoutms / 1000.0
        with self._event_cond:
            while True:
                if id(eventSet) not in self._event_sets:
                    raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
                if eventSet.pending:
                    gpu, xid = eventSet.pending.pop(0)
                    return _EventData(
                        device=eventSet.handles[gpu],
                        eventType=pynvml.nvmlEventTypeXidCriticalError,
                        eventData=xid,
                    )
                left_s = deadline_s - time.monotonic()
                if left_s <= 0:
                    raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
                self._event_cond.wait(left_s)

    def nvmlEventSetFree(self, eventSet: _EventSet) -> None:  # noqa: N803
        """Free an event set."""
        with self._lock:
            self._check("nvmlEventSetFree")
        with self._event_cond:
            if self._event_sets.pop(id(eventSet), None) is None:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            self._event_cond.notify_all()

    @property
    def live_event_sets(self) -> int:
        """Event sets created and not yet freed."""
        with self._event_cond:
            return len(self._event_sets)

    # -- slow getters: implemented (and counted) so a test can prove read() avoids them

    def nvmlDeviceGetPcieThroughput(self, handle: _Handle, counter: int) -> int:
        """PCIe throughput in KB/s over a 20 ms window (21.7 ms per call on an H100)."""
        with self._lock:
            gpu = self._check("nvmlDeviceGetPcieThroughput", handle)
            w = WORKLOADS[self._active(gpu, self._clock())[0]]
            rx = counter == pynvml.NVML_PCIE_UTIL_RX_BYTES
            frac = w.pcie_rx_link_frac if rx else w.pcie_tx_link_frac
            return round(frac * self.profile.pcie_link_bytes_per_s / 1000)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: _Handle) -> int:
        """Energy since boot in mJ (6 ms per call on an H100)."""
        with self._lock:
            gpu = self._check("nvmlDeviceGetTotalEnergyConsumption", handle)
            return round(self._power_w(gpu, noisy=False) * (self._clock() - self._boot_s) * 1000)

    def nvmlDeviceGetProcessUtilization(self, handle: _Handle, timeStamp: int) -> list[Any]:  # noqa: N803
        """Per-process utilization samples (2.5-5.5 ms per call on an H100); none here."""
        with self._lock:
            self._check("nvmlDeviceGetProcessUtilization", handle)
            return []

    # -- GPM ---------------------------------------------------------------------

    def nvmlGpmQueryDeviceSupport(self, device: _Handle) -> Any:
        """``c_nvmlGpmSupport_t``: ``isSupportedDevice`` is 1 on Hopper, 0 before."""
        with self._lock:
            self._check("nvmlGpmQueryDeviceSupport", device)
            support = pynvml.c_nvmlGpmSupport_t()
            support.version = pynvml.NVML_GPM_SUPPORT_VERSION
            support.isSupportedDevice = 1 if self.profile.has_gpm else 0
            return support

    def nvmlGpmSampleAlloc(self) -> Any:
        """A ``c_nvmlGpmSample_t`` pointing at a buffer of our own."""
        with self._lock:
            self._check("nvmlGpmSampleAlloc")
            buffer = ctypes.create_string_buffer(16)
            self._gpm_samples[ctypes.addressof(buffer)] = _GpmSample(buffer)
            return ctypes.cast(buffer, pynvml.c_nvmlGpmSample_t)

    def nvmlGpmSampleFree(self, gpmSample: Any) -> None:  # noqa: N803
        """Free a sample from ``nvmlGpmSampleAlloc``."""
        with self._lock:
            self._check("nvmlGpmSampleFree")
            address = ctypes.cast(gpmSample, ctypes.c_void_p).value
            if address not in self._gpm_samples:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            del self._gpm_samples[address]

    def nvmlGpmSampleGet(self, device: _Handle, gpmSample: Any) -> Any:  # noqa: N803
        """Record ``device``'s counters now into ``gpmSample``."""
        with self._lock:
            gpu = self._check("nvmlGpmSampleGet", device)
            # The fake models GPM in MIG mode per GPU instance only (nvmlGpmMigSampleGet).
            if not self.profile.has_gpm or self.profile.mig_instances:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            sample = self._sample(gpmSample)
            sample.gpu, sample.time_s = gpu, self._clock()
            return gpmSample

    def nvmlGpmMigSampleGet(self, device: _Handle, gpuInstanceId: int, gpmSample: Any) -> Any:  # noqa: N803
        """Record the counters of GPU instance ``gpuInstanceId`` of ``device`` now."""
        with self._lock:
            self._check("nvmlGpmMigSampleGet", device)
            if not self.profile.has_gpm:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            slots = [k for k, m in enumerate(self.profile.mig_instances)
                     if m.gpu_instance_id == gpuInstanceId]
            if device.mig is not None or not slots:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            sample = self._sample(gpmSample)
            sample.gpu = device.index * self._per_gpu + slots[0]
            sample.time_s = self._clock()
            return gpmSample

    def nvmlGpmMetricsGet(self, metricsGet: Any) -> Any:  # noqa: N803
        """Fill ``metricsGet.metrics[i]`` (``nvmlReturn``, ``value``) from its two samples."""
        with self._lock:
            self._check("nvmlGpmMetricsGet")
            if metricsGet.version != pynvml.NVML_GPM_METRICS_GET_VERSION:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
            s1, s2 = self._sample(metricsGet.sample1), self._sample(metricsGet.sample2)
            if s1.gpu is None or s2.gpu is None or s1.time_s is None or s2.time_s is None:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            if s1.gpu != s2.gpu or s2.time_s <= s1.time_s:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            gpu = s1.gpu
            # Injected errors apply to the GPU the samples came from.
            self._raise_injected(gpu // self._per_gpu, "nvmlGpmMetricsGet")
            self.gpm_intervals.append((gpu, s1.time_s, s2.time_s))
            if len(self.gpm_intervals) > 2 * GPM_INTERVALS_KEPT:
                # Trimmed in halves, not per append: a list (tests slice it), amortized O(1).
                del self.gpm_intervals[:-GPM_INTERVALS_KEPT]
            means = self._mean(gpu, s1.time_s, s2.time_s)
            link = self.profile.pcie_link_bytes_per_s
            if not 0 <= metricsGet.numMetrics <= pynvml.NVML_GPM_METRIC_MAX:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            # The array and each id read once: pynvml's structs override attribute access,
            # and this fake stands in for a C call (~25 us a GPU), so keep its Python short.
            metrics = metricsGet.metrics
            for i in range(metricsGet.numMetrics):
                metric = metrics[i]
                metric_id = metric.metricId
                code = self._metric_errors.get((gpu, metric_id))
                if metric_id in _GPM_FIELDS:
                    value = self._noisy(gpu, means[_GPM_FIELDS[metric_id]])
                elif metric_id in _GPM_PCIE:
                    bytes_per_s = means[_GPM_PCIE[metric_id]] * link
                    value = self._noisy(gpu, bytes_per_s, hi=None) / _MiB  # GPM: MiB/s
                else:
                    code = pynvml.NVML_ERROR_NOT_SUPPORTED if code is None else code
                    value = 0.0
                metric.nvmlReturn = pynvml.NVML_SUCCESS if code is None else code
                metric.value = 0.0 if code is not None else value
            return metricsGet

    # -- internals ---------------------------------------------------------------

    def _gpu(self, gpu: int) -> None:
        if not 0 <= gpu < self.gpus:
            raise ValueError(f"no fake GPU {gpu} (there are {self.gpus})")

    def _unit(self, unit: int) -> None:
        if not 0 <= unit < self.units:
            raise ValueError(f"no fake GPU or MIG instance {unit} (there are {self.units})")

    @staticmethod
    def _error_code(error: str | int) -> int:
        if isinstance(error, int):
            return error
        if error not in _ERRORS:
            raise ValueError(f"unknown error {error!r}; known: {', '.join(_ERRORS)}")
        return _ERRORS[error]

    def _check(self, fn_name: str, handle: _Handle | None = None, *, gpu: int | None = None) -> int:
        """Count the call, enforce init, validate the handle, raise injected errors.

        Returns the unit the handle addresses (the GPU; on a MIG profile an instance,
        the first one for the GPU's own handle); -1 for a call on no device.
        """
        self.calls[fn_name] += 1
        if self._init_count <= 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        mig = None
        if handle is not None:
            if not isinstance(handle, _Handle):
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            gpu, mig = handle.index, handle.mig
        if gpu is None:
            return -1
        if not 0 <= gpu < self.gpus:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if mig is not None and not 0 <= mig < len(self.profile.mig_instances):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        self._raise_injected(gpu, fn_name)
        if self.unprivileged and (
            fn_name in _UNPRIVILEGED_DENIED
            or (fn_name == "nvmlDeviceGetMemoryInfo" and mig is None and self._per_gpu > 1)
        ):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
        if mig is not None and fn_name in _BOARD_ONLY:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu * self._per_gpu + (mig or 0)

    def _raise_injected(self, gpu: int, fn_name: str) -> None:
        key = (gpu, fn_name) if (gpu, fn_name) in self._injected else (gpu, "*")
        error = self._injected.get(key)
        if error is None:
            return
        left = self._injected_left.get(key)
        if left is not None:
            if left <= 1:
                del self._injected[key], self._injected_left[key]
            else:
                self._injected_left[key] = left - 1
        if isinstance(error, Exception):
            raise error.with_traceback(None)  # the same instance again: no growing traceback
        raise pynvml.NVMLError(error)

    def _sample(self, pointer: Any) -> _GpmSample:
        address = ctypes.cast(pointer, ctypes.c_void_p).value
        sample = self._gpm_samples.get(address) if address is not None else None
        if sample is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return sample

    def _noisy(self, gpu: int, value: float, hi: float | None = 100.0) -> float:
        # Zero stays zero: an idle GPU reads exactly 0, as the real one does.
        if value <= 0 or self._noise == 0:
            return value
        rng = self._rngs[gpu]
        noisy = value * (1 + rng.gauss(0, 0.005 * self._noise)) + rng.gauss(0, 0.1 * self._noise)
        noisy = max(noisy, 0.0)
        return noisy if hi is None else min(noisy, hi)

    def _power_w(self, gpu: int, *, noisy: bool) -> float:
        p = self.profile
        frac = WORKLOADS[self._active(gpu, self._clock())[0]].power_frac
        watts = p.power_idle_w + frac * (p.power_max_w - p.power_idle_w)
        return self._noisy(gpu, watts, hi=p.power_max_w) if noisy else watts

    def _active(self, gpu: int, t_s: float) -> tuple[str, float]:
        """The workload running on ``gpu`` at ``t_s``, and until when it surely runs."""
        timeline = self._timeline[gpu]
        i = len(timeline) - 1
        while i > 0 and timeline[i][0] > t_s:
            i -= 1
        start_s, spec = timeline[i]
        segment_end_s = timeline[i + 1][0] if i + 1 < len(timeline) else math.inf
        if isinstance(spec, str):
            return spec, segment_end_s
        period_s = sum(d for _, d in spec)
        phase_s = (t_s - start_s) % period_s
        edge_s = 0.0
        for name, duration_s in spec:
            edge_s += duration_s
            if phase_s < edge_s:
                return name, min(t_s + (edge_s - phase_s), segment_end_s)
        return spec[-1][0], min(t_s, segment_end_s)  # float rounding at the very edge

    def _mean(self, gpu: int, t1_s: float, t2_s: float) -> dict[str, float]:
        """Time-weighted mean of the GPM-visible fields over [t1_s, t2_s]."""
        totals = dict.fromkeys(_AVERAGED, 0.0)
        t_s = t1_s
        while t_s < t2_s:
            name, until_s = self._active(gpu, t_s)
            next_s = min(until_s, t2_s)
            if next_s <= t_s:  # never stall on float rounding at a boundary
                next_s = math.nextafter(t_s, math.inf)
            workload = WORKLOADS[name]
            for field in _AVERAGED:
                totals[field] += getattr(workload, field) * (next_s - t_s)
            t_s = next_s
        span_s = t2_s - t1_s
        return {field: total / span_s for field, total in totals.items()}


class FakeHostSensor:
    """``HostSensor`` for the fake GPUs' processes (their pids exist nowhere else).

    Args:
        library: the fake library whose processes to report.
        host_cpu_pct: what host-wide CPU use to report.
    """

    def __init__(self, library: FakeNvmlLibrary, host_cpu_pct: float = 3.0) -> None:
        self._library = library
        self._host_cpu_pct = host_cpu_pct

    def read(self, time_s: float, gpu_pids: dict[int, tuple[int, ...]]) -> HostSample:
        """CPU of the fake processes among ``gpu_pids``; other pids are skipped."""
        processes = []
        for pid, gpus in sorted(gpu_pids.items()):
            cpu_pct = self._library.process_cpu_pct(pid)
            if cpu_pct is None:
                continue
            processes.append(
                HostProcess(pid=pid, cpu_pct=cpu_pct, gpu_indices=gpus, name="python3")
            )
        return HostSample(time_s=time_s, cpu_pct=self._host_cpu_pct, processes=tuple(processes))


def fake_backend(
    profile: str = "h100",
    gpus: int = 1,
    workloads: str | Sequence[str] | None = None,
    seed: int = 0,
    clock: Clock = time.monotonic,
) -> NvmlBackend:
    """The real ``NvmlBackend`` over a ``FakeNvmlLibrary``.

    Args:
        profile: ``"h100"``, ``"a100"``, or in MIG mode ``"h100-mig"``, ``"a100-mig"``.
        gpus: how many GPUs.
        workloads: one spec for all GPUs or one per GPU (``"gemv"``,
            ``"gemv:2,gemm:2"``, ...); default idle.
        seed: noise seed.
        clock: monotonic seconds, shared by the library and the backend.

    Returns:
        The backend; ``backend.library`` is the ``FakeNvmlLibrary`` to steer
        (``set_workload``, ``inject``).
    """
    library = FakeNvmlLibrary(profile, gpus, workloads, seed=seed, clock=clock)
    return NvmlBackend(library, clock=clock)
