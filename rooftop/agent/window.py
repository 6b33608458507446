"""Window: samples in, per-GPU windows of derived signals out (pure, no I/O).

Each ``GpuSample`` becomes a ``Tick``: the signals the classifier decides on
(DESIGN §3), with the engine and host state at that moment attached. A
``GpuWindow`` is a run of ticks of one GPU plus their time-weighted means, which
are evidence only: the classifier decides per tick, never on the means (alternating
GEMV / GEMM averages to "host-bound", which is wrong).

Attribution of engines and host processes to a GPU: the record names the GPU
(``gpu_indices``), or its pid is in the GPU's NVML process list, or, when the
recording has exactly one GPU, a record that carries no attribution at all applies
to it.

A MIG instance is a device of its own: windows are keyed by ``DeviceKey`` (the GPU
index and, for an instance, its MIG UUID), so two instances of one GPU never mix.

Time: the daemon bounds windows on the monotonic clock, and ``on_monotonic_time``
re-dates a window's samples onto it where the wall clock stepped, so sample wall
times are labels and never weights (DESIGN §7.4, "Time").
"""

from __future__ import annotations

import dataclasses
import math
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby, pairwise
from statistics import fmean
from typing import Any, NamedTuple

from rooftop.common.errors import ConfigError
from rooftop.common.model import EngineSample, GpuSample, HostSample, Provenance, Record

__all__ = [
    "ENGINE_HOLD_DEFAULT_S",
    "PCIE_LANE_BYTES_PER_S",
    "STEP_TOLERANCE_S",
    "DeviceKey",
    "EngineSummary",
    "GpuWindow",
    "Tick",
    "build_window",
    "build_windows",
    "derive_ticks",
    "engines_by_device",
    "on_monotonic_time",
    "pcie_link_bytes_per_s",
    "summarize",
    "time_weighted_mean",
]

class DeviceKey(NamedTuple):
    """What tells devices apart: a GPU's index, plus its MIG UUID for a MIG instance."""

    gpu_index: int
    mig_uuid: str = ""

    @classmethod
    def of(cls, sample: GpuSample) -> DeviceKey:
        """The device ``sample`` came from."""
        return cls(sample.gpu_index, sample.mig_uuid)

    def label(self) -> str:
        """``"0"`` for GPU 0, ``"0/MIG-..."`` for one of its MIG instances."""
        return f"{self.gpu_index}/{self.mig_uuid}" if self.mig_uuid else str(self.gpu_index)


# Usable bandwidth of one lane, per direction, after line coding (gen1/2 8b/10b,
# gen3-5 128b/130b, gen6 FLIT): gen5 x16 = 63 GB/s per direction.
PCIE_LANE_BYTES_PER_S: Mapping[int, float] = {
    1: 0.25e9,
    2: 0.5e9,
    3: 0.985e9,
    4: 1.969e9,
    5: 3.938e9,
    6: 7.563e9,
}

# An engine (or host) sample describes its last interval; it stays the current state
# for HOLD_INTERVALS of its own interval, so one late report does not make the GPU look
# request-free, while a dead engine stops counting soon.
HOLD_INTERVALS = 3.0
ENGINE_HOLD_DEFAULT_S = 5.0  # when there is no previous sample to measure the interval
_HOLD_MIN_S = 1.0  # 10 Hz hooks with jitter should not flicker in and out
_HOLD_MAX_S = 30.0  # a scrape every 15 s still holds; a stale engine does not forever


