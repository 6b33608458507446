"""The TLS gate: the collector's public port, where TLS ends and refusals start.

gRPC's own TLS ends a bad handshake (no client certificate, an unknown CA, an
expired certificate) inside its C core, before any call exists: grpcio's Python API
has no hook there, so such a refusal could be neither counted nor logged. The gate
terminates TLS itself (``ssl`` on asyncio), on the ingest server's event loop:

- a handshake that fails is classified (``HandshakeReason``), counted and logged
  once per peer and reason through the same ``on_refused`` as every other refusal;
  a connection that closes before sending a byte (a TCP health probe, a port scan)
  is not a refusal and is only debug-logged;
- a handshake that succeeds opens one plaintext connection to the gRPC server on
  loopback and relays bytes both ways with flow control (HTTP/2 frames, pings and
  GOAWAY pass through untouched);
- each relayed connection is registered by its loopback source port, so the gRPC
  side learns who is really calling (``peer``): the remote address and the client
  certificate's CN and SANs. A loopback connection the gate did not make is
  unknown, and ``auth.Authenticator`` refuses it.

Certificates are re-read when their files change (``ServerTls``): each new
connection's handshake uses the current set; established ones keep their session.

Bounded under abuse: past ``max_handshakes`` handshakes in progress or
``max_connections`` connections open, a new connection is closed at once and
counted (``tls_handshake_limit``, ``tls_connection_limit``); a handshake that fails
frees its TLS state at once (not at the next full gc) and the heap freed by a burst
of them goes back to the OS (``malloc_trim``), so RSS falls after a flood.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from rooftop.common.errors import ConfigError
from rooftop.common.reloading import ReloadingFile

__all__ = [
    "HandshakeReason",
    "Peer",
    "ServerTls",
    "TlsGate",
    "classify_handshake_error",
    "grpc_peer",
    "listen_socket",
]

log = logging.getLogger(__name__)

# A handshake must finish within this, or the connection is refused (and counted):
# slow or stalled handshakes otherwise hold sockets and memory.
HANDSHAKE_TIMEOUT_S = 10.0
# Connections open at once (handshaking or relayed), and TLS handshakes in progress at
# once: past either a new connection is closed at once and counted. A handshake in
# progress holds ~320 KB (asyncio's 256 KiB TLS read buffer and OpenSSL's state).
MAX_CONNECTIONS = 4096
MAX_HANDSHAKES = 128
# After handshakes end, hand the freed heap back to the OS this much later (once for a
# burst): glibc keeps freed memory otherwise, and RSS would stay at the flood's peak.
_TRIM_DELAY_S = 1.0
# Bytes buffered towards one side before reading from the other pauses.
_HIGH_WATER_BYTES = 1024 * 1024

# OpenSSL X509_V_ERR_* codes, as ``SSLCertVerificationError.verify_code``.
_EXPIRED = 10  # CERT_HAS_EXPIRED
_NOT_YET_VALID = 9  # CERT_NOT_YET_VALID
_UNKNOWN_ISSUER = {
    2,  # UNABLE_TO_GET_ISSUER_CERT
    18,  # DEPTH_ZERO_SELF_SIGNED_CERT
    19,  # SELF_SIGNED_CERT_IN_CHAIN
    20,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    7,  # CERT_SIGNATURE_FAILURE
}


class HandshakeReason(StrEnum):
    """Why a TLS handshake was refused (the ``rooftop.refuse.reason``)."""

    NO_CLIENT_CERT = "tls_no_client_cert"
    UNKNOWN_CA = "tls_unknown_ca"  # not signed by tls_client_ca_file
    CERT_EXPIRED = "tls_cert_expired"
    CERT_NOT_YET_VALID = "tls_cert_not_yet_valid"
    BAD_CERT = "tls_bad_cert"  # any other verification failure
    NOT_TLS = "tls_not_tls"  # plaintext (or another protocol) on the TLS port
    PEER_REJECTED = "tls_peer_rejected"  # the client refused *our* certificate (alert)
    ABANDONED = "tls_handshake_abandoned"  # hung up mid-handshake (often: distrusts us)
    TIMEOUT = "tls_handshake_timeout"
    FAILED = "tls_handshake_failed"  # anything else (protocol version, ciphers, ALPN)
    CONNECTION_LIMIT = "tls_connection_limit"  # max_connections open: closed at once
    HANDSHAKE_LIMIT = "tls_handshake_limit"  # max_handshakes in progress: closed at once


def classify_handshake_error(exc: BaseException) -> HandshakeReason:
    """The reason a server-side handshake failed (after the client sent something).

    A hang-up without a TLS alert is ``ABANDONED``: gRPC's client, for one, closes
    silently when it does not trust the server's certificate.
    """
    if isinstance(exc, TimeoutError):
        return HandshakeReason.TIMEOUT
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code == _EXPIRED:
            return HandshakeReason.CERT_EXPIRED
        if code == _NOT_YET_VALID:
            return HandshakeReason.CERT_NOT_YET_VALID
        if code in _UNKNOWN_ISSUER:
            return HandshakeReason.UNKNOWN_CA
        return HandshakeReason.BAD_CERT
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionError):
        return HandshakeReason.ABANDONED
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "NO_CERTIFICATE_RETURNED"):
            return HandshakeReason.NO_CLIENT_CERT
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST"):
            return HandshakeReason.NOT_TLS
        if reason.startswith(("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_")):
            return HandshakeReason.PEER_REJECTED
        if reason == "UNEXPECTED_EOF_WHILE_READING":
            return HandshakeReason.ABANDONED
        return HandshakeReason.FAILED
    return HandshakeReason.FAILED


def describe_handshake_error(exc: BaseException) -> str:
    """The handshake failure in one line, for the log (no traceback)."""
    if isinstance(exc, TimeoutError):
        return "no TLS handshake in time"
    if classify_handshake_error(exc) is HandshakeReason.ABANDONED:
        return "the client hung up mid-handshake (does it trust this collector's CA?)"
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"client certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return str(exc) or type(exc).__name__


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a call.

    Attributes:
        address: the remote address as gRPC writes it (``ipv4:10.0.0.7:51234``).
        names: the client certificate's CN and SANs (empty without mTLS).
    """

    address: str
    names: frozenset[str] = frozenset()


