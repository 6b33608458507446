"""Ingest over TLS and mTLS with real certificates (made by the openssl CLI)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from rooftop.collector.config import CollectorConfig
from tests.collector.helpers import AgentStream, batch, start_server
from tests.security.pki import OPENSSL, Pki

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="no openssl CLI to make certificates")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ca.crt``; ``server.crt``/``.key`` (127.0.0.1, localhost); ``client`` for agent-1."""
    pki = Pki(tmp_path_factory.mktemp("pki"))
    pki.ca("ca")
    pki.issue("server", ca="ca", cn="localhost", sans=("IP:127.0.0.1", "DNS:localhost"),
              usage="serverAuth")  # fmt: skip
    pki.issue("client", ca="ca", cn="agent-1", sans=("DNS:agent-1",))
    return pki.root


def _config(pki: Path, *, mtls: bool) -> CollectorConfig:
    return CollectorConfig(
        listen="127.0.0.1:0",
        tls_cert_file=pki / "server.crt",
        tls_key_file=pki / "server.key",
        tls_client_ca_file=pki / "ca.crt" if mtls else None,
    ).validated()


def _creds(pki: Path, *, client_cert: bool) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.crt").read_bytes(),
        private_key=(pki / "client.key").read_bytes() if client_cert else None,
        certificate_chain=(pki / "client.crt").read_bytes() if client_cert else None,
    )


def test_tls_without_client_certificates(pki: Path):
    server, fleet = start_server(config=_config(pki, mtls=False))
    try:
        with AgentStream(
            f"127.0.0.1:{server.port}", credentials=_creds(pki, client_cert=False)
        ) as s:
            s.send(batch(1, agent_id="anyone"))
            assert s.wait_acked(1)[-1].acked_seq == 1
    finally:
        server.shutdown(timeout_s=1)
    assert fleet.counts().batches == 1


def test_mtls_checks_agent_id_against_the_certificate(pki: Path):
    server, fleet = start_server(config=_config(pki, mtls=True))
    target = f"127.0.0.1:{server.port}"
    try:
        with AgentStream(target, credentials=_creds(pki, client_cert=True)) as s:
            s.send(batch(1, agent_id="agent-1"))
            assert s.wait_acked(1)[-1].acked_seq == 1
        with AgentStream(target, credentials=_creds(pki, client_cert=True)) as s:
            s.send(batch(1, agent_id="agent-2"))
            s.wait_done()
            assert s.error is not None
            assert s.error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "agent-2" in (s.error.details() or "")
        with AgentStream(target, credentials=_creds(pki, client_cert=False)) as s:
            s.send(batch(1, agent_id="agent-1"))
            s.wait_done()
            assert s.error is not None
            assert s.error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.shutdown(timeout_s=1)
    assert fleet.counts().batches == 1
