"""Classifier: a ``GpuWindow`` in, a ``Verdict`` out (pure; DESIGN §3).

Every sample is classified by the decision tree, with the engine state at that
moment; the window's verdict comes from the shares of those per-sample regimes.
Window means are evidence, never the input to the tree: 2 s of GEMV alternating
with 2 s of GEMM averages to dram 55 / compute 48, which the tree would call
host-bound, while the samples say half memory-bound, half compute-bound.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from statistics import fmean

from rooftop.agent.window import GpuWindow, Tick
from rooftop.common.errors import ConfigError, inaccessible_text
from rooftop.common.model import Bound, Cause, Evidence, Provenance, Verdict

__all__ = [
    "DEFAULT_THRESHOLDS",
    "Hysteresis",
    "Thresholds",
    "classify",
    "classify_tick",
    "explain_tick",
    "is_active",
]


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The decision tree's thresholds (percentages 0-100, shares 0-1).

    Defaults are DESIGN §3's, checked against the H100 recordings: the best
    achievable DRAM bandwidth was ~85 % of spec, so "dram > 80" is near the ceiling.
    """

    idle_busy_pct: float = 0.5  # util.gpu is whole percent: ≥ 1 means a kernel ran
    memory_high_pct: float = 80.0
    compute_high_pct: float = 80.0
    low_pct: float = 60.0  # "the other below 60"; both below it → host-bound
    dominant_pct: float = 50.0
    dominance_ratio: float = 2.0  # the 2:1 memory-to-compute ratio operators alert on
    regime_share: float = 0.6  # of active samples, to name a regime
    starved_active_share: float = 0.5  # active in under this share of samples ...
    starved_queue_empty_share: float = 0.5  # ... with the queue empty over this share
    pcie_cause_pct: float = 50.0  # of link capacity, busier direction
    cpu_cause_pct: float = 90.0  # of ONE core
    proxy_confidence: float = 0.7  # factor when dram/compute are NVML proxies (no GPM)
    decisive_share: float = 0.9  # a regime share this high is not marginal
    # The sample factor of a one-sample window; n samples: 1 - (1 - this) / n. At the
    # agent's defaults (1 Hz x 5 s) a clean window is 0.9: high, yet under the 0.95 at
    # which Hysteresis lets a change through at once, so hysteresis_windows still holds.
    single_sample_confidence: float = 0.5

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"thresholds.{f.name} must be a finite number ≥ 0, not {value}")
        for name in ("regime_share", "starved_active_share", "starved_queue_empty_share",
                     "proxy_confidence", "decisive_share", "single_sample_confidence"):
            if getattr(self, name) > 1:
                raise ConfigError(f"thresholds.{name} is a share (0-1), not {getattr(self, name)}")
        if self.dominance_ratio < 1:
            raise ConfigError(f"thresholds.dominance_ratio must be ≥ 1, not {self.dominance_ratio}")


DEFAULT_THRESHOLDS = Thresholds()


# ---- one sample -----------------------------------------------------------------


