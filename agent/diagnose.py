"""What ``agentctl diagnose`` and ``agentctl record`` do, apart from argument parsing.

Live: sensors → sampler ticks → records. Replay: a trace file → records. Either way:
records → windows per GPU → one verdict per window.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from agent.classifier import DEFAULT_THRESHOLDS, Thresholds, classify
from agent.errors import ConfigError
from agent.model import Record, Verdict
from agent.sampler import Sampler
from agent.sensors.base import GpuBackend, HostSensor
from agent.window import build_windows

__all__ = ["FakeSpec", "diagnose_records", "open_backend", "open_host_sensor", "sample"]


@dataclass(frozen=True, slots=True)
class FakeSpec:
    """``--fake PROFILE[:WORKLOAD[,WORKLOAD...]]``: one workload per GPU (the last repeats)."""

    profile: str
    workloads: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> FakeSpec:
        """Parse ``h100`` or ``h100:gemv,gemm``; raises ``ConfigError`` when malformed."""
        profile, _, rest = text.partition(":")
        if not profile:
            raise ConfigError(f"--fake {text!r}: expected PROFILE[:WORKLOAD,...], e.g. h100:gemv")
        workloads = tuple(w.strip() for w in rest.split(",") if w.strip()) if rest else ()
        return cls(profile.strip().lower(), workloads)


def open_backend(fake: FakeSpec | None = None, gpus: int = 1) -> GpuBackend:
    """The NVML backend, or the shipped fake one; raises ``NvmlUnavailable`` without a driver."""
    if fake is not None:
        from agent.sensors.fake import fake_backend  # noqa: PLC0415 — only for --fake

        count = max(gpus, len(fake.workloads))
        workloads = None
        if fake.workloads:
            workloads = [fake.workloads[min(i, len(fake.workloads) - 1)] for i in range(count)]
        return fake_backend(fake.profile, gpus=count, workloads=workloads)
    from agent.sensors.nvml import NvmlBackend  # noqa: PLC0415 — keeps pynvml off --replay

    return NvmlBackend()


def open_host_sensor() -> HostSensor:
    """The psutil host sensor."""
    from agent.sensors.host import PsutilHostSensor  # noqa: PLC0415

    return PsutilHostSensor()


def sample(
    backend: GpuBackend,
    host: HostSensor | None,
    seconds: float,
    rate_hz: float,
    on_progress: Callable[[float], None] | None = None,
    on_records: Callable[[list[Record]], None] | None = None,
) -> list[Record]:
    """Sample every GPU for ``seconds`` at ``rate_hz``; returns all records in order."""
    sampler = Sampler(backend, host)
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
) -> dict[int, list[Verdict]]:
    """Per GPU index, the verdict of each window (one window when ``window_s`` is None)."""
    windows = build_windows(records, window_s=window_s)
    return {i: [classify(w, thresholds) for w in ws] for i, ws in sorted(windows.items())}


def overall(timeline: dict[int, list[Verdict]]) -> Sequence[Verdict]:
    """The last window's verdict of every GPU (the whole-run verdict when unwindowed)."""
    return [verdicts[-1] for _, verdicts in sorted(timeline.items()) if verdicts]
