"""Ingest against a REAL grpc.aio server on 127.0.0.1 (port 0) with real client streams."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rooftop.collector.config import CollectorConfig
from rooftop.collector.fleet import DecodedBatch, Fleet
from rooftop.collector.ingest import IngestServer, server_options
from rooftop.collector.query import fleet_status
from rooftop.common.codec import verdict_to_proto
from rooftop.common.errors import ConfigError
from rooftop.common.model import Bound
from rooftop.common.wire import INGEST_SERVICE
from rooftop.v1 import telemetry_pb2 as pb
from tests.collector.helpers import (
    AgentStream,
    batch,
    engine,
    gpu,
    start_server,
    target,
    verdict,
)


@pytest.fixture
def served() -> Iterator[tuple[IngestServer, Fleet]]:
    server, fleet = start_server()
    yield server, fleet
    server.shutdown(timeout_s=1)


def wait_for(pred, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_acks_are_cumulative_and_coalesced(served):
    server, fleet = served
    with AgentStream(target(server)) as stream:
        stream.send(*(batch(seq, records=[gpu(seq % 8)]) for seq in range(1, 301)))
        acks = stream.wait_acked(300)
    seqs = [a.acked_seq for a in acks]
    assert seqs == sorted(seqs), "cumulative acks never go back"
    assert seqs[-1] == 300
    assert len(acks) < 300, "acks are coalesced, not one per batch"
    assert all(a.boot_id == "boot-1" and not a.rejected_seq for a in acks)
    counts = fleet.counts()
    assert (counts.batches, counts.samples, counts.duplicates) == (300, 300, 0)


def test_resent_seqs_are_applied_once(served):
    server, fleet = served
    first = [batch(seq, records=[gpu(0), gpu(1)]) for seq in range(1, 11)]
    with AgentStream(target(server)) as stream:
        stream.send(*first)
        stream.wait_acked(10)
    # A reconnect after a lost ack: the agent resends 1..10, then goes on with 11.
    with AgentStream(target(server)) as stream:
        stream.send(*first, batch(11, records=[gpu(0)]))
        acks = stream.wait_acked(11)
    assert acks[-1].acked_seq == 11
    counts = fleet.counts()
    assert counts.batches == 11
    assert counts.samples == 21
    assert counts.duplicates == 10
    agent = fleet.snapshot().agents[0]
    assert (agent.batches, agent.samples) == (11, 21)


def test_duplicates_within_one_stream_are_dropped(served):
    server, fleet = served
    with AgentStream(target(server)) as stream:
        stream.send(batch(1), batch(2), batch(2), batch(1), batch(3))
        stream.wait_acked(3)
    assert fleet.counts().batches == 3
    assert fleet.counts().duplicates == 2


def _poison(kind: str) -> pb.Batch:
    if kind == "nan":
        return batch(2, records=[gpu(0), gpu(1, dram_bw_pct=math.nan)])
    if kind == "negative":
        return batch(2, records=[gpu(0, power_w=-5.0)])
    if kind == "over_100":
        return batch(2, records=[gpu(0, busy_pct=180.0)])
    if kind == "engine_inf":
        return batch(2, records=[engine(tpot_ms=math.inf)])
    if kind == "bad_verdict":
        bad = verdict_to_proto(verdict())
        bad.verdict = "sort-of-bound"
        return batch(2, verdicts=[bad])
    if kind == "bad_cause":
        bad = verdict_to_proto(verdict(bound=Bound.HOST))
        bad.cause = "gremlins"
        return batch(2, verdicts=[bad])
    if kind == "empty_record":
        return batch(2, records=[pb.TraceRecord()])
    if kind == "no_time":
        b = batch(2, records=[gpu(0)])
        b.records[0].gpu.ClearField("time")
        return b
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "reason", "words"),
    [
        ("nan", "invalid_value", "dram_bw_pct is nan"),
        ("negative", "invalid_value", "power_w is negative"),
        ("over_100", "invalid_value", "busy_pct is over 100"),
        ("engine_inf", "invalid_value", "tpot_ms is inf"),
        ("bad_verdict", "bad_enum", "sort-of-bound"),
        ("bad_cause", "bad_enum", "gremlins"),
        ("empty_record", "empty_record", "none of gpu"),
        ("no_time", "missing_time", "has no time"),
    ],
)
def test_poison_batch_is_rejected_in_band_and_the_stream_goes_on(served, kind, reason, words):
    server, fleet = served
    with AgentStream(target(server)) as stream:
        stream.send(batch(1, records=[gpu(0)]), _poison(kind), batch(3, records=[gpu(0)]))
        acks = stream.wait_acked(3)
    rejections = [a for a in acks if a.rejected_seq]
    assert len(rejections) == 1
    assert rejections[0].rejected_seq == 2
    assert rejections[0].error.startswith("INVALID_ARGUMENT: ")
    assert words in rejections[0].error
    counts = fleet.counts()
    assert counts.rejected == ((reason, 1),)
    assert counts.batches == 2  # 1 and 3; the poison one was consumed, not applied


def test_batch_without_identity_is_rejected(served):
    server, fleet = served
    with AgentStream(target(server)) as stream:
        stream.send(batch(5, agent_id=""), batch(0), batch(1))
        acks = stream.wait_acked(1)
    rejected = [a for a in acks if a.error]
    assert [a.rejected_seq for a in rejected] == [5, 0]
    assert "agent_id" in rejected[0].error and "seq" in rejected[1].error
    assert fleet.counts().rejected == (("missing_identity", 2),)


def test_future_dated_samples_are_clamped_and_counted(served):
    server, fleet = served
    ahead_s = time.time() + 3600  # an agent whose clock is an hour fast
    with AgentStream(target(server)) as stream:
        stream.send(batch(1, records=[gpu(0, time_s=ahead_s), gpu(1)]))
        stream.wait_acked(1)
    snap = fleet.snapshot()
    assert snap.counts.skewed == 1
    g0 = next(g for g in snap.gpus if g.gpu_index == 0)
    assert g0.sample is not None and g0.sample.time_s <= time.time()
    assert snap.agents[0].lag_s is not None and 0 <= snap.agents[0].lag_s < 5


def applied_1_to_3(server: IngestServer) -> None:
    """An agent's seqs 1-3 applied and acked on a stream of their own (now closed)."""
    with AgentStream(target(server)) as stream:
        stream.send(batch(1), batch(2), batch(3))
        stream.wait_acked(3)


