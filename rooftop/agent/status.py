"""Pure rendering of the collector's fleet status (``agentctl status``, ``diagnose --collector``).

Input is the ``rooftop.v1.FleetStatus`` the collector's Query service answers; output
is text for people or JSON-ready dicts. "Seen 3s ago" is measured on the collector's
clock (``taken_time``), so a skewed laptop clock cannot make a live node look stale.
Every string an agent sent (host name, agent id, GPU name, MIG uuid, engine id) is
escaped in the text (``rooftop.common.text.printable``): it reaches a terminal.

Over several collectors the fleet is their merged answer (``fleet_query.query_fleets``):
each collector that did not answer gets one line of its own above the table
(``collector ADDR: NOT ANSWERING (why)``), and ``--json`` lists every collector with
its outcome (``collectors_json``).

A node whose stream to the collector that reports it is closed (``NodeStatus.connected``
false, ``disconnected_time`` set) shows ``disconnected 42s`` in the STREAM column: its
agent is down, restarting, or streams to a collector that was not asked. A collector
that predates these fields sets neither: ``-``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rooftop.agent.health_report import format_health, health_json, health_of
from rooftop.agent.render import format_table, grid, iso_time, verdict_json
from rooftop.common.codec import record_from_proto, timestamp_s, verdict_from_proto
from rooftop.common.model import INACCESSIBLE_CAUSE, Evidence, GpuSample, Provenance, Verdict
from rooftop.common.text import printable
from rooftop.v1 import telemetry_pb2 as pb

if TYPE_CHECKING:  # grpc stays out of this pure module
    from rooftop.agent.fleet_query import CollectorOutcome

__all__ = [
    "STALE_AFTER_S",
    "collector_lines",
    "collectors_json",
    "diagnosis_json",
    "format_diagnosis",
    "format_status",
    "gpu_device",
    "gpu_sample",
    "node_verdicts",
    "status_json",
    "via",
]

# A node silent this long is flagged: agents send a batch at least every second.
STALE_AFTER_S = 30.0


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _since_seen_s(fs: pb.FleetStatus, node: pb.NodeStatus) -> float:
    return timestamp_s(fs.taken_time) - timestamp_s(node.last_seen_time)


def _since_disconnected_s(fs: pb.FleetStatus, node: pb.NodeStatus) -> float | None:
    """Seconds since the node's stream closed, on the collector's clock; None if open.

    None too when the collector did not say (one older than ``connected``): the table
    must not call a node disconnected on the strength of a field left unset.
    """
    if node.connected or not node.HasField("disconnected_time"):
        return None
    return timestamp_s(fs.taken_time) - timestamp_s(node.disconnected_time)


def _stream(fs: pb.FleetStatus, node: pb.NodeStatus) -> str:
    """The STREAM cell: ``connected``, ``disconnected 42s``, or ``-`` when unknown."""
    if node.connected:
        return "connected"
    since_s = _since_disconnected_s(fs, node)
    return "-" if since_s is None else f"disconnected {_ago(since_s)}"


def _dropped(stats: pb.AgentStats) -> int:
    return stats.dropped_spool_full + stats.dropped_corrupt + stats.dropped_invalid


def _opt(msg: Any, name: str) -> Any:
    return getattr(msg, name) if msg.HasField(name) else None


def _no_data(gpu: pb.GpuStatus) -> bool:
    """No data from the GPU: NVML reported it lost, or refuses the agent access to it."""
    return gpu.HasField("sample") and gpu.sample.lost


def _inaccessible(gpu: pb.GpuStatus) -> str | None:
    """NVML's error name when it refuses the agent the GPU ("NO_PERMISSION"), else None."""
    if _no_data(gpu) and gpu.sample.HasField("inaccessible"):
        return gpu.sample.inaccessible
    return None


def _lost(gpu: pb.GpuStatus) -> bool:
    # An inaccessible GPU is not lost: it needs access for the agent, never a reset.
    return _no_data(gpu) and _inaccessible(gpu) is None