@dataclass(frozen=True, slots=True)
class Tick:
    """The signals of one GPU at one sample, with the engine and host state then.

    ``dram_pct`` is GPM DRAM_BW_UTIL (true MBU), or NVML util.memory as a proxy;
    ``compute_pct`` is the busiest GPM tensor/FP pipe, or NVML util.gpu as a proxy.
    ``busy_pct`` is util.gpu, a duty cycle; ``sm_active_pct`` is reported only (SMs
    stalled on memory count as active). ``None`` means not measured.
    """

    time_s: float
    dram_pct: float | None = None
    dram_provenance: Provenance | None = None
    compute_pct: float | None = None
    compute_provenance: Provenance | None = None
    busy_pct: float | None = None
    sm_active_pct: float | None = None
    pcie_pct: float | None = None  # busier direction, % of the link's per-direction capacity
    requests_running: int | None = None
    requests_waiting: int | None = None
    tpot_ms: float | None = None
    ttft_ms: float | None = None
    engine_ids: tuple[str, ...] = ()
    process_cpu_pct: float | None = None  # busiest process of this GPU, % of ONE core
    host_cpu_pct: float | None = None
    lost: bool = False
    inaccessible: str | None = None  # NVML's error when this user may not open the GPU

    @property
    def requests_in_flight(self) -> int | None:
        """Requests running plus waiting, or None without engine data."""
        if self.requests_running is None and self.requests_waiting is None:
            return None
        return (self.requests_running or 0) + (self.requests_waiting or 0)

    @property
    def queue_empty(self) -> bool | None:
        """True when the engine has nothing to do (no request in flight); None if unknown."""
        in_flight = self.requests_in_flight
        return None if in_flight is None else in_flight == 0


@dataclass(frozen=True, slots=True)
class EngineSummary:
    """The engines of one GPU over a window: time-weighted means of their state."""

    engine_ids: tuple[str, ...]
    tpot_ms: float | None = None
    ttft_ms: float | None = None
    requests_running: float | None = None
    requests_waiting: float | None = None

    @property
    def requests_in_flight(self) -> float | None:
        """Mean requests running plus waiting, or None if neither was reported."""
        if self.requests_running is None and self.requests_waiting is None:
            return None
        return (self.requests_running or 0.0) + (self.requests_waiting or 0.0)


@dataclass(frozen=True, slots=True)
class GpuWindow:
    """One GPU over one window: its ticks and their time-weighted means (evidence).

    ``start_s``/``end_s`` are the window's bounds: the fixed window when windows were
    asked for, else the first and last sample. Means are ``None`` when nothing was
    measured; a mean's provenance is ``proxy`` if any tick in it was a proxy.
    """

    gpu_index: int
    gpu_uuid: str
    gpu_name: str
    start_s: float
    end_s: float
    ticks: tuple[Tick, ...]
    dram_pct: float | None = None
    dram_provenance: Provenance | None = None
    compute_pct: float | None = None
    compute_provenance: Provenance | None = None
    busy_pct: float | None = None
    sm_active_pct: float | None = None
    pcie_pct: float | None = None
    process_cpu_pct: float | None = None
    host_cpu_pct: float | None = None
    engine: EngineSummary | None = None
    lost: bool = False
    # Set (NVML's error name) when every lost tick was a GPU this user may not open:
    # a permission problem, not a lost GPU.
    inaccessible: str | None = None
    # MIG identity (see GpuSample): empty / None for a whole GPU.
    mig_uuid: str = ""
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None

    @property
    def samples(self) -> int:
        """How many GPU samples the window holds."""
        return len(self.ticks)


def pcie_link_bytes_per_s(gen: int | None, width: int | None) -> float | None:
    """Per-direction capacity of a PCIe link in bytes/s, or None when unknown."""
    if gen is None or width is None or width <= 0:
        return None
    per_lane = PCIE_LANE_BYTES_PER_S.get(gen)
    return None if per_lane is None else per_lane * width


def time_weighted_mean(points: Sequence[tuple[float, float]]) -> float | None:
    """Trapezoid-rule mean of ``(time_s, value)`` points in time order (nvitop-style).

    One point is its own mean; points all at one instant get the plain mean.
    """
    if not points:
        return None
    span_s = points[-1][0] - points[0][0]
    if span_s <= 0:
        return fmean(v for _, v in points)
    area = sum((t1 - t0) * (v0 + v1) / 2 for (t0, v0), (t1, v1) in pairwise(points))
    return area / span_s


def _dram(sample: GpuSample) -> tuple[float | None, Provenance | None]:
    if sample.dram_bw_pct is not None:
        return sample.dram_bw_pct, Provenance.GPM
    if sample.mem_ctrl_pct is not None:
        return sample.mem_ctrl_pct, Provenance.PROXY
    return None, None