def is_active(tick: Tick, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> bool:
    """Work is present: a kernel ran, GPM saw activity, or requests are in flight.

    Each of busy (util.gpu), GPM DRAM bandwidth, the busiest GPM pipe and GPM SM
    activity above the idle bar is work. util.gpu refreshes every 200 ms while GPM
    covers each tick's own interval, so busy can still read 0 for a tick whose GPM
    figures show a kernel ran (a GEMV's first tick: DRAM 67 %). A process merely holding
    a CUDA context reads 0 on all of them and is not work. The NVML proxies for dram
    and compute (util.memory, util.gpu) count only when util.gpu itself is unknown.
    """
    if tick.requests_in_flight:
        return True
    bar = thresholds.idle_busy_pct
    if tick.busy_pct is not None and tick.busy_pct > bar:
        return True
    signals = [tick.sm_active_pct]
    for value, provenance in ((tick.dram_pct, tick.dram_provenance),
                              (tick.compute_pct, tick.compute_provenance)):
        if provenance is Provenance.GPM or tick.busy_pct is None:
            signals.append(value)
    return any(v is not None and v > bar for v in signals)


def explain_tick(tick: Tick, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> tuple[Bound, str]:
    """The regime of one sample and the branch of the tree that fired, in words."""
    th = thresholds
    if not is_active(tick, th):
        return Bound.IDLE, (
            f"busy and GPM activity ≤ {th.idle_busy_pct:g} and no request in flight"
        )
    dram, compute = tick.dram_pct, tick.compute_pct
    if dram is None or compute is None:
        return Bound.MIXED, "dram or compute not measured"
    if dram > th.memory_high_pct:
        if compute < th.low_pct:
            return Bound.MEMORY, f"dram > {th.memory_high_pct:g} and compute < {th.low_pct:g}"
        if tick.compute_provenance is Provenance.PROXY:
            # util.gpu reads 95-98 for GEMV and GEMM alike: without GPM only util.memory
            # separates them (GEMV 97, GEMM 33), so a high one alone says memory-bound.
            return Bound.MEMORY, f"util.memory > {th.memory_high_pct:g} (no GPM)"
    if dram >= th.dominant_pct and dram >= th.dominance_ratio * compute:
        return Bound.MEMORY, (
            f"dram ≥ {th.dominant_pct:g} and dram ≥ {th.dominance_ratio:g} × compute"
        )
    if compute > th.compute_high_pct and dram < th.low_pct:
        return Bound.COMPUTE, f"compute > {th.compute_high_pct:g} and dram < {th.low_pct:g}"
    if compute >= th.dominant_pct and compute >= th.dominance_ratio * dram:
        return Bound.COMPUTE, (
            f"compute ≥ {th.dominant_pct:g} and compute ≥ {th.dominance_ratio:g} × dram"
        )
    if dram < th.low_pct and compute < th.low_pct:
        return Bound.HOST, f"dram and compute < {th.low_pct:g} while work is present"
    return Bound.MIXED, "no rule fires (dram or compute high, neither dominates)"


def classify_tick(tick: Tick, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> Bound:
    """The regime of one sample by the decision tree (idle, memory, compute, host, mixed)."""
    return explain_tick(tick, thresholds)[0]


# ---- one window -----------------------------------------------------------------


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return fmean(present) if present else None


def _clamp01(x: float) -> float:
    return min(1.0, max(0.0, x))


def _pct(share: float) -> str:
    return f"{share:.0%}"


def _sample_factor(n: int, th: Thresholds) -> float:
    # Each sample shrinks the doubt: one is a glimpse (0.5), the agent's default window
    # of five 0.9, ten 0.95, fifty (diagnose's 5 s at 10 Hz) 0.99. A count, not a
    # duration: the share a verdict rests on is estimated from this many samples.
    return 1.0 - (1.0 - th.single_sample_confidence) / max(n, 1)


def _confidence(share: float, n: int, proxy: bool, th: Thresholds) -> float:
    span = th.decisive_share - th.regime_share
    share_f = 1.0 if span <= 0 else 0.6 + 0.4 * _clamp01((share - th.regime_share) / span)
    proxy_f = th.proxy_confidence if proxy else 1.0
    return round(_clamp01(share_f * _sample_factor(n, th) * proxy_f), 3)


def _evidence(window: GpuWindow, active_share: float) -> tuple[Evidence, ...]:
    items: list[tuple[str, float | None, Provenance | None]] = [
        ("dram_pct", window.dram_pct, window.dram_provenance),
        ("compute_pct", window.compute_pct, window.compute_provenance),
        ("busy_pct", window.busy_pct, Provenance.NVML),
        ("sm_active_pct", window.sm_active_pct, Provenance.GPM),
        ("pcie_pct", window.pcie_pct, Provenance.GPM),
        ("process_cpu_pct", window.process_cpu_pct, Provenance.HOST),
        ("host_cpu_pct", window.host_cpu_pct, Provenance.HOST),
    ]
    if window.engine is not None:
        items += [
            ("tpot_ms", window.engine.tpot_ms, Provenance.ENGINE),
            ("ttft_ms", window.engine.ttft_ms, Provenance.ENGINE),
            ("requests", window.engine.requests_in_flight, Provenance.ENGINE),
            # The decode batch: the roofline's (diagnose --model); waiting ones are not in it.
            ("requests_running", window.engine.requests_running, Provenance.ENGINE),
        ]
    items.append(("active_share", active_share, Provenance.NVML))
    return tuple(
        Evidence(name, float(value), prov)
        for name, value, prov in items
        if value is not None and prov is not None
    )


_MEMORY_ADVICE = (
    "FP8 KV cache: --kv-cache-dtype fp8 (≈ 2× less KV traffic)",
    "Decode at small batch sits far below the ridge point: adding FLOPS does not move "
    "TPOT; memory bandwidth does",
    "Quantize weights (FP8 or INT4): fewer bytes read per token",
    "Larger batches (continuous batching): arithmetic intensity grows ≈ with batch",
    "Speculative decoding: several tokens per pass over the weights",
    "A higher-bandwidth GPU: H200 +43 % over H100, B200 ≈ 2.4×",
)
_COMPUTE_ADVICE = (
    "Tensor parallelism / more GPUs",
    "FP8 compute: ≈ 2× the dense FP16 tensor throughput on Hopper",
    "Chunked or disaggregated prefill, so prefill does not stall decode",
)
_HOST_ADVICE: dict[Cause, tuple[str, ...]] = {
    Cause.CPU: (
        "CUDA graphs / fewer kernel launches",
        "A faster tokenizer (Rust 'fast' tokenizers), off the engine loop",
        "The engine's Python loop is the bottleneck: the GPU waits for launches",
    ),
    Cause.PCIE: (
        "Pinned host memory for transfers",
        "No CPU offload (weights, KV cache) in the hot path",
    ),
    Cause.STARVED: (
        "More load per GPU, or fewer replicas",
        "The GPU waits for requests: check client concurrency and the load balancer",
    ),
}


_HOST_HINTS = (
    "Engine process at ~100 % of one core → CUDA graphs / fewer launches, faster tokenizer",
    "PCIe busy → pinned memory, no CPU offload in the hot path",
    "Engine queue empty → more load or fewer replicas",
)


# What would name a host-bound cause, most telling first: (figure, where it comes from).
_HOST_EVIDENCE = (
    ("process CPU", "the host sensor"),
    ("request queue", "engine hooks"),
    ("PCIe", "GPM PCIe counters"),
)


def _missing_host_evidence(host_ticks: Sequence[Tick]) -> list[tuple[str, str]]:
    has = (
        any(t.process_cpu_pct is not None for t in host_ticks),
        any(t.queue_empty is not None for t in host_ticks),
        any(t.pcie_pct is not None for t in host_ticks),
    )
    return [item for item, present in zip(_HOST_EVIDENCE, has, strict=True) if not present]


def _host_unnamed_advice(host_ticks: Sequence[Tick]) -> tuple[str, ...]:
    missing = _missing_host_evidence(host_ticks)
    if not missing:
        return ("Profile the host loop (py-spy, nsys)", *_HOST_HINTS)
    sources = ", ".join(f"{src} ({what})" for what, src in missing)
    return (f"Name the cause: run with {missing[0][1]}",
            f"Evidence that would name the cause: {sources}", *_HOST_HINTS)


def _host_cause(host_ticks: Sequence[Tick], th: Thresholds) -> tuple[Cause | None, str]:
    """First match wins: pcie, cpu, starved; else no cause, saying what is missing."""
    pcie = _mean(t.pcie_pct for t in host_ticks)
    if pcie is not None and pcie > th.pcie_cause_pct:
        return Cause.PCIE, f"PCIe at {pcie:.0f} % of link capacity (> {th.pcie_cause_pct:g})"
    cpu = _mean(t.process_cpu_pct for t in host_ticks)
    if cpu is not None and cpu >= th.cpu_cause_pct:
        return Cause.CPU, (
            f"the GPU's process at {cpu:.0f} % of one core (≥ {th.cpu_cause_pct:g})"
        )
    empty = sum(1 for t in host_ticks if t.queue_empty)
    if host_ticks and empty / len(host_ticks) > th.starved_queue_empty_share:
        return Cause.STARVED, f"engine queue empty in {_pct(empty / len(host_ticks))} of them"
    seen = [f"no {what} data" for what, _ in _missing_host_evidence(host_ticks)]
    if pcie is not None:
        seen.append(f"PCIe {pcie:.0f} %")
    if cpu is not None:
        seen.append(f"process CPU {cpu:.0f} %")
    if any(t.queue_empty is False for t in host_ticks):
        seen.append("requests in flight")
    return None, f"cause not named ({', '.join(seen)})"


def _clause_text(bound: Bound, share: float, clauses: Counter[str], n_in: int) -> str:
    if len(clauses) == 1:
        return f"{next(iter(clauses))} in {_pct(share)} of active samples"
    parts = ", ".join(f"{c} {_pct(k / n_in)}" for c, k in clauses.most_common())
    return f"{bound.value} in {_pct(share)} of active samples ({parts})"


def _closer(ranked: Sequence[tuple[Bound, float]], ticks: Sequence[Tick]) -> Bound:
    """Which regime a mixed window is closest to."""
    named = [(b, s) for b, s in ranked if b is not Bound.MIXED]
    if named and (len(named) == 1 or named[0][1] > named[1][1]):
        return named[0][0]
    dram = _mean(t.dram_pct for t in ticks) or 0.0
    compute = _mean(t.compute_pct for t in ticks) or 0.0
    return Bound.MEMORY if dram >= compute else Bound.COMPUTE


def _advice(bound: Bound) -> tuple[str, ...]:
    if bound is Bound.MEMORY:
        return _MEMORY_ADVICE
    if bound is Bound.COMPUTE:
        return _COMPUTE_ADVICE
    if bound is Bound.HOST:
        return _HOST_HINTS
    return ()


def classify(window: GpuWindow, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> Verdict:
    """The verdict for one GPU over one window, from the regimes of its samples.

    No active sample and no request → idle. Active in under half the samples while
    the engine queue was empty most of the window → host-bound, starved. Else the
    regime of ≥ 60 % of active samples (host-bound names its cause: pcie, cpu,
    starved, first match); below that → mixed, naming the leading regimes.
    """
    th = thresholds

    def verdict(bound: Bound, cause: Cause | None, confidence: float, rule: str,
                advice: Sequence[str], regimes: Sequence[tuple[Bound, float]],
                active: int, active_share: float) -> Verdict:
        return Verdict(
            gpu_index=window.gpu_index,
            gpu_uuid=window.gpu_uuid,
            gpu_name=window.gpu_name,
            verdict=bound,
            cause=cause,
            confidence=confidence,
            rule=rule,
            evidence=_evidence(window, active_share),
            recommendations=tuple(advice),
            regimes=tuple(regimes),
            samples=window.samples,
            active_samples=active,
            window_start_s=window.start_s,
            window_end_s=window.end_s,
            mig_uuid=window.mig_uuid,
            gpu_instance_id=window.gpu_instance_id,
            compute_instance_id=window.compute_instance_id,
        )

    if window.lost and window.inaccessible is not None:
        # Not lost: NVML will not let this user open it, so nothing measures its
        # activity: "unknown" (never "lost", which alerts and advises a reset), its rule
        # naming the inaccessibility. Certain (1.0), so it shows at once as "lost" did.
        index = window.gpu_index
        return verdict(Bound.UNKNOWN, None, 1.0, inaccessible_text(index, window.inaccessible),
                       (f"Give the agent's user access to the GPU: /dev/nvidia{index} (file "
                        "permissions or group), or the device in the container's device list",
                        "The GPU itself may be healthy and busy: a permission problem, not a "
                        "hardware fault"),
                       (), 0, 0.0)
    if window.lost:
        return verdict(Bound.LOST, None, 1.0, "NVML reports the GPU lost (GpuIsLost)",
                       ("Drain the node and reset the GPU",
                        "Check the kernel log for Xid errors (79: fallen off the bus)"),
                       (), 0, 0.0)
    ticks = window.ticks
    if not ticks:
        return verdict(Bound.IDLE, None, 0.0, "no samples in the window", (), (), 0, 0.0)

    explained = [(t, *explain_tick(t, th)) for t in ticks]
    active = [(t, b, c) for t, b, c in explained if b is not Bound.IDLE]
    n, n_active = len(ticks), len(active)
    active_share = n_active / n
    counts = Counter(b for _, b, _ in active)
    # Ties go to the tree's order (memory before compute before host before mixed).
    order = list(Bound)
    ranked = sorted(((b, k / n_active) for b, k in counts.items()),
                    key=lambda bs: (-bs[1], order.index(bs[0])))

    if n_active == 0 and not any(_has_activity_signal(t) for t in ticks):
        # Nothing measured activity (an A100 MIG instance): "idle" would be a guess.
        where = "this MIG instance" if window.mig_uuid else "this GPU"
        return verdict(Bound.UNKNOWN, None, 0.0,
                       f"no activity signal: util.gpu not supported and no GPM on {where} "
                       f"in {n} samples",
                       ("Activity of a MIG instance needs GPM (Hopper or later); on this GPU "
                        "the engine's own metrics (--engine) are the only activity signal"
                        if window.mig_uuid else
                        "A GPU in MIG mode reports activity per instance: see the verdicts "
                        "of its MIG instances",),
                       (), 0, 0.0)
    if n_active == 0:
        return verdict(Bound.IDLE, None, _confidence(1.0, n, False, th),
                       f"no active sample (busy and GPM activity ≤ {th.idle_busy_pct:g}) "
                       f"and no request in flight in {n} samples", (), (), 0, 0.0)

    queue_empty_share = sum(1 for t in ticks if t.queue_empty) / n
    if (active_share < th.starved_active_share
            and queue_empty_share > th.starved_queue_empty_share):
        return verdict(Bound.HOST, Cause.STARVED,
                       _confidence(queue_empty_share, n, False, th),
                       f"active in {_pct(active_share)} of samples while the engine queue "
                       f"was empty {_pct(queue_empty_share)} of the window",
                       _HOST_ADVICE[Cause.STARVED], ranked, n_active, active_share)

    active_ticks = [t for t, _, _ in active]
    proxy = any(Provenance.PROXY in (t.dram_provenance, t.compute_provenance)
                for t in active_ticks)
    lead, lead_share = ranked[0]
    if lead_share >= th.regime_share:
        lead_ticks = [(t, c) for t, b, c in active if b is lead]
        rule = _clause_text(lead, lead_share, Counter(c for _, c in lead_ticks), n_active)
        confidence = _confidence(lead_share, n_active, proxy, th)
        if lead is Bound.HOST:
            host_ticks = [t for t, _ in lead_ticks]
            cause, why = _host_cause(host_ticks, th)
            advice = _HOST_ADVICE[cause] if cause else _host_unnamed_advice(host_ticks)
            return verdict(lead, cause, confidence, f"{rule}; {why}", advice, ranked,
                           n_active, active_share)
        if lead is Bound.MIXED:
            closer = _closer((), [t for t, _ in lead_ticks])
            return verdict(lead, None, confidence, f"{rule}; closer to {closer.value}",
                           (f"Near the ridge point (both high); closest to {closer.value}",
                            *_advice(closer)[:2]),
                           ranked, n_active, active_share)
        return verdict(lead, None, confidence, rule, _advice(lead), ranked,
                       n_active, active_share)

    closer = _closer(ranked, active_ticks)
    leading = ", ".join(f"{b.value} {_pct(s)}" for b, s in ranked[:3])
    # "Mixed" is surest when no regime comes near the bar: a leader 20 points short
    # of it is full confidence, one just short of it is marginal.
    span = th.regime_share - 0.4
    mixed_f = 0.6 + 0.4 * _clamp01((th.regime_share - lead_share) / span) if span > 0 else 0.6
    confidence = round(mixed_f * _sample_factor(n_active, th)
                       * (th.proxy_confidence if proxy else 1.0), 3)
    rule = (f"no regime holds {_pct(th.regime_share)} of active samples: {leading}; "
            f"closer to {closer.value}")
    advice = (f"Phases alternate: see --timeline; closest to {closer.value}",
              *_advice(closer)[:2])
    return verdict(Bound.MIXED, None, confidence, rule, advice, ranked, n_active, active_share)


def _has_activity_signal(tick: Tick) -> bool:
    """Whether anything measured the GPU's activity in ``tick`` (util.gpu or GPM)."""
    return any(v is not None for v in (tick.busy_pct, tick.sm_active_pct, tick.dram_pct,
                                       tick.compute_pct))


# ---- across windows (daemon) ----------------------------------------------------


@dataclass(slots=True)
class _Held:
    verdict: Verdict
    candidate: tuple[Bound, Cause | None] | None = None
    wins: int = 0


def _key(v: Verdict) -> tuple[Bound, Cause | None]:
    return v.verdict, v.cause


class Hysteresis:
    """Keeps a reported verdict stable: a change must win ``hold`` windows in a row.

    A new verdict (bound and cause) replaces the held one once it has won ``hold``
    consecutive windows, or at once when its confidence is at least ``confident``
    (a lost GPU is certain and shows at once). The same verdict as the held one
    refreshes it. One instance serves every GPU, keyed by ``gpu_index`` (and the MIG
    UUID, for a MIG instance).
    """

    def __init__(self, hold: int = 2, confident: float = 0.95) -> None:
        if hold < 1:
            raise ConfigError(f"hysteresis hold must be ≥ 1 window, not {hold}")
        self.hold = hold
        self.confident = confident
        self._held: dict[tuple[int, str], _Held] = {}

    def held(self, gpu_index: int, mig_uuid: str = "") -> Verdict | None:
        """The verdict now reported for ``gpu_index`` (or its MIG instance), if any."""
        state = self._held.get((gpu_index, mig_uuid))
        return None if state is None else state.verdict

    def update(self, verdict: Verdict) -> Verdict:
        """Feed the newest window's verdict; returns the verdict to report."""
        device = (verdict.gpu_index, verdict.mig_uuid)
        state = self._held.get(device)
        if state is None or _key(verdict) == _key(state.verdict):
            self._held[device] = _Held(verdict)
            return verdict
        key = _key(verdict)
        state.wins = state.wins + 1 if key == state.candidate else 1
        state.candidate = key
        if state.wins >= self.hold or verdict.confidence >= self.confident:
            self._held[device] = _Held(verdict)
            return verdict
        return state.verdict
