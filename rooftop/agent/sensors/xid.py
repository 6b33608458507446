"""Critical XID errors from NVML events, on their own thread, never in the sampling loop.

``XidWatcher`` registers every GPU for ``nvmlEventTypeXidCriticalError`` in one NVML
event set and takes what it queued (``nvmlEventSetWait_v2`` without blocking) once every
``POLL_S`` on a daemon thread, every queued event at once. Each event is logged and
lands in the GPU's tally: the distinct codes seen (sticky: a GPU that fell off the bus
stays so until the agent restarts), the events of each and the event count.
``NvmlBackend.read`` copies the tally into each sample; the sampling loop never blocks on
an event.

Nothing on the thread may raise: a failed wait is counted through the backend's
choke point (``count_error``), logged once, and the thread backs off and waits again.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["MAX_CODES", "POLL_S", "WAIT_MS", "XID_CRITICAL_ERROR", "XidWatcher"]

logger = logging.getLogger(__name__)

# nvml.h's nvmlEventTypeXidCriticalError (0x8, unchanged since CUDA 11.0); pynvml is
# imported by nvml.py alone, and a library stand-in need not carry event constants.
XID_CRITICAL_ERROR = 0x8
# How long one wait blocks: none. NVML queues events in the set until they are taken,
# so the thread polls (WAIT_MS = 0) every POLL_S and sleeps on its stop event between:
# one wakeup a second instead of ten (a blocking 100 ms wait cost ~0.2 % of a core at
# 1 Hz on the fake), and close() is immediate. An XID reaches the tally ≤ POLL_S late.
WAIT_MS = 0
POLL_S = 1.0
# After an error other than a timeout, the thread sleeps this long before waiting again,
# so a broken event set costs a call a second, not a busy loop.
_BACKOFF_S = 1.0
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
    """Waits for critical XID events of ``devices`` on a daemon thread.

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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
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
            return
        self._thread = threading.Thread(target=self._run, name="rooftop-xid", daemon=True)
        self._thread.start()

    def watch(self, gpu_index: int, handle: Any) -> bool:
        """Watch one more GPU (opened after the others); False where no set is waited on."""
        return self._thread is not None and self._register(gpu_index, handle)

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
        """
        with self._lock:
            if gpu_index not in self._counts:
                return (), None, ()
            codes = tuple(self._codes.get(gpu_index, ()))
            return codes, self._counts[gpu_index], tuple(self._code_counts.get(gpu_index, ()))

    def _run(self) -> None:
        wait = self._nvml.nvmlEventSetWait_v2
        timeout_code = self._nvml.NVML_ERROR_TIMEOUT
        while not self._stop.is_set():
            try:
                data = wait(self._set, WAIT_MS)
            except Exception as err:  # noqa: BLE001 — nothing may escape this thread
                if getattr(err, "value", None) != timeout_code:  # NVMLError_Timeout: no event
                    self._failed(err)
                else:
                    self._stop.wait(POLL_S)  # none queued: look again in a second
                continue
            try:
                self._record(data)
            except Exception as err:  # noqa: BLE001 — a malformed event costs itself only
                self._failed(err)

    def _failed(self, err: Exception) -> None:
        self._count_error("nvmlEventSetWait_v2", err)
        self._stop.wait(_BACKOFF_S)

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
        """Stop the thread and free the event set (idempotent); before ``nvmlShutdown``."""
        self._stop.set()
        if self._thread is not None:
            # A wait returns within WAIT_MS; freeing the set under a waiting thread
            # would be undefined in NVML, so the thread goes first.
            self._thread.join(timeout=WAIT_MS / 1000.0 + 5.0)
            if self._thread.is_alive():
                logger.warning("XID event thread did not stop; its event set is not freed")
                return
            self._thread = None
        self._free()

    def _free(self) -> None:
        if self._set is None:
            return
        event_set, self._set = self._set, None
        try:
            self._nvml.nvmlEventSetFree(event_set)
        except Exception as err:  # noqa: BLE001 — shutting down: nothing to do about it
            self._count_error("nvmlEventSetFree", err)
