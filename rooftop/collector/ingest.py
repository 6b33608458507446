"""Ingest: the collector's gRPC edge (``rooftop.v1.Ingest/Stream`` plus ``grpc.health.v1``).

One long-lived bidi stream per agent. Each batch carries (agent_id, boot_id, seq):

- **Dedup**: a seq already applied for that (agent_id, boot_id) is counted as a
  duplicate and not applied again (a resend after a lost ack).
- **Cumulative acks**: after applying, the stream acks the highest contiguous seq.
  Acks are coalesced like TCP's delayed acks: one after ``ack_every_batches``
  applied batches, or ``ack_interval_s`` after the first unacked one, whichever
  comes first (per-message acks cost the client 2-3.5x CPU, measured). Keep
  ``ack_every_batches`` below the agent's in-flight window (64) so it never stalls.
- **Auth** (``Authenticator``, before any handler): TLS, or mTLS where ``agent_id``
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
- **Poison** (``fleet.PoisonBatch``: NaN, negative, >100 %, bad enum, no identity)
  is rejected in-band (``Ack.rejected_seq``, ``Ack.error`` starting with
  ``INVALID_ARGUMENT``), counted by reason, and treated as consumed: the stream
  goes on. Skewed clocks are clamped and counted, see ``rooftop.collector.fleet``.
- **Oversized** messages never reach the handler: gRPC refuses them against
  ``max_message_bytes`` with ``RESOURCE_EXHAUSTED``; the server stays healthy.

The aio server runs on its own event loop in a background thread, so ``IngestServer``
has the same synchronous ``start``/``flush``/``shutdown`` shape as every component.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeAlias, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rooftop.agent.stream import AGENT_ID_METADATA
from rooftop.collector.config import CollectorConfig
from rooftop.collector.fleet import BatchObserver, Fleet, PoisonBatch, decode_batch
from rooftop.collector.gate import HandshakeReason, Peer, ServerTls, TlsGate, listen_socket
from rooftop.collector.query import QUERY_SERVICE_NAME, QueryServicer
from rooftop.common.errors import ConfigError
from rooftop.common.reloading import FileSignature, file_signature
from rooftop.v1 import telemetry_pb2 as pb
from rooftop.v1 import telemetry_pb2_grpc

__all__ = [
    "SERVICE_NAME",
    "Authenticator",
    "Deduplicator",
    "IngestServer",
    "IngestServicer",
    "RefuseReason",
    "Refusal",
    "Refusals",
    "TokenFile",
    "server_options",
]

log = logging.getLogger(__name__)

SERVICE_NAME = "rooftop.v1.Ingest"
_HEALTH_PREFIX = "/grpc.health.v1.Health/"
# Acks are tiny; a whole fleet's status (Query) is several MiB for 1,000 nodes.
_MAX_SEND_BYTES = 64 * 1024 * 1024


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
    ) -> None:
        self._fleet = fleet
        self._refusals = refusals
        self._peers = peers or direct_peer
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
        identities = _peer_of(self._peers, context).names if self._require_identity else None
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
                    if item.reason is not None and self._refusals is not None:
                        self._refusals.refused(
                            _peer_of(self._peers, context).address,
                            Refusal(item.reason, item.code, item.details),
                        )
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
        committed: dict[tuple[str, str], int] = {}  # key -> last seq committed on this stream
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
                            RefuseReason.IDENTITY_MISMATCH,
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
        committed: dict[tuple[str, str], int],
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

    def _commit(self, key: tuple[str, str], seq: int, committed: dict[tuple[str, str], int]) -> int:
        # One ordered stream, oldest first: a stream's first seq of a key, or one that
        # jumps past its previous + 1, is where the agent resumed; the seqs in between
        # were dropped by the agent and will never come (a stall otherwise: e2e (d)).
        resumed = committed.get(key, -1) != seq - 1
        contiguous, skipped = self._dedup.commit(key, seq, first_on_stream=resumed)
        committed[key] = seq
        if skipped:
            self._fleet.count_missing(skipped)
        return contiguous


PeerLookup: TypeAlias = Callable[[str], Peer | None]


def direct_peer(address: str) -> Peer:
    """A call's peer without the TLS gate: its own address, no certificate names."""
    return Peer(address)


