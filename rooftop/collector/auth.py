"""Auth: every call's credentials, checked before any handler runs; refusals counted.

TLS, or mTLS where a claimed ``agent_id`` must be the client certificate's CN or a
SAN (else PERMISSION_DENIED); and/or a bearer token (``authorization: Bearer …``)
checked in constant time against a token file re-read when it changes (UNAUTHENTICATED).
A read-only token may call ``Query`` but not ``Ingest``; health checks need no token.
Plaintext only with ``insecure``, and a token arriving over plaintext is refused.
Refusals are counted by reason (``rooftop.collector.refused``) and logged once per
peer, including the TLS handshakes the gate (``rooftop.collector.gate``) refused.
"""

from __future__ import annotations

import hmac
import inspect
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeAlias, cast

import grpc

from rooftop.collector.fleet import Fleet
from rooftop.collector.gate import HandshakeReason, Peer
from rooftop.common.errors import ConfigError
from rooftop.common.reloading import ReloadingFile
from rooftop.common.wire import AGENT_ID_METADATA, INGEST_SERVICE

__all__ = [
    "Authenticator",
    "IdentityBindings",
    "PeerLookup",
    "RefuseReason",
    "Refusal",
    "Refusals",
    "TokenFile",
    "direct_peer",
    "peer_of",
]

log = logging.getLogger(__name__)

PeerLookup: TypeAlias = Callable[[str], Peer | None]


def direct_peer(address: str) -> Peer:
    """A call's peer without the TLS gate: its own address, no certificate names."""
    return Peer(address)


def peer_of(peers: PeerLookup, context: grpc.aio.ServicerContext[Any, Any]) -> Peer:
    """Who is behind a call: the gate's record of it, else its own address."""
    address = context.peer()
    return peers(address) or Peer(address)


class RefuseReason(StrEnum):
    """Why a call was refused before any handler ran (the ``rooftop.refuse.reason``)."""

    MISSING_TOKEN = "missing_token"
    BAD_TOKEN = "bad_token"
    READ_ONLY_TOKEN = "read_only_token"  # the read-only token, on Ingest
    TOKEN_OVER_PLAINTEXT = "token_over_plaintext"  # the token travelled in the clear
    IDENTITY_MISMATCH = "identity_mismatch"  # claimed agent_id is not the certificate's
    AGENT_ID_MISMATCH = "agent_id_mismatch"  # agent_id is bound to another certificate
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
        self.refused(peer_of(self._peers, context).address, refusal)
        await context.abort(refusal.code, refusal.message)


class IdentityBindings:
    """Which authenticated identity owns each agent_id: the first to stream it keeps it.

    The identity is a client certificate's names (CN and SANs, as the gate read them):
    a certificate that also names ``node-7`` cannot stream as ``node-7`` once
    ``node-7``'s own certificate has. A renewed certificate with the same names is
    the same identity. A shared bearer token is no identity (every holder presents
    the same one), so token-only modes bind nothing (SECURITY.md, "Sequence numbers
    and agent identity"). Bounded: past ``max_agents`` the least recently streaming
    agent_id is forgotten, in O(1). Used on the ingest loop only.

    Args:
        max_agents: agent_ids remembered.
    """

    def __init__(self, *, max_agents: int = 100_000) -> None:
        self._max_agents = max_agents
        self._owners: OrderedDict[str, frozenset[str]] = OrderedDict()

    def claim(self, agent_id: str, identity: frozenset[str]) -> bool:
        """Whether ``identity`` may stream ``agent_id`` (binding it when it is the first)."""
        if not identity:
            return True  # nobody authenticated: nothing to bind to
        owner = self._owners.get(agent_id)
        if owner is None:
            self._owners[agent_id] = identity
            if len(self._owners) > self._max_agents:
                self._owners.popitem(last=False)
            return True
        if owner != identity:
            return False
        self._owners.move_to_end(agent_id)
        return True

    def __len__(self) -> int:
        return len(self._owners)


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
        self._file = ReloadingFile(
            (path,),
            lambda: _read_tokens(path, key),
            what=f"collector.{key}",
            log=log,
            describe=lambda old, new: f"{len(new)} token(s) accepted",
            level=logging.ERROR,
        )

    def matches(self, authorization: bytes) -> bool:
        """Whether ``authorization`` is ``Bearer <one of the tokens>``."""
        ok = False
        for expected in self._file.get():
            ok |= hmac.compare_digest(authorization, expected)
        return ok


def _read_tokens(path: Path, key: str) -> tuple[bytes, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = (
            f"not UTF-8 text (byte offset {exc.start})"
            if isinstance(exc, UnicodeDecodeError)
            else exc.strerror or str(exc)
        )
        raise ConfigError(f"collector.{key} {path}: unreadable: {reason}") from exc
    tokens = [t.strip() for t in text.splitlines()]
    tokens = [t for t in tokens if t and not t.startswith("#")]
    if not tokens:
        raise ConfigError(f"collector.{key} {path}: holds no token")
    return tuple(f"Bearer {t}".encode() for t in tokens)


# The stubs make these generic; at runtime they are plain classes.
_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
_INGEST_PREFIX = f"/{INGEST_SERVICE}/"
_HEALTH_PREFIX = "/grpc.health.v1.Health/"


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