def test_reconnect_past_a_gap_skips_what_the_agent_dropped(served):
    server, fleet = served
    applied_1_to_3(server)
    # The agent's spool dropped 4..6 while it was disconnected; it resumes at 7.
    with AgentStream(target(server)) as stream:
        stream.send(batch(7), batch(8))
        acks = stream.wait_acked(8)
    assert acks[-1].acked_seq == 8
    assert fleet.counts().missing == 3


def acked_elsewhere(seq: int, acked_seq: int) -> pb.Batch:
    """Batch ``seq`` of an agent that had seen ``acked_seq`` acked (by any collector)."""
    msg = batch(seq)
    msg.acked_seq = acked_seq
    return msg


def test_a_gap_another_collector_acked_is_counted_acked_elsewhere_not_missing(served):
    server, fleet = served
    applied_1_to_3(server)
    # The agent was away: another collector applied and acked 4..6; it comes back at 7.
    with AgentStream(target(server)) as stream:
        stream.send(acked_elsewhere(7, 6), acked_elsewhere(8, 7))
        acks = stream.wait_acked(8)
    assert acks[-1].acked_seq == 8
    counts = fleet.counts()
    assert (counts.missing, counts.acked_elsewhere) == (0, 3)
    status = fleet_status(fleet.snapshot()).collector  # what agentctl status reads
    assert (status.missing, status.acked_elsewhere) == (0, 3)


def test_a_gap_without_acked_seq_is_missing_as_from_an_older_agent(served):
    server, fleet = served
    applied_1_to_3(server)
    with AgentStream(target(server)) as stream:
        stream.send(batch(7), batch(8))  # no acked_seq: the field absent reads 0
        stream.wait_acked(8)
    counts = fleet.counts()
    assert (counts.missing, counts.acked_elsewhere) == (3, 0)


def test_only_the_seqs_up_to_acked_seq_count_as_acked_elsewhere(served):
    server, fleet = served
    applied_1_to_3(server)
    # Acked elsewhere up to 5; 6 the agent's spool dropped before anyone had it.
    with AgentStream(target(server)) as stream:
        stream.send(acked_elsewhere(7, 5))
        stream.wait_acked(7)
    counts = fleet.counts()
    assert (counts.missing, counts.acked_elsewhere) == (1, 2)


