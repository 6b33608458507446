"""Every way in without the right credentials is refused, and nothing is stored.

One real collector process (TLS, mTLS against ``ca``, an agents' token and a
read-only token), real clients: gRPC streams like an agent's, real agent processes,
and ``agentctl status``. Each refusal is checked for its status code and message,
for an empty fleet afterwards (asked through the collector's own Query service), and
for being counted (``rooftop.collector.refused``) and logged once per peer.

TLS handshake failures (no client certificate, an unknown CA, an expired
certificate) never become a call: the collector's TLS gate ends the connection (the
client sees UNAVAILABLE) and counts and logs them like the rest (docs/SECURITY.md).
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from rooftop.agent.config import load_config
from rooftop.agent.credentials import ClientAuth
from rooftop.agent.fleet_query import query_fleet_status
from rooftop.cli import main
from rooftop.common.errors import ConfigError, Rejected
from rooftop.common.wire import AGENT_ID_METADATA
from rooftop.v1 import telemetry_pb2 as pb
from rooftop.v1 import telemetry_pb2_grpc
from tests.collector.helpers import AgentStream, batch, gpu, verdict
from tests.security.conftest import AgentProc, Certs, CollectorProc, wait_for

AGENTS_TOKEN = "s3cret-agents"
READ_TOKEN = "s3cret-read"


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tokens")
    files = {
        "agents": ("# the agents' token\n" + AGENTS_TOKEN + "\n"),
        "read": READ_TOKEN + "\n",
        "wrong": "not-the-token\n",
    }
    for name, text in files.items():
        (d / name).write_text(text)
    return {name: d / name for name in files}


@pytest.fixture(scope="module")
def collector(
    certs: Certs, tokens: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CollectorProc]:
    proc = CollectorProc(
        tmp_path_factory.mktemp("mtls-collector"),
        tls_cert_file=certs.server.cert,
        tls_key_file=certs.server.key,
        tls_client_ca_file=certs.ca,
        token_file=tokens["agents"],
        read_token_file=tokens["read"],
    ).start()
    yield proc
    proc.stop()


def creds(certs: Certs, client: str | None = "agent1") -> grpc.ChannelCredentials:
    cert = getattr(certs, client) if client else None
    return grpc.ssl_channel_credentials(
        root_certificates=certs.ca.read_bytes(),
        private_key=cert.key.read_bytes() if cert else None,
        certificate_chain=cert.cert.read_bytes() if cert else None,
    )


def fleet(collector: CollectorProc, certs: Certs, tokens: dict[str, Path]) -> pb.FleetStatus:
    """The collector's view, asked as an operator would: ops certificate, read-only token."""
    auth = ClientAuth(ca_file=certs.ca, cert_file=certs.ops.cert, key_file=certs.ops.key,
                      token_file=tokens["read"])  # fmt: skip
    return query_fleet_status(collector.address, auth)


def refused(fs: pb.FleetStatus) -> dict[str, int]:
    return dict(fs.collector.refused)


def attempt(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    metadata: list[tuple[str, str]],
    agent_id: str = "agent-1",
) -> grpc.RpcError:
    """One agent-like stream sending one batch; the error it ends with."""
    with AgentStream(address, credentials=credentials, metadata=metadata) as stream:
        stream.send(batch(1, agent_id=agent_id, records=[gpu(0)], verdicts=[verdict(0)]))
        stream.wait_done()
        assert stream.error is not None, "the collector accepted the stream"
        return stream.error


def agent_md(token: str | None = AGENTS_TOKEN, claimed: str | None = "agent-1") -> list:
    md = [("authorization", f"Bearer {token}")] if token is not None else []
    return md + ([(AGENT_ID_METADATA, claimed)] if claimed is not None else [])


def log_lines(collector: CollectorProc, reason: str) -> list[str]:
    return [line for line in collector.log().splitlines() if f"({reason})" in line]


# --- TLS handshake refusals (the collector's TLS gate; counted, logged once per peer) -------


