"""Batch work off the ingest event loop: one thread applies every stream's batches.

Why a thread: gRPC's asyncio server takes one new stream per turn of its event loop,
and a turn runs every callback that is ready. With decoding and applying on the loop, a
busy collector's turns are long (tens of milliseconds for the batches of a few hundred
streams), so a burst of new streams (a dead peer's agents failing over) queued for
many seconds: on a loaded 2-core machine a survivor took a few new streams a second.
With the work here the loop only moves messages; its turns stay short and it takes new
streams while batches are applied, the interpreter switching between the two threads
every few milliseconds. Working the queue in short slices of the loop itself (no
thread) was measured too, and on a crowded machine still took ~30 streams a second
(docs/PERFORMANCE.md, "The apply thread").

One thread, first in first out: batches are applied in the order they arrived, one at
a time, as they were on the loop, so the fleet, the seq bookkeeping and the observers
see one batch at a time; the loop only reads the seq marks it acks (an int each, as it
already read the marks thread's writes). A stream awaits its batch before it reads
the next, so at most one batch per stream waits here, and gRPC's flow control still
pushes back on a sender faster than the collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Applier"]

T = TypeVar("T")

# A job: what to run, the future awaiting it, the loop that future belongs to.
_Job = tuple[Callable[[], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class Applier:
    """Runs callables on one worker thread for coroutines on an event loop.

    ``await applier.run(fn)`` queues ``fn`` behind everything queued before it and
    returns its result (or raises its exception) on the caller's loop. Results go back
    in groups: one loop wakeup for every result finished by the time it runs.

    A job runs even if its awaiting task was cancelled meanwhile (it was queued; a batch
    is applied and, not acked, sent again by its agent: a duplicate).

    Args:
        name: the worker thread's name.
        clock: monotonic seconds, for ``busy_s``.
    """

    def __init__(
        self, name: str = "rooftop-apply", *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._name = name
        self._clock = clock
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # Finished jobs not yet handed back, per loop: (future, result, error).
        self._done: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any, BaseException | None]]]
        self._done = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._busy_since: float | None = None  # when the job now running started

    def start(self) -> None:
        """Start the worker thread (idempotent; ``run`` starts it too).

        Raises:
            RuntimeError: the applier is closed.
        """
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._closed:
            raise RuntimeError("the applier is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the worker thread, after every job queued before it.

        Raises:
            RuntimeError: the applier is closed.
            Exception: whatever ``fn`` raised.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:  # queued before close's last word, or refused
            self._start_locked()
            self._queue.put((fn, future, loop))
        return await future

    def busy_s(self) -> float:
        """How long the job now running has run (0.0 when idle): a wedged one shows here."""
        started = self._busy_since
        return 0.0 if started is None else max(0.0, self._clock() - started)

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (False before the first job and after ``close``)."""
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout_s: float = 5.0) -> None:
        """Finish the jobs queued, then stop the thread. Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)  # after every job queued: they finish first
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            fn, future, loop = job
            self._busy_since = self._clock()
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - thread boundary: the awaiting stream raises it
                error = exc
            self._busy_since = None
            with self._lock:
                done = self._done.setdefault(loop, [])
                wake = not done  # the first since the loop last took them: one wakeup
                done.append((future, result, error))
            if wake:
                with contextlib.suppress(RuntimeError):  # the loop has closed: nobody awaits
                    loop.call_soon_threadsafe(self._hand_back, loop)

    def _hand_back(self, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop``: resolve every finished job's future."""
        with self._lock:
            done = self._done.pop(loop, [])
        for future, result, error in done:
            if future.cancelled():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
