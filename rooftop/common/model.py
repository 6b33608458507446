"""The data that flows through the agent: samples in, verdicts out.

Small frozen dataclasses with units in their field names. Absent (``None``) means
"not measured", never zero: an A100 has no GPM, so its ``dram_bw_pct`` is ``None``.
Times are Unix epoch seconds (``time_s``); the protobuf edge converts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import StrEnum

__all__ = [
    "COUNT_FIELDS",
    "EMPTY_HISTOGRAM",
    "ENGINE_HISTOGRAM_FIELDS",
    "INACCESSIBLE_CAUSE",
    "PCT_SLACK",
    "PERCENT_FIELDS",
    "UPPER_BOUNDS",
    "Bound",
    "Cause",
    "EngineSample",
    "Evidence",
    "GpuProcess",
    "GpuSample",
    "HistogramDelta",
    "HostProcess",
    "HostSample",
    "PodRef",
    "Provenance",
    "Record",
    "Verdict",
    "invalid_reason",
]


class Provenance(StrEnum):
    """Where a figure came from; a verdict on proxies is less certain."""

    GPM = "gpm"  # GPU performance monitoring (Hopper+): true pipe / DRAM activity
    NVML = "nvml"  # plain NVML counters, meaning what they say (duty cycle, power...)
    PROXY = "proxy"  # an NVML counter standing in for a GPM signal we do not have
    ENGINE = "engine"  # the inference engine's own figures (hooks, /metrics)
    HOST = "host"  # the host's CPU accounting (psutil)
    ROOFLINE = "roofline"  # computed from the model's size and the GPU's spec sheet


class Bound(StrEnum):
    """What bounds a GPU over a window (or in one sample: its regime)."""

    IDLE = "idle"
    MEMORY = "memory-bound"
    COMPUTE = "compute-bound"
    HOST = "host-bound"
    MIXED = "mixed"
    LOST = "lost"
    # No activity signal at all (an A100 MIG instance: util.gpu not supported, no GPM):
    # the GPU may be busy or idle, and saying "idle" would be a guess.
    UNKNOWN = "unknown"


class Cause(StrEnum):
    """Why a GPU is host-bound, where the evidence allows saying."""

    PCIE = "pcie"
    CPU = "cpu"
    STARVED = "starved"


# The cause shown beside a GPU NVML refuses the agent (``GpuSample.inaccessible``): not
# a ``Cause`` (nothing bounds it; it is ``unknown``), but the same cell and attribute.
INACCESSIBLE_CAUSE = "inaccessible"


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A compute process on a GPU, from NVML's process list."""

    pid: int
    gpu_mem_bytes: int | None = None
    # What the workload is outside Kubernetes (the host sensor fills these in): the
    # command name and the Slurm job id from the process's environment, when readable.
    name: str | None = None
    slurm_job_id: str | None = None