def _peer_of(peers: PeerLookup, context: grpc.aio.ServicerContext[Any, Any]) -> Peer:
    address = context.peer()
    return peers(address) or Peer(address)


# --- auth ----------------------------------------------------------------------------------


class RefuseReason(StrEnum):
    """Why a call was refused before any handler ran (the ``rooftop.refuse.reason``)."""

    MISSING_TOKEN = "missing_token"
    BAD_TOKEN = "bad_token"
    READ_ONLY_TOKEN = "read_only_token"  # the read-only token, on Ingest
    TOKEN_OVER_PLAINTEXT = "token_over_plaintext"  # the token travelled in the clear
    IDENTITY_MISMATCH = "identity_mismatch"  # claimed agent_id is not the certificate's
    NOT_THROUGH_GATE = "not_through_gate"  # a loopback call around the TLS gate


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused call: the status the client gets, and the reason it is counted under."""

    reason: RefuseReason
    code: grpc.StatusCode
    message: str


class Refusals:
    """Counts refusals (``Fleet.count_refused``) and logs each peer once per reason.

    Calls refused before their handler (``refused``, ``abort``) and TLS handshakes
    the gate refused (``handshake_refused``) alike. Bounded: past ``max_peers`` (peer
    host, reason) pairs the least recently refused is forgotten, so a flood of peers
    costs no memory (a forgotten one may log again).

    Args:
        fleet: where refusals are counted.
        peers: who is behind a call's ``context.peer()`` (the TLS gate's ``peer``).
        max_peers: how many (peer host, reason) pairs are remembered as logged.
    """

    def __init__(
        self, fleet: Fleet, *, peers: PeerLookup | None = None, max_peers: int = 4096
    ) -> None:
        self._fleet = fleet
        self._peers = peers or direct_peer
        self._max_peers = max_peers
        self._logged: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()

    def refused(self, peer: str, refusal: Refusal) -> None:
        """Count ``refusal``; log it unless this peer was refused so already."""
        self._note(peer, refusal.reason.value, f"{refusal.code.name}: {refusal.message}")

    def handshake_refused(self, peer: str, reason: HandshakeReason, detail: str) -> None:
        """Count a TLS handshake the gate refused; log it once per peer and reason."""
        self._note(peer, reason.value, f"TLS handshake: {detail}")

    def _note(self, peer: str, reason: str, what: str) -> None:
        self._fleet.count_refused(reason)
        key = (_peer_host(peer), reason)
        with self._lock:
            if key in self._logged:
                self._logged.move_to_end(key)
                return
            self._logged[key] = None
            if len(self._logged) > self._max_peers:
                self._logged.popitem(last=False)
        log.warning(
            "refused %s (%s): %s [counted; not logged again for this peer and reason]",
            key[0],
            reason,
            what,
        )

    async def abort(self, context: grpc.aio.ServicerContext[Any, Any], refusal: Refusal) -> None:
        """Count, log once, and end the call with the refusal's status (raises)."""
        self.refused(_peer_of(self._peers, context).address, refusal)
        await context.abort(refusal.code, refusal.message)


def _peer_host(peer: str) -> str:
    # "ipv4:10.0.0.7:51234", "ipv6:[::1]:51234": the port changes with every connection.
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