def grpc_peer(sockaddr: Any) -> str:
    """A socket address in gRPC's peer notation: ``ipv4:H:P`` or ``ipv6:[H]:P``."""
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        host, port = sockaddr[0], sockaddr[1]
        if ":" in host:
            return f"ipv6:[{host}]:{port}"
        return f"ipv4:{host}:{port}"
    return f"unix:{sockaddr}"


def certificate_names(cert: dict[str, Any] | None) -> frozenset[str]:
    """A verified peer certificate's subject CN and every SAN value (DNS, IP, URI, …)."""
    if not cert:
        return frozenset()
    names: set[str] = set()
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.add(value)
    for _kind, value in cert.get("subjectAltName", ()):
        names.add(value)
    return frozenset(names)


def listen_socket(listen: str, *, backlog: int = 1024) -> socket.socket:
    """A bound, listening TCP socket for ``HOST:PORT`` (``[::]`` is dual-stack).

    Raises:
        OSError: the address cannot be resolved or bound.
    """
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]")
    port = int(port_text)
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host in ("::", ""):
            # "[::]" means every interface, IPv4 too, as it does for gRPC.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ServerTls:
    """The collector's certificate, key and client CA, re-read when they change.

    ``context()`` is asked before every new connection's handshake. When a file
    changed (mtime, size or inode) the set is read and checked (the key must match
    the certificate, the CA must parse) before it is used; a set that fails is
    logged once and the current one stays. Established connections keep their session.

    Raises:
        ConfigError: the files are unusable at construction.
    """

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self.mutual = client_ca_file is not None
        self._file = ReloadingFile(
            (cert_file, key_file, client_ca_file),
            lambda: _server_context(cert_file, key_file, client_ca_file),
            what="collector TLS files",
            log=log,
            describe=lambda old, new: f"reloaded ({cert_file}); new handshakes use them",
            level=logging.ERROR,
        )

    def context(self) -> ssl.SSLContext:
        """The SSL context for the next handshake: a new one when the files changed."""
        return self._file.get()


