"""Query: the fleet's status for people (``agentctl status``, ``diagnose --collector``).

Two halves, as everywhere in the collector:

- ``fleet_status`` is pure: a ``FleetSnapshot`` in, a ``pb.FleetStatus`` out (nodes →
  GPUs → latest verdict, newest sample, engine; last seen, lag, drops, the collector's
  own counters). Without ``detail`` a verdict keeps only its name, cause, confidence,
  rule and window, which keeps a 1,000-node answer near 1 MiB.
- ``QueryServicer`` serves it as ``rooftop.v1.Query/GetFleetStatus`` on the ingest's
  gRPC server: same port, same TLS and token checks (``rooftop.collector.ingest``), and a
  read-only token (``read_token_file``) may call it but not ``Ingest``.

Times are the collector's clock (``taken_time`` included), so "last seen 3 s ago" is
right whatever the asking machine's clock says.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from rooftop import __version__
from rooftop.collector.fleet import EngineState, Fleet, FleetSnapshot, GpuState
from rooftop.common.codec import record_to_proto, timestamp, verdict_to_proto
from rooftop.v1 import telemetry_pb2 as pb
from rooftop.v1 import telemetry_pb2_grpc

__all__ = ["QueryServicer", "fleet_status"]


Acked = Callable[[tuple[str, str]], int]


def _gpu_status(g: GpuState, *, detail: bool) -> pb.GpuStatus:
    out = pb.GpuStatus(
        gpu_index=g.gpu_index,
        gpu_uuid=g.gpu_uuid,
        gpu_name=g.gpu_name,
        updated_time=timestamp(g.updated_s),
        mig_uuid=g.mig_uuid,
    )
    if g.verdict is not None:
        out.verdict.CopyFrom(verdict_to_proto(g.verdict))
        if not detail:
            for name in ("evidence", "recommendations", "regimes"):
                out.verdict.ClearField(name)
    if g.sample is not None:
        if detail:
            out.sample.CopyFrom(record_to_proto(g.sample).gpu)
        elif g.sample.lost:
            # A lost GPU must show as lost in the short answer too, and an inaccessible
            # one as inaccessible (not lost).
            out.sample.CopyFrom(
                pb.GpuSample(
                    time=timestamp(g.sample.time_s),
                    gpu_index=g.gpu_index,
                    gpu_uuid=g.gpu_uuid,
                    lost=True,
                    inaccessible=g.sample.inaccessible,
                    mig_uuid=g.mig_uuid,
                )
            )
    if g.engine is not None:
        out.engine.CopyFrom(record_to_proto(g.engine).engine)
    return out


def _collector_status(snap: FleetSnapshot) -> pb.CollectorStatus:
    c = snap.counts
    return pb.CollectorStatus(
        batches=c.batches,
        samples=c.samples,
        duplicates=c.duplicates,
        restored_duplicates=c.restored_duplicates,
        skewed=c.skewed,
        missing=c.missing,
        acked_elsewhere=c.acked_elsewhere,
        streams=c.streams,
        rejected=dict(c.rejected),
        refused=dict(c.refused),
        limited=dict(c.limited),
        version=__version__,
    )


def fleet_status(
    snap: FleetSnapshot,
    *,
    node: str = "",
    detail: bool = False,
    acked: Acked | None = None,
) -> pb.FleetStatus:
    """The fleet's status as ``rooftop.v1.FleetStatus``; pure.

    Args:
        snap: the fleet at one instant.
        node: only the node whose agent_id or hostname this is; "" for every node.
        detail: full verdicts (evidence, advice, regimes) and each GPU's newest sample.
        acked: the highest contiguous seq applied for (agent_id, boot_id).

    Returns:
        Nodes sorted by hostname then agent_id, GPUs by index.
    """
    out = pb.FleetStatus(taken_time=timestamp(snap.taken_s))
    out.collector.CopyFrom(_collector_status(snap))
    gpus: dict[str, list[GpuState]] = {}
    for g in snap.gpus:
        gpus.setdefault(g.agent_id, []).append(g)
    engines: dict[str, list[EngineState]] = {}
    for e in snap.engines:
        engines.setdefault(e.agent_id, []).append(e)
    disconnected_s = dict(snap.disconnected_s)
    for a in sorted(snap.agents, key=lambda a: (a.hostname, a.agent_id)):
        if node and node not in (a.agent_id, a.hostname):
            continue
        n = out.nodes.add(
            agent_id=a.agent_id,
            hostname=a.hostname,
            boot_id=a.boot_id,
            first_seen_time=timestamp(a.first_seen_s),
            last_seen_time=timestamp(a.last_seen_s),
            stats=a.stats.to_proto(),
            batches=a.batches,
            samples=a.samples,
            acked_seq=acked((a.agent_id, a.boot_id)) if acked is not None else 0,
            connected=a.agent_id in snap.connected,
        )
        if a.agent_id in disconnected_s:
            # Moved to another collector or down; kept here until forget_after_s.
            n.disconnected_time.CopyFrom(timestamp(disconnected_s[a.agent_id]))
        if a.lag_s is not None:
            n.lag_s = a.lag_s
        if a.clock_offset_s is not None:
            n.clock_offset_s = a.clock_offset_s
        for g in sorted(gpus.get(a.agent_id, ()),
                        key=lambda g: (g.gpu_index, g.gpu_uuid, g.mig_uuid)):
            n.gpus.append(_gpu_status(g, detail=detail))
        for e in sorted(engines.get(a.agent_id, ()), key=lambda e: e.engine.engine_id):
            n.engines.append(record_to_proto(e.engine).engine)
    return out


class QueryServicer(telemetry_pb2_grpc.QueryServicer):
    """``rooftop.v1.Query/GetFleetStatus`` over a ``Fleet``.

    Args:
        fleet: read at each call (a snapshot: no lock held while encoding).
        acked: the ingest's highest contiguous seq per (agent_id, boot_id); called on
            the server's event loop, where the ingest keeps it.
    """

    def __init__(self, fleet: Fleet, *, acked: Acked | None = None) -> None:
        self._fleet = fleet
        self._acked = acked

    async def GetFleetStatus(  # noqa: N802 - the name is the RPC's
        self,
        request: pb.FleetStatusRequest,
        context: grpc.aio.ServicerContext[pb.FleetStatusRequest, pb.FleetStatus],
    ) -> pb.FleetStatus:
        """The fleet's status; NOT_FOUND when ``request.node`` names no known node."""
        snap = self._fleet.snapshot()
        seqs: dict[tuple[str, str], int] = {}
        if self._acked is not None:
            seqs = {
                (a.agent_id, a.boot_id): self._acked((a.agent_id, a.boot_id)) for a in snap.agents
            }
        # Encoding a large fleet takes a while: off the loop that applies batches.
        status = await asyncio.to_thread(
            fleet_status,
            snap,
            node=request.node,
            detail=request.detail,
            acked=lambda k: seqs.get(k, 0),
        )
        if request.node and not status.nodes:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no node {request.node!r} (agent_id or hostname) has reported to this "
                f"collector; {len(snap.agents)} node(s) known",
            )
        return status
