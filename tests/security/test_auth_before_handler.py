"""Refusals happen before any handler runs: the servicers are spied on, in process.

The same collector code as the subprocess tests, in this process, so that
``IngestServicer.Stream`` and ``QueryServicer.GetFleetStatus`` can be wrapped with a
spy: for every refused call the spy must not have run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from rooftop.collector.auth import Refusal, Refusals, RefuseReason
from rooftop.collector.config import CollectorConfig
from rooftop.collector.fleet import Fleet
from rooftop.collector.ingest import IngestServer, IngestServicer
from rooftop.collector.query import QueryServicer
from rooftop.common.wire import AGENT_ID_METADATA
from rooftop.v1 import telemetry_pb2 as pb
from rooftop.v1 import telemetry_pb2_grpc
from tests.collector.helpers import AgentStream, batch, gpu, start_server
from tests.security.conftest import Certs


@pytest.fixture
def spied(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    stream, query = IngestServicer.Stream, QueryServicer.GetFleetStatus

    async def stream_spy(self, request_iterator, context):  # type: ignore[no-untyped-def]
        calls.append("Ingest/Stream")
        async for ack in stream(self, request_iterator, context):
            yield ack

    async def query_spy(self, request, context):  # type: ignore[no-untyped-def]
        calls.append("Query/GetFleetStatus")
        return await query(self, request, context)

    monkeypatch.setattr(IngestServicer, "Stream", stream_spy)
    monkeypatch.setattr(QueryServicer, "GetFleetStatus", query_spy)
    return calls


@pytest.fixture
def server(spied: list[str], certs: Certs, tmp_path: Path) -> Iterator[tuple[IngestServer, Fleet]]:
    del spied  # patched before the server registers the servicers
    (tmp_path / "token").write_text("agents-token\n")
    (tmp_path / "read").write_text("read-token\n")
    config = CollectorConfig(
        listen="127.0.0.1:0",
        tls_cert_file=certs.server.cert,
        tls_key_file=certs.server.key,
        tls_client_ca_file=certs.ca,
        token_file=tmp_path / "token",
        read_token_file=tmp_path / "read",
    ).validated()
    srv, fleet = start_server(config=config)
    yield srv, fleet
    srv.shutdown(timeout_s=1)


def _creds(certs: Certs, name: str = "agent1") -> grpc.ChannelCredentials:
    cert = getattr(certs, name)
    return grpc.ssl_channel_credentials(
        certs.ca.read_bytes(), cert.key.read_bytes(), cert.cert.read_bytes()
    )


def _stream_error(target: str, creds: grpc.ChannelCredentials, md: list) -> grpc.RpcError:
    with AgentStream(target, credentials=creds, metadata=md) as s:
        s.send(batch(1, agent_id="agent-2", records=[gpu(0)]))
        s.wait_done()
        assert s.error is not None
        return s.error


def test_no_handler_runs_for_a_refused_call(server, certs, spied):
    srv, fleet = server
    target = f"127.0.0.1:{srv.port}"
    cases = [
        ([], grpc.StatusCode.UNAUTHENTICATED),  # no token
        ([("authorization", "Bearer nope")], grpc.StatusCode.UNAUTHENTICATED),
        ([("authorization", "Bearer read-token")], grpc.StatusCode.PERMISSION_DENIED),
        (
            [("authorization", "Bearer agents-token"), (AGENT_ID_METADATA, "agent-2")],
            grpc.StatusCode.PERMISSION_DENIED,
        ),
    ]
    for md, code in cases:
        assert _stream_error(target, _creds(certs), md).code() == code
    with grpc.secure_channel(target, _creds(certs, "ops")) as channel:
        stub = telemetry_pb2_grpc.QueryStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetFleetStatus(pb.FleetStatusRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        assert spied == []  # not one handler ran
        assert fleet.counts().batches == 0 and not fleet.snapshot().agents
        assert dict(fleet.counts().refused) == {
            "missing_token": 2,
            "bad_token": 1,
            "read_only_token": 1,
            "identity_mismatch": 1,
        }
        # The right credentials reach the handlers.
        status = stub.GetFleetStatus(
            pb.FleetStatusRequest(), metadata=[("authorization", "Bearer read-token")], timeout=5
        )
        assert not status.nodes
    md = [("authorization", "Bearer agents-token"), (AGENT_ID_METADATA, "agent-1")]
    with AgentStream(target, credentials=_creds(certs), metadata=md) as s:
        s.send(batch(1, agent_id="agent-1", records=[gpu(0)]))
        assert s.wait_acked(1)[-1].acked_seq == 1
    assert spied == ["Query/GetFleetStatus", "Ingest/Stream"]


def test_a_plaintext_server_refuses_tokens_before_any_handler(spied):
    srv, fleet = start_server()
    try:
        md = [("authorization", "Bearer anything")]
        err = _stream_error(f"127.0.0.1:{srv.port}", None, md)  # type: ignore[arg-type]
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        srv.shutdown(timeout_s=1)
    assert spied == []
    assert fleet.counts().refused == (("token_over_plaintext", 1),)


def test_refusals_log_once_per_peer_and_reason_within_a_bound(caplog):
    fleet = Fleet()
    refusals = Refusals(fleet, max_peers=2)
    bad = Refusal(RefuseReason.BAD_TOKEN, grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
    missing = Refusal(RefuseReason.MISSING_TOKEN, grpc.StatusCode.UNAUTHENTICATED, "missing")
    with caplog.at_level(logging.WARNING, logger="rooftop.collector.ingest"):
        for port in range(40000, 40010):  # one peer, ten connections: one line
            refusals.refused(f"ipv4:10.0.0.1:{port}", bad)
        refusals.refused("ipv4:10.0.0.1:1", missing)  # another reason: its own line
        refusals.refused("ipv6:[::1]:5", bad)  # (10.0.0.1, bad_token) is forgotten now
        refusals.refused("ipv4:10.0.0.1:2", bad)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines
    assert lines[0].startswith("refused ipv4:10.0.0.1 (bad_token): UNAUTHENTICATED:")
    assert "ipv6:[::1] (bad_token)" in lines[2]
    assert dict(fleet.counts().refused) == {"bad_token": 12, "missing_token": 1}