@pytest.mark.parametrize(
    ("client", "reason", "detail"),
    [
        (None, "tls_no_client_cert", "peer did not return a certificate"),
        ("foreign", "tls_unknown_ca", "client certificate rejected: unable to get local issuer"),
        ("expired", "tls_cert_expired", "client certificate rejected: certificate has expired"),
    ],
)
def test_handshake_refusals_are_counted_logged_once_and_store_nothing(
    collector, certs, tokens, client, reason, detail
):
    before = fleet(collector, certs, tokens)
    for _ in range(3):
        error = attempt(collector.address, creds(certs, client), agent_md())
        assert error.code() == grpc.StatusCode.UNAVAILABLE, reason
    print(f"\n{reason}: client sees {error.code().name}: {error.details()}")
    after = fleet(collector, certs, tokens)
    assert after.collector.batches == before.collector.batches == 0
    assert not after.nodes
    # gRPC's client may retry the connection within one attempt: at least one each.
    assert refused(after).get(reason, 0) - refused(before).get(reason, 0) >= 3
    wait_for(lambda: log_lines(collector, reason), "the refusal in the log")
    lines = log_lines(collector, reason)
    assert len(lines) == 1, lines  # many handshakes, one line
    assert "ipv4:127.0.0.1" in lines[0] and f"TLS handshake: {detail}" in lines[0], lines[0]
    print(f"collector logs: {lines[0].split('] ', 1)[-1]}")


def test_a_certificate_from_the_wrong_ca_cannot_even_query(collector, certs, tokens):
    auth = ClientAuth(ca_file=certs.ca, cert_file=certs.foreign.cert,
                      key_file=certs.foreign.key, token_file=tokens["read"])  # fmt: skip
    with pytest.raises(Exception, match="UNAVAILABLE"):
        query_fleet_status(collector.address, auth, timeout_s=5)


