"""Critical XID errors from NVML events, taken as the samples read them: no thread of their own.

``XidWatcher`` registers every GPU for ``nvmlEventTypeXidCriticalError`` in one NVML
event set. Whoever reads the tally (``NvmlBackend.read``, once per GPU per tick) first
takes what the set queued, without blocking (``nvmlEventSetWait_v2`` with no wait), at
most once every ``POLL_S``: every queued event at once. Each event is logged and lands
in the GPU's tally: the distinct codes seen (sticky: a GPU that fell off the bus stays
so until the agent restarts), the events of each and the event count. A sample carries
every XID queued before its tick (at 1 Hz, each tick looks); the sampling loop never
waits for an event. A thread of its own cost a wakeup a second (~0.02 % of a core on a
VM, more than the look itself inside a tick).

Nothing here may raise into the tick: a failed wait is counted through the backend's
choke point (``count_error``), logged once, and the next look waits ``_BACKOFF_S``.
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["MAX_CODES", "POLL_S", "WAIT_MS", "XID_CRITICAL_ERROR", "XidWatcher"]

logger = logging.getLogger(__name__)

# nvml.h's nvmlEventTypeXidCriticalError (0x8, unchanged since CUDA 11.0); pynvml is
# imported by nvml.py alone, and a library stand-in need not carry event constants.
XID_CRITICAL_ERROR = 0x8
# How long one wait blocks: never. NVML queues events in the set until they are taken.
WAIT_MS = 0
# The least time between two looks at the set: twice a second, so a 1 Hz tick looks at
# every tick (its jitter aside) and a 10 Hz one at every fifth.
POLL_S = 0.5
# After an error other than a timeout, the next look waits this long, so a broken event
# set costs a call a second, not one per GPU per tick.
_BACKOFF_S = 1.0
# The most events one look takes (an XID storm must not hold up the tick); the rest
# stay queued in the set for the next look.
_EVENTS_PER_LOOK = 64
# Distinct XID codes kept per GPU (a GPU spewing every code must not grow memory).
MAX_CODES = 16


def _handle_key(handle: Any) -> Any:
    """A hashable key for a device handle: its address for a ctypes pointer.

    pynvml hands back a new pointer object in each event, equal only by address.
    """
    if isinstance(handle, ctypes._Pointer):
        return ctypes.cast(handle, ctypes.c_void_p).value
    return handle


class XidWatcher:
    """Critical XID events of ``devices``, taken from their event set as the tally is read.

    Args:
        nvml: the NVML library (``pynvml`` or a fake with its API).
        devices: (gpu_index, handle) of each GPU that can be read.
        attempt: the backend's choke point, ``(gpu_index, fn, *args) -> (value,
            error)``; set creation and registration go through it (counted, logged once).
        count_error: counts a failed wait under its function's name.
    """

    def __init__(
        self,
        nvml: Any,
        devices: Sequence[tuple[int, Any]],
        attempt: Callable[..., tuple[Any, Exception | None]],
        count_error: Callable[[str, Exception], None],
    ) -> None:
        self._nvml = nvml
        self._attempt = attempt
        self._count_error = count_error
        self._lock = threading.Lock()
        self._codes: dict[int, list[int]] = {}
        self._code_counts: dict[int, list[int]] = {}  # aligned with _codes
        self._counts: dict[int, int] = {}
        self._look_lock = threading.Lock()  # one look at the set at a time
        self._next_look_s = -math.inf  # time.monotonic(): pacing, not the samples' clock
        self._set: Any = None
        self._gpus: dict[Any, int] = {}
        create = getattr(nvml, "nvmlEventSetCreate", None)
        register = getattr(nvml, "nvmlDeviceRegisterEvents", None)
        if create is None or register is None or not devices:
            return
        try:
            event_set, _ = attempt(devices[0][0], create)
        except Exception:  # noqa: BLE001 — the choke point's DeviceLost: no events, no harm
            return
        if event_set is None:
            return
        self._set = event_set
        for gpu_index, handle in devices:
            self._register(gpu_index, handle)
        if not self._gpus:
            self._free()

    def watch(self, gpu_index: int, handle: Any) -> bool:
        """Watch one more GPU (opened after the others); False where there is no event set."""
        return self._set is not None and self._register(gpu_index, handle)

    def _register(self, gpu_index: int, handle: Any) -> bool:
        """Add ``handle`` to the event set, through the backend's choke point."""
        try:
            _, error = self._attempt(
                gpu_index, self._nvml.nvmlDeviceRegisterEvents, handle, XID_CRITICAL_ERROR,
                self._set,
            )  # fmt: skip
        except Exception:  # noqa: BLE001 — lost meanwhile: its reads will say so
            return False
        if error is not None:
            return False
        with self._lock:
            self._gpus[_handle_key(handle)] = gpu_index
            self._counts.setdefault(gpu_index, 0)
        return True

    def tally(self, gpu_index: int) -> tuple[tuple[int, ...], int | None]:
        """The distinct XID codes seen on ``gpu_index`` and the event count.

        The count is None when the GPU is not watched: "no XID" would be a guess.
        """
        codes, count, _ = self.tally_by_code(gpu_index)
        return codes, count

    def tally_by_code(self, gpu_index: int) -> tuple[tuple[int, ...], int | None, tuple[int, ...]]:
        """``tally`` and the events of each of its codes, in its order, read together.

        Beyond ``MAX_CODES`` distinct codes a new one is counted in the total only.
        Takes the events queued until now first (``look``).
        """
        self.look()
        with self._lock:
            if gpu_index not in self._counts:
                return (), None, ()
            codes = tuple(self._codes.get(gpu_index, ()))
            return codes, self._counts[gpu_index], tuple(self._code_counts.get(gpu_index, ()))

    def look(self) -> None:
        """Take every event queued in the set (up to ``_EVENTS_PER_LOOK``), never waiting.

        At most once every ``POLL_S``; a look already under way on another thread is
        not waited for. Errors are counted, never raised.
        """
        if self._set is None or time.monotonic() < self._next_look_s:
            return
        if not self._look_lock.acquire(blocking=False):
            return
        try:
            event_set = self._set
            if event_set is None:  # closed meanwhile
                return
            self._next_look_s = time.monotonic() + POLL_S
            wait = self._nvml.nvmlEventSetWait_v2
            timeout_code = self._nvml.NVML_ERROR_TIMEOUT
            for _ in range(_EVENTS_PER_LOOK):
                try:
                    data = wait(event_set, WAIT_MS)
                except Exception as err:  # noqa: BLE001 — nothing may escape into the tick
                    if getattr(err, "value", None) != timeout_code:  # Timeout: none queued
                        self._count_error("nvmlEventSetWait_v2", err)
                        self._next_look_s = time.monotonic() + _BACKOFF_S
                    return
                try:
                    self._record(data)
                except Exception as err:  # noqa: BLE001 — a malformed event costs itself only
                    self._count_error("nvmlEventSetWait_v2", err)
        finally:
            self._look_lock.release()

    def _record(self, data: Any) -> None:
        if not int(data.eventType) & XID_CRITICAL_ERROR:
            return
        gpu_index = self._gpus.get(_handle_key(data.device))
        if gpu_index is None:
            return
        xid = int(data.eventData)
        with self._lock:
            self._counts[gpu_index] += 1
            codes = self._codes.setdefault(gpu_index, [])
            counts = self._code_counts.setdefault(gpu_index, [])
            if xid in codes:
                counts[codes.index(xid)] += 1
            elif len(codes) < MAX_CODES:
                codes.append(xid)
                counts.append(1)
        logger.warning("GPU %d: XID %d (critical error event from NVML)", gpu_index, xid)

    def close(self) -> None:
        """Free the event set (idempotent); before ``nvmlShutdown``."""
        with self._look_lock:  # not under a look taking events from it
            self._free()

    def _free(self) -> None:
        if self._set is None:
            return
        event_set, self._set = self._set, None
        try:
            self._nvml.nvmlEventSetFree(event_set)
        except Exception as err:  # noqa: BLE001 — shutting down: nothing to do about it
            self._count_error("nvmlEventSetFree", err)
