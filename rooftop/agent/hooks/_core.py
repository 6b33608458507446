"""The in-engine aggregator behind :mod:`rooftop.agent.hooks`: cheap marks in, summaries out.

Two sides with different rules:

- **The caller's side** (``Request.token`` above all) runs on the engine's own
  thread once per token. It reads a clock and stores two or three attributes: no
  lock, no allocation, no call into anything but the clock. Every method catches
  everything and counts it, because an exception here would kill a generation.
- **The shipper's side** runs on a daemon thread every ``interval_s``. It reads what
  the caller's side stored, turns it into an interval summary (TPOT and TTFT per
  request, tokens, queue depth, and one TPOT / TTFT / duration observation per
  finished request, counted into fixed bucket arrays), and sends it as one
  datagram to the agent's unix socket, non-blocking. No agent listening: the
  summary is dropped and counted.

Why no lock is safe (CPython with the GIL): each attribute store is atomic, and a
thread switch only happens where the interpreter checks its eval breaker (calls,
backward jumps), never between ``self._tokens += n`` and ``self._last_ns = now``.
So the shipper always sees a token count and the timestamp of that same token.
``set.add``/``set.discard``/``set.copy`` and ``deque.append``/``popleft`` are single
C calls and atomic too. On a free-threaded build (3.13t) a torn read can skew one
interval's sample by one token; it never raises.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from rooftop.agent.hooks.wire import (
    REQUEST_DURATION_BOUNDS_S,
    TPOT_BOUNDS_S,
    TTFT_BOUNDS_S,
    HookSummary,
    bucketize,
    encode_summary,
    summarize,
)
from rooftop.common.counters import Counters

__all__ = [
    "DEFAULT_INTERVAL_S",
    "DEFAULT_SOCKET_PATH",
    "ENV_ENGINE_ID",
    "ENV_INTERVAL_S",
    "ENV_GPUS",
    "ENV_MODEL",
    "ENV_SOCKET",
    "Aggregator",
    "HookStats",
    "Request",
]

_log = logging.getLogger("rooftop.hooks")

ENV_SOCKET = "ROOFTOP_HOOK_SOCKET"
ENV_ENGINE_ID = "ROOFTOP_ENGINE_ID"
ENV_MODEL = "ROOFTOP_MODEL"
# Explicit GPU attribution ("0,1"), for when the agent cannot match the engine's pid
# against NVML's process list (containers with their own pid namespace).
ENV_GPUS = "ROOFTOP_ENGINE_GPUS"


def _env_gpus() -> tuple[int, ...]:
    """GPU indices from ``$ROOFTOP_ENGINE_GPUS``; garbage there means no attribution."""
    try:
        return tuple(int(g) for g in os.environ.get(ENV_GPUS, "").split(",") if g.strip())
    except ValueError:
        return ()
ENV_INTERVAL_S = "ROOFTOP_HOOK_INTERVAL_S"
DEFAULT_SOCKET_PATH = "/run/rooftop/hooks.sock"
DEFAULT_INTERVAL_S = 1.0
# Bounds what piles up if the shipper thread cannot run (a stopped process, a
# wedged interpreter): the engine's memory must not grow because we are stuck.
_MAX_PENDING = 65_536
_NS_PER_MS = 1_000_000
# An engine-reported latency above a day is garbage (the agent refuses such samples:
# rooftop.common.model.UPPER_BOUNDS); dropping it here keeps the rest of the summary.
_MAX_LATENCY_S = 86_400.0


@dataclass(frozen=True, slots=True)
class HookStats:
    """What the hook has done so far (cumulative over the process)."""

    sent: int = 0  # summaries handed to the socket
    dropped: int = 0  # summaries that could not be sent: no agent listening, its buffer full
    errors: int = 0  # exceptions caught on the caller's side or in the shipper
    last_error: str | None = None  # the most recent send or internal error, for humans


class Request:
    """One request's marks. Created by :meth:`Aggregator.start_request`; never raises.

    Use ``token()`` once per generated token (or ``token(n)`` for a chunk of ``n``),
    then ``end()``. The first ``token`` call is the first token (TTFT ends there);
    ``first_token()`` is the same call, for readability. A ``Request`` is also a
    context manager that calls ``end()`` on exit.
    """

    __slots__ = (
        "_agg",
        "_clock",
        "_counted",
        "_end_ns",
        "_ended",
        "_first_ns",
        "_first_tokens",
        "_last_ns",
        "_snap_ns",
        "_snap_tokens",
        "_start_ns",
        "_tokens",
        "_ttft_done",
        "sequences",
    )

    def __init__(self, agg: Aggregator, clock_ns: Callable[[], int], sequences: int = 1) -> None:
        self._agg = agg
        self._clock = clock_ns
        # Sequences decoded together in this request (a batched generate call): each
        # step yields one token per sequence, so output tokens = steps x sequences
        # while TPOT is the step time.
        self.sequences = sequences
        self._tokens: int = 0
        self._first_ns: int | None = None
        self._first_tokens: int = 0
        self._last_ns: int = 0
        self._ended = False
        self._end_ns: int = 0
        # Written by the shipper thread only.
        self._snap_ns: int | None = None
        self._snap_tokens: int = 0
        self._counted: int = 0
        self._ttft_done = False
        self._start_ns: int = clock_ns()

    def token(self, n: int = 1) -> None:
        """Mark ``n`` tokens generated now (the hot path: a clock read and two stores)."""
        try:
            now = self._clock()
            self._tokens += n
            if self._first_ns is None:
                self._first_ns = now
                self._first_tokens = self._tokens
            self._last_ns = now
        except Exception:  # noqa: BLE001 - whatever the engine passed, it must not see us fail
            self._agg._note_error("token")

    first_token = token

    def end(self) -> None:
        """Mark the request finished (idempotent)."""
        try:
            if self._ended:
                return
            self._end_ns = self._clock()
            self._ended = True
            agg = self._agg
            agg._active.discard(self)
            agg._finished.append(self)
        except Exception:  # noqa: BLE001 - never raise into the engine
            self._agg._note_error("end")

    def __enter__(self) -> Request:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.end()


class _Collected:
    """Per-interval scratch the shipper fills from the requests it visits."""

    __slots__ = ("duration_s", "req_tpot_s", "req_ttft_s", "tokens", "tpot_ms", "ttft_ms")

    def __init__(self) -> None:
        self.tpot_ms: list[float] = []
        self.ttft_ms: list[float] = []
        self.tokens = 0
        # One value per finished request, for the histograms.
        self.req_tpot_s: list[float] = []
        self.req_ttft_s: list[float] = []
        self.duration_s: list[float] = []


def _finite_nonneg(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def _count_or_none(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _env_interval_s() -> float:
    raw = os.environ.get(ENV_INTERVAL_S)
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        _log.warning(
            "%s=%r is not a positive number; using %s s", ENV_INTERVAL_S, raw, DEFAULT_INTERVAL_S
        )
        return DEFAULT_INTERVAL_S
    return value


def _socket_address(path: str) -> str:
    # "@name" is the Linux abstract namespace (no file, no permissions to manage),
    # handy between containers that share a network namespace but not a /run.
    return "\0" + path[1:] if path.startswith("@") else path


class Aggregator:
    """Aggregates one engine process's marks and ships interval summaries.

    Args:
        engine_id: names this engine to the agent; default ``$ROOFTOP_ENGINE_ID`` or
            ``pid-<pid>``.
        model: the model served, if known; default ``$ROOFTOP_MODEL``.
        gpu_indices: the GPUs this engine uses, when the agent cannot see its pid in
            NVML's process list; default ``$ROOFTOP_ENGINE_GPUS`` ("0,1").
        socket_path: the agent's unix datagram socket; default ``$ROOFTOP_HOOK_SOCKET``
            or ``/run/rooftop/hooks.sock``. ``@name`` means the abstract namespace.
        interval_s: seconds between summaries; default ``$ROOFTOP_HOOK_INTERVAL_S`` or 1.
        clock_ns: monotonic nanosecond clock, injectable for tests.
        wall_clock_s: epoch seconds stamped on summaries (informational).
        autostart: start the shipper thread on the first request. Off in tests that
            drive :meth:`flush` by hand.
    """

    def __init__(
        self,
        *,
        engine_id: str | None = None,
        model: str | None = None,
        gpu_indices: tuple[int, ...] | None = None,
        socket_path: str | None = None,
        interval_s: float | None = None,
        clock_ns: Callable[[], int] = time.perf_counter_ns,
        wall_clock_s: Callable[[], float] = time.time,
        autostart: bool = True,
    ) -> None:
        self._engine_id_given = engine_id or os.environ.get(ENV_ENGINE_ID) or None
        self.pid = os.getpid()
        self.engine_id = self._engine_id_given or f"pid-{self.pid}"
        self.model = model or os.environ.get(ENV_MODEL) or None
        self.gpu_indices = gpu_indices if gpu_indices is not None else _env_gpus()
        self.socket_path = socket_path or os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET_PATH
        if interval_s is None or not (isinstance(interval_s, (int, float)) and interval_s > 0):
            if interval_s is not None:
                _log.warning(
                    "interval_s=%r is not a positive number; using the default", interval_s
                )
            interval_s = _env_interval_s()
        self.interval_s = float(interval_s)
        self._clock = clock_ns
        self._wall = wall_clock_s
        self.autostart = autostart

        # Written by the caller's side.
        self._active: set[Request] = set()
        self._finished: deque[Request] = deque(maxlen=_MAX_PENDING)
        self._tpot_s: deque[object] = deque(maxlen=_MAX_PENDING)
        self._ttft_s: deque[object] = deque(maxlen=_MAX_PENDING)
        self._duration_s: deque[object] = deque(maxlen=_MAX_PENDING)
        self._tokens_added: int = 0
        self._started: int = 0
        self._ended_count: int = 0
        self._running: object = None
        self._waiting: object = None
        self._kv_usage: object = None
        self._counts = Counters(HookStats)

        # The shipper's side.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shut = False
        self._closed = False
        self._sock: socket.socket | None = None
        self._seq = 0
        self._seen_tokens_added = 0
        self._seen_started = 0
        self._seen_ended = 0
        self._last_summary_ns = clock_ns()
        _LIVE.add(self)

    # -- caller's side -------------------------------------------------------------

    def start_request(self, sequences: int = 1) -> Request:
        """Mark a request arriving now and return its :class:`Request`.

        Args:
            sequences: sequences decoded together in this request (batched generate);
                output tokens count ``sequences`` per token mark.

        Returns:
            The request handle (also a context manager).
        """
        req = Request(self, self._clock, sequences)
        try:
            self._active.add(req)
            self._started += 1
            if self._thread is None and self.autostart and not self._shut:
                self.start()
        except Exception:  # noqa: BLE001 - never raise into the engine
            self._note_error("start_request")
        return req

    def add_tokens(self, n: int) -> None:
        """Count ``n`` output tokens not tied to a :class:`Request` (engine-level counters)."""
        try:
            self._tokens_added += n
        except Exception:  # noqa: BLE001 - never raise into the engine
            self._note_error("add_tokens")

    def observe_tpot_s(self, seconds: float) -> None:
        """Record one request's time per output token, measured by the engine itself."""
        self._tpot_s.append(seconds)

    def observe_ttft_s(self, seconds: float) -> None:
        """Record one request's time to first token, measured by the engine itself."""
        self._ttft_s.append(seconds)

    def observe_request_duration_s(self, seconds: float) -> None:
        """Record one finished request's duration (arrival to last token), engine-measured."""
        self._duration_s.append(seconds)

    def set_queue(self, running: int | None = None, waiting: int | None = None) -> None:
        """Report the engine's own queue depth; overrides the count of open requests."""
        self._running = running
        self._waiting = waiting

    def set_kv_cache_usage(self, ratio: float | None) -> None:
        """Report the fraction of KV-cache blocks in use (0-1), where the engine knows it."""
        self._kv_usage = ratio

    def _note_error(self, where: str) -> None:
        # Must not raise either: it runs inside the except clauses above.
        self._counts.add(errors=1)
        self._counts.set(last_error=f"exception in {where}")

    # -- shipper's side ------------------------------------------------------------

    def stats(self) -> HookStats:
        """Counters: summaries sent and dropped, errors swallowed."""
        return self._counts.get()

    def start(self) -> None:
        """Start the shipper thread (idempotent; a no-op after shutdown)."""
        with self._lock:
            if self._thread is not None or self._shut:
                return
            self._stop.clear()
            thread = threading.Thread(target=self._run, name="rooftop-hooks", daemon=True)
            self._thread = thread
        thread.start()

    def flush(self, timeout_s: float = 1.0) -> bool:
        """Build and send a summary now, on the calling thread.

        Args:
            timeout_s: how long to wait for the shipper thread if it is mid-send.

        Returns:
            True when a summary reached the socket; False when it was dropped or
            the shipper did not yield within ``timeout_s``.
        """
        if not self._lock.acquire(timeout=max(0.0, timeout_s)):
            return False
        try:
            return False if self._closed else self._ship_locked()
        finally:
            self._lock.release()

    def shutdown(self, timeout_s: float = 1.0) -> None:
        """Stop the shipper, send a final summary and close the socket (idempotent)."""
        if self._shut:
            return
        self._shut = True
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        self.flush(timeout_s)
        if not self._lock.acquire(timeout=max(0.0, timeout_s)):
            self._closed = True  # a wedged send still holds the lock: leave it the socket
            return
        try:
            self._closed = True
            if self._sock is not None:
                self._sock.close()
                self._sock = None
        finally:
            self._lock.release()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                self._ship_locked()

    def _ship_locked(self) -> bool:
        try:
            data = encode_summary(self._collect())
        except Exception as exc:  # noqa: BLE001 - thread boundary: count, log once, go on
            error = f"building a summary: {exc!r}"
            self._counts.add(errors=1)
            self._counts.set(last_error=error)
            if self._counts.get().errors == 1:
                _log.warning("rooftop hook: %s", error)
            return False
        return self._send(data)

    def _send(self, data: bytes) -> bool:
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # Non-blocking: a slow or wedged agent must never stall the engine;
                # a full receive buffer (EAGAIN) is a drop, like no agent at all.
                sock.setblocking(False)
                # An aggregator dropped without shutdown() still closes its socket.
                weakref.finalize(self, sock.close)
                self._sock = sock
            self._sock.sendto(data, _socket_address(self.socket_path))
        except (OSError, AttributeError) as exc:
            # No listener (ENOENT, ECONNREFUSED), buffer full (EAGAIN), no AF_UNIX on
            # this platform (AttributeError): all the same to the engine.
            self._counts.add(dropped=1)
            self._counts.set(last_error=f"send to {self.socket_path}: {exc}")
            return False
        self._counts.add(sent=1)
        return True

    def _collect(self) -> HookSummary:
        now_ns = self._clock()
        counts = self._counts.get()
        got = _Collected()
        finished: list[Request] = []
        with contextlib.suppress(IndexError):
            while True:
                finished.append(self._finished.popleft())
        active = self._active.copy()
        for req in finished:
            self._visit(req, got)
            self._observe_finished(req, got)
        for req in active:
            self._visit(req, got)
        observed_tpot_s = self._drain_seconds(self._tpot_s)
        observed_ttft_s = self._drain_seconds(self._ttft_s)
        got.tpot_ms.extend(v * 1000.0 for v in observed_tpot_s)
        got.ttft_ms.extend(v * 1000.0 for v in observed_ttft_s)
        got.req_tpot_s.extend(observed_tpot_s)
        got.req_ttft_s.extend(observed_ttft_s)
        got.duration_s.extend(self._drain_seconds(self._duration_s))

        added = self._tokens_added
        if isinstance(added, int) and added >= self._seen_tokens_added:
            got.tokens += added - self._seen_tokens_added
            self._seen_tokens_added = added
        started, self._seen_started = self._started - self._seen_started, self._started
        ended, self._seen_ended = len(finished), self._seen_ended + len(finished)

        running = _count_or_none(self._running)
        if running is None:
            running = len(active)
        kv = _finite_nonneg(self._kv_usage)
        interval_ns, self._last_summary_ns = now_ns - self._last_summary_ns, now_ns
        self._seq += 1
        return HookSummary(
            pid=self.pid,
            engine_id=self.engine_id,
            model=self.model,
            gpu_indices=self.gpu_indices,
            seq=self._seq,
            time_s=float(self._wall()),
            interval_s=max(0.0, interval_ns / 1e9),
            requests_running=running,
            requests_waiting=_count_or_none(self._waiting),
            requests_started=max(0, started),
            requests_finished=ended,
            output_tokens=max(0, got.tokens),
            tpot_ms=summarize(got.tpot_ms),
            ttft_ms=summarize(got.ttft_ms),
            kv_cache_usage_ratio=kv if kv is not None and kv <= 1.0 else None,
            dropped=counts.dropped,
            errors=counts.errors,
            tpot_hist=bucketize(got.req_tpot_s, TPOT_BOUNDS_S),
            ttft_hist=bucketize(got.req_ttft_s, TTFT_BOUNDS_S),
            request_duration_hist=bucketize(got.duration_s, REQUEST_DURATION_BOUNDS_S),
        )

    @staticmethod
    def _drain_seconds(queue: deque[object]) -> list[float]:
        out: list[float] = []
        with contextlib.suppress(IndexError):
            while True:
                value = _finite_nonneg(queue.popleft())
                if value is not None and value <= _MAX_LATENCY_S:
                    out.append(value)
        return out

    def _observe_finished(self, req: Request, got: _Collected) -> None:
        # One observation per finished request, off the caller's thread: the marks it
        # left (start, first and last token, end) are all the histograms need.
        try:
            start_ns, end_ns = req._start_ns, req._end_ns
            if end_ns >= start_ns:
                got.duration_s.append((end_ns - start_ns) / 1e9)
            first_ns = req._first_ns
            if first_ns is None:
                return  # no token: no TTFT, no TPOT
            if first_ns >= start_ns:
                got.req_ttft_s.append((first_ns - start_ns) / 1e9)
            decoded = req._tokens - req._first_tokens
            if decoded > 0 and req._last_ns >= first_ns:
                got.req_tpot_s.append((req._last_ns - first_ns) / decoded / 1e9)
        except Exception:  # noqa: BLE001 - garbage from the caller costs one request
            self._note_error("summarizing a finished request")

    def _visit(self, req: Request, got: _Collected) -> None:
        try:
            first_ns = req._first_ns
            if first_ns is None:
                return
            tokens = req._tokens
            last_ns = req._last_ns
            if not req._ttft_done:
                req._ttft_done = True
                ttft_ms = (first_ns - req._start_ns) / _NS_PER_MS
                if ttft_ms >= 0:
                    got.ttft_ms.append(ttft_ms)
            if req._snap_ns is None:
                req._snap_ns, req._snap_tokens = first_ns, req._first_tokens
            new_tokens = tokens - req._snap_tokens
            elapsed_ns = last_ns - req._snap_ns
            if new_tokens > 0 and elapsed_ns >= 0:
                tpot_ms = elapsed_ns / new_tokens / _NS_PER_MS
                if math.isfinite(tpot_ms):
                    got.tpot_ms.append(tpot_ms)
                req._snap_ns, req._snap_tokens = last_ns, tokens
            fresh = int(tokens - req._counted)
            if fresh > 0:
                seqs = req.sequences if isinstance(req.sequences, int) and req.sequences > 0 else 1
                got.tokens += fresh * seqs
                req._counted = tokens
        except Exception:  # noqa: BLE001 - garbage from the caller costs one request, not the summary
            self._note_error("summarizing a request")


# Live aggregators, for the fork and exit hooks below (weak: they must not keep one alive).
_LIVE: weakref.WeakSet[Aggregator] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child has no shipper thread (threads do not survive fork), possibly a lock
    # held by the parent's shipper, and the parent's requests. Start afresh.
    for agg in list(_LIVE):
        agg._lock = threading.Lock()
        agg._stop = threading.Event()
        agg._thread = None
        agg._sock = None
        agg.pid = os.getpid()
        if agg._engine_id_given is None:
            agg.engine_id = f"pid-{agg.pid}"
        agg._active = set()
        agg._finished.clear()


def _at_exit() -> None:
    # Ship the last partial interval; short timeout so exit is never held up.
    for agg in list(_LIVE):
        with contextlib.suppress(Exception):
            agg.shutdown(timeout_s=0.2)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