@dataclass(frozen=True, slots=True)
class PodRef:
    """A Kubernetes container that holds a GPU or MIG instance (kubelet pod-resources)."""

    pod: str
    namespace: str
    container: str


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU at one tick: a single consistent snapshot (percentages are 0-100)."""

    time_s: float
    gpu_index: int
    gpu_uuid: str = ""
    gpu_name: str = ""
    busy_pct: float | None = None  # NVML util.gpu: a duty cycle, NOT SM activity
    mem_ctrl_pct: float | None = None  # NVML util.memory: memory-controller busy time
    sm_active_pct: float | None = None  # GPM SM_UTIL (high for memory-bound work too)
    sm_occupancy_pct: float | None = None  # GPM SM_OCCUPANCY
    tensor_active_pct: float | None = None  # GPM ANY_TENSOR_UTIL
    fp16_active_pct: float | None = None  # GPM FP16_UTIL
    fp32_active_pct: float | None = None  # GPM FP32_UTIL
    fp64_active_pct: float | None = None  # GPM FP64_UTIL
    dram_bw_pct: float | None = None  # GPM DRAM_BW_UTIL: true memory-bandwidth utilization
    pcie_rx_bytes_per_s: float | None = None
    pcie_tx_bytes_per_s: float | None = None
    pcie_link_gen: int | None = None
    pcie_link_width: int | None = None
    power_w: float | None = None
    sm_clock_mhz: float | None = None
    mem_used_bytes: int | None = None
    mem_total_bytes: int | None = None
    temperature_c: float | None = None
    clock_event_reasons: int | None = None
    processes: tuple[GpuProcess, ...] = ()
    lost: bool = False  # no data from the GPU: NVML said lost, or see ``inaccessible``
    # NVML's error name when it refuses this user the GPU ("NO_PERMISSION"); ``lost`` is
    # set too (no data), but the GPU is not lost: it needs access, never a reset.
    inaccessible: str | None = None
    # The GPM fields repeat the previous reading (this tick came < 100 ms after the last
    # GPM sample): the latest value for a gauge, never a new measurement for a window.
    gpm_stale: bool = False
    # MIG identity, set only for a MIG instance: ``gpu_index``/``gpu_uuid`` stay the
    # parent GPU's, so the instance is told apart by its own "MIG-..." UUID.
    mig_uuid: str = ""
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None
    # Health (rooftop.common.health.assess reads these). Critical XIDs the NVML event
    # thread saw since the agent started: distinct codes (sticky) and how many events.
    xid_codes: tuple[int, ...] = ()
    xid_count: int | None = None  # None: XID events not available on this GPU/driver
    # Events per code, aligned with ``xid_codes`` (empty: not counted per code, as from
    # an older agent; ``xid_count`` is then the only count).
    xid_code_counts: tuple[int, ...] = ()
    # ECC error counts (None: no ECC, e.g. consumer GPUs). Volatile: since the driver
    # loaded; aggregate: the GPU's lifetime (kept in its InfoROM).
    ecc_corrected_volatile: int | None = None
    ecc_uncorrected_volatile: int | None = None
    ecc_corrected_aggregate: int | None = None
    ecc_uncorrected_aggregate: int | None = None
    # Row remapping (Ampere+; None before): rows remapped for correctable and
    # uncorrectable errors, a remap waiting for the next reset, a remap that failed.
    remapped_rows_corrected: int | None = None
    remapped_rows_uncorrected: int | None = None
    remap_pending: bool | None = None
    remap_failed: bool | None = None
    # Page retirement (before Ampere: V100, T4; None where the GPU remaps rows instead):
    # pages retired for multiple single-bit ECC errors / a double-bit ECC error, and a
    # retirement pending (applied at the next GPU reset or driver reload).
    retired_pages_single_bit: int | None = None
    retired_pages_double_bit: int | None = None
    retired_pages_pending: bool | None = None
    # Kubernetes containers the kubelet assigned this GPU (or MIG instance) to; a shared
    # GPU lists every one. Empty outside Kubernetes or with no pod-resources socket.
    pods: tuple[PodRef, ...] = ()


# Where each GpuSample metric comes from when measured.
GPU_FIELD_PROVENANCE: dict[str, Provenance] = {
    "busy_pct": Provenance.NVML,
    "mem_ctrl_pct": Provenance.NVML,
    "sm_active_pct": Provenance.GPM,
    "sm_occupancy_pct": Provenance.GPM,
    "tensor_active_pct": Provenance.GPM,
    "fp16_active_pct": Provenance.GPM,
    "fp32_active_pct": Provenance.GPM,
    "fp64_active_pct": Provenance.GPM,
    "dram_bw_pct": Provenance.GPM,
    "pcie_rx_bytes_per_s": Provenance.GPM,
    "pcie_tx_bytes_per_s": Provenance.GPM,
}


@dataclass(frozen=True, slots=True)
class HistogramDelta:
    """Per-request observations of one latency over one interval, as explicit buckets.

    ``bucket_counts[i]`` counts observations in ``(bounds_s[i-1], bounds_s[i]]``; the
    last one counts those above every bound, so it has ``len(bounds_s) + 1`` entries.
    The bounds travel with the counts: an engine's own histogram keeps its bounds.
    """

    bounds_s: tuple[float, ...]
    bucket_counts: tuple[int, ...]
    sum_s: float
    count: int

    def problem(self) -> str | None:
        """Why these figures cannot be a histogram (lengths, order, NaN, counts), else None."""
        if len(self.bucket_counts) != len(self.bounds_s) + 1:
            return (
                f"{len(self.bucket_counts)} bucket counts for {len(self.bounds_s)} bounds "
                "(expected one more)"
            )
        if not all(math.isfinite(b) for b in self.bounds_s) or any(
            a >= b for a, b in zip(self.bounds_s, self.bounds_s[1:], strict=False)
        ):
            return "bounds are not finite and strictly increasing"
        if any(c < 0 for c in self.bucket_counts) or self.count != sum(self.bucket_counts):
            return f"count {self.count} is not the sum of non-negative bucket counts"
        if not math.isfinite(self.sum_s) or self.sum_s < 0:
            return f"sum_s is {self.sum_s}"
        return None


@dataclass(frozen=True, slots=True)
class EngineSample:
    """An inference engine's state over its last interval."""

    time_s: float
    engine_id: str
    requests_running: int | None = None
    requests_waiting: int | None = None
    tpot_ms: float | None = None
    ttft_ms: float | None = None
    output_tokens: int | None = None
    pid: int | None = None
    gpu_indices: tuple[int, ...] = ()
    model: str | None = None
    tpot_p50_ms: float | None = None
    tpot_p99_ms: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    # One observation per finished request (hooks, vLLM plugin) or the engine's own
    # histogram's bucket increase since the last scrape; None: not measured.
    tpot_hist: HistogramDelta | None = None
    ttft_hist: HistogramDelta | None = None
    request_duration_hist: HistogramDelta | None = None


