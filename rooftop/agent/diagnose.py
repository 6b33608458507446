"""What ``agentctl diagnose`` and ``agentctl record`` do, apart from argument parsing.

Live: sensors → sampler ticks → records. Replay: a trace file → records. Either way:
records → windows per GPU → one verdict per window.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from rooftop.agent.classifier import DEFAULT_THRESHOLDS, Thresholds, classify
from rooftop.agent.engines.sources import EngineSources
from rooftop.agent.roofline import Dtype, ModelSpec, analyze, application_mbu, detect_gpu
from rooftop.agent.sampler import Sampler
from rooftop.agent.sensors.base import GpuBackend, HostSensor
from rooftop.agent.window import DeviceKey, build_windows
from rooftop.common.errors import ConfigError
from rooftop.common.model import Bound, Evidence, Provenance, Record, Verdict

__all__ = [
    "HOST_BOUND_MBU_PCT",
    "MBU_GAP_POINTS",
    "FakeSpec",
    "ModelContext",
    "diagnose_records",
    "open_backend",
    "open_host_sensor",
    "sample",
    "with_roofline",
]

# Application-side MBU and GPM DRAM bandwidth normally agree within ~10 points (8B
# decode: 75 % vs 74 % measured); a wider gap means bytes move that the model does not
# explain, or the model information is wrong.
MBU_GAP_POINTS = 20.0
# Host-bound and under this share of the roofline: the engine loop, not the GPU, sets TPOT.
HOST_BOUND_MBU_PCT = 25.0


# A workload that changes over time: gemv@2+gemm@2 alternates every 2 s.
_SCHEDULE_DEFAULT_S = "2"


@dataclass(frozen=True, slots=True)
class FakeSpec:
    """``--fake PROFILE[:WORKLOAD,...]``: one workload per GPU (the last one repeats).

    A workload is a name (``gemv``) or a schedule (``gemv@2+gemm@2``: alternate every
    2 s), in the fake library's spec form once parsed (``gemv:2,gemm:2``).
    """

    profile: str
    workloads: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> FakeSpec:
        """Parse ``h100``, ``h100:gemv,gemm`` or ``h100:gemv@2+gemm@2``."""
        profile, _, rest = text.partition(":")
        if not profile.strip():
            raise ConfigError(f"--fake {text!r}: expected PROFILE[:WORKLOAD,...], e.g. h100:gemv")
        workloads = []
        for item in (w.strip() for w in rest.split(",")):
            if not item:
                continue
            if "+" in item or "@" in item:
                parts = []
                for part in item.split("+"):
                    name, _, seconds = part.partition("@")
                    parts.append(f"{name.strip()}:{seconds.strip() or _SCHEDULE_DEFAULT_S}")
                item = ",".join(parts)
            workloads.append(item)
        return cls(profile.strip().lower(), tuple(workloads))

    def check(self) -> FakeSpec:
        """This spec, once its profile and workloads are known ones; opens nothing.

        Raises:
            ConfigError: the unknown profile or workload, as ``open_backend`` would.
        """
        from rooftop.agent.sensors.fake import FAKE_PROFILES, parse_workload  # noqa: PLC0415

        if self.profile not in FAKE_PROFILES:
            raise ConfigError(
                f"unknown fake profile {self.profile!r}; known: {', '.join(FAKE_PROFILES)}"
            )
        for workload in self.workloads:
            try:
                parse_workload(workload)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        return self


def open_backend(fake: FakeSpec | None = None, gpus: int = 1) -> GpuBackend:
    """The NVML backend, or the shipped fake one; raises ``NvmlUnavailable`` without a driver."""
    if fake is not None:
        from rooftop.agent.sensors.fake import fake_backend  # noqa: PLC0415 — only for --fake

        count = max(gpus, len(fake.workloads))
        workloads = None
        if fake.workloads:
            workloads = [fake.workloads[min(i, len(fake.workloads) - 1)] for i in range(count)]
        try:
            return fake_backend(fake.profile, gpus=count, workloads=workloads)
        except ValueError as exc:
            raise ConfigError(f"--fake: {exc}") from exc
    from rooftop.agent.sensors.nvml import NvmlBackend  # noqa: PLC0415 — keeps pynvml off --replay

    return NvmlBackend()


def open_host_sensor(backend: GpuBackend) -> HostSensor:
    """The psutil host sensor; for the fake backend, the fake's own processes."""
    from rooftop.agent.sensors.fake import FakeHostSensor, FakeNvmlLibrary  # noqa: PLC0415
    from rooftop.agent.sensors.host import PsutilHostSensor  # noqa: PLC0415
    from rooftop.agent.sensors.nvml import NvmlBackend  # noqa: PLC0415

    if isinstance(backend, NvmlBackend) and isinstance(backend.library, FakeNvmlLibrary):
        return FakeHostSensor(backend.library)
    return PsutilHostSensor()