def _lost_line(gpu: pb.GpuStatus) -> str:
    # NO_PERMISSION is not a lost GPU: it needs access for the agent, never a reset.
    why = _inaccessible(gpu)  # called for a GPU with no data only
    if why:
        return (f"NOT ACCESSIBLE to the agent (NVML {why}) — give the agent access to "
                f"/dev/nvidia{gpu.gpu_index}; the GPU itself may be fine")
    return "LOST — NVML reports the GPU lost"


def _verdict_name(gpu: pb.GpuStatus) -> str:
    if _lost(gpu):
        return "lost"
    if _inaccessible(gpu) is not None:
        return "unknown"  # nothing measures it: the agent may not open it
    return gpu.verdict.verdict if gpu.HasField("verdict") else "(no window yet)"


def _engine_json(e: pb.EngineSample) -> dict[str, Any]:
    return {
        "engine_id": e.engine_id,
        "model": _opt(e, "model"),
        "tpot_ms": _opt(e, "tpot_ms"),
        "ttft_ms": _opt(e, "ttft_ms"),
        "requests_running": _opt(e, "requests_running"),
        "requests_waiting": _opt(e, "requests_waiting"),
        "gpu_indices": list(e.gpu_indices),
        "time": iso_time(timestamp_s(e.time)),
    }


def gpu_device(gpu: pb.GpuStatus) -> str:
    """``"0"`` for GPU 0, ``"0/MIG-..."`` for a MIG instance of it."""
    return f"{gpu.gpu_index}/{gpu.mig_uuid}" if gpu.mig_uuid else str(gpu.gpu_index)


def _gpu_json(gpu: pb.GpuStatus) -> dict[str, Any]:
    v = gpu.verdict if gpu.HasField("verdict") else None
    engine = gpu.engine if gpu.HasField("engine") else None
    return {
        "gpu_index": gpu.gpu_index,
        "gpu_uuid": gpu.gpu_uuid,
        "gpu_name": gpu.gpu_name,
        "mig_uuid": gpu.mig_uuid or None,  # a MIG instance of gpu_index
        "verdict": _verdict_name(gpu) if v is not None or _no_data(gpu) else None,
        "cause": _opt(v, "cause") if v is not None else None,
        "confidence": round(v.confidence, 3) if v is not None else None,
        "rule": v.rule if v is not None else None,
        "window_end": iso_time(timestamp_s(v.window_end)) if v is not None else None,
        "lost": _lost(gpu),
        "inaccessible": _inaccessible(gpu),
        "tpot_ms": _opt(engine, "tpot_ms") if engine is not None else None,
        "ttft_ms": _opt(engine, "ttft_ms") if engine is not None else None,
        "engine_id": engine.engine_id if engine is not None else None,
        "updated": iso_time(timestamp_s(gpu.updated_time)),
    }


def _node_head(fs: pb.FleetStatus, node: pb.NodeStatus) -> dict[str, Any]:
    since_s = _since_seen_s(fs, node)
    disconnected_s = _since_disconnected_s(fs, node)
    return {
        "agent_id": node.agent_id,
        "hostname": node.hostname,
        "boot_id": node.boot_id,
        "last_seen": iso_time(timestamp_s(node.last_seen_time)),
        "seconds_since_seen": round(since_s, 3),
        "stale": since_s > STALE_AFTER_S,
        "connected": node.connected,
        # Both set only while the stream is known closed (the text's "disconnected 42s").
        "disconnected_time": None if disconnected_s is None
        else iso_time(timestamp_s(node.disconnected_time)),
        "seconds_since_disconnected": None if disconnected_s is None
        else round(disconnected_s, 3),
        "lag_s": _opt(node, "lag_s"),
        "clock_offset_s": _opt(node, "clock_offset_s"),
    }


def _collector_json(c: pb.CollectorStatus) -> dict[str, Any]:
    return {
        "version": c.version,
        "batches": c.batches,
        "samples": c.samples,
        "duplicates": c.duplicates,
        "restored_duplicates": c.restored_duplicates,
        "missing": c.missing,
        "acked_elsewhere": c.acked_elsewhere,
        "skewed": c.skewed,
        "streams": c.streams,
        "rejected": dict(sorted(c.rejected.items())),
        "refused": dict(sorted(c.refused.items())),
        "limited": dict(sorted(c.limited.items())),
    }