def _server_context(cert: Path, key: Path, ca: Path | None) -> ssl.SSLContext:
    # ssl's own errors do not say which file: name the key and the path first.
    files = {"tls_cert_file": cert, "tls_key_file": key, "tls_client_ca_file": ca}
    for name, path in files.items():
        if path is not None:
            try:
                with path.open("rb"):
                    pass
            except OSError as exc:
                raise ConfigError(
                    f"collector.{name} {path}: cannot read: {exc.strerror or exc}"
                ) from exc
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Raises on a key that does not match the certificate (a half-done rotation);
    # the empty password makes an encrypted key an error instead of a prompt.
    try:
        context.load_cert_chain(cert, key, password="")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"collector.tls_key_file {key} does not match tls_cert_file {cert}"
            ) from exc
        raise ConfigError(
            f"collector.tls_cert_file {cert} and tls_key_file {key}: not a PEM certificate "
            f"and its unencrypted key ({exc.reason or exc})"
        ) from exc
    # gRPC clients insist on HTTP/2 by ALPN.
    context.set_alpn_protocols(["h2"])
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"collector.tls_client_ca_file {ca}: no PEM CA certificate ({exc.reason or exc})"
            ) from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _drop_tracebacks(exc: BaseException | None) -> None:
    """Clear the tracebacks of ``exc`` and its causes, so their frames can be freed now."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__context__ or exc.__cause__


def _libc_malloc_trim() -> Callable[[int], int] | None:
    # glibc only (musl and others have no malloc_trim): elsewhere, nothing to call.
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_malloc_trim = _libc_malloc_trim()


class _Relay(asyncio.Protocol):
    """One end of a relayed connection; what it receives goes to ``other``'s transport.

    Flow control: when this end's transport buffers too much (``pause_writing``),
    reading from the other end pauses until it drains.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Relay | None = None
        self.on_lost: Callable[[], None] | None = None
        self._pending: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.attach(transport)  # type: ignore[arg-type]

    def attach(self, transport: asyncio.Transport) -> None:
        """Adopt a transport made elsewhere (``loop.start_tls`` makes no connection_made)."""
        self.transport = transport
        transport.set_write_buffer_limits(high=_HIGH_WATER_BYTES)

    def link(self, other: _Relay) -> None:
        """Relay to ``other`` from now on; what arrived before goes first."""
        self.other = other
        pending, self._pending = self._pending, []
        for data in pending:
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is None or other.transport is None:
            self._pending.append(data)
            return
        other.transport.write(data)

    def eof_received(self) -> bool:
        self.close()  # HTTP/2 has no half-close: one side done means both are
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.on_lost is not None:
            self.on_lost()
        if self.other is not None:
            self.other.close()

    def close(self) -> None:
        """Close both ends (buffered data is still written)."""
        for end in (self, self.other):
            if end is not None and end.transport is not None and not end.transport.is_closing():
                end.transport.close()

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


