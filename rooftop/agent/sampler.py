"""The sampling tick: every GPU once, then the host, as records for the window.

Shared by ``diagnose``, ``record`` and the daemon, so they all see the same data. A
lost GPU becomes a ``GpuSample(lost=True)``, one this user may not open a
``GpuSample(lost=True, inaccessible=<NVML error>)``, and the others go on. A MIG
instance (``GpuInfo.mig_uuid`` set) is read as a device of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rooftop.agent.sensors.base import Clock, GpuBackend, GpuInfo, HostSensor, PodSource
from rooftop.common.errors import DeviceInaccessible, DeviceLost, SensorError
from rooftop.common.model import GpuProcess, GpuSample, HostSample, Record

if TYPE_CHECKING:  # the engine sources pull in the scrapers; the sampler only drains
    from rooftop.agent.engines.sources import Drainable

__all__ = ["Sampler"]

log = logging.getLogger(__name__)


class Sampler:
    """Reads all GPUs (and the host) once per ``tick``."""

    def __init__(
        self,
        backend: GpuBackend,
        host: HostSensor | None = None,
        clock: Clock = time.time,
        engines: Drainable | None = None,
        pods: PodSource | None = None,
    ) -> None:
        self.backend = backend
        self.host = host
        self.engines = engines
        self.pods = pods  # Kubernetes: the containers holding each GPU (kubelet)
        self.clock = clock
        self.devices: tuple[GpuInfo, ...] = backend.devices()
        self._lost: set[tuple[int, str]] = set()  # (gpu_index, mig_uuid) warned about
        self.ticks = 0

    def tick(self) -> list[Record]:
        """One sample per GPU, one host sample, and the engine samples since the last tick."""
        # Engine summaries waiting on the hook socket are read here, once a tick, rather
        # than by a thread woken per datagram (the receiver's thread is a backstop);
        # before the clock, so they are stamped at or before this tick, as they arrived.
        receive = getattr(self.engines, "receive", None)
        if receive is not None:
            receive()
        now_s = self.clock()
        records: list[Record] = []
        gpu_pids: dict[int, tuple[int, ...]] = {}
        for info in self.devices:
            key = (info.gpu_index, info.mig_uuid)
            try:
                if info.mig_uuid:
                    # Only MIG-aware backends list instances, and they take mig_uuid.
                    read: Any = self.backend.read
                    sample = read(info.gpu_index, now_s, mig_uuid=info.mig_uuid)
                else:
                    sample = self.backend.read(info.gpu_index, now_s)
            except (DeviceLost, DeviceInaccessible) as exc:
                if key not in self._lost:
                    log.warning("%s; the other GPUs go on", exc)
                    self._lost.add(key)
                # No data either way; the sample says whether it is loss or access.
                sample = GpuSample(
                    time_s=now_s,
                    gpu_index=info.gpu_index,
                    gpu_uuid=info.gpu_uuid,
                    gpu_name=info.gpu_name,
                    lost=True,
                    inaccessible=exc.error if isinstance(exc, DeviceInaccessible) else None,
                    mig_uuid=info.mig_uuid,
                    gpu_instance_id=info.gpu_instance_id,
                    compute_instance_id=info.compute_instance_id,
                    # XID 79 arrives as the GPU falls off the bus: the lost sample must
                    # still carry it (a backend that watches no XIDs has no tally).
                    **({} if info.mig_uuid else self._xids(info.gpu_index)),
                )
            if self.pods is not None:
                pods = self.pods.pods_of(info.gpu_uuid, info.mig_uuid, info.gpu_index)
                if pods:
                    sample = dataclasses.replace(sample, pods=pods)
            records.append(sample)
            for proc in sample.processes:
                gpu_pids[proc.pid] = (*gpu_pids.get(proc.pid, ()), info.gpu_index)
        # A read may have opened a GPU that failed to open at start (with its MIG
        # instances, if it has them): the next tick reads the list as it is now.
        self.devices = self.backend.devices()
        if self.host is not None:
            try:
                host_sample = self.host.read(now_s, gpu_pids)
            except SensorError as exc:
                log.warning("host sensor: %s", exc)
            else:
                records.append(host_sample)
                if gpu_pids:
                    _name_processes(records, host_sample, getattr(self.host, "slurm_job_id", None))
        if self.engines is not None:
            # After the GPUs: a replay hands over the engine samples up to this read.
            records.extend(self.engines.drain())
        self.ticks += 1
        return records

    def _xids(self, gpu_index: int) -> dict[str, Any]:
        fields = getattr(self.backend, "xid_fields", None)
        if fields is None:
            return {}
        return dict(fields(gpu_index))  # codes, count and count per code

    def run(
        self,
        seconds: float,
        rate_hz: float,
        on_tick: Callable[[list[Record], float], None],
        stop: threading.Event | None = None,
        monotonic: Clock = time.monotonic,
    ) -> None:
        """Tick at ``rate_hz`` for ``seconds`` (or until ``stop``), calling ``on_tick``.

        ``on_tick`` gets the records and the fraction of the run done (0-1). Ticks are
        scheduled on absolute deadlines so a slow tick does not drift the rate.
        """
        stop = stop or threading.Event()
        period_s = 1.0 / rate_hz
        start = monotonic()
        n = 0
        while not stop.is_set():
            records = self.tick()
            n += 1
            elapsed = monotonic() - start
            on_tick(records, min(1.0, elapsed / seconds) if seconds > 0 else 1.0)
            if elapsed >= seconds:
                return
            deadline = start + n * period_s
            stop.wait(max(0.0, deadline - monotonic()))


def _name_processes(
    records: list[Record], host: HostSample, slurm_job_id: Callable[[int], str | None] | None
) -> None:
    """Give each GPU process its command name and Slurm job (the workload outside k8s).

    NVML lists pids only; the host sensor has just read those same pids, so their names
    (and, when readable, ``SLURM_JOB_ID``) are at hand. Replaces the samples in place.
    """
    names = {p.pid: p.name for p in host.processes if p.name}
    for i, record in enumerate(records):
        if not isinstance(record, GpuSample) or not record.processes:
            continue
        named = []
        changed = False
        for p in record.processes:
            name = names.get(p.pid, p.name)
            job = slurm_job_id(p.pid) if slurm_job_id is not None else p.slurm_job_id
            # A copy only where something changed: dataclasses.replace per process per
            # tick was a measurable share of the tick.
            if name != p.name or job != p.slurm_job_id:
                named.append(dataclasses.replace(p, name=name, slurm_job_id=job))
                changed = True
            else:
                named.append(p)
        if changed:
            records[i] = _with_processes(record, tuple(named))


# GpuSample's fields in __init__ order (all of them are init fields, none keyword-only).
_GPU_FIELDS = tuple(f.name for f in dataclasses.fields(GpuSample))
_gpu_values = operator.attrgetter(*_GPU_FIELDS)
_PROCESSES = _GPU_FIELDS.index("processes")


def _with_processes(sample: GpuSample, processes: tuple[GpuProcess, ...]) -> GpuSample:
    """``dataclasses.replace(sample, processes=processes)`` at half its cost.

    Every GPU's sample every tick: ``replace`` walks the fields and builds keywords
    (~12 us of a ~6 us construction).
    """
    values = list(_gpu_values(sample))
    values[_PROCESSES] = processes
    return GpuSample(*values)