def via(collector: str, collectors: Sequence[CollectorOutcome] = ()) -> str:
    """``collector ADDR``, or ``collectors A, B, C`` when several were asked."""
    if len(collectors) > 1:
        return "collectors " + ", ".join(c.address for c in collectors)
    return f"collector {collector}"


def collector_lines(collectors: Sequence[CollectorOutcome]) -> list[str]:
    """One line per collector that did not answer (or refused), escaped for a terminal."""
    return [
        printable(f"collector {c.address}: {'REFUSED' if c.refused else 'NOT ANSWERING'} "
                  f"({c.error})")
        for c in collectors
        if not c.ok
    ]  # fmt: skip


def collectors_json(collectors: Sequence[CollectorOutcome]) -> list[dict[str, Any]]:
    """``--json``'s ``collectors``: each collector asked, whether it answered, its counters."""
    return [
        {
            "address": c.address,
            "tls_name": c.tls_name or None,  # the DNS name the address came from
            "ok": c.ok,
            "error": c.error or None,
            "refused": c.refused,
            "nodes": c.nodes if c.ok else None,
            "version": c.version if c.ok else None,
            "collector_status": _collector_json(c.status) if c.status is not None else None,
        }
        for c in collectors
    ]


def status_json(
    fs: pb.FleetStatus, *, collector: str, collectors: Sequence[CollectorOutcome] = ()
) -> dict[str, Any]:
    """``agentctl status --json``: every node and GPU, with the collector's counters.

    Over several collectors: ``collector_status`` is their sum, ``collectors`` each one.
    """
    nodes = []
    for node in fs.nodes:
        s = node.stats
        nodes.append(
            {
                **_node_head(fs, node),
                "acked_seq": node.acked_seq,
                "batches": node.batches,
                "samples": node.samples,
                "queued": s.queued,
                "dropped": _dropped(s),
                "dropped_by_reason": {
                    "spool_full": s.dropped_spool_full,
                    "corrupt": s.dropped_corrupt,
                    "invalid": s.dropped_invalid,
                },
                "rejected_batches": s.rejected_batches,
                "reconnects": s.reconnects,
                "gpus": [_gpu_json(g) for g in node.gpus],
                "engines": [_engine_json(e) for e in node.engines],
            }
        )
    return {
        "collector": collector,
        "collectors": collectors_json(collectors),
        "taken_time": iso_time(timestamp_s(fs.taken_time)),
        "collector_status": _collector_json(fs.collector),
        "nodes": nodes,
    }


def _ms(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f} ms"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"


def _elsewhere(c: pb.CollectorStatus) -> str:
    # Quiet at zero: only a return home after a failover skips seqs acked elsewhere.
    if not c.acked_elsewhere:
        return ""
    return f" ({c.acked_elsewhere} acked elsewhere)"


def _limited(c: pb.CollectorStatus) -> str:
    # Quiet when no bound refused anything (the usual case); else what and how much.
    if not c.limited:
        return ""
    return f"; limited: {_counts(dict(c.limited))}"


def _restored(c: pb.CollectorStatus) -> str:
    # Quiet at zero, like the rest of the line's exceptions: most collectors never restart.
    if not c.restored_duplicates:
        return ""
    return f" ({c.restored_duplicates} across a restart)"


