"""Workloads: who is using a GPU, and one row per workload for people (pure).

A GPU's **workload** is, first match wins:

1. the **model** an inference engine on it serves (the engine's ``model`` label);
2. else the **pod owner** of the Kubernetes container holding it (``PodRef``), read
   from the pod name the way the controllers make it: a Deployment's pods are
   ``<name>-<pod-template-hash>-<suffix>`` (hash 6-10 and suffix 5 characters of
   Kubernetes' random alphabet), a StatefulSet's ``<name>-<ordinal>``, a
   DaemonSet's ``<name>-<suffix>``; any other pod is its own workload;
3. else the **process** holding it (its command name when known, else its pid),
   which means something only on its own node.

``aggregate`` folds per-GPU facts (``WorkloadGpu``) into rows by workload, namespace
or node: GPUs, the verdict mix, the worst TPOT p50/p99, and the one action that would
help (the advice of the dominant verdict). The collector exports the same grouping as
``rooftop.workload.bound``; ``agentctl status --by`` prints it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from rooftop.common.model import Bound, EngineSample, GpuSample, PodRef, Verdict

__all__ = [
    "GROUPINGS",
    "Workload",
    "WorkloadGpu",
    "WorkloadKind",
    "WorkloadRow",
    "aggregate",
    "pod_owner",
    "workload_gpus",
    "workload_of",
]


class WorkloadKind(StrEnum):
    """What names a workload (the ``rooftop.workload.kind`` attribute)."""

    MODEL = "model"
    DEPLOYMENT = "deployment"
    STATEFULSET = "statefulset"
    DAEMONSET = "daemonset"
    POD = "pod"
    PROCESS = "process"
    NONE = "none"  # nothing on the GPU that Rooftop can name


# k8s.io/apimachinery/pkg/util/rand: the alphabet of generated name suffixes and of
# the pod-template hash (no vowels, no 0, 1, 3: no words, no look-alikes).
_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_DEPLOYMENT = re.compile(rf"^(?P<name>.+)-[{_ALPHABET}]{{6,10}}-[{_ALPHABET}]{{5}}$")
_STATEFULSET = re.compile(r"^(?P<name>.+)-(?:0|[1-9][0-9]*)$")
_DAEMONSET = re.compile(rf"^(?P<name>.+)-[{_ALPHABET}]{{5}}$")

# The verdict that wins a tie in the mix: the one most worth acting on first.
_SEVERITY = (Bound.LOST, Bound.HOST, Bound.MEMORY, Bound.COMPUTE, Bound.MIXED, Bound.UNKNOWN,
             Bound.IDLE)  # fmt: skip

GROUPINGS = ("workload", "namespace", "node")


@dataclass(frozen=True, slots=True)
class Workload:
    """One workload: its kind, name and namespace.

    Attributes:
        kind: what names it.
        name: the model, the controller's or pod's name, ``<command> (pid N)`` or
            ``pid N``.
        namespace: the Kubernetes namespace; "" outside Kubernetes.
        node: the host, only for a process (a pid names nothing elsewhere) and NONE.
    """

    kind: WorkloadKind
    name: str
    namespace: str = ""
    node: str = ""

    @property
    def label(self) -> str:
        """``deployment/vllm``, ``model/meta-llama/Llama-3.1-8B``, ``node-1:pid 42``."""
        if self.kind is WorkloadKind.NONE:
            return f"{self.node}:(no workload)" if self.node else "(no workload)"
        if self.kind is WorkloadKind.PROCESS:
            return f"{self.node}:{self.name}" if self.node else self.name
        return f"{self.kind.value}/{self.name}"


def pod_owner(pod: str) -> tuple[WorkloadKind, str]:
    """The controller that made ``pod``, from its name: ``(kind, name)``.

    An all-digit last part is an ordinal (StatefulSet), which a DaemonSet suffix could
    also be in about 0.1 % of names: the name is all there is to go on.
    """
    match = _DEPLOYMENT.match(pod)
    if match:
        return WorkloadKind.DEPLOYMENT, match["name"]
    match = _STATEFULSET.match(pod)
    if match:
        return WorkloadKind.STATEFULSET, match["name"]
    match = _DAEMONSET.match(pod)
    if match:
        return WorkloadKind.DAEMONSET, match["name"]
    return WorkloadKind.POD, pod


def workload_of(
    *,
    node: str,
    model: str | None = None,
    pods: Sequence[PodRef] = (),
    processes: Sequence[tuple[int, int | None]] = (),
    process_names: Mapping[int, str] | None = None,
) -> Workload:
    """The workload using one GPU (module docstring for the order).

    Args:
        node: the GPU's host.
        model: the model an engine on the GPU serves, if any.
        pods: the containers holding the GPU; the first names the owner.
        processes: (pid, GPU memory bytes or None) of NVML's process list.
        process_names: command names by pid, where known.

    Returns:
        The workload; kind NONE when nothing names one.
    """
    namespace = pods[0].namespace if pods else ""
    if model:
        return Workload(WorkloadKind.MODEL, model, namespace)
    if pods:
        kind, name = pod_owner(pods[0].pod)
        return Workload(kind, name, namespace)
    if processes:
        # The process holding the most GPU memory is the one doing the work.
        pid, _ = max(processes, key=lambda p: (p[1] or 0, -p[0]))
        command = (process_names or {}).get(pid)
        name = f"{command} (pid {pid})" if command else f"pid {pid}"
        return Workload(WorkloadKind.PROCESS, name, node=node)
    return Workload(WorkloadKind.NONE, "", node=node)


@dataclass(frozen=True, slots=True)
class WorkloadGpu:
    """What one GPU (or MIG instance) tells about its workload."""

    workload: Workload
    node: str
    device: str  # "0", or "0/MIG-..." for a MIG instance
    gpu_name: str
    verdict: Bound | None  # None: no window closed yet
    recommendations: tuple[str, ...] = ()
    pods: tuple[PodRef, ...] = ()
    model: str | None = None
    tpot_p50_ms: float | None = None
    tpot_p99_ms: float | None = None


def workload_gpus(
    *,
    node: str,
    device: str,
    gpu_name: str,
    sample: GpuSample | None,
    verdict: Verdict | None,
    engine: EngineSample | None,
) -> tuple[WorkloadGpu, ...]:
    """One GPU's facts from its newest sample, verdict and engine: one per workload on it.

    A GPU shared by the pods of several controllers (time-slicing, a shared MIG
    instance) belongs to each of them: one entry per owner, with its own pods.

    The newest sample's pods win over the verdict's (which cover the last window), so
    a pod that moved shows where it is now. Without engine percentiles the mean TPOT
    stands in for p50. On a MIG instance an engine counts only when its pid is in the
    instance's process list: engines name GPUs by index, which every instance of the
    GPU shares.
    """
    pods = sample.pods if sample is not None and sample.pods else ()
    if not pods and verdict is not None:
        pods = verdict.pods
    processes = (
        tuple((p.pid, p.gpu_mem_bytes) for p in sample.processes) if sample is not None else ()
    )
    if (
        engine is not None
        and sample is not None
        and sample.mig_uuid
        and engine.pid not in {pid for pid, _ in processes}
    ):
        engine = None
    model = engine.model if engine is not None else None
    no_data = sample is not None and sample.lost
    # NVML refusing the agent the GPU is no lost GPU: nothing measures it ("unknown").
    lost = no_data and sample is not None and sample.inaccessible is None
    current = Bound.LOST if lost else Bound.UNKNOWN if no_data else None
    p50 = p99 = None
    if engine is not None:
        p50 = engine.tpot_p50_ms if engine.tpot_p50_ms is not None else engine.tpot_ms
        p99 = engine.tpot_p99_ms
    # The pods of each owner, in the order the kubelet listed them.
    groups: dict[Workload, list[PodRef]] = {}
    if not model:
        for pod in pods:
            groups.setdefault(workload_of(node=node, pods=(pod,)), []).append(pod)
    if not groups:
        owner = workload_of(node=node, model=model, pods=pods, processes=processes)
        groups[owner] = list(pods)
    return tuple(
        WorkloadGpu(
            workload=owner,
            node=node,
            device=device,
            gpu_name=gpu_name,
            verdict=current or (verdict.verdict if verdict is not None else None),
            recommendations=verdict.recommendations if verdict is not None and not no_data else (),
            pods=tuple(owned),
            model=model,
            tpot_p50_ms=p50,
            tpot_p99_ms=p99,
        )
        for owner, owned in groups.items()
    )


@dataclass(frozen=True, slots=True)
class WorkloadRow:
    """One workload (or namespace, or node) and its GPUs, for people and the gauge.

    Attributes:
        key: the row's name (a workload label, a namespace, a node).
        workload: the workload, when rows are by workload.
        gpus: its GPUs and MIG instances.
        devices: those, as ``node:device`` (``gpu-node-1:0/MIG-...``).
        nodes: the hosts they are on.
        mix: (verdict, GPUs) most first; ``None`` counts GPUs with no window yet.
        dominant: the verdict of most GPUs (ties: the most urgent), None if none yet.
        action: the first advice of a GPU in the dominant verdict; None if it has none.
        tpot_p50_ms: the worst p50 (or mean) TPOT of its engines.
        tpot_p99_ms: the worst p99 TPOT of its engines.
        models: the models its engines serve.
        pods: its containers.
        gpu_names: the GPU products it runs on.
    """

    key: str
    workload: Workload | None
    gpus: int
    devices: tuple[str, ...]
    nodes: tuple[str, ...]
    mix: tuple[tuple[Bound | None, int], ...]
    dominant: Bound | None
    action: str | None
    tpot_p50_ms: float | None
    tpot_p99_ms: float | None
    models: tuple[str, ...]
    pods: tuple[PodRef, ...]
    gpu_names: tuple[str, ...]

    def share(self, bound: Bound) -> float:
        """The share of this row's GPUs in ``bound``, 0-1."""
        count = sum(n for b, n in self.mix if b is bound)
        return count / self.gpus if self.gpus else 0.0


