"""Ingest: the collector's gRPC edge (``rooftop.v1.Ingest/Stream`` plus ``grpc.health.v1``).

One long-lived bidi stream per agent. Each batch carries (agent_id, boot_id, seq):

- **Dedup**: a seq already applied for that (agent_id, boot_id) is counted as a
  duplicate and not applied again (a resend after a lost ack).
- **Cumulative acks**: after applying, the stream acks the highest contiguous seq.
  Acks are coalesced like TCP's delayed acks: one after ``ack_every_batches``
  applied batches, or ``ack_interval_s`` after the first unacked one, whichever
  comes first (per-message acks cost the client 2-3.5x CPU, measured). Keep
  ``ack_every_batches`` below the agent's in-flight window (64) so it never stalls.
- **Auth**: TLS, or mTLS where ``agent_id`` must be the client certificate's CN or a
  SAN (else PERMISSION_DENIED); and/or a bearer token (``authorization: Bearer …``
  metadata) checked in constant time before any handler (UNAUTHENTICATED).
  Health checks need no token. Plaintext only with ``insecure``.
- **Gaps**: an agent sends oldest first on one ordered stream, so when the first
  batch of a (re)connected stream starts past the contiguous seq, the batches in
  between were dropped by the agent's spool: they are skipped and counted
  (``rooftop.collector.missing``) instead of holding the ack back forever. Gaps
  inside a stream wait for a late fill-in, up to ``max_ahead`` batches.
- **Poison** (``fleet.PoisonBatch``: NaN, negative, >100 %, bad enum, no identity)
  is rejected in-band (``Ack.rejected_seq``, ``Ack.error`` starting with
  ``INVALID_ARGUMENT``), counted by reason, and treated as consumed: the stream
  goes on. Skewed clocks are clamped and counted, see ``collector.fleet``.
- **Oversized** messages never reach the handler: gRPC refuses them against
  ``max_message_bytes`` with ``RESOURCE_EXHAUSTED``; the server stays healthy.

The aio server runs on its own event loop in a background thread, so ``IngestServer``
has the same synchronous ``start``/``flush``/``shutdown`` shape as every component.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent.errors import ConfigError
from collector.config import CollectorConfig
from collector.fleet import BatchObserver, Fleet, PoisonBatch, decode_batch
from protos.rooftop.v1 import telemetry_pb2 as pb
from protos.rooftop.v1 import telemetry_pb2_grpc

__all__ = ["SERVICE_NAME", "Deduplicator", "IngestServer", "IngestServicer", "server_options"]

log = logging.getLogger(__name__)

SERVICE_NAME = "rooftop.v1.Ingest"
_HEALTH_PREFIX = "/grpc.health.v1.Health/"


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """The gRPC server options: explicit message limits and a keepalive policy.

    gRPC's default server answers client pings closer than 5 minutes with GOAWAY
    (too_many_pings); agents ping every 30 s (with a 10 s timeout), so the server
    permits pings every 10 s, with or without calls in flight.
    """
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        # The server's own pings find agents that vanished without a FIN.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # Two collectors must not share a port silently.
        ("grpc.so_reuseport", 0),
    ]


# --- dedup ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Seqs:
    contiguous: int = 0  # every seq <= this was applied (or skipped as missing)
    ahead: set[int] = field(default_factory=set)  # applied seqs above a gap
    last_used_s: float = 0.0


class Deduplicator:
    """Which seqs of each (agent_id, boot_id) were applied; pure, single-threaded.

    Args:
        max_ahead: applied seqs kept above a gap before the gap is given up on.
        max_keys: (agent_id, boot_id) pairs remembered; the least recently used go.
        clock: for least-recently-used bookkeeping.
    """

    def __init__(
        self,
        *,
        max_ahead: int = 1024,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_ahead = max_ahead
        self._max_keys = max_keys
        self._clock = clock
        self._keys: dict[tuple[str, str], _Seqs] = {}

    def is_duplicate(self, key: tuple[str, str], seq: int) -> bool:
        """Whether ``seq`` of ``key`` was applied already."""
        st = self._keys.get(key)
        return st is not None and (seq <= st.contiguous or seq in st.ahead)

    def acked(self, key: tuple[str, str]) -> int:
        """The highest contiguous seq applied for ``key`` (0 when none)."""
        st = self._keys.get(key)
        return st.contiguous if st is not None else 0

    def commit(self, key: tuple[str, str], seq: int, *, first_on_stream: bool) -> tuple[int, int]:
        """Record ``seq`` as applied.

        Args:
            key: (agent_id, boot_id).
            seq: the applied (or rejected, hence consumed) seq.
            first_on_stream: no seq of ``key`` was committed on this stream yet: the
                agent resumed from its oldest retained batch.

        Returns:
            (highest contiguous seq, seqs skipped as missing).
        """
        st = self._keys.get(key)
        if st is None:
            if len(self._keys) >= self._max_keys:
                oldest = min(self._keys, key=lambda k: self._keys[k].last_used_s)
                del self._keys[oldest]
            st = self._keys[key] = _Seqs()
        st.last_used_s = self._clock()
        skipped = 0
        if first_on_stream and seq > st.contiguous + 1 and not st.ahead:
            # The agent resumes from its oldest retained batch: what lies between was
            # dropped by its spool (or applied by a collector before a restart).
            skipped = seq - 1 - st.contiguous
            st.contiguous = seq - 1
        if seq == st.contiguous + 1:
            st.contiguous = seq
        elif seq > st.contiguous:
            st.ahead.add(seq)
            if len(st.ahead) > self._max_ahead:
                # The gap will not fill: stop holding every later ack back for it.
                low = min(st.ahead)
                skipped += low - 1 - st.contiguous
                st.contiguous = low - 1
        while st.contiguous + 1 in st.ahead:
            st.contiguous += 1
            st.ahead.discard(st.contiguous)
        return st.contiguous, skipped


# --- servicer ------------------------------------------------------------------------------

_END = object()  # the reader's last word


@dataclass(frozen=True, slots=True)
class _Abort:
    code: grpc.StatusCode
    details: str


class IngestServicer(telemetry_pb2_grpc.IngestServicer):
    """``rooftop.v1.Ingest/Stream``: dedup, validate, apply, ack cumulatively.

    Args:
        fleet: where applied batches go.
        observers: told about every applied batch (OTel histograms); their errors
            are logged, never raised into the stream.
        clock: the collector's wall clock (Unix epoch seconds), for lag and skew.
        ack_every_batches: the most batches applied between two acks.
        ack_interval_s: the longest an applied batch waits for its ack.
        max_future_skew_s: sample times further ahead than this are clamped.
        require_identity: check ``agent_id`` against the client certificate (mTLS).
    """

    def __init__(
        self,
        fleet: Fleet,
        *,
        observers: Sequence[BatchObserver] = (),
        clock: Callable[[], float] = time.time,
        ack_every_batches: int = 32,
        ack_interval_s: float = 0.1,
        max_future_skew_s: float = 300.0,
        require_identity: bool = False,
    ) -> None:
        self._fleet = fleet
        self._observers = tuple(observers)
        self._clock = clock
        self._ack_every = max(1, ack_every_batches)
        self._ack_interval_s = ack_interval_s
        self._max_future_skew_s = max_future_skew_s
        self._require_identity = require_identity
        self._dedup = Deduplicator()

    @property
    def dedup(self) -> Deduplicator:
        """The seq bookkeeping (read by tests and a future query API)."""
        return self._dedup

    async def Stream(  # noqa: N802 - the name is the RPC's
        self,
        request_iterator: AsyncIterator[pb.Batch],
        context: grpc.aio.ServicerContext[pb.Batch, pb.Ack],
    ) -> AsyncIterator[pb.Ack]:
        """One agent's stream: batches in, cumulative acks (and in-band rejections) out."""
        identities = _peer_identities(context) if self._require_identity else None
        out: asyncio.Queue[object] = asyncio.Queue()
        # Reading runs in its own task so batches keep being applied while acks are written.
        reader = asyncio.create_task(self._read(request_iterator, out, identities))
        self._fleet.stream_opened()
        try:
            while True:
                item = await out.get()
                if item is _END:
                    break
                if isinstance(item, _Abort):
                    await context.abort(item.code, item.details)
                yield item  # type: ignore[misc]
        finally:
            reader.cancel()
            self._fleet.stream_closed()

    async def _read(
        self,
        requests: AsyncIterator[pb.Batch],
        out: asyncio.Queue[object],
        identities: frozenset[str] | None,
    ) -> None:
        """Apply batches as they arrive; queue coalesced acks (delayed-ack, like TCP's)."""
        loop = asyncio.get_running_loop()
        committed: set[tuple[str, str]] = set()  # keys committed on this stream
        pending: dict[tuple[str, str], None] = {}  # keys with batches not acked yet
        unacked = 0
        timer: asyncio.TimerHandle | None = None

        def ack() -> None:
            nonlocal timer, unacked
            if timer is not None:
                timer.cancel()
                timer = None
            for key in pending:
                out.put_nowait(pb.Ack(boot_id=key[1], acked_seq=self._dedup.acked(key)))
            pending.clear()
            unacked = 0

        try:
            async for batch in requests:
                if identities is not None and batch.agent_id not in identities:
                    out.put_nowait(
                        _Abort(
                            grpc.StatusCode.PERMISSION_DENIED,
                            f"agent_id {batch.agent_id!r} does not match the client certificate",
                        )
                    )
                    return
                rejection = self._handle(batch, committed, pending)
                if rejection is not None:
                    out.put_nowait(rejection)  # at once: the agent must not resend it
                unacked += 1
                if unacked >= self._ack_every:
                    ack()
                elif timer is None:
                    timer = loop.call_later(self._ack_interval_s, ack)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The client went away or the call failed (e.g. an oversized message): gRPC
            # has set the call's status; ack what was applied and end.
            log.debug("agent stream ended", exc_info=True)
        finally:
            if timer is not None:
                timer.cancel()
        ack()
        out.put_nowait(_END)

    def _handle(
        self,
        batch: pb.Batch,
        committed: set[tuple[str, str]],
        touched: dict[tuple[str, str], None],
    ) -> pb.Ack | None:
        """Apply one batch; an in-band rejection ack when it is poison."""
        key = (batch.agent_id, batch.boot_id)
        received_s = self._clock()
        if batch.agent_id and batch.boot_id and batch.seq:
            touched[key] = None
            if self._dedup.is_duplicate(key, batch.seq):
                self._fleet.count_duplicate()
                return None
        try:
            decoded = decode_batch(
                batch, received_s=received_s, max_future_skew_s=self._max_future_skew_s
            )
        except PoisonBatch as exc:
            self._fleet.count_rejected(exc.reason)
            log.warning(
                "rejected batch %s/%s seq %d: %s", batch.agent_id, batch.boot_id, batch.seq, exc
            )
            acked = 0
            if batch.agent_id and batch.boot_id and batch.seq:
                # Consumed: a poison batch is never applied, and never blocks the ack.
                acked = self._commit(key, batch.seq, committed)
            return pb.Ack(
                boot_id=batch.boot_id,
                acked_seq=acked,
                rejected_seq=batch.seq,
                error=f"INVALID_ARGUMENT: {exc}",
            )
        self._fleet.apply(decoded, received_s=received_s)
        self._commit(key, batch.seq, committed)
        for observer in self._observers:
            try:
                observer.observe_batch(decoded, received_s)
            except Exception:
                # An exporter bug must not take ingest down; the batch is applied.
                log.exception("batch observer %r failed", observer)
        return None

    def _commit(self, key: tuple[str, str], seq: int, committed: set[tuple[str, str]]) -> int:
        contiguous, skipped = self._dedup.commit(key, seq, first_on_stream=key not in committed)
        committed.add(key)
        if skipped:
            self._fleet.count_missing(skipped)
        return contiguous


