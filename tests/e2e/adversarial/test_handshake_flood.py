"""Half-done TLS handshakes: capped while they last, and their memory returned after.

Before: no cap in the TLS gate; 3,000 half-done handshakes took the collector from
38 to 988 MB (~320 KB each: asyncio's TLS read buffer and OpenSSL's state) and it
kept that memory after they closed. Now past ``max_handshakes`` in progress (and
``max_connections`` open) a new connection is closed at once and counted, and once
the handshakes end the freed heap is handed back to the OS.
"""

from __future__ import annotations

import socket
import ssl

import pytest

from tests.collector.helpers import AgentStream, batch, gpu
from tests.e2e.adversarial.conftest import counter, report, rss_mib, settled_rss_mib
from tests.e2e.conftest import Harness, wait_for

pytestmark = pytest.mark.slow

FLOOD = 400
MAX_HANDSHAKES = 32
# One handshake in progress costs the collector ~320 KB; allow 1 MiB each, and 12 MiB
# for gRPC and the allocator, far under the FLOOD x 320 KB (~122 MiB measured) that
# the old code held, during the flood and after it.
PER_HANDSHAKE_MIB = 1.0
SLACK_MIB = 12.0


def client_hello() -> bytes:
    """The first flight of a TLS client: a ClientHello, to start a handshake and stall it."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def refused(c, reason: str) -> float:
    return counter(c, "rooftop_collector_refused_total", "rooftop_refuse_reason", reason)


def ended(c) -> float:
    """Handshakes that ended without a connection: the client hung up, or took too long."""
    reasons = ("tls_handshake_abandoned", "tls_handshake_failed", "tls_handshake_timeout")
    return sum(refused(c, r) for r in reasons)


@pytest.mark.parametrize("e2e", ["mtls"], indirect=True)
def test_half_done_handshakes_are_capped_counted_and_their_memory_returned(e2e: Harness):
    c = e2e.collector(max_handshakes=MAX_HANDSHAKES)
    assert e2e.pki is not None
    agent = e2e.pki.issue("agent-ok", ca="ca", cn="agent-ok")
    creds = e2e.pki.root / "ca.crt"
    import grpc  # noqa: TID251, PLC0415 — the legitimate agent's mTLS channel

    credentials = grpc.ssl_channel_credentials(creds.read_bytes(), *agent.pem())
    hello = client_hello()
    refused(c, "tls_handshake_limit")  # the first scrape's caches are no flood's cost
    base_mib = settled_rss_mib(c.pid)
    socks: list[socket.socket] = []
    with AgentStream(c.address, credentials=credentials) as good:
        good.send(batch(1, agent_id="agent-ok", records=[gpu(0)]))
        good.wait_acked(1)
        try:
            for _ in range(FLOOD):
                sock = socket.create_connection(("127.0.0.1", c.port))
                sock.sendall(hello)  # ... and never another byte
                socks.append(sock)
            wait_for(lambda: refused(c, "tls_handshake_limit") >= FLOOD - MAX_HANDSHAKES,
                     "handshakes past the cap refused")  # fmt: skip
            during_mib = rss_mib(c.pid) - base_mib
            # The agent that was streaming before the flood still is.
            good.send(batch(2, agent_id="agent-ok", records=[gpu(0)]))
            good.wait_acked(2)
        finally:
            for sock in socks:
                sock.close()
        capped = refused(c, "tls_handshake_limit")
        wait_for(lambda: ended(c) >= MAX_HANDSHAKES, "the stalled handshakes ended")
        after_mib = settled_rss_mib(c.pid, samples=10) - base_mib
    # A new agent connection after the flood is served.
    with AgentStream(c.address, credentials=credentials) as again:
        again.send(batch(3, agent_id="agent-ok", records=[gpu(0)]))
        again.wait_acked(3)
    report("handshake_flood", {"flood": FLOOD, "max_handshakes": MAX_HANDSHAKES,
                               "refused_at_cap": capped, "ended": ended(c),
                               "rss_growth_during_mib": during_mib,
                               "rss_growth_after_close_mib": after_mib})  # fmt: skip
    assert capped == FLOOD - MAX_HANDSHAKES
    assert during_mib < MAX_HANDSHAKES * PER_HANDSHAKE_MIB + SLACK_MIB
    assert after_mib < SLACK_MIB
