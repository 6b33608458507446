"""Stream: the agent's network edge to the collector (DESIGN §7).

One long-lived bidi ``Ingest.Stream`` per agent::

    spool.pending ──► sender (grpc's request thread) ──► Batch ──► collector
    spool.ack     ◄── reader (the streamer's thread) ◄── Ack   ◄──┘  (cumulative)

``Streamer`` sends what the spool holds, oldest first, at most ``max_in_flight``
unacked; every batch carries the agent's self-metrics in ``Batch.stats``. An
``Ack.rejected_seq`` (a poison batch) is counted and consumed, never resent. An ack
(or rejection) of a seq above any this boot has sent is refused: a collector cannot
have applied it, so it was forged (another agent's ``seq = 2^63``) or the collector
is confused; the spool keeps every batch, the refusal is counted
(``AgentStats.acks_refused``), logged at most once a minute, and the stream is
dropped so the batches go again (to the next collector).

Which collector: ``homing.Homing``. The agent starts at its *home*, the first of
its rendezvous ranking of the collectors (the listed order does not matter; a DNS
name that resolves to several addresses is several collectors, re-resolved every
``resolve_interval_s``). On any failure it moves to the next-ranked collector at
once; after a full round of failures it backs off 1 s × 1.6ⁿ with ±20 % jitter,
capped at 30 s. While away, it probes home with the gRPC health check every
``home_probe_interval_s``; once home has answered SERVING for
``return_home_after_s`` it goes home gracefully: no new batches, a half-close, the
collector's last acks (at most ``drain_timeout_s``), then the stream to home. That
move is not a failure. Delivery is at-least-once up to the spool's capacity.

Every batch also carries ``Batch.acked_seq``: the highest seq of its boot any
collector has acked, so a collector the agent returns to counts the seqs another one
took meanwhile as delivered elsewhere, not missing.

Batch format ``auto`` (``auto_columns``): each stream sends records until its
collector's ack says ``columns``, then columns. The batcher makes columns while the
last ack said the collector reads them (``collector_reads_columns``: through an
outage too, so the spool holds columns then), and the stream turns a batch into what
its collector reads as it sends it (``to_columns``, ``to_records``). A new stream (a
failover, a return home, a reconnect) starts over with records, so a collector too old
to read columns never gets them.

Batches come from ``batcher.Batcher``; what the agent presents (TLS, token) from
``credentials.ClientAuth``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2

from rooftop.agent.batcher import STATS_MAX_BYTES, to_columns, to_records
from rooftop.agent.credentials import ClientAuth, with_tls_name
from rooftop.agent.homing import (
    Endpoint,
    Homing,
    Resolver,
    expand,
    has_names,
    system_resolver,
)
from rooftop.agent.spool import Key, Spool
from rooftop.common.codec import timestamp
from rooftop.common.counters import Counters
from rooftop.common.errors import Rejected, Retryable, StreamError
from rooftop.common.ratelimit import RateLimitedLog
from rooftop.common.wire import AGENT_ID_METADATA, DEFAULT_MAX_MESSAGE_BYTES, INGEST_SERVICE
from rooftop.v1 import telemetry_pb2 as pb
from rooftop.v1 import telemetry_pb2_grpc

__all__ = [
    "StreamStats",
    "Streamer",
    "backoff_delay_s",
    "channel_options",
    "map_grpc_errors",
]

log = logging.getLogger(__name__)


# Transient by nature: reconnect. Everything else means the collector refused us.
_RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


@contextlib.contextmanager
def map_grpc_errors(address: str = "") -> Iterator[None]:
    """Turn ``grpc.RpcError`` into ``Retryable`` or ``Rejected`` (httpx's ``map_exceptions``).

    Raises:
        Retryable: a transient status (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, …).
        Rejected: the collector refused (UNAUTHENTICATED, PERMISSION_DENIED, …).
    """
    try:
        yield
    except grpc.RpcError as exc:
        # Sync calls raise a grpc.Call, aio ones an AioRpcError: both carry a status.
        call = exc if isinstance(exc, (grpc.Call, grpc.aio.AioRpcError)) else None
        code = call.code() if call is not None else grpc.StatusCode.UNKNOWN
        details = call.details() if call is not None else str(exc)
        where = f"{address}: " if address else ""
        message = f"{where}{code.name}: {details or 'no details'}"
        if code in _RETRYABLE_CODES:
            raise Retryable(message) from exc
        raise Rejected(message) from exc


def backoff_delay_s(
    attempt: int,
    *,
    base_s: float = 1.0,
    factor: float = 1.6,
    max_s: float = 30.0,
    jitter: float = 0.2,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before reconnect ``attempt`` (0-based): base × factor^n, jittered, capped.

    Jitter spreads a fleet's reconnects after a collector restart (gRPC's own
    connection-backoff spec uses the same 1 s, 1.6, ±20 %, 120 s; we cap at 30 s).
    """
    delay_s = base_s * factor ** min(attempt, 64)
    spread = (rng or random).uniform(-jitter, jitter)
    return max(0.0, min(max_s, delay_s * (1.0 + spread)))


def channel_options(
    *,
    keepalive_time_s: float,
    keepalive_timeout_s: float,
    max_message_bytes: int,
    connect_timeout_s: float = 10.0,
) -> list[tuple[str, int]]:
    """The client channel options: keepalive (also when idle) and explicit message caps."""
    return [
        # grpc core takes its connect timeout from this (default 20 s): a blackholed
        # address fails over after connect_timeout_s. A refused one fails at once: the
        # stream is fail-fast (no wait_for_ready).
        ("grpc.min_reconnect_backoff_ms", round(connect_timeout_s * 1000)),
        ("grpc.keepalive_time_ms", round(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(keepalive_timeout_s * 1000)),
        # While a flow-control (BDP) ping is outstanding, the keepalive rides on it and
        # grpc waits this long for its ack instead (default 60 s): same timeout for both.
        ("grpc.http2.ping_timeout_ms", round(keepalive_timeout_s * 1000)),
        # A stream waiting for the next batch has no call data in flight; ping anyway,
        # or a silent partition is noticed only by the next write.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # We reconnect and resend ourselves; grpc's transparent retries would reorder.
        ("grpc.enable_retries", 0),
        # No bandwidth-delay probing of what the agent receives: acks, a few bytes each.
        # Each ack otherwise set off a probe ping and its answer, ~9 of the agent's ~40
        # thread wakeups a second at 1 Hz (~0.07 % of a core on a VM). The batches' own
        # flow control is the collector's to size, and it keeps its probes.
        ("grpc.http2.bdp_probe", 0),
    ]


@dataclass(frozen=True, slots=True)
class StreamStats:
    """The streamer's own counters (the spool's are in ``SpoolStats``)."""

    sent: int = 0  # batches written to a stream, resends included
    acked: int = 0  # batches settled by a collector ack
    rejected_batches: int = 0
    dropped_invalid: int = 0  # too large to ever send
    reconnects: int = 0
    acks_refused: int = 0  # acks of seqs never sent: refused, nothing discarded
    failovers: int = 0  # moves to the next-ranked collector after a failure
    ack_timeouts: int = 0  # streams left because no ack came within ack_timeout_s
    returns_home: int = 0  # graceful moves back home after the hysteresis
    home_probes: int = 0  # health checks of home while away
    connected: bool = False
    address: str | None = None  # the collector streamed to now
    home: str | None = None  # the first-ranked collector (rendezvous hashing)


_Call = grpc.aio.StreamStreamCall[pb.Batch, pb.Ack]

# The standard health check (the collector serves it on the ingest port, no token needed).
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"

# A refused ack is logged at most this often (the count says how many in between).
_REFUSAL_LOG_INTERVAL_S = 60.0


class _Session:
    """One stream to one collector: what is in flight on it, and where sending is.

    Used only on the streamer's event loop thread, so it needs no lock.
    """

    def __init__(self, address: str, tls_name: str = "") -> None:
        self.address = address
        self.tls_name = tls_name  # the DNS name the address came from, for TLS
        self.cursor: Key | None = None  # last (boot_id, seq) handed to this stream
        self.progressed = False  # an ack arrived: the collector is healthy
        self.columns = False  # an ack said so: this collector reads Batch.gpu_columns
        self.in_flight: deque[Key] = deque()
        # Set to move elsewhere gracefully (home, or the collector left the DNS
        # answer): no new batches, half-close, take the last acks, end.
        self.leaving = False
        self.drain_deadline: asyncio.Timeout | None = None  # the reader's, while it reads
        # Due while batches are in flight: ack_timeout_s after the last ack, or after
        # the send that found nothing owed (None: nothing owed, nothing due).
        self.ack_deadline: asyncio.Timeout | None = None

    def settled(self, boot_id: str, seq: int, *, only: bool = False) -> None:
        """Forget in-flight keys of ``boot_id`` up to ``seq`` (just ``seq`` with ``only``)."""
        self.in_flight = deque(
            (b, s)
            for b, s in self.in_flight
            if not (b == boot_id and (s == seq if only else s <= seq))
        )


class Streamer:
    """Delivers the spool to a collector over one bidi stream, with failover and backoff.

    The stream runs on ``grpc.aio`` in an event loop of its own thread: the sync API
    wakes every waiting thread 10 times a second, which alone cost ~0.3 % of a core
    idle (measured; the budget for the whole agent at 1 Hz is 0.5 %); aio sleeps.

    Lifecycle: ``start()``, ``flush(timeout_s)`` (wait until the spool is acked),
    ``shutdown(timeout_s)`` (final flush, then close; idempotent).
    """

    def __init__(
        self,
        spool: Spool,
        collectors: Sequence[str],
        *,
        channel_credentials: grpc.ChannelCredentials | None = None,
        auth: ClientAuth | None = None,
        agent_id: str = "",
        keepalive_time_s: float = 30.0,
        keepalive_timeout_s: float = 10.0,
        connect_timeout_s: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_in_flight: int = 64,
        backoff_base_s: float = 1.0,
        backoff_factor: float = 1.6,
        backoff_max_s: float = 30.0,
        poll_interval_s: float = 5.0,
        return_home_after_s: float = 30.0,
        home_probe_interval_s: float = 5.0,
        resolve_interval_s: float = 30.0,
        drain_timeout_s: float = 2.0,
        ack_timeout_s: float = 30.0,
        resolve: Resolver = system_resolver,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        engine_scrape_errors: Callable[[], int] | None = None,
        auto_columns: bool = False,
    ) -> None:
        """Configure; nothing connects until ``start()``.

        Args:
            spool: where batches wait until acked.
            collectors: ``host:port`` addresses, in any order (rendezvous hashing of
                ``agent_id`` ranks them); a DNS name with several addresses is several.
            channel_credentials: TLS/mTLS credentials; None streams in plaintext (the
                caller decides that plaintext was asked for explicitly).
            auth: credentials and token re-read at each (re)connect (rotation);
                overrides ``channel_credentials``.
            agent_id: sent as ``x-rooftop-agent-id`` so the collector checks it
                against the client certificate before any handler runs.
            keepalive_time_s: ping period on the connection (DESIGN: 30 s).
            keepalive_timeout_s: a ping unanswered this long drops the connection.
            connect_timeout_s: give up on an address that does not connect this fast.
            max_message_bytes: explicit send/receive cap; bigger batches are dropped.
            max_in_flight: unacked batches on the stream before the sender waits.
            backoff_base_s: first reconnect delay after a full round of failures.
            backoff_factor: growth of the delay per further round.
            backoff_max_s: cap on the delay.
            poll_interval_s: how often an idle sender looks at the spool even when
                nobody called ``wake()`` (a safety net: appends should wake it).
            return_home_after_s: home must answer every health probe this long
                before the agent leaves another collector for it (hysteresis).
            home_probe_interval_s: how often home is probed while away.
            resolve_interval_s: how often DNS names in ``collectors`` are resolved again.
            drain_timeout_s: the longest a graceful move waits for the last acks.
            ack_timeout_s: batches in flight and no ack for this long: the collector
                is not serving this stream (wedged, or partitioned where keepalive is
                slower), and the agent fails over to the next-ranked one.
            resolve: ``(host, port) -> addresses`` (tests inject one).
            rng: jitter source (tests seed it).
            wall_clock: epoch seconds for ``Batch.sent_time``.
            monotonic: the clock of the return-home hysteresis.
            engine_scrape_errors: failed engine ``/metrics`` scrapes so far, carried
                in-band (``AgentStats.engine_scrape_errors``).
            auto_columns: ``batch_format = "auto"``: send GPU samples as columns on a
                stream once its collector's ack says it reads them (``Ack.columns``).
        """
        if not collectors:
            raise ValueError("at least one collector address is needed")
        self._spool = spool
        self._engine_scrape_errors = engine_scrape_errors
        self._auto_columns = auto_columns
        self._collector_reads_columns = False  # as the last ack said (collector_reads_columns)
        self._collectors = tuple(collectors)
        if any(not address or address.isspace() for address in self._collectors):
            raise ValueError("a collector address is empty")
        has_names(self._collectors)  # ValueError for an address that is not host:port
        self._resolve = resolve
        # Unresolved until the stream thread starts (DNS must not block the caller).
        self._homing = Homing(
            agent_id,
            [Endpoint(address) for address in self._collectors],
            return_after_s=return_home_after_s,
        )
        self._home_probe_interval_s = home_probe_interval_s
        self._resolve_interval_s = resolve_interval_s
        self._drain_timeout_s = drain_timeout_s
        self._ack_timeout_s = ack_timeout_s
        self._monotonic = monotonic
        self._credentials = channel_credentials
        self._auth = auth
        self._agent_id = agent_id
        self._options = channel_options(
            keepalive_time_s=keepalive_time_s,
            keepalive_timeout_s=keepalive_timeout_s,
            max_message_bytes=max_message_bytes,
            connect_timeout_s=connect_timeout_s,
        )
        self._max_message_bytes = max_message_bytes
        self._connect_timeout_s = connect_timeout_s
        self._max_in_flight = max_in_flight
        self._backoff_base_s = backoff_base_s
        self._backoff_factor = backoff_factor
        self._backoff_max_s = backoff_max_s
        self._poll_interval_s = poll_interval_s
        self._rng = rng or random.Random()
        self._wall_clock = wall_clock

        self._stopped = threading.Event()  # for flush's waits, set on shutdown
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None  # loop-side; set via call_soon_threadsafe
        self._session: _Session | None = None
        self._shut = False
        self._counts = Counters(StreamStats)
        # Per boot, the highest seq this process has written to a stream (loop thread).
        self._sent_high: dict[str, int] = {}
        self._refusal_log = RateLimitedLog(log, interval_s=_REFUSAL_LOG_INTERVAL_S)

    # --- lifecycle (any thread) -----------------------------------------------------

    def start(self) -> None:
        """Start streaming in the background (idempotent)."""
        if self._thread is not None or self._shut:
            return
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready,), name="rooftop-stream", daemon=True
        )
        self._thread.start()
        ready.wait(5.0)

    def wake(self) -> None:
        """Tell the sender there is something new in the spool (thread-safe, cheap)."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(wake.set)

    def flush(self, timeout_s: float) -> bool:
        """Wait until every spooled batch is acked; False on timeout."""
        deadline = time.monotonic() + timeout_s
        self.wake()
        while self._spool.queued > 0:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0 or self._thread is None or not self._thread.is_alive():
                return False
            self._stopped.wait(min(0.02, remaining_s))
        return True

    def shutdown(self, timeout_s: float) -> None:
        """Final flush within ``timeout_s``, then close the stream (idempotent)."""
        if self._shut:
            return
        deadline = time.monotonic() + timeout_s
        # Leave a little of the budget to close cleanly.
        self.flush(max(0.0, timeout_s - min(1.0, timeout_s / 4)))
        self._shut = True
        self._stopped.set()
        loop, main = self._loop, self._main
        if loop is not None and main is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(main.cancel)
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                log.warning("stream did not stop within %.1f s", timeout_s)

    @property
    def collector_reads_columns(self) -> bool:
        """Whether the last ack, from whichever collector, said it reads ``gpu_columns``.

        Kept through an outage and a new stream's first moments, so what the batcher
        makes meanwhile is what the collectors have been reading (any thread).
        """
        return self._collector_reads_columns

    # --- counters (any thread) ------------------------------------------------------

    def stats(self) -> StreamStats:
        """A snapshot of the streamer's counters."""
        session = self._session
        return dataclasses.replace(
            self._counts.get(),
            connected=session is not None and session.progressed,
            address=session.address if session is not None else None,
            home=self._homing.home.address,
        )

    def agent_stats(self) -> pb.AgentStats:
        """The self-metrics carried in-band on every batch."""
        spool = self._spool.stats()
        own = self._counts.get()
        return pb.AgentStats(
            queued=spool.queued,
            sent=own.sent,
            acked=own.acked,
            dropped_spool_full=spool.dropped_full,
            dropped_corrupt=spool.dropped_corrupt,
            dropped_invalid=own.dropped_invalid + spool.dropped_invalid,
            reconnects=own.reconnects,
            rejected_batches=own.rejected_batches,
            acks_refused=own.acks_refused,
            engine_scrape_errors=(
                self._engine_scrape_errors() if self._engine_scrape_errors is not None else 0
            ),
        )

    # --- the event loop thread ------------------------------------------------------

    def _thread_main(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._run(ready))
        except Exception:  # thread boundary: nothing should get here; say so if it does
            log.exception("collector stream thread failed")
        finally:
            ready.set()

    async def _run(self, ready: threading.Event) -> None:
        self._wake = asyncio.Event()
        self._main = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        ready.set()
        try:
            await self._connect_loop()
        except asyncio.CancelledError:
            pass  # shutdown
        # grpc hands a closed call's last events to this loop a moment later, through
        # another loop when the process has one (a collector beside us in tests): let
        # them land before asyncio.run closes this one. Shutdown's cancel may land here
        # too, when the stream had already ended on its own: it must not escape.
        end_s = self._loop.time() + 0.1
        while (left_s := end_s - self._loop.time()) > 0:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(left_s)

    async def _connect_loop(self) -> None:
        await self._refresh_endpoints()
        helpers = [asyncio.create_task(self._probe_home_loop())]
        if self._resolve_interval_s > 0 and has_names(self._collectors):
            helpers.append(asyncio.create_task(self._resolve_loop()))
        try:
            await self._deliver()
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    async def _deliver(self) -> None:
        failed_rounds = 0  # full rounds of collectors without a healthy stream
        tried = 0  # collectors failed in this round
        reconnect = False
        while True:
            endpoint = self._homing.current
            if reconnect:
                self._counts.add(reconnects=1)
            reconnect = True
            session = _Session(endpoint.address, endpoint.tls_name)
            try:
                await self._stream(session)
            except StreamError as exc:
                level = logging.ERROR if isinstance(exc, Rejected) else logging.WARNING
                log.log(level, "collector stream: %s", exc)
            except asyncio.CancelledError:
                raise
            except Exception:  # loop boundary: log, reconnect, never die
                log.exception("collector stream to %s failed", endpoint.address)
            if self._stopped.is_set():
                # Shut down, though its cancel may never have reached us: grpc.aio passes
                # it on to the call's _prepare_rpc task, which swallows it when the call
                # has just failed, and the attempt ends in a plain Retryable (seen: a
                # stream that went on reconnecting after shutdown).
                return
            if session.leaving:
                # A chosen move (home, or a collector gone from DNS): not a failure.
                failed_rounds = tried = 0
                reconnect = False
                continue
            if session.progressed:
                failed_rounds = tried = 0
            if self._homing.current != endpoint:
                continue  # re-resolved meanwhile: the new choice, at once
            moved_to = self._homing.failed()
            if moved_to != endpoint:
                self._counts.add(failovers=1)
                log.info("failing over from %s to %s", endpoint.address, moved_to.address)
            tried += 1
            if tried < len(self._homing.ranked):
                continue  # fail over to the next-ranked collector at once
            tried = 0
            delay_s = backoff_delay_s(
                failed_rounds,
                base_s=self._backoff_base_s,
                factor=self._backoff_factor,
                max_s=self._backoff_max_s,
                rng=self._rng,
            )
            failed_rounds += 1
            log.info("reconnecting in %.1f s", delay_s)
            await asyncio.sleep(delay_s)

    @staticmethod
    def _loop_time() -> float:
        """The event loop's clock, which ``asyncio.Timeout`` deadlines are in."""
        return asyncio.get_running_loop().time()

    def _leave(self, why: str) -> None:
        """End the current stream gracefully (loop thread); the next goes to ``current``."""
        session = self._session
        if session is None or session.leaving:
            return
        log.info("leaving collector %s: %s", session.address, why)
        session.leaving = True
        if self._wake is not None:
            self._wake.set()  # the sender stops and half-closes
        if session.drain_deadline is not None and self._loop is not None:
            session.drain_deadline.reschedule(self._loop.time() + self._drain_timeout_s)

    async def _probe_home_loop(self) -> None:
        """While away, probe home; go home once it has been healthy for the hysteresis."""
        while True:
            await asyncio.sleep(self._home_probe_interval_s)
            if not self._homing.away:
                continue
            home = self._homing.home
            healthy = await self._probe(home)
            self._counts.add(home_probes=1)
            if home != self._homing.home or not self._homing.away:
                continue  # re-resolved or moved meanwhile: this answer is about nothing
            if self._homing.probed_home(healthy, self._monotonic()):
                self._homing.go_home()
                self._counts.add(returns_home=1)
                self._leave(f"home {home.address} is healthy again")

    async def _probe(self, endpoint: Endpoint) -> bool:
        """Whether ``endpoint`` answers the gRPC health check SERVING for Ingest."""
        channel = self._channel(endpoint.address, endpoint.tls_name)
        try:
            check = channel.unary_unary(
                _HEALTH_CHECK,
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            response = await check(
                health_pb2.HealthCheckRequest(service=INGEST_SERVICE),
                metadata=self._metadata(),
                timeout=max(0.1, min(self._home_probe_interval_s, self._connect_timeout_s)),
            )
        except (grpc.RpcError, OSError) as exc:
            log.debug("home %s does not answer: %s", endpoint.address, exc)
            return False
        finally:
            await channel.close(grace=None)
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    async def _refresh_endpoints(self) -> None:
        """Resolve the DNS names among the collectors again (off the loop)."""
        loop = asyncio.get_running_loop()
        endpoints = await loop.run_in_executor(None, expand, self._collectors, self._resolve)
        current = self._homing.current
        if self._homing.refresh(endpoints):
            log.info(
                "collectors: %s (home %s)",
                ", ".join(e.address for e in self._homing.ranked),
                self._homing.home.address,
            )
            if self._homing.current != current:
                self._leave(f"{current.address} is no longer among the collectors")

    async def _resolve_loop(self) -> None:
        while True:
            await asyncio.sleep(self._resolve_interval_s)
            try:
                await self._refresh_endpoints()
            except Exception:  # task boundary: keep the collectors we have
                log.exception("re-resolving the collectors failed")

    def _channel(self, address: str, tls_name: str = "") -> grpc.aio.Channel:
        credentials = self._credentials
        # A subchannel of its own per channel: one shared through grpc's global pool
        # may still be in the reconnect backoff of that collector's last failure, and
        # would fail a probe, or the stream home after a good probe, at once.
        options: list[tuple[str, str | int]] = [
            *self._options,
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if self._auth is not None:
            # Per connection: rotated certificates take effect at the next one.
            credentials = self._auth.credentials()
            options += self._auth.options()
        if credentials is not None:
            # An address a DNS name resolved to: the certificate names the name (an
            # explicit server_name still wins).
            options = with_tls_name(options, tls_name)
            return grpc.aio.secure_channel(address, credentials, options=options)
        return grpc.aio.insecure_channel(address, options=options)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        own = ((AGENT_ID_METADATA, self._agent_id),) if self._agent_id else ()
        return own + (self._auth.metadata() if self._auth is not None else ())

    async def _stream(self, session: _Session) -> None:
        """One stream until it breaks (``StreamError``), or until a move (``_leave``).

        A move returns once the collector has acked what it got, or after
        ``drain_timeout_s``.
        """
        channel = self._channel(session.address, session.tls_name)
        sender: asyncio.Task[None] | None = None
        call: _Call | None = None
        try:
            # Fail-fast (no wait_for_ready): a refused address fails over at once.
            call = telemetry_pb2_grpc.IngestStub(channel).Stream(metadata=self._metadata())
            self._session = session
            sender = asyncio.create_task(self._send_loop(session, call))
            try:
                # No deadlines until a send owes an ack (``_send``) or a graceful move
                # sets one (``_leave``).
                async with (
                    asyncio.timeout(None) as session.ack_deadline,
                    asyncio.timeout(None) as session.drain_deadline,
                ):
                    with map_grpc_errors(session.address):
                        while True:
                            ack = await call.read()
                            if not isinstance(ack, pb.Ack):
                                break  # grpc.aio.EOF: the collector ended the stream
                            if not session.progressed:
                                log.info("streaming to collector %s", session.address)
                            self._on_ack(session, ack)
                            if session.leaving and not session.in_flight:
                                break  # everything acked: no need to wait for EOF
            except TimeoutError:
                if not session.leaving:
                    # Connected, maybe even written to, but not served: keepalive would
                    # not notice (the connection answers pings) for as long as it lasts.
                    self._counts.add(ack_timeouts=1)
                    raise Retryable(
                        f"{session.address}: no ack within {self._ack_timeout_s:g} s "
                        f"with {len(session.in_flight)} batch(es) in flight"
                    ) from None
                # The drain took too long: what is unacked goes again, to the next one.
                log.info("left %s with %d batch(es) unacked", session.address,
                         len(session.in_flight))
            if session.leaving:
                return
            raise Retryable(f"{session.address}: the collector closed the stream")
        finally:
            self._session = None
            session.drain_deadline = session.ack_deadline = None
            if sender is not None:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            if call is not None:
                # Let the call finish before the channel (and maybe the loop) goes:
                # grpc delivers late events of a closed loop's calls through another
                # process loop, if there is one (a collector in the same process).
                call.cancel()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await call.code()
            await channel.close(grace=None)

    def _on_ack(self, session: _Session, ack: pb.Ack) -> None:
        boot_id = ack.boot_id or (session.cursor[0] if session.cursor else "")
        sent = max(self._sent_high.get(boot_id, 0), self._spool.sent_before(boot_id))
        if ack.acked_seq > sent and self._spool.is_earlier_run(boot_id):
            # An earlier run's boot: it may have sent more than its spool kept (the
            # unsynced tail a crash lost), so the collector's mark may lie above all
            # we hold of it. Settle what we hold; refusing would resend it forever.
            ack = pb.Ack(
                boot_id=ack.boot_id,
                acked_seq=sent,
                rejected_seq=ack.rejected_seq,
                error=ack.error,
                columns=ack.columns,
            )
        if max(ack.acked_seq, ack.rejected_seq) > sent:
            # Never trust an ack of what was never sent: settling it would discard
            # batches the collector never applied (SECURITY.md, sequence numbers).
            self._refuse_ack(session, boot_id, ack, sent)
            raise Retryable(
                f"{session.address}: acked seq {max(ack.acked_seq, ack.rejected_seq)} "
                f"of boot {boot_id}, above the highest sent ({sent}); batches kept"
            )
        if ack.rejected_seq:
            # Poison: resending cannot help; count it and let it go.
            log.warning(
                "collector %s rejected batch %s/%d: %s",
                session.address,
                boot_id,
                ack.rejected_seq,
                ack.error or "no reason given",
            )
            self._spool.discard(boot_id, ack.rejected_seq)
            session.settled(boot_id, ack.rejected_seq, only=True)
            self._counts.add(rejected_batches=1)
        if ack.acked_seq:
            settled = self._spool.ack(boot_id, ack.acked_seq)
            session.settled(boot_id, ack.acked_seq)
            self._counts.add(acked=settled)
        if ack.columns:
            session.columns = True  # this collector's; the next stream asks again
        self._collector_reads_columns = ack.columns
        session.progressed = True
        if session.ack_deadline is not None:
            # An ack: the collector serves this stream; what is still owed has its time.
            due = self._loop_time() + self._ack_timeout_s if session.in_flight else None
            session.ack_deadline.reschedule(due)
        if self._wake is not None:
            self._wake.set()  # room in flight: the sender may go on

    def _refuse_ack(self, session: _Session, boot_id: str, ack: pb.Ack, sent: int) -> None:
        self._counts.add(acks_refused=1)
        self._refusal_log.log(
            logging.WARNING,
            "ack-refused",
            "collector %s acked seq %d of boot %s, above the highest sent (%d): refused, "
            "nothing discarded (counted in acks_refused)",
            session.address,
            max(ack.acked_seq, ack.rejected_seq),
            boot_id,
            sent,
        )

    async def _send_loop(self, session: _Session, call: _Call) -> None:
        try:
            await self._send(session, call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # task boundary: end the stream so the reader notices
            if not isinstance(exc, (grpc.RpcError, asyncio.InvalidStateError)):
                log.exception("stream sender failed")
            call.cancel()

    async def _send(self, session: _Session, call: _Call) -> None:
        wake = self._wake
        assert wake is not None  # set before any stream starts
        while True:
            wake.clear()  # before looking, so a wake during the look is not lost
            if session.leaving:
                # A graceful move: the collector acks what it has, then ends the call.
                await call.done_writing()
                return
            room = self._max_in_flight - len(session.in_flight)
            batches = self._spool.pending(min(room, 32), after=session.cursor) if room > 0 else []
            if not batches:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_interval_s):
                        await wake.wait()
                continue
            for batch in batches:
                if session.leaving:
                    break
                key = (batch.boot_id, batch.seq)
                session.cursor = key
                if self._auto_columns:
                    # As this collector reads them: the batcher makes columns while the
                    # stream's collector says it reads them, records otherwise, and a
                    # batch sent on another stream than the one it was made for (a
                    # failover, a reconnect, a spool from before) is turned here. An
                    # older collector ignores gpu_columns: its samples would be lost.
                    if session.columns:
                        to_columns(batch, self._max_message_bytes - STATS_MAX_BYTES)
                    else:
                        to_records(batch)
                size_bytes = batch.ByteSize() + STATS_MAX_BYTES
                if size_bytes > self._max_message_bytes:
                    # Would fail the whole stream on every reconnect: drop it, counted.
                    log.error("batch %d is %d bytes, over the message cap", batch.seq, size_bytes)
                    self._spool.discard(*key)
                    self._counts.add(dropped_invalid=1)
                    continue
                deadline = session.ack_deadline
                if deadline is not None and deadline.when() is None:
                    # Nothing was owed: this batch starts the clock.
                    deadline.reschedule(self._loop_time() + self._ack_timeout_s)
                session.in_flight.append(key)
                if batch.seq > self._sent_high.get(batch.boot_id, 0):
                    self._sent_high[batch.boot_id] = batch.seq
                self._counts.add(sent=1)  # before the snapshot: "sent" includes this batch
                batch.stats.CopyFrom(self.agent_stats())
                batch.sent_time.CopyFrom(timestamp(self._wall_clock()))
                # Set here, not in the batcher: a batch is spooled before any ack of it
                # can come, and the spool's ack grows while it waits (other collectors
                # included); like stats, the freshest value is the one at send time.
                # Never above seq - 1 (an ack that landed meanwhile): the collector
                # believes no more than that anyway.
                batch.acked_seq = max(0, min(self._spool.acked(batch.boot_id), batch.seq - 1))
                await call.write(batch)