def format_status(
    fs: pb.FleetStatus, *, collector: str, collectors: Sequence[CollectorOutcome] = ()
) -> str:
    """``agentctl status``: one row per GPU, the node's figures on its first row.

    ``collectors``: how each collector answered, when several were asked; a line
    each for those that did not, under the title.
    """
    gpus = sum(len(n.gpus) for n in fs.nodes)
    c = fs.collector
    lines = [
        printable(
            f"Rooftop fleet — {via(collector, collectors)} (rooftop {c.version or '?'}): "
            f"{len(fs.nodes)} node(s), {gpus} GPU(s), {c.streams} stream(s) open"
        ),
        *collector_lines(collectors),
    ]
    header = ["NODE", "AGENT", "SEEN", "STREAM", "LAG", "QUEUED", "DROPPED", "RECONN", "GPU",
              "VERDICT", "CAUSE", "CONF", "TPOT", "TTFT"]  # fmt: skip
    rows: list[list[str]] = []
    for node in fs.nodes:
        since_s = _since_seen_s(fs, node)
        lag = _opt(node, "lag_s")
        head = [
            node.hostname,
            node.agent_id,
            _ago(since_s) + (" STALE" if since_s > STALE_AFTER_S else ""),
            _stream(fs, node),
            "-" if lag is None else f"{lag:.1f}s",
            str(node.stats.queued),
            str(_dropped(node.stats)),
            str(node.stats.reconnects),
        ]
        blank = [""] * len(head)
        if not node.gpus:
            rows.append([*head, "-", "(no GPU reported)", "", "", "", ""])
        for i, gpu in enumerate(node.gpus):
            v = gpu.verdict if gpu.HasField("verdict") else None
            engine = gpu.engine if gpu.HasField("engine") else None
            rows.append(
                [
                    *(head if i == 0 else blank),
                    gpu_device(gpu),
                    _verdict_name(gpu),
                    _cause_cell(gpu, v),
                    f"{v.confidence:.2f}" if v is not None and not _no_data(gpu) else "-",
                    _ms(_opt(engine, "tpot_ms") if engine is not None else None, 1),
                    _ms(_opt(engine, "ttft_ms") if engine is not None else None, 0),
                ]
            )
    if rows:
        lines += grid(header, rows)
    else:
        lines.append("  no node has reported yet")
    answered = sum(o.ok for o in collectors)
    lines.append(
        printable(
            f"  {'collector' if answered <= 1 else f'{answered} collectors (sum)'}: "
            f"{c.batches} batches, {c.samples} samples, "
            f"{c.duplicates} duplicate(s){_restored(c)}, {c.missing} missing{_elsewhere(c)}; "
            f"rejected: {_counts(dict(c.rejected))}; refused: {_counts(dict(c.refused))}"
            f"{_limited(c)}"
        )
    )
    if any(_since_seen_s(fs, n) > STALE_AFTER_S for n in fs.nodes):
        lines.append(
            f"  STALE = nothing heard for over {STALE_AFTER_S:g} s: the agent, its host or the "
            "network is down (the collector forgets a node after forget_after_s)."
        )
    if any(_since_disconnected_s(fs, n) is not None for n in fs.nodes):
        lines.append(
            "  disconnected = the node's stream to the collector that reports it closed that "
            "long ago: its agent is down or restarting, or streams to a collector not asked "
            "or not answering."
        )
    return "\n".join(lines)


def node_verdicts(node: pb.NodeStatus) -> list[Verdict]:
    """The node's latest verdicts, as ``diagnose`` shows them.

    The engine's TPOT/TTFT are added as evidence where the verdict carries none: the
    collector attributes engines to GPUs, the agent's window may not have.
    """
    out = []
    for gpu in node.gpus:
        if not gpu.HasField("verdict"):
            continue
        v = verdict_from_proto(gpu.verdict, gpu_name=gpu.gpu_name)
        extra = []
        if gpu.HasField("engine"):
            for name in ("tpot_ms", "ttft_ms"):
                value = _opt(gpu.engine, name)
                if value is not None and v.evidence_value(name) is None:
                    extra.append(Evidence(name, value, Provenance.ENGINE))
        out.append(dataclasses.replace(v, evidence=(*v.evidence, *extra)) if extra else v)
    return out


def _node_source(fs: pb.FleetStatus, node: pb.NodeStatus, collector: str) -> str:
    # ``collector``: the one whose report of the node is shown (the newest, when merged).
    since_s = _since_seen_s(fs, node)
    stale = " — STALE" if since_s > STALE_AFTER_S else ""
    disconnected_s = _since_disconnected_s(fs, node)
    closed = "" if disconnected_s is None else f", disconnected {_ago(disconnected_s)} ago"
    name = node.hostname if node.hostname == node.agent_id else f"{node.hostname} ({node.agent_id})"
    return f"{name} via collector {collector}, last seen {_ago(since_s)} ago{closed}{stale}"


