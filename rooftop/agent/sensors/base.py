"""The interfaces every sensor implements; the rest of the agent sees only these.

A ``GpuBackend`` hands out one frozen ``GpuSample`` per GPU per tick (like nvitop's
``Device.oneshot()``); implementations: ``NvmlBackend`` (real), ``FakeNvml``
(profiles + error injection, shipped so GPU-less machines can run everything) and
``ReplayBackend`` (trace format v1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from rooftop.common.model import GpuSample, HostSample, PodRef

__all__ = ["Clock", "GpuBackend", "GpuInfo", "HostSensor", "PodSource"]

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """What does not change while the agent runs."""

    gpu_index: int
    gpu_uuid: str
    gpu_name: str
    has_gpm: bool
    mem_total_bytes: int | None = None
    pcie_link_gen_max: int | None = None
    pcie_link_width_max: int | None = None
    # MIG: ``mig_mode`` on a parent GPU in MIG mode. A MIG instance is a device of its
    # own: ``gpu_index``/``gpu_uuid`` are its parent's, ``mig_uuid`` ("MIG-...") names it.
    mig_mode: bool = False
    mig_uuid: str = ""
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None


@runtime_checkable
class GpuBackend(Protocol):
    """Source of GPU samples."""

    def devices(self) -> tuple[GpuInfo, ...]:
        """The GPUs on this host, in index order; a MIG parent's instances follow it."""
        ...

    def read(self, gpu_index: int, time_s: float) -> GpuSample:
        """One consistent snapshot of ``gpu_index``, stamped ``time_s`` (epoch seconds).

        A backend that lists MIG instances also takes ``mig_uuid=`` (keyword) to read
        one instance; the sampler passes it only for devices whose ``mig_uuid`` is set.

        Raises ``DeviceLost`` when the GPU fell off the bus; other GPUs go on.
        Fields the GPU cannot measure are ``None``.
        """
        ...

    def close(self) -> None:
        """Release the backend (idempotent)."""
        ...


class HostSensor(Protocol):
    """Source of host CPU samples."""

    def read(self, time_s: float, gpu_pids: dict[int, tuple[int, ...]]) -> HostSample:
        """Host CPU and the CPU of ``gpu_pids`` (pid -> GPU indices it holds)."""
        ...


class PodSource(Protocol):
    """Which Kubernetes containers hold a GPU (``rooftop.agent.sensors.pods``)."""

    def pods_of(
        self, gpu_uuid: str, mig_uuid: str = "", gpu_index: int | None = None
    ) -> tuple[PodRef, ...]:
        """The containers holding this GPU or MIG instance now; () when none or unknown."""
        ...