def sample(
    backend: GpuBackend,
    host: HostSensor | None,
    seconds: float,
    rate_hz: float,
    on_progress: Callable[[float], None] | None = None,
    on_records: Callable[[list[Record]], None] | None = None,
    engines: EngineSources | None = None,
) -> list[Record]:
    """Sample every GPU for ``seconds`` at ``rate_hz``; returns all records in order.

    Engine samples (hooks, scrapers) drained from ``engines`` join the records each tick.
    """
    sampler = Sampler(backend, host, engines=engines)
    records: list[Record] = []

    def on_tick(batch: list[Record], done: float) -> None:
        records.extend(batch)
        if on_records is not None:
            on_records(batch)
        if on_progress is not None:
            on_progress(done)

    sampler.run(seconds, rate_hz, on_tick)
    return records


def diagnose_records(
    records: Iterable[Record],
    window_s: float | None = None,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
) -> dict[DeviceKey, list[Verdict]]:
    """Per device (GPU, or MIG instance), the verdict of each window.

    One window when ``window_s`` is None.
    """
    windows = build_windows(records, window_s=window_s)
    return {i: [classify(w, thresholds) for w in ws] for i, ws in sorted(windows.items())}


def overall(timeline: Mapping[DeviceKey, list[Verdict]]) -> Sequence[Verdict]:
    """The last window's verdict of every GPU and MIG instance.

    The whole-run verdict when unwindowed.
    """
    return [verdicts[-1] for _, verdicts in sorted(timeline.items()) if verdicts]


@dataclass(frozen=True, slots=True)
class ModelContext:
    """What the roofline needs to know about the served model (``diagnose --model``)."""

    model: ModelSpec
    dtype: Dtype = Dtype.BF16
    kv_dtype: Dtype | None = None
    context_tokens: int = 0  # mean tokens per request in flight (prompt + generated)


def with_roofline(verdict: Verdict, ctx: ModelContext) -> Verdict:
    """Add the TPOT floor and application-side MBU to a verdict that has engine TPOT.

    Application-side MBU = floor ÷ measured TPOT (DESIGN §4). It is set beside GPM DRAM
    bandwidth; a gap wider than ``MBU_GAP_POINTS`` is called out in the verdict.
    """
    tpot = verdict.evidence_value("tpot_ms")
    gpu = detect_gpu(verdict.gpu_name)
    if tpot is None or tpot.value <= 0 or gpu is None:
        return verdict
    # The decode step holds the running requests only: waiting ones (queued for a KV
    # slot or prefill) add neither weight reads nor KV traffic to it.
    running = verdict.evidence_value("requests_running")
    batch = max(1, round(running.value)) if running is not None else 1
    result = analyze(ctx.model, gpu, batch=batch, context=ctx.context_tokens,
                     dtype=ctx.dtype, kv_dtype=ctx.kv_dtype)
    mbu_pct = 100 * application_mbu(result.tpot_floor_ms, tpot.value)
    evidence = [
        Evidence("tpot_floor_ms", result.tpot_floor_ms, Provenance.ROOFLINE),
        Evidence("app_mbu_pct", mbu_pct, Provenance.ROOFLINE),
    ]
    note = (f"TPOT {tpot.value:.1f} ms against a {result.tpot_floor_ms:.2f} ms bandwidth floor "
            f"({ctx.model.name} {ctx.dtype.value}, batch {batch} on {gpu.name}): "
            f"{mbu_pct:.0f} % of the roofline")
    dram = verdict.evidence_value("dram_pct")
    recommendations = list(verdict.recommendations)
    if dram is not None and dram.provenance is Provenance.GPM:
        note += f", GPM DRAM {dram.value:.0f} %"
        gap = dram.value - mbu_pct
        if abs(gap) > MBU_GAP_POINTS:
            evidence.append(Evidence("mbu_gap_pct", gap, Provenance.ROOFLINE))
            note += f" — a {abs(gap):.0f}-point gap"
            recommendations.append(
                "DRAM traffic exceeds what the model needs per token: look for other "
                "processes on the GPU, a KV cache larger than --context assumes, or "
                "recomputation; check --model/--dtype"
                if gap > 0 else
                "The model moves fewer bytes than --model/--dtype say it must: check the "
                "model, dtype and batch given"
            )
    if verdict.verdict is Bound.HOST and mbu_pct < HOST_BOUND_MBU_PCT:
        # DESIGN §4: HF eager decode of an 8B model ran at 96 ms, 5 % of the roofline.
        recommendations.insert(0, (
            f"TPOT is {tpot.value / result.tpot_floor_ms:.0f}× the bandwidth floor while the "
            "GPU waits: the engine loop sets TPOT — CUDA graphs, fewer launches, or a "
            "serving engine (vLLM, SGLang)"
        ))
    return dataclasses.replace(
        verdict,
        evidence=verdict.evidence + tuple(evidence),
        rule=f"{verdict.rule}; {note}",
        recommendations=tuple(recommendations),
    )
