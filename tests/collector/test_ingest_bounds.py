"""The ingest stream under abuse, against a REAL grpc.aio server on loopback: a message
that is not a Batch, a new agent past ``max_agents``, an over-long label, a client that
never reads its acks, and a flood of one kind of log line."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import grpc
import pytest

from rooftop.collector.fleet import Fleet
from rooftop.collector.ingest import IngestServer
from rooftop.v1 import telemetry_pb2 as pb
from rooftop.v1 import telemetry_pb2_grpc
from tests.collector.helpers import AgentStream, batch, gpu, start_server, target
from tests.support import wait_for


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[tuple[IngestServer, Fleet]]:
    """An ingest server; ``@pytest.mark.parametrize("served", [{...}], indirect=True)``
    sets config fields."""
    server, fleet = start_server(**getattr(request, "param", {}))
    yield server, fleet
    server.shutdown(timeout_s=1)


def test_a_message_that_is_not_a_batch_ends_the_stream_invalid_argument_and_is_counted(served):
    server, fleet = served
    with grpc.insecure_channel(target(server)) as channel:
        stream = channel.stream_stream("/rooftop.v1.Ingest/Stream",
                                       request_serializer=lambda raw: raw,
                                       response_deserializer=pb.Ack.FromString)  # fmt: skip
        good = batch(1, records=[gpu(0)]).SerializeToString()
        with pytest.raises(grpc.RpcError) as failed:
            list(stream(iter([good, b"\xff\xff\xff\xff not protobuf"]), timeout=10))
    assert failed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a rooftop.v1.Batch" in failed.value.details()
    assert dict(fleet.counts().rejected) == {"unreadable": 1}
    assert fleet.counts().batches == 1  # the good batch before it was applied


@pytest.mark.parametrize("served", [{"max_agents": 1}], indirect=True)
def test_a_new_agent_past_max_agents_gets_resource_exhausted_and_the_known_one_goes_on(served):
    server, fleet = served
    with AgentStream(target(server)) as known:
        known.send(batch(1, agent_id="known", records=[gpu(0)]))
        known.wait_acked(1)
        with AgentStream(target(server)) as newcomer:
            newcomer.send(batch(1, agent_id="newcomer", records=[gpu(0)]))
            newcomer.wait_done()
        assert newcomer.error is not None
        assert newcomer.error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # retryable
        assert "max_agents (1)" in newcomer.error.details()
        assert all(a.acked_seq == 0 for a in newcomer.acks)  # the agent keeps it, retries
        known.send(batch(2, agent_id="known", records=[gpu(0)]))
        known.wait_acked(2)
    assert dict(fleet.counts().limited) == {"agents": 1}
    assert [a.agent_id for a in fleet.snapshot().agents] == ["known"]


def test_an_over_long_label_is_rejected_in_band_and_the_stream_goes_on(served):
    server, fleet = served
    with AgentStream(target(server)) as stream:
        stream.send(batch(1, hostname="h" * 1000, records=[gpu(0)]),
                    batch(2, records=[gpu(0)]))  # fmt: skip
        acks = stream.wait_acked(2)
    rejected = [a for a in acks if a.rejected_seq == 1]
    assert rejected and rejected[0].error.startswith("INVALID_ARGUMENT: hostname is longer")
    assert dict(fleet.counts().rejected) == {"label_too_long": 1}
    assert fleet.counts().batches == 1


@pytest.mark.parametrize("served", [{"max_unread_acks": 16}], indirect=True)
def test_a_client_that_never_reads_its_acks_has_its_stream_closed_and_counted(served):
    server, fleet = served
    sent = 0
    closed = threading.Event()

    def poison() -> Iterator[pb.Batch]:
        nonlocal sent
        for seq in range(1, 200_000):
            if closed.is_set():
                return
            flood = pb.Batch(agent_id="flood", boot_id="b", seq=seq)
            flood.records.add()  # poison: each one an in-band rejection ack
            sent = seq
            yield flood

    # No BDP probing: the client's window stays small, so unread acks back up soon.
    with grpc.insecure_channel(target(server), options=[("grpc.http2.bdp_probe", 0)]) as ch:
        call = telemetry_pb2_grpc.IngestStub(ch).Stream(poison())  # never read
        wait_for(lambda: dict(fleet.counts().limited).get("unread_acks") == 1, timeout_s=30)
        closed.set()
        wait_for(lambda: fleet.counts().streams == 0)
        call.cancel()
    assert sent < 199_999


def test_a_flood_of_poison_logs_one_line_not_one_per_batch(served, caplog):
    server, fleet = served
    with caplog.at_level(logging.WARNING, "rooftop.collector.ingest"), \
            AgentStream(target(server)) as stream:  # fmt: skip
        for seq in range(1, 201):
            poison = pb.Batch(agent_id="a", boot_id="b", seq=seq)
            poison.records.add()
            stream.send(poison)
        stream.wait(lambda acks: any(a.rejected_seq == 200 for a in acks))
    assert dict(fleet.counts().rejected) == {"empty_record": 200}  # every one counted
    lines = [r for r in caplog.records if "rejected batch" in r.getMessage()]
    assert len(lines) == 1
