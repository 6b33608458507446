"""Stream against a REAL gRPC server on 127.0.0.1 (port 0) with a configurable fake Ingest."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from rooftop.agent.batcher import Batcher
from rooftop.agent.spool import Spool
from rooftop.agent.stream import (
    Streamer,
    _Session,
    backoff_delay_s,
    channel_options,
    map_grpc_errors,
)
from rooftop.common.errors import Rejected, Retryable
from rooftop.v1 import telemetry_pb2 as pb
from rooftop.v1 import telemetry_pb2_grpc
from tests.support import BOOT, FakeIngest, Proxy, Server, free_port, wait_for


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    made: list[Server] = []
    yield made
    for server in made:
        server.stop()


def serve(servers: list[Server], **kw) -> Server:
    server = Server(FakeIngest(**kw))
    servers.append(server)
    return server


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    spool = Spool(tmp_path / "spool", fsync_interval_s=0.05)
    spool.start()
    yield spool
    spool.shutdown(5)


@pytest.fixture
def make_streamer(spool: Spool) -> Iterator[Callable[..., Streamer]]:
    made: list[Streamer] = []

    def make(collectors: list[str], **kw) -> Streamer:
        kw.setdefault("backoff_base_s", 0.05)
        kw.setdefault("backoff_max_s", 0.2)
        kw.setdefault("poll_interval_s", 0.02)
        kw.setdefault("connect_timeout_s", 3.0)
        kw.setdefault("rng", random.Random(1))
        streamer = Streamer(spool, collectors, **kw)
        made.append(streamer)
        streamer.start()
        return streamer

    yield make
    for streamer in made:
        streamer.shutdown(2)


def enqueue(spool: Spool, batcher: Batcher, n: int, records: int = 3) -> None:
    for _ in range(n):
        recs = [pb.TraceRecord(gpu=pb.GpuSample(gpu_index=i)) for i in range(records)]
        for batch in batcher.make(recs):
            spool.append(batch)


def test_batches_delivered_in_order_and_acked(spool, make_streamer, servers):
    server = serve(servers)
    batcher = Batcher("node-1", BOOT)
    enqueue(spool, batcher, 20)
    streamer = make_streamer([server.address])
    wait_for(lambda: spool.queued == 0)
    assert server.servicer.seqs() == list(range(1, 21))
    assert streamer.stats().acked == 20
    assert streamer.stats().connected
    first = server.servicer.received[0]
    assert (first.agent_id, first.boot_id, first.seq) == ("node-1", BOOT, 1)
    assert first.HasField("sent_time")


def test_reconnect_after_server_restart_loses_nothing(spool, make_streamer, servers):
    server = serve(servers)
    batcher = Batcher("node-1", BOOT)
    enqueue(spool, batcher, 10)
    streamer = make_streamer([server.address])
    wait_for(lambda: spool.queued == 0)
    server.stop()
    enqueue(spool, batcher, 10)  # produced while the collector is down: spooled
    time.sleep(0.3)  # a few failed reconnects
    assert spool.queued == 10
    server.start()
    streamer.wake()
    wait_for(lambda: spool.queued == 0)
    assert sorted(set(server.servicer.seqs())) == list(range(1, 21))
    assert streamer.stats().reconnects >= 1
    # The self-metrics ride in-band: later batches report the reconnects.
    last = server.servicer.received[-1]
    assert last.stats.reconnects >= 1
    assert last.stats.sent >= 10


def test_fails_over_to_the_next_address(spool, make_streamer, servers):
    dead = f"127.0.0.1:{free_port()}"
    server = serve(servers)
    batcher = Batcher("node-1", BOOT)
    enqueue(spool, batcher, 5)
    streamer = make_streamer([dead, server.address], backoff_base_s=5.0, backoff_max_s=5.0)
    # The dead address is skipped at once, without waiting for a backoff.
    wait_for(lambda: spool.queued == 0, timeout_s=4.0)
    assert server.servicer.seqs() == [1, 2, 3, 4, 5]
    assert streamer.stats().address == server.address


def test_fails_over_when_the_first_collector_dies(spool, make_streamer, servers):
    first, second = serve(servers), serve(servers)
    batcher = Batcher("node-1", BOOT)
    enqueue(spool, batcher, 5)
    streamer = make_streamer([first.address, second.address])
    wait_for(lambda: spool.queued == 0)
    first.stop()
    enqueue(spool, batcher, 5)
    streamer.wake()
    wait_for(lambda: spool.queued == 0)
    assert first.servicer.seqs() == [1, 2, 3, 4, 5]
    assert set(range(6, 11)) <= set(second.servicer.seqs())


def test_fails_over_from_an_address_that_never_handshakes(spool, make_streamer, servers):
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(8)  # TCP connects, HTTP/2 never answers: only the connect timeout helps
    try:
        server = serve(servers)
        enqueue(spool, Batcher("node-1", BOOT), 3)
        hung = f"127.0.0.1:{hang.getsockname()[1]}"
        make_streamer([hung, server.address], connect_timeout_s=0.5)
        wait_for(lambda: spool.queued == 0, timeout_s=5.0)
        assert server.servicer.seqs() == [1, 2, 3]
    finally:
        hang.close()


def test_keepalive_detects_a_silent_partition(spool, make_streamer, servers):
    server = serve(servers)
    proxy = Proxy(server.port)
    try:
        batcher = Batcher("node-1", BOOT)
        enqueue(spool, batcher, 3)
        streamer = make_streamer(
            [proxy.address], keepalive_time_s=0.2, keepalive_timeout_s=0.5, connect_timeout_s=0.5
        )
        wait_for(lambda: spool.queued == 0)
        proxy.freeze()
        enqueue(spool, batcher, 3)
        streamer.wake()
        # No FIN, no RST: only an unanswered keepalive ping can tell the stream is dead.
        wait_for(lambda: streamer.stats().reconnects >= 1, timeout_s=5.0)
        assert spool.queued == 3
        proxy.heal()
        wait_for(lambda: spool.queued == 0)
        assert set(server.servicer.seqs()) == set(range(1, 7))
    finally:
        proxy.close()


def test_rejected_seq_is_counted_and_not_resent(spool, make_streamer, servers):
    server = serve(servers, reject={3})
    batcher = Batcher("node-1", BOOT)
    enqueue(spool, batcher, 5)
    streamer = make_streamer([server.address])
    wait_for(lambda: spool.queued == 0)
    assert streamer.stats().rejected_batches == 1
    server.stop()  # a reconnect resends whatever is unacked: seq 3 must not be among it
    server.start()
    enqueue(spool, batcher, 1)
    streamer.wake()
    wait_for(lambda: spool.queued == 0)
    assert server.servicer.count(3) == 1
    assert server.servicer.received[-1].stats.rejected_batches == 1


def test_stats_in_band(spool, make_streamer, servers):
    server = serve(servers)
    batcher = Batcher("node-1", BOOT)
    enqueue(spool, batcher, 3)
    make_streamer([server.address])
    wait_for(lambda: spool.queued == 0)
    enqueue(spool, batcher, 1)
    wait_for(lambda: spool.queued == 0)
    stats = server.servicer.received[-1].stats
    assert stats.sent == 4  # this batch included
    assert stats.acked == 3  # the ones before it
    assert stats.queued == 1  # itself, not yet acked when it left
    assert stats.dropped_spool_full == stats.dropped_corrupt == stats.reconnects == 0


def test_oversize_batch_is_split_and_fully_delivered(spool, make_streamer, servers):
    server = serve(servers)
    batcher = Batcher("node-1", BOOT)
    records = [pb.TraceRecord(gpu=pb.GpuSample(gpu_index=i % 8)) for i in range(1200)]
    verdicts = [pb.Verdict(gpu_index=0, verdict="memory-bound")]
    parts = batcher.make(records, verdicts)
    assert [len(p.records) for p in parts] == [500, 500, 200]
    assert [p.seq for p in parts] == [1, 2, 3]
    assert len(parts[-1].verdicts) == 1
    big = [pb.TraceRecord(gpu=pb.GpuSample(gpu_name="x" * 100_000)) for _ in range(25)]
    big_parts = batcher.make(big)
    assert len(big_parts) >= 3
    assert all(p.ByteSize() <= 1024 * 1024 for p in big_parts)
    for part in parts + big_parts:
        spool.append(part)
    make_streamer([server.address])
    wait_for(lambda: spool.queued == 0)
    got = [b for b in server.servicer.received]
    assert sum(len(b.records) for b in got) == 1200 + 25
    assert server.servicer.seqs() == list(range(1, len(parts) + len(big_parts) + 1))


def test_batch_over_the_message_cap_is_dropped_counted(spool, make_streamer, servers):
    server = serve(servers)
    batcher = Batcher("node-1", BOOT, max_batch_bytes=4 * 1024 * 1024)
    spool.append(batcher.make([pb.TraceRecord(gpu=pb.GpuSample(gpu_name="x" * 200_000))])[0])
    enqueue(spool, batcher, 1)
    streamer = make_streamer([server.address], max_message_bytes=100_000)
    wait_for(lambda: spool.queued == 0)
    assert server.servicer.seqs() == [2]
    assert streamer.stats().dropped_invalid == 1
    assert server.servicer.received[-1].stats.dropped_invalid == 1


def test_map_grpc_errors_against_a_refusing_server(servers):
    refusing = serve(servers, abort=grpc.StatusCode.UNAUTHENTICATED)
    with grpc.insecure_channel(refusing.address) as channel:
        stub = telemetry_pb2_grpc.IngestStub(channel)
        with pytest.raises(Rejected, match="UNAUTHENTICATED"):
            with map_grpc_errors(refusing.address):
                list(stub.Stream(iter([pb.Batch(seq=1)])))
    with grpc.insecure_channel(f"127.0.0.1:{free_port()}") as channel:
        stub = telemetry_pb2_grpc.IngestStub(channel)
        with pytest.raises(Retryable, match="UNAVAILABLE"):
            with map_grpc_errors():
                list(stub.Stream(iter([pb.Batch(seq=1)])))


def test_refusing_collector_is_retried_not_fatal(spool, make_streamer, servers):
    server = serve(servers, abort=grpc.StatusCode.PERMISSION_DENIED)
    enqueue(spool, Batcher("node-1", BOOT), 1)
    streamer = make_streamer([server.address])
    wait_for(lambda: server.servicer.streams >= 2)
    assert spool.queued == 1  # nothing lost, still retrying
    assert streamer.stats().reconnects >= 1


def test_backoff_grows_by_1_6_with_jitter_and_caps_at_30_s():
    rng = random.Random(7)
    delays = [backoff_delay_s(n, rng=rng) for n in range(12)]
    assert 0.8 <= delays[0] <= 1.2
    for n, delay in enumerate(delays):
        nominal = min(30.0, 1.6**n)
        assert nominal * 0.8 - 1e-9 <= delay <= min(30.0, nominal * 1.2) + 1e-9
    assert max(delays) <= 30.0
    assert backoff_delay_s(100, rng=rng) <= 30.0
    assert backoff_delay_s(0, base_s=0.01, jitter=0.0) == pytest.approx(0.01)


def test_channel_options_are_explicit():
    opts = dict(
        channel_options(keepalive_time_s=30, keepalive_timeout_s=10, max_message_bytes=4 << 20)
    )
    assert opts["grpc.keepalive_time_ms"] == 30_000
    assert opts["grpc.keepalive_timeout_ms"] == 10_000
    assert opts["grpc.keepalive_permit_without_calls"] == 1
    assert opts["grpc.max_send_message_length"] == opts["grpc.max_receive_message_length"]


def test_shutdown_stops_the_stream_even_when_its_cancel_is_swallowed(spool, monkeypatch):
    """grpc.aio passes the shutdown's cancel on to the call's _prepare_rpc task, which
    swallows it when the call has just failed: the attempt then ends in a plain
    Retryable, as here, and the stream must not back off and reconnect."""

    async def stream_swallowing_cancel(self: Streamer, session: _Session) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(30)
        raise Retryable(f"{session.address}: UNAVAILABLE: failed to connect")

    monkeypatch.setattr(Streamer, "_stream", stream_swallowing_cancel)
    streamer = Streamer(spool, [f"127.0.0.1:{free_port()}"], backoff_base_s=30, backoff_max_s=30)
    streamer.start()
    streamer.shutdown(2)
    assert streamer._thread is not None and not streamer._thread.is_alive()


def test_flush_times_out_without_a_collector_and_shutdown_is_idempotent(spool):
    enqueue(spool, Batcher("node-1", BOOT), 1)
    streamer = Streamer(
        spool,
        [f"127.0.0.1:{free_port()}"],
        backoff_base_s=0.05,
        backoff_max_s=0.1,
        connect_timeout_s=1.0,
    )
    streamer.start()
    started = time.monotonic()
    assert not streamer.flush(0.3)
    assert time.monotonic() - started < 2
    streamer.shutdown(1)
    streamer.shutdown(1)
    assert spool.queued == 1  # still spooled for the next start


# --- acks are not trusted blindly (SECURITY.md, "Sequence numbers and agent identity") -------

FORGED_SEQ = 2**63


class ForgingIngest(FakeIngest):
    """Answers the first batch it ever gets with an ack of seq 2^63, then acks honestly.

    What the collector did before its seq bound: another token holder had sent the
    victim's agent_id and boot_id with seq 2^63, and every later ack carried it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.forged = False

    def Stream(self, request_iterator, context):  # noqa: N802 - the RPC's name
        for ack in super().Stream(request_iterator, context):
            if not self.forged:
                self.forged = True
                ack = pb.Ack(boot_id=ack.boot_id, acked_seq=FORGED_SEQ)
            yield ack