class TokenFile:
    """Bearer tokens from a file, one per line (blank lines and ``#`` comments skipped).

    Every line is accepted, which makes rotation refusal-free: add the new token,
    roll it out to the agents, then remove the old one. The file is re-read when its
    mtime, size or inode changes; unreadable or empty then, the previous tokens stay
    (logged once). Compared in constant time (``hmac.compare_digest``), every token.

    Raises:
        ConfigError: unreadable or empty at construction.
    """

    def __init__(self, path: Path, *, key: str) -> None:
        self._path = path
        self._key = key
        self._sig: FileSignature | None = None
        self._bad_sig: FileSignature | None = None
        self._tokens: tuple[bytes, ...] = ()
        self._lock = threading.Lock()
        self._reload(strict=True)

    def matches(self, authorization: bytes) -> bool:
        """Whether ``authorization`` is ``Bearer <one of the tokens>``."""
        with self._lock:
            self._reload(strict=False)
            tokens = self._tokens
        ok = False
        for expected in tokens:
            ok |= hmac.compare_digest(authorization, expected)
        return ok

    def _reload(self, *, strict: bool) -> None:
        sig = file_signature([self._path])
        if sig == self._sig:
            return
        tokens: list[str] = []
        try:
            text = self._path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problem = f"unreadable: {exc}"
        else:
            tokens = [t.strip() for t in text.splitlines()]
            tokens = [t for t in tokens if t and not t.startswith("#")]
            problem = "" if tokens else "holds no token"
        if problem:
            if strict:
                raise ConfigError(f"collector.{self._key} {self._path}: {problem}")
            if sig != self._bad_sig:
                self._bad_sig = sig
                log.error(
                    "collector.%s changed but %s: keeping the previous tokens", self._key, problem
                )
            return
        if self._sig is not None:
            log.info("collector.%s changed: %d token(s) accepted", self._key, len(tokens))
        self._tokens = tuple(f"Bearer {t}".encode() for t in tokens)
        self._sig = sig


# The stubs make these generic; at runtime they are plain classes.
_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
_INGEST_PREFIX = f"/{SERVICE_NAME}/"