def _compute(sample: GpuSample) -> tuple[float | None, Provenance | None]:
    # Pipe activity, not SM_UTIL: SMs waiting on memory read "active" (81 % on a GEMV).
    pipes = [
        v
        for v in (
            sample.tensor_active_pct,
            sample.fp16_active_pct,
            sample.fp32_active_pct,
            sample.fp64_active_pct,
        )
        if v is not None
    ]
    if pipes:
        return max(pipes), Provenance.GPM
    if sample.busy_pct is not None:
        return sample.busy_pct, Provenance.PROXY
    return None, None


def _pcie_pct(sample: GpuSample) -> float | None:
    rates = [r for r in (sample.pcie_rx_bytes_per_s, sample.pcie_tx_bytes_per_s) if r is not None]
    capacity = pcie_link_bytes_per_s(sample.pcie_link_gen, sample.pcie_link_width)
    if not rates or capacity is None:
        return None
    return 100.0 * max(rates) / capacity


def _hold_s(interval_s: float | None) -> float:
    if interval_s is None:
        return ENGINE_HOLD_DEFAULT_S
    return min(max(HOLD_INTERVALS * interval_s, _HOLD_MIN_S), _HOLD_MAX_S)


def _held_index(times: Sequence[float], t: float) -> int | None:
    """Index of the latest time at or before ``t`` that is still held, else None."""
    i = bisect_right(times, t) - 1
    if i < 0:
        return None
    interval_s = times[i] - times[i - 1] if i > 0 else None
    return i if t - times[i] <= _hold_s(interval_s) else None


def _applies(gpu_indices: tuple[int, ...], pid: int | None, gpu: int,
             gpu_pids: frozenset[int], sole_gpu: bool) -> bool:
    if gpu_indices:
        return gpu in gpu_indices
    if pid is not None and pid in gpu_pids:
        return True
    # Nothing to match on (no pid, or no process list to match it against): on a
    # one-GPU host there is only one GPU it can be using.
    return sole_gpu and (pid is None or not gpu_pids)


