"""GPU health beside the verdict: one pure function from a sample to ok / degraded / failed.

The agent (``diagnose``) and the collector (``hw.status``) both call ``assess``, so a
GPU reads the same everywhere. The states are the OpenTelemetry hardware semantic
conventions' ``hw.state`` values. What the sample carries:

- critical XID codes the NVML event set delivered since the agent started
  (``xid_codes``, sticky: a GPU that fell off the bus stays failed until it is reset
  and the agent restarts);
- ECC error counts (volatile: since the driver loaded; aggregate: the GPU's life);
- row remapping (Ampere+): rows remapped, a remap pending (applied at the next
  reset), a remap that failed;
- page retirement (before Ampere: V100, T4), which row remapping replaced: pages
  retired for ECC errors, a retirement pending (applied at the next reset or driver
  reload); a retirement that failed comes as XID 64;
- the clock-event reasons bitmask, named by ``clock_event_names``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from rooftop.common.model import GpuSample

__all__ = [
    "CLOCK_EVENT_REASONS",
    "FAILED_XIDS",
    "HW_STATES",
    "SLOWDOWN_REASONS",
    "GpuHealth",
    "HealthState",
    "assess",
    "clock_event_names",
]


class HealthState(StrEnum):
    """A GPU's health, as OpenTelemetry's ``hw.state`` names it (``HW_STATES``), or unknown."""

    OK = "ok"
    DEGRADED = "degraded"
    FAILED = "failed"
    # Not an hw.state value: nothing could be read (NVML refuses this user the GPU), so
    # neither "ok" nor "failed" can be said. ``hw.status`` has no series for it.
    UNKNOWN = "unknown"


# The states ``hw.status`` exports, one series each (OpenTelemetry's hw.state values).
HW_STATES = (HealthState.OK, HealthState.DEGRADED, HealthState.FAILED)


# XIDs after which the GPU needs a reset (or replacing) before it can be trusted again:
# NVIDIA's XID catalogue lists them as "reset the GPU" / "contact support". Any other
# critical XID (an application's illegal address, a page fault...) degrades.
FAILED_XIDS: dict[int, str] = {
    48: "double-bit ECC error",
    64: "ECC row remapping or page retirement failed",
    79: "GPU has fallen off the bus",
    95: "uncontained ECC error",
}

# nvmlClocksEventReason* bits (nvml.h), one name each; the names are the suffixes
# nvidia-smi -q prints under "Clocks Event Reasons", in snake case.
CLOCK_EVENT_REASONS: tuple[tuple[int, str], ...] = (
    (0x001, "idle"),
    (0x002, "applications_clocks"),
    (0x004, "sw_power_cap"),
    (0x008, "hw_slowdown"),
    (0x010, "sync_boost"),
    (0x020, "sw_thermal_slowdown"),
    (0x040, "hw_thermal_slowdown"),
    (0x080, "hw_power_brake"),
    (0x100, "display_clocks"),
)
# Hardware pulling clocks down (overheating, a power brake, an external slowdown
# signal): the GPU runs, slower than it should. Software caps are policy, not health.
SLOWDOWN_REASONS = frozenset({"hw_slowdown", "hw_thermal_slowdown", "hw_power_brake"})


def clock_event_names(mask: int | None) -> tuple[str, ...]:
    """The named states set in an ``nvmlClocksEventReason*`` bitmask, in bit order.

    Bits nvml.h does not define here come back as ``"0x..."`` so nothing is hidden.
    """
    if not mask:
        return ()
    names = [name for bit, name in CLOCK_EVENT_REASONS if mask & bit]
    known = 0
    for bit, _ in CLOCK_EVENT_REASONS:
        known |= bit
    if mask & ~known:
        names.append(f"0x{mask & ~known:x}")
    return tuple(names)


@dataclass(frozen=True, slots=True)
class GpuHealth:
    """A GPU's health state and why, worst reason first."""

    state: HealthState
    reasons: tuple[str, ...] = ()
    xid_codes: tuple[int, ...] = ()  # the failing XIDs first

    @property
    def failed(self) -> bool:
        """Whether the GPU needs a reset or replacing."""
        return self.state is HealthState.FAILED


def assess(sample: GpuSample) -> GpuHealth:
    """The health of the GPU ``sample`` came from (pure: same sample, same answer).

    Failed: a failing XID (``FAILED_XIDS``), uncorrected volatile ECC errors, a failed
    row remap, or the GPU lost. Degraded: another critical XID, a row remap pending, a
    page retirement pending, a hardware slowdown. Otherwise ok. An inaccessible GPU (no
    permission) with no XID is unknown, its reason naming the inaccessibility: it needs
    access, not a reset, and nothing about its health could be read (its XIDs, from the
    event set, are judged as above).
    """
    if sample.lost and sample.inaccessible is not None and not sample.xid_codes:
        return GpuHealth(
            HealthState.UNKNOWN,
            (
                f"not accessible to the agent (NVML {sample.inaccessible}): its health cannot "
                "be read; give the agent access to the GPU, no reset needed",
            ),
        )
    failed: list[str] = []
    degraded: list[str] = []
    fatal = [x for x in sample.xid_codes if x in FAILED_XIDS]
    other = [x for x in sample.xid_codes if x not in FAILED_XIDS]
    failed.extend(f"XID {x}: {FAILED_XIDS[x]}" for x in fatal)
    if sample.lost and sample.inaccessible is None:
        failed.append("GPU lost: NVML cannot reach it")
    if sample.ecc_uncorrected_volatile:
        failed.append(f"{sample.ecc_uncorrected_volatile} uncorrected ECC errors since boot")
    if sample.remap_failed:
        failed.append("row remapping failed: replace the GPU")
    degraded.extend(f"XID {x}" for x in other)
    if sample.remap_pending:
        degraded.append("row remap pending: reset the GPU to apply it")
    if sample.retired_pages_pending:
        degraded.append("page retirement pending: reset the GPU (or reload the driver) to apply it")
    slow = [n for n in clock_event_names(sample.clock_event_reasons) if n in SLOWDOWN_REASONS]
    if slow:
        degraded.append("clocks held down: " + ", ".join(slow))
    state = (
        HealthState.FAILED if failed else HealthState.DEGRADED if degraded else HealthState.OK
    )
    return GpuHealth(state, (*failed, *degraded), (*fatal, *other))
