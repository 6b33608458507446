"""Certificates and tokens rotate under live streams, with no restart and no loss.

The end-to-end test runs a real collector (mTLS + token) and a real agent behind a
TCP proxy. While the agent streams, the collector's certificate and key, the agent's
certificate and key and the token (on both sides) are all replaced. The live stream
goes on untouched (an established TLS session keeps its keys); then the proxy cuts
the connection, the agent reconnects, and the new connection is made with the new
files on both sides. Counted by seq at the end: every batch the agent made was
applied exactly once.
"""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
from pathlib import Path

import grpc
import pytest

from rooftop.agent.credentials import ClientAuth
from rooftop.agent.fleet_query import query_fleet_status
from rooftop.collector.auth import TokenFile
from rooftop.collector.config import CollectorConfig
from rooftop.common.errors import ConfigError
from rooftop.common.wire import AGENT_ID_METADATA
from rooftop.v1 import telemetry_pb2 as pb
from tests.collector.helpers import AgentStream, batch, gpu, start_server
from tests.security.conftest import AgentProc, Certs, CollectorProc, Proxy, wait_for
from tests.security.pki import Cert, replace_atomically


def served_certificate(port: int, ca: Path, client: Cert) -> bytes:
    """DER of the certificate the collector presents to a new connection."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(client.cert), str(client.key))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def copy(cert: Cert, directory: Path, name: str) -> Cert:
    out = Cert(directory / f"{name}.crt", directory / f"{name}.key")
    shutil.copyfile(cert.cert, out.cert)
    shutil.copyfile(cert.key, out.key)
    return out


def rotate(target: Cert, new: Cert) -> None:
    # Certificate first, then key: in between the pair does not match, and the
    # collector must keep serving the old pair rather than break new handshakes.
    replace_atomically(target.cert, new.cert.read_bytes())
    replace_atomically(target.key, new.key.read_bytes())


@pytest.mark.slow
def test_rotation_under_a_live_stream_loses_nothing(certs: Certs, tmp_path: Path, procs):
    cdir, adir = tmp_path / "collector", tmp_path / "agent"
    cdir.mkdir()
    adir.mkdir()
    server = copy(certs.server, cdir, "server")
    client = copy(certs.agent1, adir, "agent")
    (cdir / "token").write_text("token-1\n")
    (adir / "token").write_text("token-1\n")
    (tmp_path / "read").write_text("read-token\n")
    collector = CollectorProc(cdir, tls_cert_file=server.cert, tls_key_file=server.key,
                              tls_client_ca_file=certs.ca, token_file=cdir / "token",
                              read_token_file=tmp_path / "read").start()  # fmt: skip
    procs.append(collector)
    proxy = Proxy(collector.port)
    procs.append(proxy)
    agent = AgentProc(adir, agent_id="agent-1", collectors=[proxy.address], ca_file=certs.ca,
                      cert_file=client.cert, key_file=client.key, token_file=adir / "token",
                      server_name="localhost").start()  # fmt: skip
    procs.append(agent)
    ops = ClientAuth(ca_file=certs.ca, cert_file=certs.ops.cert, key_file=certs.ops.key,
                     token_file=tmp_path / "read")  # fmt: skip

    def node() -> pb.NodeStatus | None:
        fs = query_fleet_status(collector.address, ops)
        return fs.nodes[0] if fs.nodes else None

    def acked() -> int:
        n = node()
        return n.acked_seq if n is not None else 0

    def reconnects() -> int:
        n = node()
        return n.stats.reconnects if n is not None else 0

    wait_for(lambda: acked() >= 20, "the agent streaming", timeout_s=30)
    assert served_certificate(collector.port, certs.ca, certs.ops) == der(certs.server.cert)

    # Rotate everything while the stream is live.
    new_server = certs.issue(
        "server-2", cn="localhost", sans=("IP:127.0.0.1", "DNS:localhost"), usage="serverAuth"
    )
    new_client = certs.issue("agent-1-2", cn="agent-1", sans=("DNS:agent-1",))
    rotate(server, new_server)
    rotate(client, new_client)
    replace_atomically(cdir / "token", b"token-2\n")  # the old token is no longer accepted
    replace_atomically(adir / "token", b"# rotated\ntoken-2\n")
    at_rotation, reconnects_before = acked(), reconnects()
    wait_for(lambda: acked() >= at_rotation + 20, "the live stream going on", timeout_s=30)
    assert reconnects() == reconnects_before  # the same stream, untouched

    # A new connection: the collector presents the new certificate...
    assert served_certificate(collector.port, certs.ca, certs.ops) == der(new_server.cert)
    # ...and the old token is refused.
    md = [("authorization", "Bearer token-1"), (AGENT_ID_METADATA, "agent-1")]
    creds = grpc.ssl_channel_credentials(certs.ca.read_bytes(), *certs.agent2.pem())
    with AgentStream(collector.address, credentials=creds, metadata=md) as s:
        s.send(batch(1, agent_id="agent-2"))
        s.wait_done()
        assert s.error is not None and s.error.code() == grpc.StatusCode.UNAUTHENTICATED

    # Cut the agent's connection: it reconnects with its new certificate and token.
    proxy.reset()
    wait_for(
        lambda: reconnects() > reconnects_before and acked() > at_rotation + 40,
        "the agent back with the new credentials",
        timeout_s=30,
    )

    assert agent.stop() == 0
    last_seq = agent.last_seq()
    final = query_fleet_status(collector.address, ops)
    (n,) = final.nodes
    # Counted by seq: 1..last_seq all applied (contiguous ack), each exactly once.
    assert n.acked_seq == last_seq
    assert n.batches == last_seq
    assert final.collector.missing == 0
    # The one refusal is this test's old-token probe: the agent never sent a stale token.
    assert dict(final.collector.refused) == {"bad_token": 1}
    assert "kept in the spool" not in agent.log()
    assert "collector TLS files changed: reloaded" in collector.log()
    assert "collector.token_file changed" in collector.log()
    assert "TLS files changed: the next connection uses the new ones" in agent.log()
    assert "token file changed: the next connection presents the new token" in agent.log()
    print(f"\nrotation: {last_seq} batches, all applied once; {n.stats.reconnects} reconnect(s); "
          f"{final.collector.duplicates} duplicate(s) dropped")  # fmt: skip


def test_a_half_done_rotation_keeps_the_current_certificate(certs, tmp_path, caplog):
    server = copy(certs.server, tmp_path, "server")
    config = CollectorConfig(listen="127.0.0.1:0", tls_cert_file=server.cert,
                             tls_key_file=server.key, tls_client_ca_file=certs.ca)  # fmt: skip
    srv, fleet = start_server(config=config.validated())
    try:
        new = certs.issue(
            "server-3", cn="localhost", sans=("IP:127.0.0.1", "DNS:localhost"), usage="serverAuth"
        )
        with caplog.at_level(logging.INFO, logger="rooftop.collector.ingest"):
            replace_atomically(server.cert, new.cert.read_bytes())  # the key is still the old one
            assert served_certificate(srv.port, certs.ca, certs.ops) == der(certs.server.cert)
            assert served_certificate(srv.port, certs.ca, certs.ops) == der(certs.server.cert)
            broken = [r for r in caplog.records if "unusable" in r.getMessage()]
            assert len(broken) == 1  # logged once, not per handshake
            replace_atomically(server.key, new.key.read_bytes())
            assert served_certificate(srv.port, certs.ca, certs.ops) == der(new.cert)
        md = [(AGENT_ID_METADATA, "agent-1")]
        creds = grpc.ssl_channel_credentials(certs.ca.read_bytes(), *certs.agent1.pem())
        with AgentStream(f"127.0.0.1:{srv.port}", credentials=creds, metadata=md) as s:
            s.send(batch(1, agent_id="agent-1", records=[gpu(0)]))
            assert s.wait_acked(1)[-1].acked_seq == 1
    finally:
        srv.shutdown(timeout_s=1)
    assert fleet.counts().batches == 1


def test_token_file_accepts_every_line_and_survives_a_bad_rewrite(tmp_path, caplog):
    path = tmp_path / "token"
    path.write_text("# comment\nold\n\nnew\n")
    tokens = TokenFile(path, key="token_file")
    assert tokens.matches(b"Bearer old") and tokens.matches(b"Bearer new")
    assert not tokens.matches(b"Bearer # comment") and not tokens.matches(b"old")
    path.write_text("")  # emptied mid-rotation: keep what worked
    with caplog.at_level(logging.ERROR, logger="rooftop.collector.ingest"):
        assert tokens.matches(b"Bearer old")
        assert tokens.matches(b"Bearer old")
    assert len(caplog.records) == 1
    path.write_text("newest\n")
    assert tokens.matches(b"Bearer newest") and not tokens.matches(b"Bearer old")
    path.unlink()
    with pytest.raises(ConfigError, match="token_file"):
        TokenFile(path, key="token_file")


def test_client_auth_rereads_changed_files(certs, tmp_path):
    token = tmp_path / "token"
    token.write_text("one\n")
    client = copy(certs.agent1, tmp_path, "agent")
    auth = ClientAuth(ca_file=certs.ca, cert_file=client.cert, key_file=client.key,
                      token_file=token, server_name="localhost")  # fmt: skip
    first = auth.credentials()
    assert auth.credentials() is first  # unchanged files: not re-read
    assert auth.metadata() == (("authorization", "Bearer one"),)
    assert auth.options() == [("grpc.ssl_target_name_override", "localhost")]
    replace_atomically(token, b"two\n")
    assert auth.metadata() == (("authorization", "Bearer two"),)
    rotate(client, certs.agent2)
    assert auth.credentials() is not first
    token.unlink()  # gone mid-rotation: the last good token stays
    assert auth.metadata() == (("authorization", "Bearer two"),)
    with pytest.raises(ConfigError, match="key_file"):
        ClientAuth(ca_file=certs.ca, cert_file=client.cert)
    with pytest.raises(ConfigError, match="cannot read"):
        ClientAuth(ca_file=certs.ca, token_file=tmp_path / "missing")