def test_an_ack_above_every_seq_sent_is_refused_counted_and_nothing_is_lost(
    spool, make_streamer, servers
):
    server = Server(ForgingIngest())
    servers.append(server)
    batcher = Batcher("node-1", BOOT)
    enqueue(spool, batcher, 5)
    streamer = make_streamer([server.address])
    wait_for(lambda: streamer.stats().acks_refused >= 1)
    # Batched after the forged ack: accepting it had marked these delivered unsent.
    enqueue(spool, batcher, 15)
    streamer.wake()
    wait_for(lambda: spool.queued == 0)
    assert sorted(set(server.servicer.seqs())) == list(range(1, 21))
    assert streamer.stats().acks_refused == 1
    assert server.servicer.received[-1].stats.acks_refused == 1


@pytest.mark.parametrize("applied", [10, 13], ids=["all-spooled", "unsynced-tail-lost"])
def test_an_ack_of_batches_an_earlier_run_sent_is_accepted(tmp_path: Path, servers, applied):
    # The agent restarted with its spool: the collector applied 1..10 before and acks
    # 10 on the first resend. Not a forgery: the spool holds them from the last run.
    # Or the last run sent 11..13 too, but crashed before its spool synced them: the
    # collector's mark lies above all the spool holds of that boot, and must settle it
    # (refusing it would resend those batches forever).
    first = Spool(tmp_path / "spool")
    batcher = Batcher("node-1", BOOT)
    enqueue(first, batcher, 10)
    first.shutdown(5)
    server = serve(servers)
    server.servicer.done[BOOT] = set(range(1, applied + 1))
    server.servicer.contiguous[BOOT] = applied
    spool = Spool(tmp_path / "spool")
    assert spool.queued == 10 and spool.sent_before(BOOT) == 10
    streamer = Streamer(spool, [server.address], poll_interval_s=0.02, max_in_flight=1)
    streamer.start()
    try:
        wait_for(lambda: spool.queued == 0)
        assert streamer.stats().acks_refused == 0
    finally:
        streamer.shutdown(2)
        spool.shutdown(2)
