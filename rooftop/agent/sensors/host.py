"""Host CPU, from psutil: the whole host, and each process that holds a GPU.

The signature of a Python-bound engine loop is its process pinned at ~100 % of one
core while the GPU waits (DESIGN §2), so per-process CPU is in percent of ONE core.
Every figure is a rate since this sensor's previous ``read`` (non-blocking): the
``psutil.Process`` objects are kept between reads so their CPU-time deltas work.
A pid's first reading has no previous one to compare with, so its ``cpu_pct`` is
``None`` (not measured) rather than psutil's placeholder 0.0.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import psutil

from rooftop.common.model import HostProcess, HostSample

__all__ = ["PsutilHostSensor"]


class PsutilHostSensor:
    """``HostSensor`` over psutil.

    Args:
        proc_root: where procfs is mounted (default ``/proc``), e.g. the host's
            ``/proc`` bind-mounted into a container. psutil reads it from a
            module-wide setting, so this applies to every psutil user in the process.
    """

    def __init__(self, proc_root: Path | None = None) -> None:
        if proc_root is not None:
            psutil.PROCFS_PATH = str(proc_root)
        self._lock = threading.Lock()
        self._processes: dict[int, psutil.Process] = {}
        # pid -> SLURM_JOB_ID from its environment, read once per process (it is fixed at
        # exec); None when unset or not ours to read (another user's /proc/<pid>/environ).
        self._slurm_job_ids: dict[int, str | None] = {}
        # Our own baseline, not psutil.cpu_percent(None): that one keeps module-wide
        # state, so any other caller in the process would shorten our interval.
        self._last_cpu_times: Any = self._cpu_times()

    def read(self, time_s: float, gpu_pids: dict[int, tuple[int, ...]]) -> HostSample:
        """Host CPU and the CPU of ``gpu_pids`` since the previous ``read``.

        Args:
            time_s: the sample's timestamp (Unix epoch seconds).
            gpu_pids: pid -> indices of the GPUs it holds (from NVML's process lists).

        Returns:
            The sample. Host ``cpu_pct`` is of all cores (0-100); each process's is of
            one core (a multi-threaded process can exceed 100). Pids that are gone or
            not ours to read are left out silently.
        """
        with self._lock:
            cpu_times = self._cpu_times()
            host_cpu_pct = _busy_pct(self._last_cpu_times, cpu_times)
            if cpu_times is not None:
                self._last_cpu_times = cpu_times
            processes = []
            for pid, gpu_indices in sorted(gpu_pids.items()):
                process = self._read_process(pid, gpu_indices)
                if process is not None:
                    processes.append(process)
            # Forget pids no longer on a GPU, so the cache stays as small as the GPU set.
            for pid in self._processes.keys() - gpu_pids.keys():
                del self._processes[pid]
                self._slurm_job_ids.pop(pid, None)
        return HostSample(time_s=time_s, cpu_pct=host_cpu_pct, processes=tuple(processes))

    def _read_process(self, pid: int, gpu_indices: tuple[int, ...]) -> HostProcess | None:
        try:
            proc = self._processes.get(pid)
            first = proc is None or not proc.is_running()  # not running: the pid was reused
            if proc is None or first:
                proc = psutil.Process(pid)
                self._processes[pid] = proc
                self._slurm_job_ids[pid] = _slurm_job_id(proc)
            with proc.oneshot():
                cpu_pct = proc.cpu_percent(None)
                name = proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            # Exited between NVML's list and now, or another user's: nothing to say.
            self._processes.pop(pid, None)
            self._slurm_job_ids.pop(pid, None)
            return None
        return HostProcess(
            pid=pid,
            cpu_pct=None if first else cpu_pct,
            gpu_indices=gpu_indices,
            name=name,
        )

    def slurm_job_id(self, pid: int) -> str | None:
        """The Slurm job of a GPU process seen at the last ``read``; None: none or unreadable."""
        with self._lock:
            return self._slurm_job_ids.get(pid)

    @staticmethod
    def _cpu_times() -> Any:
        try:
            return psutil.cpu_times()
        except OSError:
            return None  # procfs unreadable: host CPU is reported absent


def _slurm_job_id(proc: psutil.Process) -> str | None:
    """``SLURM_JOB_ID`` in the process's environment, when this user may read it."""
    try:
        job = proc.environ().get("SLURM_JOB_ID")
    except (psutil.Error, OSError):
        return None  # another user's process (no ptrace access), or gone: unknown
    return (job.strip() or None) if job else None


def _busy_pct(before: Any, after: Any) -> float | None:
    """Busy share of all CPU time between two ``psutil.cpu_times()`` (as psutil does)."""
    if before is None or after is None:
        return None
    total_delta = _total_s(after) - _total_s(before)
    busy_delta = _busy_s(after) - _busy_s(before)
    if total_delta <= 0 or busy_delta <= 0:
        return 0.0
    return round(min(100.0, 100.0 * busy_delta / total_delta), 1)


def _total_s(times: Any) -> float:
    # Linux already counts guest time inside user and nice (psutil and htop agree).
    total: float = sum(times)
    return total - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)


def _busy_s(times: Any) -> float:
    # iowait is idle time: the CPU did nothing while waiting for I/O.
    return _total_s(times) - float(times.idle) - float(getattr(times, "iowait", 0.0))