def _sum_or_none(values: Iterable[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _mean_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return fmean(present) if present else None


def derive_ticks(
    gpu_samples: Sequence[GpuSample],
    engine_samples: Sequence[EngineSample] = (),
    host_samples: Sequence[HostSample] = (),
    *,
    sole_gpu: bool = False,
) -> tuple[Tick, ...]:
    """One ``Tick`` per sample of ONE GPU, in time order.

    Args:
        gpu_samples: samples of a single GPU (any order).
        engine_samples: engine samples of the host; those not attributed to this GPU
            are ignored. Include some from before the first GPU sample so the engine
            state is known from the start.
        host_samples: host samples; the latest held one at each tick is used.
        sole_gpu: the host has exactly one GPU, so unattributed records apply to it.

    Raises:
        ValueError: the samples belong to more than one GPU.
    """
    samples = sorted(gpu_samples, key=lambda s: s.time_s)
    if len({DeviceKey.of(s) for s in samples}) > 1:
        raise ValueError("derive_ticks takes the samples of one GPU (or one MIG instance)")
    if any(s.dram_bw_pct is not None for s in samples):
        # A GPM GPU's sample without GPM figures is a gap (the first tick, before two GPM
        # samples 100 ms apart exist), not a GPU without GPM: leave it out rather than
        # let util.memory stand in as a proxy and lower the verdict's confidence. So is
        # a stale one (GPM asked again within 100 ms, at 10 Hz with jitter about a third
        # of ticks): its figures repeat the previous tick's, and counting them again
        # would weigh that interval twice.
        samples = [s for s in samples
                   if (s.dram_bw_pct is not None and not s.gpm_stale) or s.lost]
    if not samples:
        return ()
    gpu = samples[0].gpu_index
    # Processes come and go; any pid seen on this GPU in these samples counts as its own.
    gpu_pids = frozenset(p.pid for s in samples for p in s.processes)

    by_engine: dict[str, list[EngineSample]] = {}
    for e in sorted(engine_samples, key=lambda e: e.time_s):
        if _applies(e.gpu_indices, e.pid, gpu, gpu_pids, sole_gpu):
            by_engine.setdefault(e.engine_id, []).append(e)
    engine_times = {k: [e.time_s for e in v] for k, v in by_engine.items()}
    hosts = sorted(host_samples, key=lambda h: h.time_s)
    host_times = [h.time_s for h in hosts]

    ticks = []
    for s in samples:
        held = []
        for engine_id, engines in by_engine.items():
            i = _held_index(engine_times[engine_id], s.time_s)
            if i is not None:
                held.append(engines[i])
        host_i = _held_index(host_times, s.time_s)
        host = hosts[host_i] if host_i is not None else None
        cpus = [] if host is None else [
            p.cpu_pct for p in host.processes
            if p.cpu_pct is not None and _applies(p.gpu_indices, p.pid, gpu, gpu_pids, sole_gpu)
        ]
        dram, dram_prov = _dram(s)
        compute, compute_prov = _compute(s)
        ticks.append(Tick(
            time_s=s.time_s,
            dram_pct=dram,
            dram_provenance=dram_prov,
            compute_pct=compute,
            compute_provenance=compute_prov,
            busy_pct=s.busy_pct,
            sm_active_pct=s.sm_active_pct,
            pcie_pct=_pcie_pct(s),
            requests_running=_sum_or_none(e.requests_running for e in held),
            requests_waiting=_sum_or_none(e.requests_waiting for e in held),
            tpot_ms=_mean_or_none(e.tpot_ms for e in held),
            ttft_ms=_mean_or_none(e.ttft_ms for e in held),
            engine_ids=tuple(sorted({e.engine_id for e in held})),
            process_cpu_pct=max(cpus) if cpus else None,
            host_cpu_pct=None if host is None else host.cpu_pct,
            lost=s.lost,
            inaccessible=s.inaccessible,
        ))
    return tuple(ticks)


def _tw_mean(ticks: Sequence[Tick], attr: str) -> float | None:
    points = [(t.time_s, float(v)) for t in ticks if (v := getattr(t, attr)) is not None]
    return time_weighted_mean(points)


def _provenance(ticks: Sequence[Tick], attr: str) -> Provenance | None:
    seen = {p for t in ticks if (p := getattr(t, attr)) is not None}
    if not seen:
        return None
    return Provenance.PROXY if Provenance.PROXY in seen else Provenance.GPM


def summarize(
    gpu_index: int,
    ticks: Sequence[Tick],
    *,
    gpu_uuid: str = "",
    gpu_name: str = "",
    start_s: float | None = None,
    end_s: float | None = None,
    mig_uuid: str = "",
    gpu_instance_id: int | None = None,
    compute_instance_id: int | None = None,
) -> GpuWindow:
    """A ``GpuWindow`` over ``ticks`` (time order); bounds default to the first/last tick.

    ``mig_uuid`` and the instance ids name the MIG instance the ticks came from.
    """
    if not ticks and (start_s is None or end_s is None):
        raise ValueError("an empty window needs explicit bounds")
    engine_ticks = [t for t in ticks if t.engine_ids]
    engine = None
    if engine_ticks:
        engine = EngineSummary(
            engine_ids=tuple(sorted({i for t in engine_ticks for i in t.engine_ids})),
            tpot_ms=_tw_mean(engine_ticks, "tpot_ms"),
            ttft_ms=_tw_mean(engine_ticks, "ttft_ms"),
            requests_running=_tw_mean(engine_ticks, "requests_running"),
            requests_waiting=_tw_mean(engine_ticks, "requests_waiting"),
        )
    return GpuWindow(
        gpu_index=gpu_index,
        gpu_uuid=gpu_uuid,
        gpu_name=gpu_name,
        start_s=ticks[0].time_s if start_s is None else start_s,
        end_s=ticks[-1].time_s if end_s is None else end_s,
        ticks=tuple(ticks),
        dram_pct=_tw_mean(ticks, "dram_pct"),
        dram_provenance=_provenance(ticks, "dram_provenance"),
        compute_pct=_tw_mean(ticks, "compute_pct"),
        compute_provenance=_provenance(ticks, "compute_provenance"),
        busy_pct=_tw_mean(ticks, "busy_pct"),
        sm_active_pct=_tw_mean(ticks, "sm_active_pct"),
        pcie_pct=_tw_mean(ticks, "pcie_pct"),
        process_cpu_pct=_tw_mean(ticks, "process_cpu_pct"),
        host_cpu_pct=_tw_mean(ticks, "host_cpu_pct"),
        engine=engine,
        lost=any(t.lost for t in ticks),
        inaccessible=_inaccessible(ticks),
        mig_uuid=mig_uuid,
        gpu_instance_id=gpu_instance_id,
        compute_instance_id=compute_instance_id,
    )


def _inaccessible(ticks: Sequence[Tick]) -> str | None:
    lost = [t for t in ticks if t.lost]
    if not lost or any(t.inaccessible is None for t in lost):
        return None  # a truly lost tick outweighs any permission problem
    return lost[-1].inaccessible


def _identity(samples: Sequence[GpuSample]) -> tuple[str, str]:
    uuid = next((s.gpu_uuid for s in reversed(samples) if s.gpu_uuid), "")
    name = next((s.gpu_name for s in reversed(samples) if s.gpu_name), "")
    return uuid, name


def _mig_identity(samples: Sequence[GpuSample]) -> dict[str, Any]:
    """``summarize``'s MIG arguments for the samples of one device (none: a whole GPU)."""
    last = samples[-1]
    if not last.mig_uuid:
        return {}
    return {"mig_uuid": last.mig_uuid, "gpu_instance_id": last.gpu_instance_id,
            "compute_instance_id": last.compute_instance_id}


# Wall and monotonic clocks drift apart by NTP slewing (at most 0.5 ms/s) and tick
# jitter: far below this. A larger gap within one window is a step of the wall clock.
STEP_TOLERANCE_S = 0.1


def _tick_wall_s(records: Sequence[Record]) -> float | None:
    # The sampler dates a tick's GPU and host samples with one wall reading.
    return next((r.time_s for r in records if not isinstance(r, EngineSample)), None)


def on_monotonic_time(ticks: Sequence[tuple[float, Sequence[Record]]]) -> list[Record]:
    """The records of a window's ticks, re-dated where the wall clock stepped.

    Each tick is ``(monotonic_s, records)``: the records of one ``Sampler.tick`` (GPU
    and host samples dated with the tick's wall time, engine samples with their own)
    and the monotonic time it was taken at. A step of the wall clock (NTP, an
    operator, a resumed VM) inside a window would weigh one interval as an hour in the
    time-weighted means and stretch the verdict's window as far. So each tick whose
    wall time is off the monotonic timeline by more than ``STEP_TOLERANCE_S`` has its
    records moved onto it (anchored at the last tick's wall time, the verdict's
    window_end); a window without a step comes back as it is.
    """
    anchor: tuple[float, float] | None = None
    for mono_s, records in reversed(ticks):
        wall_s = _tick_wall_s(records)
        if wall_s is not None:
            anchor = (mono_s, wall_s)
            break
    out: list[Record] = []
    for mono_s, records in ticks:
        wall_s = _tick_wall_s(records)
        shift_s = 0.0 if wall_s is None or anchor is None else (
            anchor[1] + (mono_s - anchor[0]) - wall_s
        )
        if abs(shift_s) <= STEP_TOLERANCE_S:
            out.extend(records)
        else:
            out.extend(dataclasses.replace(r, time_s=r.time_s + shift_s) for r in records)
    return out


def build_window(
    gpu_samples: Sequence[GpuSample],
    engine_samples: Sequence[EngineSample] = (),
    host_samples: Sequence[HostSample] = (),
    *,
    sole_gpu: bool = False,
) -> GpuWindow:
    """One window over the samples of ONE GPU: the daemon's call, once per window.

    Pass the engine and host samples of the window and a little before it (a held
    engine state covers up to 3 of its intervals, default 5 s).

    Raises:
        ValueError: no GPU samples, or samples of more than one GPU.
    """
    if not gpu_samples:
        raise ValueError("a window needs at least one GPU sample")
    ticks = derive_ticks(gpu_samples, engine_samples, host_samples, sole_gpu=sole_gpu)
    uuid, name = _identity(gpu_samples)
    return summarize(gpu_samples[0].gpu_index, ticks, gpu_uuid=uuid, gpu_name=name,
                     **_mig_identity(gpu_samples))


def engines_by_device(
    by_device: Mapping[DeviceKey, Sequence[GpuSample]], engines: Sequence[EngineSample]
) -> dict[DeviceKey, Sequence[EngineSample]]:
    """The engine samples each device may be attributed (``derive_ticks`` then matches).

    A GPU index names the GPU and all its MIG instances: an engine whose pid a MIG
    instance's process list has is that instance's alone, not its sibling instances'
    nor the parent's (whose activity is its instances'). An engine no instance lists
    (no pid, processes not readable, a pid from another pid namespace) is left to
    every device, as before.
    """
    holders: dict[tuple[int, int], set[str]] = {}
    for key, samples in by_device.items():
        if key.mig_uuid:
            for s in samples:
                for p in s.processes:
                    holders.setdefault((key.gpu_index, p.pid), set()).add(key.mig_uuid)
    if not holders:
        return dict.fromkeys(by_device, engines)
    return {
        key: [
            e for e in engines
            if e.pid is None
            or (key.gpu_index, e.pid) not in holders
            or key.mig_uuid in holders[(key.gpu_index, e.pid)]
        ]
        for key in by_device
    }


def build_windows(
    records: Iterable[Record], window_s: float | None = None
) -> dict[DeviceKey, list[GpuWindow]]:
    """Per device (GPU index, MIG UUID for an instance), its windows in time order.

    Args:
        records: samples of any kind, in any order (a recording, a sampler's output).
        window_s: window length; None makes the whole recording one window. Fixed
            windows start at the recording's first GPU sample and are shared by all
            GPUs; a window with no sample of a GPU is left out for that GPU.

    Raises:
        ConfigError: ``window_s`` is not a positive number.
    """
    if window_s is not None and not (math.isfinite(window_s) and window_s > 0):
        raise ConfigError(f"window_s must be a positive number of seconds, not {window_s}")
    by_gpu: dict[DeviceKey, list[GpuSample]] = {}
    engines: list[EngineSample] = []
    hosts: list[HostSample] = []
    for r in records:
        if isinstance(r, GpuSample):
            by_gpu.setdefault(DeviceKey.of(r), []).append(r)
        elif isinstance(r, EngineSample):
            engines.append(r)
        else:
            hosts.append(r)
    if not by_gpu:
        return {}
    t0 = min(s.time_s for samples in by_gpu.values() for s in samples)
    sole_gpu = len(by_gpu) == 1
    device_engines = engines_by_device(by_gpu, engines)
    out: dict[DeviceKey, list[GpuWindow]] = {}
    for key, samples in sorted(by_gpu.items()):
        gpu = key.gpu_index
        samples.sort(key=lambda s: s.time_s)
        uuid, name = _identity(samples)
        mig = _mig_identity(samples)  # once per device, not a copy of every window
        # Ticks over the whole recording first, so engine hold crosses window edges.
        ticks = derive_ticks(samples, device_engines[key], hosts, sole_gpu=sole_gpu)
        if window_s is None:
            out[key] = [summarize(gpu, ticks, gpu_uuid=uuid, gpu_name=name, **mig)]
            continue
        step_s = window_s
        out[key] = [
            summarize(gpu, tuple(group), gpu_uuid=uuid, gpu_name=name,
                      start_s=t0 + k * step_s, end_s=t0 + (k + 1) * step_s, **mig)
            for k, group in groupby(ticks, key=lambda t: int((t.time_s - t0) // step_s))
        ]
    return out