def test_plaintext_on_the_tls_port_is_refused_as_not_tls(collector, certs, tokens):
    before = refused(fleet(collector, certs, tokens))
    with grpc.insecure_channel(collector.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            telemetry_pb2_grpc.QueryStub(channel).GetFleetStatus(pb.FleetStatusRequest(),
                                                                 timeout=5)  # fmt: skip
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert refused(fleet(collector, certs, tokens))["tls_not_tls"] > before.get("tls_not_tls", 0)
    wait_for(lambda: log_lines(collector, "tls_not_tls"), "the refusal in the log")
    assert len(log_lines(collector, "tls_not_tls")) == 1


def test_a_client_that_distrusts_the_collector_is_counted(collector, certs, tokens):
    """An agent with the wrong ``ca_file`` refuses *our* certificate, with a TLS alert."""
    before = refused(fleet(collector, certs, tokens))
    wrong_trust = grpc.ssl_channel_credentials(
        root_certificates=certs.wrong_ca.read_bytes(),
        private_key=certs.agent1.key.read_bytes(),
        certificate_chain=certs.agent1.cert.read_bytes(),
    )
    error = attempt(collector.address, wrong_trust, agent_md())
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    after = refused(fleet(collector, certs, tokens))
    reason = "tls_handshake_abandoned"
    assert after.get(reason, 0) > before.get(reason, 0)
    wait_for(lambda: log_lines(collector, reason), "the refusal in the log")
    line = log_lines(collector, reason)[0]
    assert "does it trust this collector's CA?" in line
    print(f"\nclient distrusts us: {line}")


def test_a_tcp_probe_is_not_a_refusal(collector, certs, tokens):
    """Load balancers and the kubelet's tcpSocket probe connect and close: not counted."""
    before = refused(fleet(collector, certs, tokens))
    for _ in range(5):
        socket.create_connection(("127.0.0.1", collector.port), timeout=5).close()
    time.sleep(0.2)
    assert refused(fleet(collector, certs, tokens)) == before


# --- refusals before any handler (counted, logged once per peer) ----------------------------


def test_missing_and_wrong_tokens_are_unauthenticated(collector, certs, tokens):
    before = refused(fleet(collector, certs, tokens))
    error = attempt(collector.address, creds(certs), agent_md(token=None))
    assert (error.code(), error.details()) == (
        grpc.StatusCode.UNAUTHENTICATED, "missing bearer token"
    )  # fmt: skip
    for _ in range(3):
        error = attempt(collector.address, creds(certs), agent_md(token="not-the-token"))
        assert (error.code(), error.details()) == (
            grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"
        )  # fmt: skip
    print(f"\nmissing token: UNAUTHENTICATED: missing bearer token; wrong: {error.details()}")
    after = fleet(collector, certs, tokens)
    assert after.collector.batches == 0 and not after.nodes
    assert refused(after).get("missing_token", 0) - before.get("missing_token", 0) == 1
    assert refused(after).get("bad_token", 0) - before.get("bad_token", 0) == 3
    wait_for(lambda: log_lines(collector, "bad_token"), "the refusal in the log")
    assert len(log_lines(collector, "bad_token")) == 1, collector.log()  # once per peer
    assert len(log_lines(collector, "missing_token")) == 1
    assert "ipv4:127.0.0.1" in log_lines(collector, "bad_token")[0]


def test_the_read_only_token_may_query_but_not_ingest(collector, certs, tokens):
    before = refused(fleet(collector, certs, tokens))
    error = attempt(collector.address, creds(certs), agent_md(token=READ_TOKEN))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "the read-only token may call Query, not Ingest"
    after = fleet(collector, certs, tokens)  # the read-only token on Query: fine
    assert after.collector.batches == 0 and not after.nodes
    assert refused(after)["read_only_token"] - before.get("read_only_token", 0) == 1
    # Query without a token is refused like Ingest is.
    with grpc.secure_channel(collector.address, creds(certs, "ops")) as channel:
        with pytest.raises(grpc.RpcError) as info:
            telemetry_pb2_grpc.QueryStub(channel).GetFleetStatus(pb.FleetStatusRequest(),
                                                                 timeout=5)  # fmt: skip
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


def test_an_agent_claiming_another_agents_id_is_refused(collector, certs, tokens):
    before = refused(fleet(collector, certs, tokens))
    # The claim in the call's metadata: refused before the stream's handler starts.
    for _ in range(2):
        error = attempt(collector.address, creds(certs, "agent1"), agent_md(claimed="agent-2"),
                        agent_id="agent-2")  # fmt: skip
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error.details() == (
            "agent_id 'agent-2' does not match the client certificate (agent-1)"
        )
    print(f"\nclaimed another id: {error.code().name}: {error.details()}")
    # No claim in the metadata, only in the batch: refused before the batch is applied.
    error = attempt(collector.address, creds(certs, "agent1"), agent_md(claimed=None),
                    agent_id="agent-2")  # fmt: skip
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "agent-2" in (error.details() or "")
    after = fleet(collector, certs, tokens)
    assert after.collector.batches == 0 and not after.nodes
    assert refused(after)["identity_mismatch"] - before.get("identity_mismatch", 0) == 3
    assert len(log_lines(collector, "identity_mismatch")) == 1


@pytest.mark.slow
def test_real_agents_with_bad_credentials_lose_nothing_and_store_nothing(
    collector, certs, tokens, tmp_path, procs
):
    common = {"collectors": [collector.address], "ca_file": certs.ca, "agent_id": "agent-1"}
    wrong_token = AgentProc(tmp_path / "wrong-token", cert_file=certs.agent1.cert,
                            key_file=certs.agent1.key, token_file=tokens["wrong"],
                            **common).start()  # fmt: skip
    expired = AgentProc(tmp_path / "expired", cert_file=certs.expired.cert,
                        key_file=certs.expired.key, token_file=tokens["agents"],
                        **common).start()  # fmt: skip
    procs += [wrong_token, expired]
    wait_for(lambda: wrong_token.log().count("UNAUTHENTICATED") >= 2, "two refused streams")
    wait_for(lambda: expired.log().count("UNAVAILABLE") >= 2, "two failed handshakes")
    assert wrong_token.stop() == 0 and expired.stop() == 0
    line = next(x for x in wrong_token.log().splitlines() if "UNAUTHENTICATED" in x)
    print(f"\nagent, wrong token: {line}")
    print(f"agent, expired: {next(x for x in expired.log().splitlines() if 'UNAVAILABLE' in x)}")
    assert "invalid bearer token" in line
    # Refused, not lost: what they sampled waits in their spools for the right credentials.
    assert "kept in the spool" in wrong_token.log() and "kept in the spool" in expired.log()
    fs = fleet(collector, certs, tokens)
    assert fs.collector.batches == 0 and not fs.nodes
    assert len(log_lines(collector, "bad_token")) == 1  # many retries, one line


def test_the_right_credentials_get_in(collector, certs, tokens):
    with AgentStream(collector.address, credentials=creds(certs), metadata=agent_md()) as s:
        s.send(batch(1, agent_id="agent-1", records=[gpu(0)], verdicts=[verdict(0)]))
        assert s.wait_acked(1)[-1].acked_seq == 1
    fs = fleet(collector, certs, tokens)
    assert [n.agent_id for n in fs.nodes] == ["agent-1"]
    assert fs.nodes[0].gpus[0].verdict.verdict == "memory-bound"
    # And the operator's view through the CLI, with the read-only token.
    result = CliRunner().invoke(main, [
        "status", "--collector", collector.address, "--ca-file", str(certs.ca),
        "--cert-file", str(certs.ops.cert), "--key-file", str(certs.ops.key),
        "--token-file", str(tokens["read"]),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert re.search(r"agent-1\s.*\s0\s+memory-bound", result.output), result.output
    assert "refused: " in result.output and "bad_token=" in result.output


# --- plaintext --------------------------------------------------------------------------------


def test_a_token_over_plaintext_is_refused_by_the_collector(tmp_path, procs):
    plain = CollectorProc(tmp_path / "plain", insecure=True).start()
    procs.append(plain)
    error = attempt(plain.address, None, agent_md())
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == (
        "a bearer token over plaintext is refused: it travelled in the clear, rotate it; "
        "tokens need TLS"
    )
    print(f"\ntoken over plaintext: {error.code().name}: {error.details()}")
    fs = query_fleet_status(plain.address, ClientAuth(insecure=True))
    assert fs.collector.batches == 0 and not fs.nodes
    assert dict(fs.collector.refused) == {"token_over_plaintext": 1}
    assert len(log_lines(plain, "token_over_plaintext")) == 1


def test_a_token_on_plaintext_is_refused_by_the_agent_config(tmp_path, tokens):
    with pytest.raises(ConfigError, match="never sent over plaintext"):
        load_config(env={}, overrides={"insecure": True, "token_file": tokens["agents"]})
    path = tmp_path / "agent.toml"
    token = tokens["agents"]
    path.write_text(
        f'collectors = ["127.0.0.1:1"]\ninsecure = true\ntoken_file = "{token}"\n'
        'backend = "fake:h100"\n'
    )
    result = CliRunner().invoke(main, ["agent", "--config", str(path)])
    assert result.exit_code == 1
    assert "token_file: a bearer token is never sent over plaintext" in result.stderr
    assert result.stderr.count("\n") == 1
    with pytest.raises(ConfigError, match="never sent over plaintext"):
        ClientAuth(insecure=True, token_file=tokens["agents"])
    result = CliRunner().invoke(main, ["status", "--collector", "127.0.0.1:1", "--insecure",
                                       "--token-file", str(tokens["agents"])])  # fmt: skip
    assert result.exit_code == 1 and "never sent over plaintext" in result.stderr


def test_a_collector_with_a_token_needs_tls(tmp_path, tokens):
    config = tmp_path / "c.toml"
    config.write_text(f'[collector]\ninsecure = true\ntoken_file = "{tokens["agents"]}"\n')
    result = CliRunner().invoke(main, ["collector", "--config", str(config)])
    assert result.exit_code == 1
    assert "collector.token_file: a bearer token needs TLS" in result.output


def test_plaintext_binds_to_loopback_unless_told_otherwise():
    from rooftop.collector.config import load_config as collector_config

    assert collector_config(insecure=True).listen == "127.0.0.1:4850"
    assert collector_config(insecure=True, listen="0.0.0.0:4850",
                            allow_unauthenticated=True).listen == "0.0.0.0:4850"


def test_status_reports_a_refusal_as_one_line(collector, certs):
    result = CliRunner().invoke(main, [
        "status", "--collector", collector.address, "--ca-file", str(certs.ca),
        "--cert-file", str(certs.ops.cert), "--key-file", str(certs.ops.key),
    ])  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"agentctl: error: {collector.address}: UNAUTHENTICATED: missing bearer token"
    )
    with pytest.raises(Rejected):
        query_fleet_status(
            collector.address,
            ClientAuth(ca_file=certs.ca, cert_file=certs.ops.cert, key_file=certs.ops.key),
        )