def _peer_identities(context: grpc.aio.ServicerContext[Any, Any]) -> frozenset[str]:
    auth = context.auth_context()
    names: set[str] = set()
    for prop in ("x509_common_name", "x509_subject_alternative_name"):
        names.update(v.decode("utf-8", "replace") for v in auth.get(prop, ()))
    return frozenset(names)


# --- auth ----------------------------------------------------------------------------------


# The stubs make these generic; at runtime they are plain classes.
_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class _BearerToken(grpc.aio.ServerInterceptor):
    """Refuses calls without the right bearer token before any handler runs.

    Compared in constant time. Health checks are exempt: load balancers and
    Kubernetes probes carry no token.
    """

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_HEALTH_PREFIX):
            return handler
        got = b""
        for k, v in handler_call_details.invocation_metadata or ():
            if k == "authorization":
                got = v.encode() if isinstance(v, str) else v
        if hmac.compare_digest(got, self._expected):
            return handler
        return _denied(handler)


def _denied(handler: _Handler) -> _Handler:
    async def deny(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


def server_credentials(config: CollectorConfig) -> grpc.ServerCredentials | None:
    """TLS (or mTLS, with a client CA) credentials from the config; None for plaintext."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    try:
        cert = Path(config.tls_cert_file).read_bytes()
        key = Path(config.tls_key_file).read_bytes()
        ca = Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else None
    except OSError as exc:
        raise ConfigError(f"collector TLS file unreadable: {exc}") from exc
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def _read_token(config: CollectorConfig) -> str | None:
    if config.token_file is None:
        return None
    try:
        token = Path(config.token_file).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"collector.token_file unreadable: {exc}") from exc
    if not token:
        raise ConfigError(f"collector.token_file {config.token_file} is empty")
    return token


# --- server --------------------------------------------------------------------------------


class IngestServer:
    """The gRPC server (Ingest + health) on its own event loop thread.

    Args:
        fleet: where applied batches go.
        config: listen address, limits, TLS, token, ack policy.
        observers: told about every applied batch.
        clock: wall clock for lag and skew (Unix epoch seconds).
    """

    def __init__(
        self,
        fleet: Fleet,
        config: CollectorConfig,
        *,
        observers: Sequence[BatchObserver] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._credentials = server_credentials(config)
        self._token = _read_token(config)
        if self._credentials is None and not config.insecure:
            raise ConfigError(
                "collector.insecure: no TLS certificate configured; set tls_cert_file and "
                "tls_key_file, or ask for plaintext explicitly (insecure = true, --insecure)"
            )
        self.servicer = IngestServicer(
            fleet,
            observers=observers,
            clock=clock,
            ack_every_batches=config.ack_every_batches,
            ack_interval_s=config.ack_interval_s,
            max_future_skew_s=config.max_future_skew_s,
            require_identity=config.tls_client_ca_file is not None,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._port = 0
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._stopped = False
        self._stop_requested: asyncio.Event | None = None
        self._grace_s = 5.0

    @property
    def port(self) -> int:
        """The bound port (useful with port 0); 0 before ``start``."""
        return self._port

    def start(self) -> int:
        """Bind, start serving, report SERVING; returns the bound port.

        Raises:
            ConfigError: the address cannot be bound.
        """
        if self._thread is not None:
            return self._port
        self._thread = threading.Thread(target=self._run, name="rooftop-ingest", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            raise ConfigError(
                f"collector.listen: cannot serve on {self._config.listen}: {self._error}"
            ) from self._error
        return self._port

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # this thread's own; grpc.aio looks it up
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            # Thread boundary: report to start() (or log when already running).
            if not self._started.is_set():
                self._error = exc
            else:
                log.exception("ingest server failed")
        finally:
            self._started.set()
            # Streams the server cancelled still have tasks winding down: let them end
            # before the loop closes, or asyncio complains that they were destroyed.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        interceptors = [_BearerToken(self._token)] if self._token else []
        server = grpc.aio.server(
            options=server_options(self._config.max_message_bytes), interceptors=interceptors
        )
        telemetry_pb2_grpc.add_IngestServicer_to_server(self.servicer, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if self._credentials is not None:
            port = server.add_secure_port(self._config.listen, self._credentials)
        else:
            port = server.add_insecure_port(self._config.listen)
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        self._server, self._health, self._port = server, health_servicer, port
        self._stop_requested = asyncio.Event()
        self._started.set()
        await self._stop_requested.wait()
        # Graceful: health says NOT_SERVING first, so balancers stop sending new
        # streams, then open streams get ``grace_s`` to finish.
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=self._grace_s)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Nothing to flush: batches are applied and acked as they drain. True."""
        del timeout_s
        return True

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Report NOT_SERVING, let open streams finish for ``timeout_s``, stop. Idempotent."""
        if self._stopped or self._loop is None or self._server is None:
            self._stopped = True
            return
        self._stopped = True
        self._grace_s = timeout_s
        stop = self._stop_requested
        if stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout=timeout_s + 5.0)
            if self._thread.is_alive():
                log.error("ingest server did not stop within %.1f s", timeout_s + 5.0)
