"""OS thread names for the daemons' Python threads, so ``top -H`` and ``/proc`` show them.

Python 3.11 names a ``threading.Thread`` for Python only: the kernel's name for it
(``/proc/<pid>/task/<tid>/comm``, what ``top -H``, ``ps -L`` and ``py-spy``-less
profiling see) stays the process's own (``python``), so a per-thread CPU figure cannot
tell the sampler from the spool writer. Linux lets a process rename any of its own
threads by writing that ``comm`` file; gRPC's C threads already name themselves.
"""

from __future__ import annotations

import threading
from pathlib import Path

__all__ = ["os_thread_name", "name_os_threads"]

_COMM_MAX = 15  # TASK_COMM_LEN - 1: the kernel truncates longer names


def os_thread_name(name: str) -> str:
    """The kernel's name for a Python thread called ``name``: without ``rooftop-``, ≤ 15 bytes."""
    short = name.removeprefix("rooftop-") or name
    return short.encode()[:_COMM_MAX].decode(errors="ignore")


def name_os_threads(proc_self: Path = Path("/proc/self")) -> int:
    """Give every live Python thread but the main one its name in the kernel.

    The main thread keeps the process's name (``ps``, ``pgrep`` and systemd show it).
    Best effort: without ``/proc`` (not Linux) nothing changes.

    Returns:
        How many threads were named.
    """
    named = 0
    main = threading.main_thread()
    for thread in threading.enumerate():
        if thread is main or thread.native_id is None:
            continue
        try:
            (proc_self / "task" / str(thread.native_id) / "comm").write_text(
                os_thread_name(thread.name)
            )
        except OSError:  # not Linux, or the thread ended meanwhile: its name does not matter
            continue
        named += 1
    return named
