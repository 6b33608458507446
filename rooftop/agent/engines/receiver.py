"""The agent's end of the hook socket: datagrams from engines in, EngineSamples out.

Engines running :mod:`rooftop.agent.hooks` send one JSON summary per interval to a unix
datagram socket (protocol: :mod:`rooftop.agent.hooks.wire`). ``HookReceiver`` binds it,
decodes on its own thread, and keeps the samples until the agent's window takes
them with ``drain()``. Malformed or impossible datagrams are counted and dropped;
nothing an engine sends can stop the receiver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rooftop.agent.hooks.wire import MAX_DATAGRAM_BYTES, Buckets, HookSummary, decode_summary
from rooftop.common.counters import Counters
from rooftop.common.errors import ConfigError
from rooftop.common.model import EMPTY_HISTOGRAM, EngineSample, HistogramDelta, invalid_reason

__all__ = ["HookReceiver", "ReceiverStats", "summary_to_sample"]

_log = logging.getLogger(__name__)

# The longest one wakeup reads datagrams before it looks at the stop flag again. The
# thread itself waits untimed: a datagram or shutdown()'s byte on the wake pipe ends
# the wait (a 0.2 s poll tick cost five idle wakeups a second).
_POLL_S = 0.2
# Ten minutes of 1 Hz summaries from 16 engines: the window drains far more often.
_DEFAULT_MAX_SAMPLES = 10_000


@dataclass(frozen=True, slots=True)
class ReceiverStats:
    """What the receiver has seen (cumulative)."""

    received: int = 0  # datagrams read
    accepted: int = 0  # turned into samples
    malformed: int = 0  # not a valid summary (bad JSON, wrong version, wrong types)
    invalid: int = 0  # well-formed but impossible (model.invalid_reason)
    overflowed: int = 0  # oldest samples dropped because nobody drained
    engines: int = 0  # distinct (engine_id, pid) seen


def _delta(buckets: Buckets | None) -> HistogramDelta | None:
    if buckets is None:
        return None  # a hook from before per-request histograms
    if buckets.count == 0:
        return EMPTY_HISTOGRAM  # measured, no request finished: no bounds to carry
    return HistogramDelta(buckets.bounds_s, buckets.bucket_counts, buckets.sum_s, buckets.count)


def summary_to_sample(summary: HookSummary, time_s: float) -> EngineSample:
    """Turn a decoded hook summary into the agent's ``EngineSample``.

    Args:
        summary: one engine interval summary.
        time_s: when the agent received it (the agent's clock, not the engine's).

    Returns:
        The sample; latency fields are None when the interval had no sample.
    """
    tpot, ttft = summary.tpot_ms, summary.ttft_ms
    return EngineSample(
        time_s=time_s,
        engine_id=summary.engine_id,
        requests_running=summary.requests_running,
        requests_waiting=summary.requests_waiting,
        tpot_ms=tpot.mean if tpot else None,
        ttft_ms=ttft.mean if ttft else None,
        output_tokens=summary.output_tokens,
        pid=summary.pid or None,
        gpu_indices=summary.gpu_indices,
        model=summary.model,
        tpot_p50_ms=tpot.p50 if tpot else None,
        tpot_p99_ms=tpot.p99 if tpot else None,
        ttft_p50_ms=ttft.p50 if ttft else None,
        ttft_p99_ms=ttft.p99 if ttft else None,
        tpot_hist=_delta(summary.tpot_hist),
        ttft_hist=_delta(summary.ttft_hist),
        request_duration_hist=_delta(summary.request_duration_hist),
    )


class HookReceiver:
    """Binds the hook socket and collects ``EngineSample``s for the agent's window.

    Args:
        socket_path: filesystem path of the unix datagram socket (``@name`` for the
            Linux abstract namespace). A stale socket file left by a dead agent is
            replaced; a live one, or a non-socket file, is a ``ConfigError``.
        clock: epoch-seconds clock stamped on each sample at receipt.
        max_samples: samples kept between drains; beyond it the oldest go (counted).
        socket_mode: permissions of the socket file. Default 0o666: engines often run
            as another user than the agent, and all they can send is validated
            telemetry; tighten it (0o660 plus a shared group) where that matters.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        clock: Callable[[], float] = time.time,
        *,
        max_samples: int = _DEFAULT_MAX_SAMPLES,
        socket_mode: int = 0o666,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        self._clock = clock
        self._mode = socket_mode
        self._samples: deque[EngineSample] = deque()
        self._max_samples = max_samples
        self._lock = threading.Lock()  # samples and engines
        self._counts = Counters(ReceiverStats)
        self._io_lock = threading.Lock()  # reading the socket: the thread or flush()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._shut = False
        self._engines: set[tuple[str, int]] = set()

    @property
    def _abstract(self) -> bool:
        return self.socket_path.startswith("@")

    def start(self) -> None:
        """Bind the socket and start the receiving thread (idempotent).

        Raises:
            ConfigError: the path is taken by a live agent or a non-socket file, or
                cannot be created.
        """
        if self._thread is not None or self._shut:
            return
        self._sock = self._bind()
        # shutdown() writes here so the thread leaves select() at once, not after a tick.
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="rooftop-hook-receiver", daemon=True)
        self._thread.start()

    def _bind(self) -> socket.socket:
        path = self.socket_path
        if self._abstract:
            address = "\0" + path[1:]
        else:
            address = path
            self._clear_stale(Path(path))
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(
                    f"hook socket {path}: cannot create its directory: {exc}"
                ) from exc
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(address)
            if not self._abstract:
                os.chmod(path, self._mode)
            # Room for bursts while the thread is descheduled (~400 B per summary).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            # Non-blocking, waited on with select(): the thread and flush() both read it.
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"hook socket {path}: cannot bind: {exc}") from exc
        return sock

    @staticmethod
    def _clear_stale(path: Path) -> None:
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return
        except OSError as exc:  # a file where a directory should be, no permission
            raise ConfigError(f"hook socket {path}: {exc}") from exc
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"hook socket {path}: exists and is not a socket; not touching it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            path.unlink(missing_ok=True)  # nobody bound: left behind by a dead agent
            return
        finally:
            probe.close()
        raise ConfigError(f"hook socket {path}: another process is receiving on it")

    def _run(self) -> None:
        sock = self._sock
        while sock is not None and not self._stop.is_set():
            try:
                fd = sock.fileno()
                readable, _, _ = select.select([fd, self._wake_r], [], [])
            except (OSError, ValueError) as exc:  # ValueError: closed under select()
                if not self._stop.is_set():
                    _log.warning("hook receiver: %s; stopping", exc)
                return
            if fd in readable:
                with self._io_lock:
                    self._read_queued(sock, deadline=time.monotonic() + _POLL_S)

    def _read_queued(self, sock: socket.socket, deadline: float) -> None:
        """Handle datagrams until none is queued (or the deadline); caller holds _io_lock."""
        while time.monotonic() < deadline:
            try:
                data = sock.recv(MAX_DATAGRAM_BYTES + 1)
            except OSError:  # BlockingIOError: nothing left queued; or closed
                return
            try:
                self._handle(data)
            except Exception:  # noqa: BLE001 - thread boundary: one bad datagram, not the receiver
                _log.exception("hook receiver: unexpected error handling a datagram")

    def _handle(self, data: bytes) -> None:
        now_s = self._clock()
        # One counter update per datagram, with its outcome (each add copies the stats);
        # under self._lock, so stats() never sees "received" without the outcome.
        with self._lock:
            try:
                summary = decode_summary(data)
            except ValueError as exc:
                self._counts.add(received=1, malformed=1)
                if self._counts.get().malformed == 1:
                    _log.warning("hook receiver: malformed datagram (%s); counting the rest", exc)
                return
            sample = summary_to_sample(summary, now_s)
            # decode_summary has checked the histograms by the same rules: not twice.
            if invalid_reason(sample, histograms=False) is not None:
                self._counts.add(received=1, invalid=1)
                return
            self._engines.add((summary.engine_id, summary.pid))
            overflowed = 0
            if len(self._samples) >= self._max_samples:
                self._samples.popleft()
                overflowed = 1
            self._samples.append(sample)
            self._counts.add(received=1, accepted=1, overflowed=overflowed)

    def flush(self, timeout_s: float = 1.0) -> None:
        """Process every datagram already queued on the socket before returning.

        Args:
            timeout_s: upper bound on the time spent.
        """
        sock = self._sock
        if sock is None:
            return
        deadline = time.monotonic() + max(0.0, timeout_s)
        # The lock makes flush() also wait for a datagram the thread has already
        # taken off the socket but not yet turned into a sample.
        if not self._io_lock.acquire(timeout=max(0.0, timeout_s)):
            return
        try:
            self._read_queued(sock, deadline)
        finally:
            self._io_lock.release()

    def drain(self) -> list[EngineSample]:
        """Take the samples received since the last drain, oldest first."""
        with self._lock:
            out = list(self._samples)
            self._samples.clear()
        return out

    def stats(self) -> ReceiverStats:
        """Counters of what was received, accepted and dropped."""
        with self._lock:
            return dataclasses.replace(self._counts.get(), engines=len(self._engines))

    def shutdown(self, timeout_s: float = 1.0) -> None:
        """Stop receiving, process what is queued, remove the socket file (idempotent)."""
        if self._shut:
            return
        self._shut = True
        self._stop.set()
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join(timeout_s)
            os.close(self._wake_r)
            os.close(self._wake_w)
        self.flush(timeout_s=min(timeout_s, 0.5))
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            if not self._abstract:
                with contextlib.suppress(OSError):
                    os.unlink(self.socket_path)

    def __enter__(self) -> HookReceiver:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