# The EngineSample fields holding a HistogramDelta.
ENGINE_HISTOGRAM_FIELDS = ("tpot_hist", "ttft_hist", "request_duration_hist")
# Measured per request, none finished in the interval. Absent (None) instead means the
# source does not count per request (an older agent or hook): the collector then
# records the interval mean, as it did before.
EMPTY_HISTOGRAM = HistogramDelta((), (0,), 0.0, 0)


@dataclass(frozen=True, slots=True)
class HostProcess:
    """CPU use of a process that holds a GPU."""

    pid: int
    cpu_pct: float | None = None  # percent of ONE core: a busy Python loop reads ~100
    gpu_indices: tuple[int, ...] = ()
    gpu_mem_bytes: int | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class HostSample:
    """The host at one tick: total CPU and the CPU of each GPU process."""

    time_s: float
    cpu_pct: float | None = None
    processes: tuple[HostProcess, ...] = ()


Record = GpuSample | EngineSample | HostSample

PERCENT_FIELDS = (
    "busy_pct",
    "mem_ctrl_pct",
    "sm_active_pct",
    "sm_occupancy_pct",
    "tensor_active_pct",
    "fp16_active_pct",
    "fp32_active_pct",
    "fp64_active_pct",
    "dram_bw_pct",
)
COUNT_FIELDS = (
    "pcie_rx_bytes_per_s",
    "pcie_tx_bytes_per_s",
    "power_w",
    "sm_clock_mhz",
    "mem_used_bytes",
    "mem_total_bytes",
    "tpot_ms",
    "ttft_ms",
    "tpot_p50_ms",
    "tpot_p99_ms",
    "ttft_p50_ms",
    "ttft_p99_ms",
)
# Rounding in NVML / GPM can overshoot 100 by a hair; beyond this it is garbage.
PCT_SLACK = 0.5
# Physical ceilings, each well above any real device (a GB200 superchip draws 2.7 kW,
# GPUs throttle near 90 C, PCIe gen6 x16 moves 0.13 TB/s): a value beyond one is a
# broken sensor or a hostile peer (1e308 W), never a measurement.
UPPER_BOUNDS: dict[str, float] = {
    "power_w": 10_000.0,
    "temperature_c": 200.0,
    "sm_clock_mhz": 100_000.0,
    "pcie_rx_bytes_per_s": 1e12,
    "pcie_tx_bytes_per_s": 1e12,
    "tpot_ms": 86_400_000.0,  # one day
    "ttft_ms": 86_400_000.0,
    "tpot_p50_ms": 86_400_000.0,
    "tpot_p99_ms": 86_400_000.0,
    "ttft_p50_ms": 86_400_000.0,
    "ttft_p99_ms": 86_400_000.0,
}