def test_a_forged_acked_seq_above_the_batch_is_clamped_and_acks_nothing_unapplied(served):
    server, fleet = served
    applied_1_to_3(server)
    with AgentStream(target(server)) as stream:
        stream.send(acked_elsewhere(7, 2**63))
        acks = stream.wait_acked(7)
        assert max(a.acked_seq for a in acks) == 7, "the ack stops at the batch's own seq"
        # A seq of the gap that does arrive is still applied, not taken for a duplicate.
        stream.send(batch(5))
        wait_for(lambda: fleet.counts().batches == 5)
    counts = fleet.counts()
    assert (counts.missing, counts.acked_elsewhere, counts.duplicates) == (0, 3, 0)


def test_every_ack_says_the_collector_reads_columns(served):
    server, _ = served
    with AgentStream(target(server)) as stream:
        stream.send(batch(1, records=[gpu(0)]), batch(2, records=[gpu(0, busy_pct=float("nan"))]))
        acks = stream.wait(lambda acks: any(a.rejected_seq == 2 for a in acks))
        acks = stream.wait_acked(2)
    assert acks and all(a.columns for a in acks), "cumulative and rejection acks alike"


def test_oversized_message_gets_resource_exhausted_and_the_server_stays_healthy(served):
    server, fleet = served
    huge = batch(1, records=[gpu(0, gpu_name="x" * (4 * 2**20 + 1000))])
    assert huge.ByteSize() > 4 * 2**20
    with AgentStream(target(server)) as stream:
        stream.send(huge)
        stream.wait_done()
        assert stream.error is not None
        assert stream.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with AgentStream(target(server)) as stream:
        stream.send(batch(1, records=[gpu(0)]))
        assert stream.wait_acked(1)[-1].acked_seq == 1
    assert fleet.counts().batches == 1
    with grpc.insecure_channel(target(server)) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_health_reports_serving_for_the_server_and_ingest(served):
    server, _ = served
    with grpc.insecure_channel(target(server)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", INGEST_SERVICE):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_fleet_state_and_observers_see_applied_batches():
    seen: list[tuple[DecodedBatch, float]] = []

    class Recorder:
        def observe_batch(self, decoded: DecodedBatch, received_s: float) -> None:
            seen.append((decoded, received_s))

    server, fleet = start_server(observers=[Recorder()])
    try:
        stats = pb.AgentStats(queued=3, sent=10, acked=7, dropped_spool_full=2, reconnects=1)
        with AgentStream(f"127.0.0.1:{server.port}") as stream:
            stream.send(
                batch(
                    1,
                    records=[gpu(0), gpu(1), engine()],
                    verdicts=[verdict(0, Bound.MEMORY)],
                    stats=stats,
                )
            )
            stream.wait_acked(1)
    finally:
        server.shutdown(timeout_s=1)
    assert len(seen) == 1 and seen[0][0].seq == 1
    snap = fleet.snapshot()
    assert snap.agents[0].hostname == "gpu-node-1"
    assert snap.agents[0].stats.dropped_spool_full == 2
    g0 = next(g for g in snap.gpus if g.gpu_index == 0)
    assert g0.verdict is not None and g0.verdict.verdict is Bound.MEMORY
    assert g0.engine is not None and g0.engine.tpot_ms == 5.84  # attributed by pid


class _HoldingObserver:
    """Holds the apply thread on agent ``stuck``'s batch until ``release`` is set."""

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.release = threading.Event()

    def observe_batch(self, decoded: DecodedBatch, received_s: float) -> None:
        if decoded.agent_id == "stuck":
            self.holding.set()
            self.release.wait(10)


def test_new_streams_are_taken_and_health_answers_while_a_batch_is_being_applied():
    # A failover burst meets a busy collector: while a batch is being applied, the
    # event loop still takes new streams (applied on the apply thread, not the loop).
    holder = _HoldingObserver()
    server, fleet = start_server(observers=[holder])
    others: list[AgentStream] = []
    try:
        with AgentStream(target(server)) as stuck:
            stuck.send(batch(1, agent_id="stuck"))
            assert holder.holding.wait(10)
            for i in range(20):
                others.append(AgentStream(target(server)))
                others[-1].send(batch(1, agent_id=f"moved-{i}"))
            wait_for(lambda: fleet.counts().streams == 21)  # every one opened meanwhile
            with grpc.insecure_channel(target(server)) as channel:
                health = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=INGEST_SERVICE), timeout=5
                )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert fleet.counts().batches == 1  # the held one: the others wait behind it
            holder.release.set()
            stuck.wait_acked(1)
            for other in others:
                other.wait_acked(1)
        assert fleet.counts().batches == 21
    finally:
        holder.release.set()
        for other in others:
            other.close()
        server.shutdown(timeout_s=1)


