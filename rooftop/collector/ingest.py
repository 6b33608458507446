"""Ingest: the collector's gRPC edge (``rooftop.v1.Ingest/Stream`` plus ``grpc.health.v1``).

One long-lived bidi stream per agent. Each batch carries (agent_id, boot_id, seq):

- **Dedup** (``dedup``): a seq already applied for that (agent_id, boot_id) is counted as a
  duplicate and not applied again (a resend after a lost ack); out-of-order seqs are
  each applied once. A seq beyond ``max_seq_jump`` past its boot's mark (or above
  2^40) is rejected in-band (reason ``seq_jump``) and never moves the mark: one
  forged seq must not ack another agent's batches away. With ``state_dir`` the marks
  are kept on disk (``marks``) and acks report only durable marks, so a restart
  applies nothing an agent saw acked.
- **Identity binding** (mTLS): the first client certificate that streams an agent_id
  owns it; another certificate naming it is refused (``agent_id_mismatch``).
- **Cumulative acks**: after applying, the stream acks the highest contiguous seq.
  Acks are coalesced like TCP's delayed acks: one after ``ack_every_batches``
  applied batches, or ``ack_interval_s`` after the first unacked one, whichever
  comes first (per-message acks cost the client 2-3.5x CPU, measured). Keep
  ``ack_every_batches`` below the agent's in-flight window (64) so it never stalls.
- **Auth** (``auth.Authenticator``, before any handler): TLS, or mTLS where ``agent_id``
  must be the client certificate's CN or a SAN (else PERMISSION_DENIED); and/or a
  bearer token (``authorization: Bearer …`` metadata) checked in constant time
  (UNAUTHENTICATED). A read-only token may call ``Query`` but not ``Ingest``. Health
  checks need no token. Plaintext only with ``insecure``, and a token arriving over
  plaintext is refused. Refusals are counted (``rooftop.collector.refused``) and
  logged once per peer. TLS is terminated by the collector's own gate
  (``rooftop.collector.gate``) in front of the gRPC server on loopback, so handshake
  refusals (no client certificate, an unknown CA, an expired certificate) are
  counted and logged the same way. Certificates and token files are re-read when
  they change (``ServerTls``, ``TokenFile``): rotation without a restart.
- **Query**: ``rooftop.v1.Query`` (``rooftop.collector.query``) on the same server and port.
- **Gaps**: an agent sends oldest first on one ordered stream, so when the first
  batch of a (re)connected stream starts past the contiguous seq, the batches in
  between were dropped by the agent's spool: they are skipped and counted
  (``rooftop.collector.missing``) instead of holding the ack back forever. The same
  holds for a jump *inside* a stream (the agent skipped a corrupt or over-cap batch):
  nothing can fill it later, and waiting would stall the agent's in-flight window.
  Skipped seqs at or below the batch's ``acked_seq`` (the agent saw them acked, by
  another collector while it was away) are counted as ``acked_elsewhere`` instead.
- **Columns**: every ack says ``columns`` (this collector reads ``Batch.gpu_columns``),
  so agents with ``batch_format = "auto"`` switch to columns on this stream.
- **Poison** (``fleet.PoisonBatch``: NaN, negative, >100 %, beyond a physical ceiling,
  bad enum, no identity, a time before 2000 or with nanos out of range, an identity
  holding control characters, which never becomes a de-duplication key) is rejected
  in-band (``Ack.rejected_seq``, ``Ack.error`` starting with
  ``INVALID_ARGUMENT``), counted by reason, and treated as consumed: the stream
  goes on. Skewed clocks are clamped and counted, see ``rooftop.collector.fleet``.
- **Oversized** messages never reach the handler: gRPC refuses them against
  ``max_message_bytes`` with ``RESOURCE_EXHAUSTED``; the server stays healthy.
- **Unreadable** messages (not a ``Batch``) end the stream with ``INVALID_ARGUMENT``
  and are counted (``rejected``, ``unreadable``); they used to end it OK, uncounted.
- **Bounded under abuse**: a new agent past ``max_agents`` ends its stream with
  ``RESOURCE_EXHAUSTED`` (nothing applied; retryable), a client that leaves more than
  ``max_unread_acks`` acks unread has its call cancelled, both counted
  (``rooftop.collector.limited``); repeated refusal lines are written once a minute
  per kind (``rooftop.common.ratelimit``).

The aio server runs on its own event loop in a background thread, so ``IngestServer``
has the same synchronous ``start``/``flush``/``shutdown`` shape as every component.
Batches are applied on one more thread (``applier``), in arrival order: the loop only
moves messages and acks, so a busy collector still takes a burst of new streams (a
dead peer's agents) at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rooftop.collector.applier import Applier
from rooftop.collector.auth import (
    Authenticator,
    IdentityBindings,
    PeerLookup,
    Refusal,
    Refusals,
    RefuseReason,
    TokenFile,
    direct_peer,
    peer_of,
)
from rooftop.collector.config import CollectorConfig
from rooftop.collector.dedup import Deduplicator, SeqCheck
from rooftop.collector.fleet import (
    BatchObserver,
    Fleet,
    LimitReason,
    OverLimit,
    PoisonBatch,
    RejectReason,
    check_identity,
    decode_batch,
)
from rooftop.collector.gate import ServerTls, TlsGate, listen_socket
from rooftop.collector.marks import MarkStore
from rooftop.collector.query import QueryServicer
from rooftop.common.errors import ConfigError
from rooftop.common.ratelimit import RateLimitedLog
from rooftop.common.text import printable
from rooftop.common.wire import INGEST_SERVICE, QUERY_SERVICE
from rooftop.v1 import telemetry_pb2 as pb
from rooftop.v1 import telemetry_pb2_grpc

__all__ = ["IngestCredentials", "IngestServer", "IngestServicer", "server_options"]

log = logging.getLogger(__name__)

# Acks are tiny; a whole fleet's status (Query) is several MiB for 1,000 nodes.
_MAX_SEND_BYTES = 64 * 1024 * 1024
# One batch applies in well under a millisecond; one on the apply thread this long has
# wedged it, and every stream's acks wait behind it.
_APPLY_STUCK_S = 10.0


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """The gRPC server options: explicit message limits and a keepalive policy.

    gRPC's default server answers client pings closer than 5 minutes with GOAWAY
    (too_many_pings); agents ping every 30 s (with a 10 s timeout), so the server
    permits pings every 10 s, with or without calls in flight.
    """
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max(max_message_bytes, _MAX_SEND_BYTES)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        # The server's own pings find agents that vanished without a FIN.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # Two collectors must not share a port silently.
        ("grpc.so_reuseport", 0),
    ]


# --- servicer ------------------------------------------------------------------------------

_END = object()  # the reader's last word


@dataclass(frozen=True, slots=True)
class _Abort:
    code: grpc.StatusCode
    details: str
    reason: RefuseReason | None = None  # counted as a refusal


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
        refusals: where an identity refusal is counted and logged.
        peers: who is behind a call's ``context.peer()`` (the TLS gate's ``peer``);
            by default the address itself, with no certificate names.
        max_unread_acks: acks queued for a client that does not read them before its
            stream is closed (memory stays bounded; counted as ``unread_acks``).
        dedup: the seq bookkeeping (a fresh ``Deduplicator`` by default).
        bindings: which certificate identity owns each agent_id (mTLS); the first
            one to stream an agent_id keeps it, another is refused.
        applier: the thread that applies every stream's batches, in arrival order,
            so the event loop stays free to take new streams (``applier``); a new one
            by default.
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
        refusals: Refusals | None = None,
        peers: PeerLookup | None = None,
        dedup: Deduplicator | None = None,
        bindings: IdentityBindings | None = None,
        max_unread_acks: int = 1024,
        applier: Applier | None = None,
    ) -> None:
        self._fleet = fleet
        self._applier = applier if applier is not None else Applier()
        self._max_unread_acks = max_unread_acks
        # A flood of one kind of refusal writes one line a minute, not one per batch.
        self._log = RateLimitedLog(log, interval_s=60.0)
        self._refusals = refusals
        self._peers = peers or direct_peer
        self._observers = tuple(observers)
        self._clock = clock
        self._ack_every = max(1, ack_every_batches)
        self._ack_interval_s = ack_interval_s
        self._max_future_skew_s = max_future_skew_s
        self._require_identity = require_identity
        self._dedup = dedup if dedup is not None else Deduplicator()
        self._bindings = (
            bindings if bindings is not None else IdentityBindings() if require_identity else None
        )

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
        identities = peer_of(self._peers, context).names if self._require_identity else None
        out: asyncio.Queue[object] = asyncio.Queue()
        handler = asyncio.current_task()

        def unread() -> None:
            # The client stopped reading acks: this task is stuck writing one, and every
            # batch it goes on sending would queue another. Cancelling the handler makes
            # gRPC cancel the call (RST_STREAM): the stream closes, nothing more queues.
            self._fleet.count_limited(LimitReason.UNREAD_ACKS)
            self._log.log(
                logging.WARNING,
                "unread_acks",
                "closed the stream of %s: it left %d acks unread (max_unread_acks)",
                peer_of(self._peers, context).address,
                out.qsize(),
            )
            if handler is not None:
                handler.cancel()

        # Reading runs in its own task so batches keep being applied while acks are written.
        agent: list[str] = []  # whose stream this is: learned at its first good batch
        reader = asyncio.create_task(
            self._read(request_iterator, out, identities, unread, agent)
        )
        self._fleet.stream_opened()
        try:
            while True:
                item = await out.get()
                if item is _END:
                    break
                if isinstance(item, _Abort):
                    if item.reason is not None and self._refusals is not None:
                        self._refusals.refused(
                            peer_of(self._peers, context).address,
                            Refusal(item.reason, item.code, item.details),
                        )
                    await context.abort(item.code, item.details)
                yield item  # type: ignore[misc]
        finally:
            reader.cancel()
            self._fleet.stream_closed()
            if agent:
                # Moved to another collector, or down: its series leave this one's export.
                self._fleet.agent_disconnected(agent[0], self._clock())

    async def _read(
        self,
        requests: AsyncIterator[pb.Batch],
        out: asyncio.Queue[object],
        identities: frozenset[str] | None,
        unread: Callable[[], None],
        agent: list[str],
    ) -> None:
        """Apply batches as they arrive; queue coalesced acks (delayed-ack, like TCP's).

        Ends the stream with a status (and counts it) when a message is not a Batch
        (INVALID_ARGUMENT), a new agent finds the collector full (RESOURCE_EXHAUSTED)
        or the client leaves more than ``max_unread_acks`` acks unread (``unread``).
        """
        loop = asyncio.get_running_loop()
        committed: dict[tuple[str, str], int] = {}  # key -> last seq committed on this stream
        pending: dict[tuple[str, str], None] = {}  # keys with batches not acked yet
        unacked = 0
        timer: asyncio.TimerHandle | None = None

        def ack(*, last: bool = False) -> None:
            nonlocal timer, unacked
            if timer is not None:
                timer.cancel()
                timer = None
            waiting = []  # applied, but the mark is not durable yet (state_dir)
            for key in pending:
                acked = self._dedup.acked(key)
                out.put_nowait(pb.Ack(boot_id=key[1], acked_seq=acked, columns=True))
                if acked < self._dedup.contiguous(key):
                    waiting.append(key)
            pending.clear()
            unacked = 0
            if waiting and not last:
                pending.update(dict.fromkeys(waiting))
                timer = loop.call_later(self._ack_interval_s, ack)

        try:
            async for batch in requests:
                if identities is not None and batch.agent_id not in identities:
                    out.put_nowait(
                        _Abort(
                            grpc.StatusCode.PERMISSION_DENIED,
                            f"agent_id {batch.agent_id!r} does not match the client certificate",
                            RefuseReason.IDENTITY_MISMATCH,
                        )
                    )
                    return
                if (
                    identities is not None
                    and self._bindings is not None
                    and not self._bindings.claim(batch.agent_id, identities)
                ):
                    out.put_nowait(
                        _Abort(
                            grpc.StatusCode.PERMISSION_DENIED,
                            f"agent_id {batch.agent_id!r} streams from another client "
                            "certificate already",
                            RefuseReason.AGENT_ID_MISMATCH,
                        )
                    )
                    return
                # Applied on the apply thread: this loop only moves messages, so its
                # turns stay short and new streams are taken meanwhile (applier).
                rejection, keyed = await self._applier.run(
                    functools.partial(self._handle, batch, committed, self._clock())
                )
                if keyed:
                    pending[(batch.agent_id, batch.boot_id)] = None  # owed an ack
                if not agent and rejection is None and _keyable(batch):
                    # Applied (or a duplicate): the fleet knows this agent streams here.
                    agent.append(batch.agent_id)
                    self._fleet.agent_connected(batch.agent_id)
                if rejection is not None:
                    out.put_nowait(rejection)  # at once: the agent must not resend it
                if out.qsize() > self._max_unread_acks:
                    unread()
                    return
                unacked += 1
                if unacked >= self._ack_every:
                    ack()
                elif timer is None:
                    timer = loop.call_later(self._ack_interval_s, ack)
        except asyncio.CancelledError:
            raise
        except DecodeError as exc:
            # Not a Batch at all. Ending with OK would tell the agent all is well.
            self._fleet.count_rejected(RejectReason.UNREADABLE)
            self._log.log(logging.WARNING, RejectReason.UNREADABLE, "unreadable message: %s", exc)
            ack(last=True)
            out.put_nowait(
                _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a rooftop.v1.Batch: {exc}")
            )
            return
        except OverLimit as exc:
            # Nothing of the batch was applied: RESOURCE_EXHAUSTED is retryable, so the
            # agent keeps it and tries again (an agent that went silent frees a place).
            self._log.log(
                logging.WARNING, exc.reason, "refused agent %s: %s", printable(batch.agent_id), exc
            )
            pending[(batch.agent_id, batch.boot_id)] = None  # its mark, as it stands
            ack(last=True)
            out.put_nowait(_Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)))
            return
        except Exception:
            # The client went away or the call failed (e.g. an oversized message): gRPC
            # has set the call's status; ack what was applied and end.
            log.debug("agent stream ended", exc_info=True)
        finally:
            if timer is not None:
                timer.cancel()
        ack(last=True)
        out.put_nowait(_END)

    def _handle(
        self, batch: pb.Batch, committed: dict[tuple[str, str], int], received_s: float
    ) -> tuple[pb.Ack | None, bool]:
        """Apply one batch, on the apply thread.

        Returns:
            An in-band rejection ack when the batch is poison (else None), and whether
            its (agent_id, boot_id) is owed a cumulative ack.
        """
        key = (batch.agent_id, batch.boot_id)
        # An identity that is missing or holds control characters never becomes a key
        # (de-duplication, marks): decode_batch refuses it below, in-band.
        keyed = _keyable(batch)
        if keyed:
            check = self._dedup.check(key, batch.seq)
            if check is SeqCheck.TOO_FAR:
                # Forged or corrupt: applying it would move the mark past every seq the
                # agent will send, acking (so discarding) its batches unapplied.
                self._fleet.count_rejected("seq_jump")
                self._log.log(
                    logging.WARNING,
                    "seq_jump",
                    "rejected batch %s/%s seq %d: beyond the boot's mark + max_seq_jump",
                    printable(batch.agent_id),
                    printable(batch.boot_id),
                    batch.seq,
                )
                rejection = pb.Ack(
                    boot_id=batch.boot_id,
                    rejected_seq=batch.seq,
                    columns=True,
                    error=f"INVALID_ARGUMENT: seq {batch.seq} is more than "
                    f"{self._dedup.max_seq_jump} past this boot's acked seq, or above 2^40",
                )
                return rejection, False
            if check is SeqCheck.DUPLICATE:
                # Applied before a restart, caught by a mark from state_dir: say so.
                restored = batch.seq <= self._dedup.restored_mark(key)
                self._fleet.count_duplicate(restored=restored)
                return None, True
        try:
            decoded = decode_batch(
                batch, received_s=received_s, max_future_skew_s=self._max_future_skew_s
            )
            self._fleet.check_labels(decoded)
        except PoisonBatch as exc:
            self._fleet.count_rejected(exc.reason)
            self._log.log(
                logging.WARNING,
                exc.reason,
                "rejected batch %s/%s seq %d: %s",
                printable(batch.agent_id),
                printable(batch.boot_id),
                batch.seq,
                printable(str(exc)),
            )
            acked = 0
            if keyed:
                # Consumed: a poison batch is never applied, and never blocks the ack.
                self._commit(key, batch.seq, committed, batch.acked_seq)
                acked = self._dedup.acked(key)
            rejection = pb.Ack(
                boot_id=batch.boot_id,
                acked_seq=acked,
                rejected_seq=batch.seq,
                columns=True,
                error=f"INVALID_ARGUMENT: {exc}",
            )
            return rejection, keyed
        self._fleet.apply(decoded, received_s=received_s)
        self._commit(key, batch.seq, committed, batch.acked_seq)
        for observer in self._observers:
            try:
                observer.observe_batch(decoded, received_s)
            except Exception:
                # An exporter bug must not take ingest down; the batch is applied.
                log.exception("batch observer %r failed", observer)
        return None, keyed

    def _commit(
        self,
        key: tuple[str, str],
        seq: int,
        committed: dict[tuple[str, str], int],
        acked_seq: int = 0,
    ) -> None:
        # One ordered stream, oldest first: a stream's first seq of a key, or one that
        # jumps past its previous + 1, is where the agent resumed; the seqs in between
        # were dropped by the agent and will never come (a stall otherwise: e2e (d)),
        # or, up to the batch's acked_seq, another collector acked them meanwhile.
        # acked_seq is the agent's word, so it only moves a count (dedup.commit).
        resumed = committed.get(key, -1) != seq - 1
        done = self._dedup.commit(key, seq, first_on_stream=resumed, acked_seq=acked_seq)
        committed[key] = seq
        if done.missing:
            self._fleet.count_missing(done.missing)
        if done.acked_elsewhere:
            self._fleet.count_acked_elsewhere(done.acked_elsewhere)


def _keyable(batch: pb.Batch) -> bool:
    """Whether ``batch``'s identity may key de-duplication (``fleet.check_identity``)."""
    try:
        check_identity(batch)
    except PoisonBatch:
        return False
    return True


# --- server --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IngestCredentials:
    """The collector's TLS files and token files, loaded (and re-read when they change)."""

    tls: ServerTls | None
    token: TokenFile | None
    read_token: TokenFile | None

    @classmethod
    def load(cls, config: CollectorConfig) -> IngestCredentials:
        """What the collector checks before it listens; ``agentctl config check`` too.

        The certificate must load with its key (and the client CA parse), every token
        file must be readable and hold a token; plaintext only when asked for, and
        never with a token.

        Raises:
            ConfigError: naming the key and the file.
        """
        tls: ServerTls | None = None
        if config.tls_cert_file is not None and config.tls_key_file is not None:
            tls = ServerTls(
                Path(config.tls_cert_file), Path(config.tls_key_file), config.tls_client_ca_file
            )
        if tls is None and not config.insecure:
            raise ConfigError(
                "collector.insecure: no TLS certificate configured; set tls_cert_file and "
                "tls_key_file, or ask for plaintext explicitly (insecure = true, --insecure)"
            )
        if tls is None and (config.token_file or config.read_token_file):
            raise ConfigError(
                "collector.token_file: a bearer token needs TLS (tls_cert_file and "
                "tls_key_file); over plaintext it would travel in the clear"
            )
        token = (
            TokenFile(Path(config.token_file), key="token_file") if config.token_file else None
        )
        read_token = (
            TokenFile(Path(config.read_token_file), key="read_token_file")
            if config.read_token_file
            else None
        )
        return cls(tls, token, read_token)


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
        self._fleet = fleet
        credentials = IngestCredentials.load(config)
        tls = credentials.tls
        # With TLS the public port is the gate's; gRPC listens on loopback behind it.
        self._gate = (
            TlsGate(
                tls,
                lambda *refused: self.refusals.handshake_refused(*refused),
                max_connections=config.max_connections,
                max_handshakes=config.max_handshakes,
            )
            if tls is not None
            else None
        )
        peers = self._gate.peer if self._gate is not None else None
        self._token = credentials.token
        self._read_token = credentials.read_token
        self.refusals = Refusals(fleet, peers=peers)
        dedup = Deduplicator(max_seq_jump=config.max_seq_jump)
        # With a state directory, acks wait for durable marks: a restart re-applies nothing.
        self.marks = MarkStore(config.state_dir, dedup) if config.state_dir is not None else None
        self._applier = Applier()
        self.servicer = IngestServicer(
            fleet,
            observers=observers,
            clock=clock,
            ack_every_batches=config.ack_every_batches,
            ack_interval_s=config.ack_interval_s,
            max_future_skew_s=config.max_future_skew_s,
            require_identity=config.tls_client_ca_file is not None,
            refusals=self.refusals,
            peers=peers,
            dedup=dedup,
            max_unread_acks=config.max_unread_acks,
            applier=self._applier,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._port = 0
        self._loopback_port = 0
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._stopped = False
        self._stop_requested: asyncio.Event | None = None
        self._grace_s = 5.0

    @property
    def port(self) -> int:
        """The bound port (useful with port 0); 0 before ``start``."""
        return self._port

    @property
    def loopback_port(self) -> int:
        """With TLS, gRPC's own port on 127.0.0.1 behind the gate (else 0)."""
        return self._loopback_port

    def start(self) -> int:
        """Bind, start serving, report SERVING; returns the bound port.

        Raises:
            ConfigError: the address cannot be bound.
        """
        if self._thread is not None:
            return self._port
        if self.marks is not None:
            self.marks.load()  # before any stream: a resend of an acked seq is a duplicate
            self.marks.start()
        self._applier.start()
        self._thread = threading.Thread(target=self._run, name="rooftop-ingest", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            self._applier.close()
            if self.marks is not None:
                self.marks.shutdown()
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
        gate = self._gate
        # Bound first, so a taken or bad address fails start() before anything runs.
        public = listen_socket(self._config.listen) if gate is not None else None
        authenticator = Authenticator(
            self.refusals,
            token=self._token,
            read_token=self._read_token,
            check_identity=self._config.tls_client_ca_file is not None,
            peers=gate.peer if gate is not None else None,
        )
        server = grpc.aio.server(
            options=server_options(self._config.max_message_bytes), interceptors=[authenticator]
        )
        telemetry_pb2_grpc.add_IngestServicer_to_server(self.servicer, server)
        query = QueryServicer(self._fleet, acked=self.servicer.dedup.acked)
        telemetry_pb2_grpc.add_QueryServicer_to_server(query, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if gate is not None and public is not None:
            try:
                self._loopback_port = server.add_insecure_port("127.0.0.1:0")
                await server.start()
                port = await gate.start(public, self._loopback_port)
            except BaseException:
                public.close()
                raise
        else:
            port = server.add_insecure_port(self._config.listen)
            await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set(INGEST_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set(QUERY_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self._server, self._health, self._port = server, health_servicer, port
        self._stop_requested = asyncio.Event()
        self._started.set()
        await self._stop_requested.wait()
        # Graceful: health says NOT_SERVING first, so balancers stop sending new
        # streams, then open streams get ``grace_s`` to finish.
        await health_servicer.enter_graceful_shutdown()
        if gate is not None:
            gate.stop_accepting()
        await server.stop(grace=self._grace_s)
        if gate is not None:
            await gate.close()

    def health_problem(self, *, ready: bool, timeout_s: float = 1.0) -> str | None:
        """Why ingest is not live (with ``ready``: not ready), in a few words; None if it is.

        Live: its event loop thread runs and runs a callback within ``timeout_s`` (a
        wedged loop accepts and acks nothing), and the apply thread runs, not stuck on
        one batch for ``_APPLY_STUCK_S``. Ready: live, serving, not shutting down.
        For Kubernetes' probes (``/healthz``, ``/readyz``); safe from any thread.
        """
        loop, thread = self._loop, self._thread
        if self._server is None or loop is None or thread is None:
            return "ingest not started"
        if not thread.is_alive() or loop.is_closed() or not self._applier.alive:
            return "ingest stopped"
        busy_s = self._applier.busy_s()
        if busy_s > _APPLY_STUCK_S:
            return f"ingest apply thread has been on one batch for {busy_s:.1f} s"
        if ready and self._stopped:
            return "ingest shutting down"
        answered = threading.Event()
        try:
            loop.call_soon_threadsafe(answered.set)
        except RuntimeError:  # closed between the check and the call
            return "ingest stopped"
        if not answered.wait(timeout_s):
            return f"ingest event loop did not answer within {timeout_s:g} s"
        return None

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Make the dedup marks durable (with ``state_dir``); batches apply as they drain."""
        return self.marks.flush(timeout_s) if self.marks is not None else True

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Report NOT_SERVING, let open streams finish for ``timeout_s``, stop. Idempotent."""
        if self._stopped or self._loop is None or self._server is None:
            self._stopped = True
            self._applier.close(timeout_s)
            if self.marks is not None:
                self.marks.shutdown()
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
        self._applier.close(timeout_s)  # the last streams' batches are applied
        if self.marks is not None:
            self.marks.shutdown()  # SIGTERM: the last marks are durable before exit
