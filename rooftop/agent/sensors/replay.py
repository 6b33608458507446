"""Replay backend: plays a trace-v1 recording back as if it were live GPUs.

Used by ``agentctl demo``-style runs and tests of the live path without a GPU. The
recording's timeline is mapped onto the caller's clock from the first ``read``; with
``loop=True`` it starts over at the end. Samples come back re-stamped with the time
they are read at, so downstream stages cannot tell a replay from NVML.

A recording whose GPU UUID is missing or all zeros (the shipped ones are anonymised)
would make every node replaying it report the *same* GPU, and the collector would
merge them. Such a GPU gets a stable UUID of its own instead, derived from ``node``
(the agent replaying it) and its index: distinct across nodes, the same at each
restart. A real recorded UUID is kept as it is.
"""

from __future__ import annotations

import bisect
import dataclasses
import uuid

from rooftop.agent.sensors.base import GpuInfo
from rooftop.agent.trace import Trace
from rooftop.common.errors import SensorError
from rooftop.common.model import EngineSample, GpuSample

__all__ = ["ReplayBackend", "replay_gpu_uuid"]

# uuid5 namespace of replayed GPUs' UUIDs (any fixed value; changing it renames them all).
_REPLAY_NAMESPACE = uuid.UUID("5d0c8a52-6f0e-4f7e-9a59-0f6f4c1d2b8e")


def _is_placeholder(gpu_uuid: str) -> bool:
    """No UUID, or an anonymised one: only zeros once the ``GPU-`` prefix and dashes go."""
    digits = gpu_uuid.removeprefix("GPU-").replace("-", "")
    return not digits.strip("0")


def replay_gpu_uuid(node: str, gpu_index: int) -> str:
    """The stable NVML-style UUID of GPU ``gpu_index`` replayed by ``node``."""
    return f"GPU-{uuid.uuid5(_REPLAY_NAMESPACE, f'{node}/gpu{gpu_index}')}"


class ReplayBackend:
    """A ``GpuBackend`` over the GPU records of a trace."""

    def __init__(self, trace: Trace, *, loop: bool = True, node: str = "") -> None:
        """Replay ``trace``'s GPUs (and engines); ``node`` names the replaying host.

        ``node`` (the agent id) seeds the UUID of a GPU recorded without a real one;
        when empty, the recording's file name does.
        """
        # By device: a GPU, or one MIG instance of it (its index is the parent's).
        by_gpu: dict[tuple[int, str], list[GpuSample]] = {}
        for record in trace.records:
            if isinstance(record, GpuSample):
                by_gpu.setdefault((record.gpu_index, record.mig_uuid), []).append(record)
        if not by_gpu:
            raise SensorError(f"{trace.path}: the recording holds no GPU samples to replay")
        seed = node or trace.path.name
        for key, samples in by_gpu.items():
            if any(_is_placeholder(s.gpu_uuid) for s in samples):
                # One identity per GPU: a real UUID recorded for it anywhere wins.
                real = (s.gpu_uuid for s in samples if not _is_placeholder(s.gpu_uuid))
                own = next(real, None) or replay_gpu_uuid(seed, key[0])
                by_gpu[key] = [
                    dataclasses.replace(s, gpu_uuid=own) if _is_placeholder(s.gpu_uuid) else s
                    for s in samples
                ]
        self._samples = {i: sorted(s, key=lambda r: r.time_s) for i, s in sorted(by_gpu.items())}
        self._times = {i: [r.time_s for r in s] for i, s in self._samples.items()}
        self._engines = sorted(
            (r for r in trace.records if isinstance(r, EngineSample)), key=lambda r: r.time_s
        )
        self._t0 = min(t[0] for t in self._times.values())
        self._duration_s = max(t[-1] for t in self._times.values()) - self._t0
        self._loop = loop
        self._start_s: float | None = None
        self._last_read_s: float | None = None
        self._drained_to_s: float | None = None
        self.source = str(trace.path)

    def devices(self) -> tuple[GpuInfo, ...]:
        """One GpuInfo per GPU (and MIG instance) in the recording."""
        infos = []
        for (index, mig_uuid), samples in self._samples.items():
            first = samples[0]
            infos.append(
                GpuInfo(
                    gpu_index=index,
                    gpu_uuid=first.gpu_uuid,
                    gpu_name=first.gpu_name,
                    has_gpm=first.dram_bw_pct is not None,
                    mem_total_bytes=first.mem_total_bytes,
                    pcie_link_gen_max=first.pcie_link_gen,
                    pcie_link_width_max=first.pcie_link_width,
                    mig_uuid=mig_uuid,
                    gpu_instance_id=first.gpu_instance_id,
                    compute_instance_id=first.compute_instance_id,
                )
            )
        return tuple(infos)

    def _offset_s(self, time_s: float) -> float:
        if self._start_s is None:
            self._start_s = time_s
        elapsed = time_s - self._start_s
        if self._loop and self._duration_s > 0:
            elapsed %= self._duration_s
        return min(elapsed, self._duration_s)

    def read(self, gpu_index: int, time_s: float, mig_uuid: str = "") -> GpuSample:
        """The recorded sample at the same offset into the recording, stamped ``time_s``.

        ``mig_uuid`` picks one recorded MIG instance of ``gpu_index``.
        """
        key = (gpu_index, mig_uuid)
        try:
            samples, times = self._samples[key], self._times[key]
        except KeyError:
            what = f"MIG instance {mig_uuid} of GPU {gpu_index}" if mig_uuid else f"GPU {gpu_index}"
            raise SensorError(f"{what} is not in the recording") from None
        self._last_read_s = time_s
        at = self._t0 + self._offset_s(time_s)
        i = max(0, bisect.bisect_right(times, at) - 1)
        return dataclasses.replace(samples[i], time_s=time_s)

    def drain(self) -> list[EngineSample]:
        """Engine samples the recording holds between the previous drain and the last read.

        Makes the replay an engine source too (``EngineSources(extra=...)``), so replayed
        TPOT/TTFT reach the window as they would from hooks; re-stamped like the GPUs.
        """
        now_s = self._last_read_s
        if now_s is None or not self._engines:
            return []
        since_s, self._drained_to_s = self._drained_to_s, now_s
        if since_s is None:
            since_s = now_s - 1.0  # the engine state just before the first read
        lo, hi = self._offset_s(since_s), self._offset_s(now_s)
        if hi < lo:  # the replay looped: the tail of the recording, then its head
            spans = [(lo, self._duration_s + 1e-9), (-1e-9, hi)]
        else:
            spans = [(lo, hi)]
        # A one-GPU recording's engine ran on that GPU: say so, as explicit config would.
        sole = tuple(i for i, _ in self._samples) if len(self._samples) == 1 else ()
        return [
            dataclasses.replace(e, time_s=now_s, gpu_indices=e.gpu_indices or sole)
            for a, b in spans
            for e in self._engines
            if self._t0 + a < e.time_s <= self._t0 + b
        ]

    def close(self) -> None:
        """Nothing to release."""