def _key(gpu: WorkloadGpu, by: str) -> str:
    if by == "namespace":
        return gpu.workload.namespace or "(none)"
    if by == "node":
        return gpu.node
    return gpu.workload.label


def _worst(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def aggregate(gpus: Iterable[WorkloadGpu], by: str = "workload") -> list[WorkloadRow]:
    """Fold per-GPU facts into one row per workload, namespace or node, by key.

    TPOT percentiles of different engines cannot be merged without their samples, so
    a row shows the worst p50 and the worst p99: what its slowest replica sees.

    Raises:
        ValueError: ``by`` is not one of ``GROUPINGS``.
    """
    if by not in GROUPINGS:
        raise ValueError(f"by must be one of {', '.join(GROUPINGS)} (got {by!r})")
    groups: dict[str, list[WorkloadGpu]] = {}
    for g in gpus:
        groups.setdefault(_key(g, by), []).append(g)
    rows = []
    for key in sorted(groups):
        # A GPU shared by two workloads of one namespace or node counts once there.
        devices: dict[tuple[str, str], WorkloadGpu] = {}
        for g in groups[key]:
            devices.setdefault((g.node, g.device), g)
        members = list(devices.values())
        counts: dict[Bound | None, int] = {}
        for g in members:
            counts[g.verdict] = counts.get(g.verdict, 0) + 1
        known = [b for b in counts if b is not None]
        dominant = min(known, key=lambda b: (-counts[b], _SEVERITY.index(b))) if known else None
        action = next(
            (g.recommendations[0] for g in members
             if g.verdict is dominant and g.recommendations),
            None,
        )  # fmt: skip
        mix = tuple(
            sorted(counts.items(),
                   key=lambda kv: (-kv[1], _SEVERITY.index(kv[0]) if kv[0] else len(_SEVERITY)))
        )  # fmt: skip
        pods = {p: None for g in groups[key] for p in g.pods}
        rows.append(
            WorkloadRow(
                key=key,
                workload=members[0].workload if by == "workload" else None,
                gpus=len(members),
                devices=tuple(sorted(f"{node}:{device}" for node, device in devices)),
                nodes=tuple(sorted({g.node for g in members})),
                mix=mix,
                dominant=dominant,
                action=action,
                tpot_p50_ms=_worst(g.tpot_p50_ms for g in members),
                tpot_p99_ms=_worst(g.tpot_p99_ms for g in members),
                models=tuple(sorted({g.model for g in members if g.model})),
                pods=tuple(pods),
                gpu_names=tuple(sorted({g.gpu_name for g in members if g.gpu_name})),
            )
        )
    return rows
