"""The TLS gate on its own: real sockets, real TLS (openssl-made certificates).

A gate in front of a loopback echo server: bytes relayed both ways with flow
control, the client certificate's names handed to the backend side, every failed
handshake classified and reported, TCP probes left alone. Then the gate in front of
the real ingest server: a call that goes around it to gRPC's loopback port is refused.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from rooftop.collector.config import CollectorConfig
from rooftop.collector.gate import (
    HandshakeReason,
    Peer,
    ServerTls,
    TlsGate,
    classify_handshake_error,
    grpc_peer,
    listen_socket,
)
from rooftop.v1 import telemetry_pb2 as pb
from rooftop.v1 import telemetry_pb2_grpc
from tests.collector.helpers import start_server
from tests.security.pki import OPENSSL, Cert, Pki

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="no openssl CLI to make certificates")


@dataclass
class Certs:
    ca: Path
    server: Cert
    agent: Cert
    foreign: Cert


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    pki = Pki(tmp_path_factory.mktemp("gate-pki"))
    ca = pki.ca("ca")
    pki.ca("other-ca")
    server = pki.issue("server", ca="ca", cn="localhost", sans=("IP:127.0.0.1",),
                       usage="serverAuth")  # fmt: skip
    agent = pki.issue("agent", ca="ca", cn="agent-1", sans=("DNS:agent-1.example",))
    foreign = pki.issue("foreign", ca="other-ca", cn="agent-1")
    return Certs(ca, server, agent, foreign)


def client_context(certs: Certs, cert: Cert | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certs.ca)
    context.set_alpn_protocols(["h2"])
    if cert is not None:
        context.load_cert_chain(cert.cert, cert.key)
    return context


@dataclass
class Running:
    gate: TlsGate
    refusals: list[tuple[str, HandshakeReason, str]]
    seen: list[Peer | None] = field(default_factory=list)  # who the backend was told about


@asynccontextmanager
async def gate_over_echo(
    certs: Certs, *, timeout_s: float = 5.0, **limits: int
) -> AsyncIterator[Running]:
    """A gate (mTLS against ``ca``) relaying to an echo server on loopback."""
    refusals: list[tuple[str, HandshakeReason, str]] = []
    gate = TlsGate(
        ServerTls(certs.server.cert, certs.server.key, certs.ca),
        lambda *refusal: refusals.append(refusal),
        handshake_timeout_s=timeout_s,
        **limits,
    )
    running = Running(gate, refusals)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Looked up on the first byte, as gRPC does on a call's first frame: the gate
        # registers a relay after connecting and before relaying anything.
        try:
            data = await reader.read(65536)
            running.seen.append(gate.peer(grpc_peer(writer.get_extra_info("peername"))))
            while data:
                writer.write(data)
                await writer.drain()
                data = await reader.read(65536)
        finally:
            writer.close()

    backend = await asyncio.start_server(echo, "127.0.0.1", 0)
    await gate.start(listen_socket("127.0.0.1:0"), backend.sockets[0].getsockname()[1])
    try:
        yield running
    finally:
        await gate.close()
        backend.close()
        await backend.wait_closed()


async def until(condition: object, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not callable(condition) or not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_relays_both_ways_under_backpressure_and_names_the_peer(certs: Certs):
    async def main() -> None:
        async with gate_over_echo(certs) as running:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", running.gate.port, ssl=client_context(certs, certs.agent)
            )
            payload = os.urandom(8 * 1024 * 1024)  # well past every buffer's high water

            async def send() -> None:
                writer.write(payload)
                await writer.drain()

            sender = asyncio.create_task(send())
            echoed = await reader.readexactly(len(payload))
            await sender
            assert echoed == payload
            peer = running.seen[0]
            assert peer is not None
            assert peer.names == {"agent-1", "agent-1.example"}
            assert peer.address == grpc_peer(writer.get_extra_info("sockname"))
            assert running.gate.connections == 1
            writer.close()
            await until(lambda: running.gate.connections == 0)  # forgotten once closed
            assert running.refusals == []

    asyncio.run(main())


@pytest.mark.parametrize(
    ("client", "reason"),
    [(None, HandshakeReason.NO_CLIENT_CERT), ("foreign", HandshakeReason.UNKNOWN_CA)],
)
def test_a_refused_handshake_is_reported_and_never_reaches_the_backend(certs, client, reason):
    async def main() -> None:
        async with gate_over_echo(certs) as running:
            cert = getattr(certs, client) if client else None
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", running.gate.port, ssl=client_context(certs, cert)
                )
                # TLS 1.3: the client's side of the handshake is done before the server
                # has checked its certificate; it learns of the refusal on reading.
                writer.write(b"x")
                assert await asyncio.wait_for(reader.read(1), 5) == b""
            except (ssl.SSLError, ConnectionError):
                pass
            await until(lambda: running.refusals)
            address, got, detail = running.refusals[0]
            assert got is reason
            assert address.startswith("ipv4:127.0.0.1:")
            assert detail
            assert running.seen == []

    asyncio.run(main())


def test_a_stalled_handshake_is_refused_as_a_timeout(certs: Certs):
    async def main() -> None:
        async with gate_over_echo(certs, timeout_s=0.3) as running:
            silent = socket.create_connection(("127.0.0.1", running.gate.port))
            half = socket.create_connection(("127.0.0.1", running.gate.port))
            half.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
            await until(lambda: len(running.refusals) == 2)
            assert {r[1] for r in running.refusals} == {HandshakeReason.TIMEOUT}
            silent.close()
            half.close()

    asyncio.run(main())


def test_handshakes_past_max_handshakes_are_closed_at_once_and_counted(certs: Certs):
    async def main() -> None:
        async with gate_over_echo(certs, max_handshakes=2) as running:
            halves = [socket.create_connection(("127.0.0.1", running.gate.port)) for _ in range(5)]
            for half in halves:
                half.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
            await until(lambda: len(running.refusals) == 3)
            assert {r[1] for r in running.refusals} == {HandshakeReason.HANDSHAKE_LIMIT}
            assert all("max_handshakes" in r[2] for r in running.refusals)
            for half in halves:
                half.close()
            await until(lambda: len(running.refusals) == 5)  # the two held ones, abandoned
            # The slots are free again: an agent's handshake goes through.
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", running.gate.port, ssl=client_context(certs, certs.agent),
                server_hostname="localhost")  # fmt: skip
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.close()

    asyncio.run(main())


def test_connections_past_max_connections_are_closed_at_once_and_counted(certs: Certs):
    async def main() -> None:
        async with gate_over_echo(certs, max_connections=2) as running:
            held = [socket.create_connection(("127.0.0.1", running.gate.port)) for _ in range(2)]
            await asyncio.sleep(0.1)  # both accepted
            extra = socket.create_connection(("127.0.0.1", running.gate.port))
            extra.settimeout(5)
            await until(lambda: len(running.refusals) == 1)
            assert running.refusals[0][1] is HandshakeReason.CONNECTION_LIMIT
            assert await asyncio.to_thread(extra.recv, 1) == b""  # closed by the gate
            for sock in (*held, extra):
                sock.close()

    asyncio.run(main())


def test_an_abandoned_handshake_frees_its_tls_state_without_waiting_for_the_gc(certs: Certs):
    # Python 3.11's asyncio keeps a failed start_tls's protocol (and its 256 KiB read
    # buffer) in a reference cycle through the exception's traceback: freed by a full
    # gc only, so a flood of half-done handshakes held its memory after they closed.
    async def main() -> int:
        async with gate_over_echo(certs) as running:
            half = socket.create_connection(("127.0.0.1", running.gate.port))
            half.sendall(b"\x16\x03\x01")
            await asyncio.sleep(0.2)  # in its handshake now
            half.close()
            await until(lambda: len(running.refusals) == 1)
            await asyncio.sleep(0.05)
            return sum(isinstance(o, asyncio.sslproto.SSLProtocol) for o in gc.get_objects())

    gc.collect()
    gc.disable()
    try:
        alive = asyncio.run(main())
    finally:
        gc.enable()
    assert alive == 0


def test_closing_the_gate_mid_handshake_leaves_no_socket_behind(certs: Certs):
    async def main() -> Running:
        async with gate_over_echo(certs) as running:
            silent = socket.create_connection(("127.0.0.1", running.gate.port))
            half = socket.create_connection(("127.0.0.1", running.gate.port))
            half.sendall(b"\x16\x03\x01")
            silent.settimeout(5)
            half.settimeout(5)
            await asyncio.sleep(0.2)  # both are in their handshake task now
        # Closed with the tasks cancelled: each socket it held is closed (an unclosed
        # one is a ResourceWarning, an error in this suite), nothing counted.
        assert silent.recv(1) == b"" and half.recv(1) == b""
        silent.close()
        half.close()
        return running

    running = asyncio.run(main())
    gc.collect()
    assert running.refusals == []


def test_plaintext_on_the_tls_port_is_not_tls(certs: Certs):
    async def main() -> None:
        async with gate_over_echo(certs) as running:
            reader, writer = await asyncio.open_connection("127.0.0.1", running.gate.port)
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # a plaintext gRPC client
            await writer.drain()
            await reader.read()  # closed on us
            await until(lambda: running.refusals)
            assert running.refusals[0][1] is HandshakeReason.NOT_TLS
            writer.close()

    asyncio.run(main())


def test_a_tcp_probe_is_not_a_refusal(certs: Certs):
    async def main() -> None:
        async with gate_over_echo(certs) as running:
            for _ in range(3):
                _, writer = await asyncio.open_connection("127.0.0.1", running.gate.port)
                writer.close()
                await writer.wait_closed()
            # A real client after the probes is served: the probes were handled.
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", running.gate.port, ssl=client_context(certs, certs.agent)
            )
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.close()
            assert running.refusals == []

    asyncio.run(main())


def _verify_error(code: int) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_code = code
    return exc


def _ssl_error(reason: str) -> ssl.SSLError:
    exc = ssl.SSLError(1, reason)
    exc.reason = reason
    return exc


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (_verify_error(10), HandshakeReason.CERT_EXPIRED),
        (_verify_error(9), HandshakeReason.CERT_NOT_YET_VALID),
        (_verify_error(20), HandshakeReason.UNKNOWN_CA),
        (_verify_error(19), HandshakeReason.UNKNOWN_CA),
        (_verify_error(26), HandshakeReason.BAD_CERT),  # unsupported purpose
        (_ssl_error("PEER_DID_NOT_RETURN_A_CERTIFICATE"), HandshakeReason.NO_CLIENT_CERT),
        (_ssl_error("WRONG_VERSION_NUMBER"), HandshakeReason.NOT_TLS),
        (_ssl_error("HTTP_REQUEST"), HandshakeReason.NOT_TLS),
        (_ssl_error("TLSV1_ALERT_UNKNOWN_CA"), HandshakeReason.PEER_REJECTED),
        (_ssl_error("NO_SHARED_CIPHER"), HandshakeReason.FAILED),
        (ConnectionResetError(), HandshakeReason.ABANDONED),
        (TimeoutError(), HandshakeReason.TIMEOUT),
    ],
)
def test_handshake_errors_are_classified(exc: BaseException, reason: HandshakeReason):
    assert classify_handshake_error(exc) is reason


def test_a_call_around_the_gate_is_refused(certs: Certs):
    """gRPC listens on loopback behind the gate: a local process calling it directly
    (plaintext, no certificate) is refused, counted, and never reaches a handler."""
    config = CollectorConfig(
        listen="127.0.0.1:0",
        tls_cert_file=certs.server.cert,
        tls_key_file=certs.server.key,
        tls_client_ca_file=certs.ca,
    ).validated()
    server, fleet = start_server(config=config)
    try:
        assert server.loopback_port not in (0, server.port)
        with grpc.insecure_channel(f"127.0.0.1:{server.loopback_port}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                telemetry_pb2_grpc.QueryStub(channel).GetFleetStatus(
                    pb.FleetStatusRequest(), timeout=5
                )
        error = info.value
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        assert "connect to the TLS port" in error.details()  # type: ignore[attr-defined]
        assert dict(fleet.counts().refused) == {"not_through_gate": 1}
    finally:
        server.shutdown(timeout_s=1)


@pytest.fixture
def ipv6() -> Iterator[None]:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6")
    yield


def test_listening_on_every_interface_takes_ipv4_too(ipv6: None):
    sock = listen_socket("[::]:0")
    try:
        assert sock.family == socket.AF_INET6
        socket.create_connection(("127.0.0.1", sock.getsockname()[1]), timeout=5).close()
    finally:
        sock.close()
