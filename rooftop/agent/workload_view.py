"""``agentctl status --by`` and ``diagnose --collector --by``: one row per workload (pure).

Input is the collector's ``rooftop.v1.FleetStatus`` asked with ``detail`` (each GPU's
newest sample carries its pods and processes, each verdict its advice); the grouping
is ``rooftop.common.workload``'s, the same the collector exports as
``rooftop.workload.bound``. Only the TPOT floor is added here, from the model catalog
(which lives in the agent: the collector does not know it): the batch-1 decode floor
of the row's model on its GPU (DESIGN §4), split over the GPUs a model too big for
one needs.

Over several collectors the input is their merged fleet (each node once,
``fleet_query.query_fleets``); a collector that did not answer gets a line above the
table, as in ``agentctl status``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rooftop.agent.models_catalog import detect_gpu, find_model
from rooftop.agent.render import grid, iso_time
from rooftop.agent.roofline import analyze
from rooftop.agent.status import collector_lines, collectors_json, gpu_device, gpu_sample, via
from rooftop.common.codec import record_from_proto, timestamp_s, verdict_from_proto
from rooftop.common.errors import RooftopError
from rooftop.common.model import EngineSample, PodRef, Verdict
from rooftop.common.text import printable
from rooftop.common.workload import WorkloadGpu, WorkloadRow, aggregate, workload_gpus
from rooftop.v1 import telemetry_pb2 as pb

if TYPE_CHECKING:  # grpc stays out of this pure module
    from rooftop.agent.fleet_query import CollectorOutcome

__all__ = ["format_workloads", "tpot_floor_ms", "workload_rows", "workloads_json"]

_MAX_PODS_SHOWN = 3


def _gpus(fs: pb.FleetStatus) -> list[WorkloadGpu]:
    out: list[WorkloadGpu] = []
    for node in fs.nodes:
        for gpu in node.gpus:
            verdict: Verdict | None = None
            if gpu.HasField("verdict"):
                try:
                    verdict = verdict_from_proto(gpu.verdict, gpu_name=gpu.gpu_name)
                except ValueError:
                    verdict = None  # a verdict name from a newer agent: shown as none yet
            engine = None
            if gpu.HasField("engine"):
                decoded = record_from_proto(pb.TraceRecord(engine=gpu.engine))
                engine = decoded if isinstance(decoded, EngineSample) else None
            out.extend(
                workload_gpus(
                    node=node.hostname or node.agent_id,
                    device=gpu_device(gpu),
                    gpu_name=gpu.gpu_name,
                    sample=gpu_sample(gpu),
                    verdict=verdict,
                    engine=engine,
                )
            )
    return out


def workload_rows(fs: pb.FleetStatus, by: str = "workload") -> list[WorkloadRow]:
    """One row per workload, namespace or node of the fleet (``rooftop.common.workload``)."""
    return aggregate(_gpus(fs), by)


def tpot_floor_ms(row: WorkloadRow) -> float | None:
    """The batch-1 TPOT floor of the row's model on its GPU; None if either is unknown.

    Only for a row serving one model on one GPU product, not on MIG instances (an
    instance has a share of the bandwidth the catalog does not list): otherwise no
    single floor applies.
    """
    if len(row.models) != 1 or len(row.gpu_names) != 1 or " MIG " in row.gpu_names[0]:
        return None
    gpu = detect_gpu(row.gpu_names[0])
    if gpu is None:
        return None
    try:
        model = find_model(row.models[0])
    except RooftopError:
        return None  # not in the catalog: no floor, not an error
    result = analyze(model, gpu)
    split = result.tensor_parallel_tpot_floor_ms
    return split if split is not None and result.tensor_parallel_gpus != 1 else result.tpot_floor_ms


def _mix(row: WorkloadRow) -> str:
    return ", ".join(f"{n} {b.value if b is not None else 'no verdict yet'}" for b, n in row.mix)


def _pods(pods: Sequence[PodRef], *, namespace: bool) -> str:
    shown = [f"{p.namespace}/{p.pod}/{p.container}" if namespace else f"{p.pod}/{p.container}"
             for p in pods[:_MAX_PODS_SHOWN]]  # fmt: skip
    more = len(pods) - _MAX_PODS_SHOWN
    return ", ".join(shown) + (f" +{more} more" if more > 0 else "") if shown else "-"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def format_workloads(
    fs: pb.FleetStatus,
    *,
    collector: str,
    by: str = "workload",
    collectors: Sequence[CollectorOutcome] = (),
) -> str:
    """The ``--by`` table: one row per workload (namespace, node), worst first by TPOT.

    ``collectors``: how each collector answered, when several were asked.
    """
    rows = workload_rows(fs, by)
    title = {"workload": "WORKLOAD", "namespace": "NAMESPACE", "node": "NODE"}[by]
    header = [title, *(["NAMESPACE"] if by == "workload" else []), "GPUS", "VERDICTS",
              "TPOT p50", "TPOT p99", "FLOOR", "PODS", "DO FIRST"]  # fmt: skip
    floors = [tpot_floor_ms(row) for row in rows]  # a catalog look-up and roofline each
    table = []
    for row, floor in zip(rows, floors, strict=True):
        namespace = [row.workload.namespace or "-"] if row.workload is not None else []
        table.append(
            [
                # grid escapes every cell: pod and model names come from agents.
                row.key,
                *namespace,
                str(row.gpus),
                _mix(row),
                _ms(row.tpot_p50_ms),
                _ms(row.tpot_p99_ms),
                _ms(floor),
                _pods(row.pods, namespace=by == "node"),
                row.action or "-",
            ]
        )
    gpus = sum(r.gpus for r in rows)
    lines = [
        printable(
            f"Rooftop {by}s — {via(collector, collectors)}: {len(rows)} {by}(s), {gpus} GPU(s) "
            f"on {len(fs.nodes)} node(s)"
        ),
        *collector_lines(collectors),
    ]
    lines += grid(header, table) if table else [
        printable(f"  no node has reported to {via(collector, collectors)}")
    ]
    if any(floor is not None for floor in floors):
        lines.append(
            "  FLOOR = the batch-1 decode floor of the model on that GPU (DESIGN §4); "
            "p50 is the engine's mean TPOT where it reports no percentiles."
        )
    return "\n".join(lines)


def workloads_json(
    fs: pb.FleetStatus,
    *,
    collector: str,
    by: str = "workload",
    collectors: Sequence[CollectorOutcome] = (),
) -> dict[str, Any]:
    """``--by ... --json``: the rows of ``format_workloads`` as JSON-ready dicts."""
    out = []
    for row in workload_rows(fs, by):
        w = row.workload
        out.append(
            {
                "key": row.key,
                "kind": w.kind.value if w is not None else by,
                "name": w.name if w is not None else row.key,
                "namespace": (w.namespace or None) if w is not None else None,
                "gpus": row.gpus,
                "devices": list(row.devices),
                "nodes": list(row.nodes),
                "verdicts": {(b.value if b is not None else "none"): n for b, n in row.mix},
                "dominant": row.dominant.value if row.dominant is not None else None,
                "action": row.action,
                "tpot_p50_ms": row.tpot_p50_ms,
                "tpot_p99_ms": row.tpot_p99_ms,
                "tpot_floor_ms": tpot_floor_ms(row),
                "models": list(row.models),
                "pods": [
                    {"pod": p.pod, "namespace": p.namespace, "container": p.container}
                    for p in row.pods
                ],
            }
        )
    return {
        "collector": collector,
        "collectors": collectors_json(collectors),
        "taken_time": iso_time(timestamp_s(fs.taken_time)),
        "by": by,
        "rows": out,
    }