class _Paused(asyncio.Protocol):
    """A connection's first protocol: reading paused until ``start_tls`` takes over."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Paused before the event loop can deliver the ClientHello here, where it
        # would be lost: start_tls resumes reading once its own protocol is in place.
        transport.pause_reading()  # type: ignore[attr-defined]


class TlsGate:
    """Terminates TLS on the public port and relays to a gRPC server on loopback.

    Args:
        tls: the certificate set (``ServerTls``).
        on_refused: called with (peer address, reason, detail) for every refused
            handshake, on the event loop.
        handshake_timeout_s: a handshake not done by then is refused.
        max_connections: connections open at once (handshaking or relayed); past it
            a new one is closed and refused as ``tls_connection_limit``.
        max_handshakes: TLS handshakes in progress at once; past it a new one is
            closed and refused as ``tls_handshake_limit``.
    """

    def __init__(
        self,
        tls: ServerTls,
        on_refused: Callable[[str, HandshakeReason, str], None],
        *,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        max_handshakes: int = MAX_HANDSHAKES,
    ) -> None:
        self._tls = tls
        self._on_refused = on_refused
        self._handshake_timeout_s = handshake_timeout_s
        self._max_connections = max_connections
        self._max_handshakes = max_handshakes
        self._in_handshake = 0  # connections inside start_tls now
        self._trim: asyncio.TimerHandle | None = None
        self._backend_port = 0
        self._peers: dict[str, Peer] = {}  # "ipv4:127.0.0.1:PORT" of our own relay → who
        self._handshakes: set[asyncio.Task[None]] = set()
        self._relays: set[_Relay] = set()
        self._sock: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self.port = 0

    def peer(self, grpc_peer_address: str) -> Peer | None:
        """Who is behind a gRPC call's ``context.peer()``; None if not relayed by the gate."""
        return self._peers.get(grpc_peer_address)

    @property
    def connections(self) -> int:
        """Relayed connections open now."""
        return len(self._peers)

    async def start(self, sock: socket.socket, backend_port: int) -> int:
        """Serve on ``sock`` (see ``listen_socket``), relaying to 127.0.0.1:``backend_port``.

        Returns the bound port.
        """
        self._backend_port = backend_port
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._acceptor = asyncio.get_running_loop().create_task(self._accept_loop(sock))
        return self.port

    async def _accept_loop(self, sock: socket.socket) -> None:
        # Our own accept loop, not loop.create_server: a connection has to be peeked
        # at (``_first_byte``) before any transport owns its socket.
        loop = asyncio.get_running_loop()
        while True:
            problem: OSError | None = None
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                problem = exc
            if problem is not None:  # EMFILE and friends: back off rather than spin
                log.error("TLS gate: accept failed: %s", problem)
                await asyncio.sleep(0.1)
                continue
            if len(self._handshakes) + len(self._peers) >= self._max_connections:
                self._refuse_now(conn, HandshakeReason.CONNECTION_LIMIT, "max_connections")
                continue
            task = loop.create_task(self._handle(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    def _refuse_now(self, conn: socket.socket, reason: HandshakeReason, setting: str) -> None:
        """Close a connection a bound refuses, before any TLS state exists for it."""
        try:
            address = grpc_peer(conn.getpeername())
        except OSError:
            address = "unknown"
        conn.close()
        self._on_refused(address, reason, f"{setting} reached: connection closed")

    def _release_memory(self) -> None:
        """Soon hand freed heap back to the OS (glibc keeps it otherwise); once per burst."""
        malloc_trim = _malloc_trim
        if self._trim is None and malloc_trim is not None:

            def trim() -> None:
                self._trim = None
                malloc_trim(0)

            self._trim = asyncio.get_running_loop().call_later(_TRIM_DELAY_S, trim)

    async def _first_byte(self, conn: socket.socket) -> bool:
        """Wait for the client to send something; False if it closed without a byte.

        Load balancers, the kubelet's tcpSocket probe and port scans connect and
        close: that is not a refused handshake. Peeking leaves the bytes in the
        socket for the handshake.

        Raises:
            TimeoutError: nothing arrived within the handshake timeout.
        """
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(conn.fileno(), wake)
        try:
            await asyncio.wait_for(readable, self._handshake_timeout_s)
        finally:
            loop.remove_reader(conn.fileno())
        try:
            return bool(conn.recv(1, socket.MSG_PEEK))
        except (BlockingIOError, InterruptedError):
            return True  # a spurious wake-up: let the handshake find out
        except OSError:
            return False  # reset before a byte

    async def _handle(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        try:
            address = grpc_peer(conn.getpeername())
        except OSError:  # already gone
            conn.close()
            return
        client = _Relay()
        raw: asyncio.Transport | None = None
        try:
            if not await self._first_byte(conn):
                log.debug("%s closed the connection without a byte (a TCP probe)", address)
                conn.close()
                return
            if self._in_handshake >= self._max_handshakes:
                self._refuse_now(conn, HandshakeReason.HANDSHAKE_LIMIT, "max_handshakes")
                return
            # Counted before the first await: connections checked meanwhile see it.
            self._in_handshake += 1
            try:
                raw, _ = await loop.connect_accepted_socket(_Paused, conn)
                # Our own deadline (asyncio's ends in a ConnectionAbortedError, which
                # would read as a client that hung up).
                tls = await asyncio.wait_for(
                    loop.start_tls(
                        raw,
                        client,
                        self._tls.context(),
                        server_side=True,
                        ssl_handshake_timeout=2 * self._handshake_timeout_s,
                    ),
                    self._handshake_timeout_s,
                )
            finally:
                self._in_handshake -= 1
                self._release_memory()
        except (OSError, TimeoutError) as exc:
            if raw is not None:
                raw.close()
            conn.close()
            reason = classify_handshake_error(exc)
            self._on_refused(address, reason, describe_handshake_error(exc))
            # Its traceback holds start_tls's frame, which holds the TLS protocol and
            # its 256 KiB buffer in a reference cycle that only a full gc frees.
            _drop_tracebacks(exc)
            return
        except BaseException:  # cancelled by close(): no socket left behind
            if raw is not None:
                raw.close()
            conn.close()
            raise
        if tls is None:  # the connection was lost during the handshake
            raw.close()
            return
        try:
            await self._relay(tls, client, address)
        except BaseException:
            tls.close()
            raise

    async def _relay(self, tls: asyncio.Transport, client: _Relay, address: str) -> None:
        """Connect the handshaken client to the gRPC server and relay both ways."""
        loop = asyncio.get_running_loop()
        client.attach(tls)
        tls.pause_reading()  # until the gRPC side is connected
        names = certificate_names(tls.get_extra_info("peercert"))
        backend = _Relay()
        problem: OSError | None = None
        try:
            await loop.create_connection(lambda: backend, "127.0.0.1", self._backend_port)
        except OSError as exc:
            problem = exc
        if problem is not None:
            log.error("TLS gate: cannot reach the gRPC server on loopback: %s", problem)
            tls.close()
            return
        assert backend.transport is not None
        # Registered before a byte is relayed, so gRPC never sees the call before this.
        key = grpc_peer(backend.transport.get_extra_info("sockname"))
        self._peers[key] = Peer(address, names)
        self._relays.update((client, backend))

        def forget() -> None:
            self._peers.pop(key, None)
            self._relays.difference_update((client, backend))

        backend.on_lost = client.on_lost = forget
        client.link(backend)
        backend.link(client)
        tls.resume_reading()
        if client.closed:  # the client went away while the backend connected
            backend.close()

    def stop_accepting(self) -> None:
        """Refuse new connections; relayed ones go on (gRPC's graceful stop ends them)."""
        if self._acceptor is not None:
            self._acceptor.cancel()
            self._acceptor = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def close(self) -> None:
        """Stop accepting and close every connection still open. Idempotent."""
        self.stop_accepting()
        for task in list(self._handshakes):
            task.cancel()
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)
        for relay in list(self._relays):
            relay.close()
        self._relays.clear()