def test_a_token_needs_tls_and_is_refused_over_plaintext(tmp_path: Path):
    # The token checks themselves, over TLS: tests/security/test_security_refusals.py.
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    with pytest.raises(ConfigError, match="token_file"):
        start_server(token_file=token)
    server, fleet = start_server()
    try:
        tgt = f"127.0.0.1:{server.port}"
        with AgentStream(tgt, metadata=[("authorization", "Bearer s3cret")]) as stream:
            stream.send(batch(1))
            stream.wait_done()
            assert stream.error is not None
            assert stream.error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "plaintext" in (stream.error.details() or "")
        assert fleet.counts().batches == 0
        assert fleet.counts().refused == (("token_over_plaintext", 1),)
        with grpc.insecure_channel(tgt) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.shutdown(timeout_s=1)


def test_plaintext_must_be_asked_for():
    with pytest.raises(ConfigError, match="insecure"):
        IngestServer(Fleet(), CollectorConfig(listen="127.0.0.1:0"))


def test_a_taken_port_is_a_config_error(served):
    server, _ = served
    other = IngestServer(Fleet(), CollectorConfig(listen=f"127.0.0.1:{server.port}", insecure=True))
    with pytest.raises(ConfigError, match="collector.listen"):
        other.start()


def test_shutdown_is_idempotent_and_ends_open_streams():
    server, _ = start_server()
    stream = AgentStream(f"127.0.0.1:{server.port}")
    stream.send(batch(1))
    stream.wait_acked(1)
    server.shutdown(timeout_s=0.5)
    server.shutdown(timeout_s=0.5)
    stream.wait_done()
    stream.close()


def test_server_options_permit_30s_client_keepalive():
    opts = dict(server_options(4 * 2**20))
    assert opts["grpc.max_receive_message_length"] == 4 * 2**20
    assert opts["grpc.keepalive_permit_without_calls"] == 1
    assert opts["grpc.http2.min_recv_ping_interval_without_data_ms"] <= 30_000


def test_a_jump_inside_a_stream_is_skipped_not_waited_for(served):
    # The agent skipped 3 mid-stream (a corrupt spool record, an over-cap batch): nothing
    # will ever fill it, so acks must go on past it. Waiting stalled the agent's 64-batch
    # in-flight window for good (tests/e2e, scenario d).
    server, fleet = served
    with AgentStream(target(server)) as stream:
        stream.send(batch(1), batch(2), *(batch(s) for s in range(4, 80)))
        acks = stream.wait_acked(79)
    assert acks[-1].acked_seq == 79
    assert fleet.counts().missing == 1
    assert fleet.counts().batches == 78


def test_a_boot_id_with_a_newline_is_refused_in_band_and_never_logged_raw(served, caplog):
    server, fleet = served
    forged = "boot-1\nERROR rooftop.collector.ingest: forged line\x1b[2J"
    with caplog.at_level("DEBUG"), AgentStream(target(server)) as stream:
        stream.send(batch(1, boot_id=forged, records=[gpu(0)]), batch(1, records=[gpu(0)]))
        acks = stream.wait_acked(1)
    (rejected,) = [a for a in acks if a.rejected_seq]
    assert rejected.error.startswith("INVALID_ARGUMENT: boot_id 'boot-1\\nERROR")
    assert fleet.counts().rejected == (("bad_identity", 1),)
    assert fleet.counts().batches == 1  # the well-formed one goes on
    # Never a de-duplication key: only boot-1 holds a mark.
    assert len(server.servicer.dedup) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("bad_identity" in m or "boot-1\\nERROR" in m for m in messages), messages
    assert not any("\n" in m or "\x1b" in m for m in messages), messages