def format_diagnosis(
    fs: pb.FleetStatus,
    *,
    collector: str,
    collectors: Sequence[CollectorOutcome] = (),
    origins: Mapping[str, str] | None = None,
) -> str:
    """``agentctl diagnose --collector``: the diagnose table of every node (or one).

    Over several collectors, ``origins`` names the collector each node's report came
    from (agent_id -> address), and a collector that did not answer gets a line first.
    """
    blocks = []
    for node in fs.nodes:
        verdicts = node_verdicts(node)
        source = _node_source(fs, node, (origins or {}).get(node.agent_id, collector))
        lines = (
            [format_table(verdicts, source=source)]  # escapes what it prints
            if verdicts
            else [printable(f"Rooftop diagnosis — {source}")]
        )
        for gpu in node.gpus:
            name = f"GPU {gpu_device(gpu)} {gpu.gpu_name}".rstrip()
            if _no_data(gpu):
                before = " (a verdict above is from before)" if gpu.HasField("verdict") else ""
                lines.append(printable(f"  {name}: {_lost_line(gpu)}{before}"))
            elif not gpu.HasField("verdict"):
                lines.append(
                    printable(f"  {name}: no verdict yet (its first window has not closed)")
                )
        # A GPU that needs a reset (XID 79, 48...) is said before the verdicts.
        lines[:0] = [printable(line) for line in _health_lines(node)]
        blocks.append("\n".join(lines))
    if not blocks:
        blocks.append(printable(f"no node has reported to {via(collector, collectors)}"))
    return "\n".join([*collector_lines(collectors), "\n\n".join(blocks)])


def _health_lines(node: pb.NodeStatus) -> list[str]:
    """Each GPU of ``node`` that is not healthy, failed first, from its newest sample.

    A lost GPU with no XID to name is left to its LOST line.
    """
    samples = [s for s in _node_samples(node) if s.xid_codes or not s.lost]
    return format_health(health_of(samples))


def gpu_sample(gpu: pb.GpuStatus) -> GpuSample | None:
    """The GPU's newest sample the collector sent; None without one (no detail asked)."""
    if not gpu.HasField("sample"):
        return None
    sample = record_from_proto(pb.TraceRecord(gpu=gpu.sample))
    return sample if isinstance(sample, GpuSample) else None


def _node_samples(node: pb.NodeStatus) -> list[GpuSample]:
    """The newest sample of each of ``node``'s GPUs the collector sent (with detail)."""
    return [s for s in map(gpu_sample, node.gpus) if s is not None]


def _cause_cell(gpu: pb.GpuStatus, v: pb.Verdict | None) -> str:
    """The CAUSE cell: the verdict's cause, ``inaccessible`` for a GPU NVML refuses."""
    if _inaccessible(gpu) is not None:
        return INACCESSIBLE_CAUSE
    return (_opt(v, "cause") or "-") if v is not None else "-"


def diagnosis_json(
    fs: pb.FleetStatus,
    *,
    collector: str,
    collectors: Sequence[CollectorOutcome] = (),
    origins: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``agentctl diagnose --collector --json``: per node, ``diagnose --json``'s ``gpus``.

    Over several collectors each node names the ``collector`` its report came from.
    """
    return {
        "source": via(collector, collectors),
        "collectors": collectors_json(collectors),
        "taken_time": iso_time(timestamp_s(fs.taken_time)),
        "nodes": [
            {
                **_node_head(fs, node),
                "collector": (origins or {}).get(node.agent_id, collector),
                "gpus": [verdict_json(v) for v in node_verdicts(node)],
                "lost_gpus": [g.gpu_index for g in node.gpus if _lost(g)],
                # GPUs NVML refuses the agent (verdict "unknown"): they need access.
                "inaccessible_gpus": [
                    g.gpu_index for g in node.gpus if _inaccessible(g) is not None
                ],
                # As `diagnose --json`'s: each GPU's health from its newest sample.
                "health": health_json(health_of(_node_samples(node))),
                "gpus_without_verdict": [
                    g.gpu_index for g in node.gpus if not g.HasField("verdict")
                ],
            }
            for node in fs.nodes
        ],
    }
