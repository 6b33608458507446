"""GPU health for ``agentctl diagnose``: the newest sample of each GPU, assessed.

A failed GPU is said first, before any verdict: a GPU that fell off the bus (XID 79)
or hit a double-bit ECC error (XID 48) needs a reset, and its "idle" verdict would
mislead. Pure functions of the records, like the rest of diagnose.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rooftop.common.health import GpuHealth, HealthState, assess
from rooftop.common.model import GpuSample, Record

__all__ = ["GpuHealthReport", "format_health", "health_json", "health_of"]

_ORDER = {HealthState.FAILED: 0, HealthState.DEGRADED: 1, HealthState.UNKNOWN: 2, HealthState.OK: 3}
_WORDS = {
    HealthState.FAILED: "FAILED",
    HealthState.DEGRADED: "degraded",
    HealthState.UNKNOWN: "health unknown",
}


@dataclass(frozen=True, slots=True)
class GpuHealthReport:
    """One GPU's health as of its newest sample."""

    gpu_index: int
    gpu_name: str
    health: GpuHealth


def health_of(records: Iterable[Record]) -> list[GpuHealthReport]:
    """Each GPU's health from its newest sample; failed, degraded, unknown, then ok.

    MIG instances are left out: XIDs, ECC and row remapping are the whole GPU's.
    """
    newest: dict[int, GpuSample] = {}
    for r in records:
        if not isinstance(r, GpuSample) or r.mig_uuid:
            continue
        seen = newest.get(r.gpu_index)
        if seen is None or r.time_s >= seen.time_s:
            newest[r.gpu_index] = r
    out = [GpuHealthReport(i, s.gpu_name, assess(s)) for i, s in sorted(newest.items())]
    return sorted(out, key=lambda h: _ORDER[h.health.state])  # stable: index order within


def format_health(reports: Sequence[GpuHealthReport]) -> list[str]:
    """One line per GPU that is not ok (failed first); none when every GPU is ok."""
    lines = []
    for r in reports:
        if r.health.state is HealthState.OK:
            continue
        name = f" ({r.gpu_name})" if r.gpu_name else ""
        word = _WORDS[r.health.state]
        lines.append(f"GPU {r.gpu_index}{name} {word}: {'; '.join(r.health.reasons)}")
    return lines


def health_json(reports: Sequence[GpuHealthReport]) -> list[dict[str, Any]]:
    """The ``health`` items of ``diagnose --json``, failed first."""
    return [
        {
            "gpu_index": r.gpu_index,
            "state": r.health.state.value,
            "reasons": list(r.health.reasons),
            "xid_codes": list(r.health.xid_codes),
        }
        for r in reports
    ]
