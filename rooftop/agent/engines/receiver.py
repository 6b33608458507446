"""The agent's end of the hook socket: datagrams from engines in, EngineSamples out.

Engines running :mod:`rooftop.agent.hooks` send one JSON summary per interval to a unix
datagram socket (protocol: :mod:`rooftop.agent.hooks.wire`). ``HookReceiver`` binds it
and keeps the samples until the agent's window takes them with ``drain()``. Malformed
or impossible datagrams are counted and dropped; nothing an engine sends can stop the
receiver.

Who reads the socket: the sampler, once per tick (``receive()``), and a thread of the
receiver's own as a backstop. The kernel holds at most ``net.unix.max_dgram_qlen`` + 1
datagrams on the socket (10 + 1 by default, and in every new network namespace; 512 + 1
where systemd's sysctl defaults apply), whatever its buffer size; a datagram sent to a
full queue is dropped at the engine (counted there: the hooks never block). So the
thread wakes for every datagram until it knows the arrival rate ``r``, then only once
the socket has gone unread for half the queue's worth, ``(max_dgram_qlen + 1) / 2 / r``
seconds (0.69 s for 8 engines a second on a queue of 11): while the sampler reads it
more often than that, the thread finds it read and sleeps on. A pass that finds the
queue (nearly) full raises ``r`` at once; a flood (the queue's half in under 50 ms) or
a trickle (under one datagram in 5 s) is read per datagram again.

The backstop's pass only takes datagrams off the socket, each stamped with the time it
was read; they are decoded into samples where samples are taken (``receive()``,
``drain()``, ``flush()``, ``stats()``): in the sampler's tick, the summaries of all
engines one after the other, rather than a few at a time in a thread woken for them
with cold caches. Read per datagram, the thread decodes each as it comes.
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

__all__ = ["HookReceiver", "ReceiverStats", "kernel_queue_datagrams", "summary_to_sample"]

_log = logging.getLogger(__name__)

# The longest one wakeup reads datagrams before it looks at the stop flag again. The
# thread itself waits untimed: a datagram or shutdown()'s byte on the wake pipe ends
# the wait (a 0.2 s poll tick cost five idle wakeups a second).
_POLL_S = 0.2
# The longest the sampler's receive() reads before its tick goes on (a flood waits
# for the thread, not the GPUs' samples).
_RECEIVE_S = 0.05
# The socket is read before this share of the kernel's datagram queue can have filled.
_QUEUE_SHARE = 0.5
# Bounds of the backstop's wait: shorter and a timer is no safer than per datagram
# (a flood); longer and the traffic is so sparse that waking per datagram is cheaper.
_MIN_HOLD_S = 0.05
_MAX_HOLD_S = 5.0
# The arrival rate is measured over windows of at least this long.
_RATE_WINDOW_S = 1.0
_MAX_DGRAM_QLEN = Path("/proc/sys/net/unix/max_dgram_qlen")
_DEFAULT_MAX_DGRAM_QLEN = 10  # the kernel's own default, and any new netns's


def kernel_queue_datagrams(path: Path = _MAX_DGRAM_QLEN) -> int:
    """How many datagrams the kernel queues on a unix datagram socket before senders get EAGAIN.

    It is ``net.unix.max_dgram_qlen`` + 1 (the kernel refuses once the queue is longer
    than the sysctl), for sockets created in this process's network namespace; SO_RCVBUF
    does not raise it. Unreadable: the kernel's default, 10 + 1.
    """
    try:
        qlen = int(path.read_text().strip())
    except (OSError, ValueError):
        qlen = _DEFAULT_MAX_DGRAM_QLEN
    return max(1, qlen + 1)


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
        time_s: when the agent took it off the socket (the agent's clock, not the
            engine's): in the daemon at the latest at the start of the next tick.

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
        queue_datagrams: how many datagrams the kernel queues on the socket; default
            :func:`kernel_queue_datagrams` (tests set it).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        clock: Callable[[], float] = time.time,
        *,
        max_samples: int = _DEFAULT_MAX_SAMPLES,
        socket_mode: int = 0o666,
        queue_datagrams: int | None = None,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        self._queue_datagrams = queue_datagrams or kernel_queue_datagrams()
        self._clock = clock
        self._mode = socket_mode
        self._samples: deque[EngineSample] = deque()
        self._max_samples = max_samples
        # Read off the socket, not yet decoded: (time read, datagram), at most max_samples.
        self._raw: deque[tuple[float, bytes]] = deque()
        self._lock = threading.Lock()  # samples, raw datagrams and engines
        self._counts = Counters(ReceiverStats)
        self._io_lock = threading.Lock()  # reading the socket: the thread or flush()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._shut = False
        self._engines: set[tuple[str, int]] = set()
        # Read passes (under _io_lock): when the socket was last read, and the arrival
        # rate (datagrams/s; None until measured) that sets the thread's wait.
        self._last_read_s = time.monotonic()
        self._rate_per_s: float | None = None
        self._window_start_s = self._last_read_s
        self._window_datagrams = 0

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
            # Bytes for bursts (~1 kB per summary); the kernel bounds the queue in
            # datagrams too (kernel_queue_datagrams), which this does not raise.
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
            hold_s = self.hold_s()
            try:
                fd = sock.fileno()
                if hold_s is None:  # per datagram: a datagram ends the wait
                    readable, _, _ = select.select([fd, self._wake_r], [], [])
                else:  # the backstop: only shutdown() ends the wait early
                    timeout_s = max(0.0, self._last_read_s + hold_s - time.monotonic())
                    readable, _, _ = select.select([self._wake_r], [], [], timeout_s)
            except (OSError, ValueError) as exc:  # ValueError: closed under select()
                if not self._stop.is_set():
                    _log.warning("hook receiver: %s; stopping", exc)
                return
            if hold_s is None and fd not in readable:
                continue
            with self._io_lock:
                # The sampler may have read it meanwhile: then wait from that read.
                if hold_s is None or time.monotonic() >= self._last_read_s + hold_s:
                    self._read_queued(sock, deadline=time.monotonic() + _POLL_S)
            if hold_s is None:
                # Per datagram (a flood, a trickle, a rate not yet known): decoded here as
                # they come, so a flood's decoding never lands in one tick of the sampler.
                self._decode_raw()

    def hold_s(self) -> float | None:
        """How long the socket may go unread now; None: read each datagram as it comes."""
        rate = self._rate_per_s
        if rate is None or rate * _MAX_HOLD_S < 1.0:
            return None  # not measured yet, or a trickle
        hold_s = _QUEUE_SHARE * self._queue_datagrams / rate
        return None if hold_s < _MIN_HOLD_S else min(hold_s, _MAX_HOLD_S)

    def _read_queued(self, sock: socket.socket, deadline: float) -> None:
        """Take datagrams off the socket until none is queued (or the deadline).

        Each is stamped with the time it was read; ``_decode_raw`` decodes them. The
        caller holds _io_lock.
        """
        read = 0
        raw, clock = self._raw, self._clock
        overflowed = 0
        while time.monotonic() < deadline:
            try:
                data = sock.recv(MAX_DATAGRAM_BYTES + 1)
            except OSError:  # BlockingIOError: nothing left queued; or closed
                break
            read += 1
            with self._lock:
                if len(raw) >= self._max_samples:  # nobody takes samples: keep the newest
                    raw.popleft()
                    overflowed += 1
                raw.append((clock(), data))
        if overflowed:
            with self._lock:
                self._counts.add(received=overflowed, overflowed=overflowed)
        self._note_pass(read)

    def _decode_raw(self) -> None:
        """Turn the datagrams read so far into samples, oldest first (any thread)."""
        if not self._raw:
            return
        with self._lock:
            raw = self._raw
            while raw:
                now_s, data = raw.popleft()
                try:
                    self._handle(data, now_s)
                except Exception:  # noqa: BLE001 - one bad datagram, not the receiver
                    _log.exception("hook receiver: unexpected error handling a datagram")

    def _note_pass(self, read: int) -> None:
        """Update the arrival rate after a read pass; caller holds _io_lock."""
        now_s = time.monotonic()
        since_s = now_s - self._last_read_s
        self._last_read_s = now_s
        # A (nearly) full queue: engines started, datagrams were perhaps refused. Read
        # sooner at once, not after a window. (A burst that fits is no reason: engines
        # started together send together, and reading more often would not help.)
        if read >= self._queue_datagrams - 1 and since_s > 0:
            self._rate_per_s = max(self._rate_per_s or 0.0, read / since_s)
        self._window_datagrams += read
        window_s = now_s - self._window_start_s
        if window_s >= _RATE_WINDOW_S:
            measured = self._window_datagrams / window_s
            # Slower: halfway per window, so a lull between bursts does not stretch the wait.
            self._rate_per_s = (
                measured if self._rate_per_s is None
                else max(measured, (self._rate_per_s + measured) / 2)
            )  # fmt: skip
            self._window_start_s, self._window_datagrams = now_s, 0

    def _handle(self, data: bytes, now_s: float) -> None:
        """One datagram read at ``now_s`` into a sample, or counted; caller holds _lock."""
        # One counter update per datagram, with its outcome (each add copies the stats);
        # under self._lock, so stats() never sees "received" without the outcome.
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
        # The lock makes flush() also wait for datagrams the thread is taking off the
        # socket; what anyone has taken is decoded below (_decode_raw).
        if not self._io_lock.acquire(timeout=max(0.0, timeout_s)):
            self._decode_raw()
            return
        try:
            self._read_queued(sock, deadline)
        finally:
            self._io_lock.release()
        self._decode_raw()

    def receive(self) -> None:
        """Read what is queued on the socket now (the sampler's tick, before its clock).

        Samples are stamped when read, so a tick that reads before it reads its clock
        gives them a time at or before its own, as when the thread read them. Bounded:
        a flood is left to the thread after ``_RECEIVE_S``.
        """
        self.flush(timeout_s=_RECEIVE_S)

    def drain(self) -> list[EngineSample]:
        """Take the samples received since the last drain, oldest first."""
        self._decode_raw()
        with self._lock:
            out = list(self._samples)
            self._samples.clear()
        return out

    def stats(self) -> ReceiverStats:
        """Counters of what was received, accepted and dropped."""
        self._decode_raw()
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