# Field names per record class: fields() per record cost more than the checks themselves.
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


def invalid_reason(record: Record, *, histograms: bool = True) -> str | None:
    """Why ``record`` holds an impossible value, else None.

    Impossible: NaN, infinite, negative, a percentage over 100, or a figure beyond its
    physical ceiling in ``UPPER_BOUNDS``.

    Args:
        record: the sample to check.
        histograms: also check an engine sample's histograms (``HistogramDelta.problem``);
            False only where the caller has just validated them itself (the hook
            receiver: ``hooks.wire`` checks the same rules while decoding).
    """
    for name in _field_names(type(record)):
        value = getattr(record, name)
        if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if math.isnan(value) or math.isinf(value):
            return f"{name} is {value}"
        if name == "time_s":
            continue
        if value < 0:
            return f"{name} is negative ({value})"
        if name in PERCENT_FIELDS and value > 100 + PCT_SLACK:
            return f"{name} is over 100 ({value})"
        if value > UPPER_BOUNDS.get(name, math.inf):
            return f"{name} is over its ceiling {UPPER_BOUNDS[name]:g} ({value:g})"
    if histograms and isinstance(record, EngineSample):
        for name in ENGINE_HISTOGRAM_FIELDS:
            hist = getattr(record, name)
            problem = hist.problem() if hist is not None else None
            if problem is not None:
                return f"{name}: {problem}"
    if isinstance(record, GpuSample) and record.xid_code_counts:
        if len(record.xid_code_counts) != len(record.xid_codes):
            return (f"xid_code_counts has {len(record.xid_code_counts)} entries for "
                    f"{len(record.xid_codes)} xid codes")
    if isinstance(record, HostSample):
        cpu_pct = record.cpu_pct
        if cpu_pct is not None and (math.isnan(cpu_pct) or cpu_pct > 100 + PCT_SLACK):
            return f"cpu_pct is out of range ({record.cpu_pct})"
        for proc in record.processes:
            if proc.cpu_pct is not None and (math.isnan(proc.cpu_pct) or proc.cpu_pct < 0):
                return f"process {proc.pid} cpu_pct is out of range ({proc.cpu_pct})"
    return None


@dataclass(frozen=True, slots=True)
class Evidence:
    """A figure the verdict rests on, with its provenance."""

    name: str
    value: float
    provenance: Provenance


@dataclass(frozen=True, slots=True)
class Verdict:
    """What bounds one GPU over one window, and what to do about it."""

    gpu_index: int
    gpu_uuid: str
    gpu_name: str
    verdict: Bound
    cause: Cause | None
    confidence: float  # 0-1
    rule: str  # the rule of the decision tree that fired, in words
    evidence: tuple[Evidence, ...]
    recommendations: tuple[str, ...]
    regimes: tuple[tuple[Bound, float], ...]  # share of active samples per regime
    samples: int
    active_samples: int
    window_start_s: float
    window_end_s: float
    # MIG identity of the instance judged (empty / None for a whole GPU): see GpuSample.
    mig_uuid: str = ""
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None
    # The containers holding the GPU over the window (see GpuSample.pods).
    pods: tuple[PodRef, ...] = ()

    def evidence_value(self, name: str) -> Evidence | None:
        """The evidence item called ``name``, if present."""
        return next((e for e in self.evidence if e.name == name), None)
