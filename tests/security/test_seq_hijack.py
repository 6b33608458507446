"""Sequence numbers are not trusted blindly, and an agent_id belongs to its certificate.

Issue 14.1: with TLS + a shared token, one token holder who learned another agent's
``boot_id`` (the fleet query shows it) sent one batch with that agent's id and
``seq = 2^63``; the collector acked it, the victim's spool accepted the ack and
discarded its unacked batches (50 of 79 lost), and ``missing`` read 9.2e18. Here a
real collector process and a real agent process replay it: the forged batch is
rejected in-band and counted, the victim loses nothing. With mTLS, the first
certificate that streams an agent_id owns it (docs/SECURITY.md, "Sequence numbers
and agent identity").
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from rooftop.agent.credentials import ClientAuth
from rooftop.agent.fleet_query import query_fleet_status
from rooftop.collector.auth import IdentityBindings
from rooftop.common.wire import AGENT_ID_METADATA
from rooftop.v1 import telemetry_pb2 as pb
from tests.collector.helpers import AgentStream, batch, gpu
from tests.security.conftest import AgentProc, Certs, CollectorProc, wait_for
from tests.security.pki import Cert

TOKEN = "shared-agents-token"
READ_TOKEN = "read-only-token"
FORGED_SEQ = 2**63


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hijack-tokens")
    (d / "agents").write_text(TOKEN + "\n")
    (d / "read").write_text(READ_TOKEN + "\n")
    return {"agents": d / "agents", "read": d / "read"}


def node(fs: pb.FleetStatus, agent_id: str) -> pb.NodeStatus | None:
    return next((n for n in fs.nodes if n.agent_id == agent_id), None)


@pytest.mark.slow
def test_a_token_holder_forging_seq_2_63_for_another_agent_loses_it_nothing(
    certs: Certs, tokens: dict[str, Path], tmp_path: Path, procs: list
):
    collector = CollectorProc(
        tmp_path / "collector",
        tls_cert_file=certs.server.cert,
        tls_key_file=certs.server.key,
        token_file=tokens["agents"],
        read_token_file=tokens["read"],
    ).start()
    procs.append(collector)
    reader = ClientAuth(ca_file=certs.ca, token_file=tokens["read"])

    def fleet() -> pb.FleetStatus:
        return query_fleet_status(collector.address, reader)

    victim = AgentProc(tmp_path / "victim", collectors=[collector.address], ca_file=certs.ca,
                       token_file=tokens["agents"], agent_id="victim").start()  # fmt: skip
    procs.append(victim)
    wait_for(lambda: (n := node(fleet(), "victim")) is not None and n.acked_seq >= 5,
             "the victim streaming")  # fmt: skip
    seen = node(fleet(), "victim")
    assert seen is not None
    boot_id, acked_then = seen.boot_id, seen.acked_seq

    # The attacker holds the shared token and read the victim's boot_id off the fleet.
    attacker_md = [("authorization", f"Bearer {TOKEN}"), (AGENT_ID_METADATA, "victim")]
    credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    with AgentStream(collector.address, credentials=credentials, metadata=attacker_md) as s:
        s.send(batch(FORGED_SEQ, agent_id="victim", boot_id=boot_id, records=[gpu(0)]))
        s.send(batch(acked_then + 5_000_000, agent_id="victim", boot_id=boot_id))
        acks = s.wait(lambda a: len([x for x in a if x.rejected_seq]) == 2)
    rejected = [a for a in acks if a.rejected_seq]
    assert all(a.error.startswith("INVALID_ARGUMENT: seq") for a in rejected), rejected

    # The victim goes on, then stops gracefully: every batch it made must be applied.
    wait_for(lambda: (n := node(fleet(), "victim")) is not None and n.acked_seq > acked_then + 10,
             "the victim streaming on after the attack")  # fmt: skip
    assert victim.stop() == 0
    last_seq = victim.last_seq()
    fs = fleet()
    after = node(fs, "victim")
    assert after is not None
    print(f"\nvictim: {last_seq} batches made, {after.batches} applied, acked {after.acked_seq}; "
          f"rejected {dict(fs.collector.rejected)}, missing {fs.collector.missing}")  # fmt: skip
    assert after.acked_seq == last_seq
    assert after.batches == last_seq, "every batch the victim made was applied, once"
    assert dict(fs.collector.rejected).get("seq_jump") == 2
    assert fs.collector.missing == 0
    assert after.stats.acks_refused == 0  # the collector never acked the forged seq


@pytest.fixture
def mtls_collector(
    certs: Certs, tokens: dict[str, Path], tmp_path: Path
) -> Iterator[CollectorProc]:
    proc = CollectorProc(
        tmp_path / "mtls",
        tls_cert_file=certs.server.cert,
        tls_key_file=certs.server.key,
        tls_client_ca_file=certs.ca,
        token_file=tokens["agents"],
        read_token_file=tokens["read"],
    ).start()
    yield proc
    proc.stop()


@pytest.mark.slow
def test_with_mtls_an_agent_id_belongs_to_the_first_certificate_that_streams_it(
    mtls_collector: CollectorProc, certs: Certs, tokens: dict[str, Path]
):
    # A certificate that names agent-1 among others (misissued, or a shared one).
    impostor = certs.issue("impostor", cn="impostor", sans=("DNS:impostor", "DNS:agent-1"))

    def creds(cert: Cert) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(certs.ca.read_bytes(), *cert.pem())

    md = [("authorization", f"Bearer {TOKEN}"), (AGENT_ID_METADATA, "agent-1")]
    with AgentStream(mtls_collector.address, credentials=creds(certs.agent1), metadata=md) as s:
        s.send(batch(1, agent_id="agent-1"))
        s.wait_acked(1)
    with AgentStream(mtls_collector.address, credentials=creds(impostor), metadata=md) as s:
        s.send(batch(2, agent_id="agent-1"))
        s.wait_done()
        assert s.error is not None and s.error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "another client certificate" in (s.error.details() or "")
    # The owner's next stream (a reconnect, a renewed certificate with the same names) is fine.
    with AgentStream(mtls_collector.address, credentials=creds(certs.agent1), metadata=md) as s:
        s.send(batch(2, agent_id="agent-1"))
        assert s.wait_acked(2)[-1].acked_seq == 2
    auth = ClientAuth(ca_file=certs.ca, cert_file=certs.ops.cert, key_file=certs.ops.key,
                      token_file=tokens["read"])  # fmt: skip
    fs = query_fleet_status(mtls_collector.address, auth)
    assert dict(fs.collector.refused).get("agent_id_mismatch") == 1
    assert fs.collector.batches == 2


def test_identity_bindings_are_bounded_and_a_renewed_certificate_is_the_same_owner():
    bindings = IdentityBindings(max_agents=2)
    node1, node2, node3 = (frozenset({f"agent-{i}"}) for i in (1, 2, 3))
    assert bindings.claim("agent-1", node1)
    assert bindings.claim("agent-1", frozenset({"agent-1"}))  # renewed: same names
    assert not bindings.claim("agent-1", frozenset({"agent-1", "impostor"}))
    assert bindings.claim("agent-2", node2) and bindings.claim("agent-3", node3)
    assert len(bindings) == 2  # agent-1, least recently streaming, was forgotten
    assert bindings.claim("agent-1", frozenset({"agent-1", "impostor"}))
    assert bindings.claim("anyone", frozenset())  # nobody authenticated: nothing to bind
