"""Pure rendering of verdicts for people (a table, a timeline) and for machines (JSON)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from rooftop.common.model import Verdict
from rooftop.common.text import printable

__all__ = ["device_label", "format_table", "format_timeline", "grid", "iso_time",
           "verdict_json"]

# Evidence shown in the table, in this order, as (evidence name, column header).
_COLUMNS = (("dram_pct", "dram"), ("compute_pct", "compute"), ("busy_pct", "busy"))


def iso_time(time_s: float) -> str:
    """RFC 3339 UTC with milliseconds; a time no datetime can hold is shown as seconds."""
    try:
        stamp = dt.datetime.fromtimestamp(time_s, tz=dt.UTC)
    except (ValueError, OverflowError, OSError):
        # Year 0001 or 1e308 s from an old collector that did not refuse it: say so
        # rather than end the whole report in a traceback.
        return f"{time_s:.3f}s since the epoch (out of range)"
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def device_label(v: Verdict) -> str:
    """``"0"`` for GPU 0; ``"0/MIG-..."`` for a MIG instance of it."""
    return f"{v.gpu_index}/{v.mig_uuid}" if v.mig_uuid else str(v.gpu_index)


def verdict_json(v: Verdict) -> dict[str, Any]:
    """A verdict as a JSON-ready dict (the ``gpus`` items of ``diagnose --json``).

    A MIG instance is an item of its own, with ``mig_uuid`` and its GPU / compute
    instance ids (``gpu_index``/``gpu_uuid`` are its parent's); they are absent for
    a whole GPU.
    """
    mig: dict[str, Any] = {}
    if v.mig_uuid:
        mig = {"mig_uuid": v.mig_uuid, "gpu_instance_id": v.gpu_instance_id,
               "compute_instance_id": v.compute_instance_id}
    return {
        "gpu_index": v.gpu_index,
        "gpu_uuid": v.gpu_uuid,
        "gpu_name": v.gpu_name,
        **mig,
        "verdict": v.verdict.value,
        "cause": v.cause.value if v.cause else None,
        "confidence": round(v.confidence, 3),
        "rule": v.rule,
        "evidence": {
            e.name: {"value": round(e.value, 3), "provenance": e.provenance.value}
            for e in v.evidence
        },
        "recommendations": list(v.recommendations),
        "regimes": {b.value: round(s, 3) for b, s in v.regimes},
        "samples": v.samples,
        "active_samples": v.active_samples,
        "window_start": iso_time(v.window_start_s),
        "window_end": iso_time(v.window_end_s),
    }


def _figure(v: Verdict, name: str) -> str:
    e = v.evidence_value(name)
    return "-" if e is None else f"{e.value:5.1f} {e.provenance.value}"


def grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart: the header line, then one line per row.

    Cells are escaped (``printable``): a host name holding an escape sequence or a line
    break, sent by any agent, reaches the reader's terminal as visible text.
    """
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in (header, *rows)]


def format_table(
    verdicts: Sequence[Verdict],
    *,
    source: str,
    skipped: Mapping[str, int] | None = None,
) -> str:
    """One row per GPU: verdict, cause, dram / compute / busy with provenance, main advice."""
    header = ["GPU", "verdict", "cause", "conf", *(h for _, h in _COLUMNS), "TPOT", "TTFT",
              "do first"]
    rows = []
    for v in verdicts:
        tpot, ttft = v.evidence_value("tpot_ms"), v.evidence_value("ttft_ms")
        rows.append([
            device_label(v),
            v.verdict.value,
            v.cause.value if v.cause else "-",
            f"{v.confidence:.2f}",
            *(_figure(v, name) for name, _ in _COLUMNS),
            "-" if tpot is None else f"{tpot.value:.1f} ms",
            "-" if ttft is None else f"{ttft.value:.0f} ms",
            v.recommendations[0] if v.recommendations else "-",
        ])
    lines = [printable(f"Rooftop diagnosis — {source}"), *grid(header, rows)]
    for v in verdicts:
        lines.append(printable(f"  GPU {device_label(v)} {v.gpu_name}: {v.rule}"))
    if any(e.provenance.value == "proxy" for v in verdicts for e in v.evidence):
        lines.append("  proxy = no GPM on this GPU: util.memory stands in for DRAM bandwidth and "
                     "util.gpu for compute; confidence is lowered.")
    if skipped:
        total = sum(skipped.values())
        why = ", ".join(f"{n} {k}" for k, n in sorted(skipped.items()))
        lines.append(f"  skipped {total} record(s) with out-of-range values ({why})")
    return "\n".join(lines)


def format_timeline(windows: Mapping[Any, Sequence[Verdict]]) -> str:
    """Per GPU (or MIG instance), one line per window: how the regime moved.

    Keyed by GPU index or ``DeviceKey``; the heading names the device of the verdicts.
    """
    lines = []
    for key, verdicts in sorted(windows.items()):
        lines.append(printable(f"GPU {device_label(verdicts[0]) if verdicts else key} timeline:"))
        t0 = verdicts[0].window_start_s if verdicts else 0.0
        for v in verdicts:
            cause = f" ({v.cause.value})" if v.cause else ""
            dram, comp = _figure(v, "dram_pct"), _figure(v, "compute_pct")
            lines.append(
                f"  +{v.window_start_s - t0:6.1f}s..+{v.window_end_s - t0:6.1f}s  "
                f"{v.verdict.value + cause:<22} dram {dram:<11} compute {comp}"
            )
    return "\n".join(lines)