class Authenticator(grpc.aio.ServerInterceptor):
    """Checks every call's credentials before any handler runs.

    - Behind the TLS gate (``peers`` given): a call on a loopback connection the gate
      did not make went around TLS and is refused (UNAUTHENTICATED), health checks
      included.
    - Plaintext server: a call carrying ``authorization`` is refused (the token
      travelled in the clear and must be considered leaked): UNAUTHENTICATED.
    - ``Ingest`` with ``token``: the token must match (UNAUTHENTICATED otherwise; the
      read-only token gets PERMISSION_DENIED). ``Query`` accepts either token. Health
      checks need no token.
    - mTLS: a claimed ``x-rooftop-agent-id`` must be the client certificate's CN or a
      SAN, else PERMISSION_DENIED before the stream's handler starts. (Each batch's
      ``agent_id`` is checked again by ``IngestServicer``.)

    Every refusal is counted by reason and logged once per peer (``Refusals``).
    """

    def __init__(
        self,
        refusals: Refusals,
        *,
        token: TokenFile | None = None,
        read_token: TokenFile | None = None,
        check_identity: bool = False,
        peers: PeerLookup | None = None,
    ) -> None:
        self._refusals = refusals
        self._tls = peers is not None  # TLS is the gate's: no gate, plaintext
        self._token = token
        self._read_token = read_token
        self._check_identity = check_identity
        self._peers = peers

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        """The call's own handler, or one that refuses it with the right status."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if not method.startswith(_HEALTH_PREFIX):
            authorization: bytes | None = None
            claimed: str | None = None
            for key, value in handler_call_details.invocation_metadata or ():
                if key == "authorization":
                    authorization = value.encode() if isinstance(value, str) else value
                elif key == AGENT_ID_METADATA:
                    claimed = (
                        value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                    )
            refusal = self._check_token(method.startswith(_INGEST_PREFIX), authorization)
            if refusal is not None:
                return _guarded(handler, self._refusals, lambda _peer: refusal)
            if self._check_identity and claimed is not None and method.startswith(_INGEST_PREFIX):
                return _guarded(handler, self._refusals, self._identity_check(claimed))
        if self._peers is not None:
            return _guarded(handler, self._refusals, self._gate_check)
        return handler

    def _check_token(self, ingest: bool, authorization: bytes | None) -> Refusal | None:
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        if not self._tls:
            if authorization is None:
                return None
            return Refusal(
                RefuseReason.TOKEN_OVER_PLAINTEXT,
                unauthenticated,
                "a bearer token over plaintext is refused: it travelled in the clear, "
                "rotate it; tokens need TLS",
            )
        full, read = self._token, self._read_token
        if (full is None) if ingest else (full is None and read is None):
            return None  # no token required for this service
        if authorization is None:
            return Refusal(RefuseReason.MISSING_TOKEN, unauthenticated, "missing bearer token")
        if full is not None and full.matches(authorization):
            return None
        if read is not None and read.matches(authorization):
            if not ingest:
                return None
            return Refusal(
                RefuseReason.READ_ONLY_TOKEN,
                grpc.StatusCode.PERMISSION_DENIED,
                "the read-only token may call Query, not Ingest",
            )
        return Refusal(RefuseReason.BAD_TOKEN, unauthenticated, "invalid bearer token")

    def _gate_check(self, address: str) -> Refusal | None:
        if self._peers is None or self._peers(address) is not None:
            return None
        return Refusal(
            RefuseReason.NOT_THROUGH_GATE,
            grpc.StatusCode.UNAUTHENTICATED,
            "this loopback port serves only the collector's TLS gate: connect to the TLS port",
        )

    def _identity_check(self, claimed: str) -> Callable[[str], Refusal | None]:
        def check(address: str) -> Refusal | None:
            peer = self._peers(address) if self._peers is not None else None
            if peer is None and self._peers is not None:
                return self._gate_check(address)
            names = peer.names if peer is not None else frozenset()
            if claimed in names:
                return None
            return Refusal(
                RefuseReason.IDENTITY_MISMATCH,
                grpc.StatusCode.PERMISSION_DENIED,
                f"agent_id {claimed!r} does not match the client certificate "
                f"({', '.join(sorted(names)) or 'no names'})",
            )

        return check


def _guarded(
    handler: _Handler, refusals: Refusals, check: Callable[[str], Refusal | None]
) -> _Handler:
    """``handler`` behind ``check(context.peer())``: a refusal ends the call before it runs.

    The wrapper has the same shape as the behaviour it wraps (coroutine or async
    generator), since grpc.aio picks how to drive a handler by that shape.
    """

    async def gate(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        refusal = check(context.peer())
        if refusal is not None:
            await refusals.abort(context, refusal)

    kind = (handler.request_streaming, handler.response_streaming)
    behavior = {
        (False, False): handler.unary_unary,
        (False, True): handler.unary_stream,
        (True, False): handler.stream_unary,
        (True, True): handler.stream_stream,
    }[kind]
    assert behavior is not None
    # The stubs type behaviours for the sync server; these are grpc.aio's.
    run = cast(Callable[..., Any], behavior)
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await gate(context)
            async for response in run(request, context):
                yield response

        wrapped: Callable[..., Any] = stream
    else:

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await gate(context)
            result = run(request, context)
            return await result if inspect.isawaitable(result) else result

        wrapped = call
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    return make(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


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
        self._fleet = fleet
        tls: ServerTls | None = None
        if config.tls_cert_file is not None and config.tls_key_file is not None:
            tls = ServerTls(
                Path(config.tls_cert_file), Path(config.tls_key_file), config.tls_client_ca_file
            )
        # With TLS the public port is the gate's; gRPC listens on loopback behind it.
        self._gate = (
            TlsGate(tls, lambda *refused: self.refusals.handshake_refused(*refused))
            if tls is not None
            else None
        )
        peers = self._gate.peer if self._gate is not None else None
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
        self._token = (
            TokenFile(Path(config.token_file), key="token_file") if config.token_file else None
        )
        self._read_token = (
            TokenFile(Path(config.read_token_file), key="read_token_file")
            if config.read_token_file
            else None
        )
        self.refusals = Refusals(fleet, peers=peers)
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
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set(QUERY_SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
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
