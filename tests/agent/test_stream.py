"""Stream against a REAL gRPC server on 127.0.0.1 (port 0) with a configurable fake Ingest."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from rooftop.agent.batcher import Batcher
from rooftop.agent.homing import Endpoint, rendezvous_rank
from rooftop.agent.spool import Spool
from rooftop.agent.stream import (
    Streamer,
    _Session,
    backoff_delay_s,
    channel_options,
    map_grpc_errors,
)
from rooftop.collector.fleet import Fleet
from rooftop.common.codec import record_from_proto, record_to_proto
from rooftop.common.errors import Rejected, Retryable
from rooftop.common.model import GpuProcess, GpuSample, HostSample
from rooftop.v1 import telemetry_pb2 as pb
from rooftop.v1 import telemetry_pb2_grpc
from tests.collector.helpers import start_server
from tests.security.pki import OPENSSL, Pki
from tests.support import (
    BOOT,
    HTTP2_PING,
    FakeIngest,
    Proxy,
    Server,
    free_port,
    http2_frames,
    wait_for,
)


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


def homed_at(home: str, collectors: list[str]) -> str:
    """An agent_id whose rendezvous home among ``collectors`` is ``home``."""
    endpoints = [Endpoint(a) for a in collectors]
    return next(
        agent_id
        for agent_id in (f"node-{i}" for i in range(1000))
        if rendezvous_rank(agent_id, endpoints)[0] == Endpoint(home)
    )


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
    collectors = [server.address, dead]
    streamer = make_streamer(
        collectors,
        agent_id=homed_at(dead, collectors),
        backoff_base_s=5.0,
        backoff_max_s=5.0,
    )
    # The dead home is skipped at once, without waiting for a backoff.
    wait_for(lambda: spool.queued == 0, timeout_s=4.0)
    assert server.servicer.seqs() == [1, 2, 3, 4, 5]
    assert streamer.stats().address == server.address


def test_fails_over_when_the_first_collector_dies(spool, make_streamer, servers):
    first, second = serve(servers), serve(servers)
    batcher = Batcher("node-1", BOOT)
    enqueue(spool, batcher, 5)
    collectors = [second.address, first.address]
    streamer = make_streamer(collectors, agent_id=homed_at(first.address, collectors))
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
        collectors = [server.address, hung]
        make_streamer(collectors, agent_id=homed_at(hung, collectors), connect_timeout_s=0.5)
        wait_for(lambda: spool.queued == 0, timeout_s=5.0)
        assert server.servicer.seqs() == [1, 2, 3]
    finally:
        hang.close()


def test_a_stream_whose_batches_go_unacked_past_ack_timeout_fails_over(
    spool, make_streamer, servers
):
    # Connected, pinged, written to, never acked: a wedged collector. Keepalive cannot
    # tell (its connection answers pings).
    busy, server = serve(servers, mute=True), serve(servers)
    enqueue(spool, Batcher("node-1", BOOT), 3)
    collectors = [server.address, busy.address]
    streamer = make_streamer(
        collectors, agent_id=homed_at(busy.address, collectors), ack_timeout_s=0.5
    )
    wait_for(lambda: spool.queued == 0, timeout_s=5.0)
    assert busy.servicer.seqs() == [1, 2, 3]  # sent there first, never acked
    assert server.servicer.seqs() == [1, 2, 3]  # so sent again, to the next-ranked
    stats = streamer.stats()
    assert stats.ack_timeouts == 1
    assert stats.failovers == 1
    assert stats.address == server.address


def test_acks_in_time_and_an_idle_stream_never_hit_ack_timeout(spool, make_streamer, servers):
    server = serve(servers)
    batcher = Batcher("node-1", BOOT)
    streamer = make_streamer([server.address], ack_timeout_s=0.3)
    # Batches for four timeouts' worth of time, each acked: every ack restarts the clock.
    for _ in range(12):
        enqueue(spool, batcher, 1)
        streamer.wake()
        time.sleep(0.1)
    wait_for(lambda: spool.queued == 0)
    # Then nothing in flight for three timeouts: nothing is owed, nothing is due.
    time.sleep(1.0)
    enqueue(spool, batcher, 1)
    streamer.wake()
    wait_for(lambda: spool.queued == 0)
    stats = streamer.stats()
    assert (stats.ack_timeouts, stats.reconnects) == (0, 0)
    assert server.servicer.seqs() == list(range(1, 14))


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


def test_the_agent_sends_no_ping_for_the_acks_it_receives(spool, make_streamer, servers):
    # gRPC's bandwidth-delay probe pinged the collector after acks came in, and the
    # answer woke the agent's threads again: ~9 of its ~40 wakeups a second at 1 Hz.
    # Acks are a few bytes: the agent's receive window needs no probing. (Keepalive
    # pings are every 30 s, past this test's end.)
    server = serve(servers)
    proxy = Proxy(server.port)
    try:
        batcher = Batcher("node-1", BOOT)
        streamer = make_streamer([proxy.address])
        for n in range(1, 11):  # one at a time: each ack comes in on its own
            enqueue(spool, batcher, 1)
            wait_for(lambda n=n: streamer.stats().acked == n)
        time.sleep(0.2)  # what an ack would set off has left the agent by now
        with proxy._lock:
            sent = bytes(proxy.from_clients)
    finally:
        proxy.close()
    frames = http2_frames(sent)
    assert sum(1 for kind, _, _ in frames if kind == 0x0) >= 10  # DATA: the batches
    pings = [f for f in frames if f[0] == HTTP2_PING and not f[1] & 0x1]
    assert pings == []


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


# --- several collectors: rendezvous home, failover, return with hysteresis (issue 13) -------


class FakeClock:
    """The return-home hysteresis clock, moved by the test (no timed assertions)."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def three(servers: list[Server]) -> tuple[list[Server], str, list[Server]]:
    """Three collectors, an agent_id and its servers in rank order (home first)."""
    made = [serve(servers) for _ in range(3)]
    agent_id = "gpu-node-7"
    ranked = rendezvous_rank(agent_id, [Endpoint(s.address) for s in made])
    by_address = {s.address: s for s in made}
    return made, agent_id, [by_address[e.address] for e in ranked]


def homing_streamer(make_streamer, three, clock: FakeClock, **kw) -> Streamer:
    made, agent_id, _ = three
    kw.setdefault("return_home_after_s", 1.0)
    kw.setdefault("home_probe_interval_s", 0.05)
    return make_streamer([s.address for s in made], agent_id=agent_id, monotonic=clock, **kw)


def probes_after(streamer: Streamer, n: int) -> None:
    """Wait until ``n`` more health checks of home have been answered (or failed)."""
    target = streamer.stats().home_probes + n
    wait_for(lambda: streamer.stats().home_probes >= target)


def test_the_agent_streams_to_its_rendezvous_home_whatever_the_listed_order(
    spool, make_streamer, three
):
    _, _, (home, second, third) = three
    enqueue(spool, Batcher("gpu-node-7", BOOT), 5)
    streamer = homing_streamer(make_streamer, three, FakeClock())
    wait_for(lambda: spool.queued == 0)
    assert home.servicer.seqs() == [1, 2, 3, 4, 5]
    assert second.servicer.received == third.servicer.received == []
    stats = streamer.stats()
    assert stats.address == stats.home == home.address
    assert stats.failovers == 0


def test_home_dies_the_next_ranked_takes_over_and_nothing_is_lost(spool, make_streamer, three):
    _, _, (home, second, third) = three
    batcher = Batcher("gpu-node-7", BOOT)
    enqueue(spool, batcher, 5)
    streamer = homing_streamer(make_streamer, three, FakeClock())
    wait_for(lambda: spool.queued == 0)
    home.stop()
    enqueue(spool, batcher, 5)
    streamer.wake()
    wait_for(lambda: spool.queued == 0, timeout_s=5.0)
    assert set(home.servicer.seqs()) | set(second.servicer.seqs()) == set(range(1, 11))
    assert set(range(6, 11)) <= set(second.servicer.seqs())
    assert third.servicer.received == []  # the next-ranked, not any other
    assert streamer.stats().address == second.address
    assert streamer.stats().failovers >= 1


def test_the_agent_returns_home_only_after_the_hysteresis(spool, make_streamer, three):
    _, _, (home, second, _) = three
    clock = FakeClock()
    batcher = Batcher("gpu-node-7", BOOT)
    streamer = homing_streamer(make_streamer, three, clock, return_home_after_s=1.0)
    home.stop()
    enqueue(spool, batcher, 3)
    streamer.wake()
    wait_for(lambda: streamer.stats().address == second.address and spool.queued == 0)
    home.start()
    probes_after(streamer, 3)  # home answers SERVING, but only for 0 s of the 1 s
    assert streamer.stats().address == second.address
    clock.now_s = 0.9
    probes_after(streamer, 2)
    assert streamer.stats().address == second.address
    assert streamer.stats().returns_home == 0
    clock.now_s = 5.0
    wait_for(lambda: streamer.stats().address == home.address)
    enqueue(spool, batcher, 3)
    streamer.wake()
    wait_for(lambda: spool.queued == 0)
    assert {4, 5, 6} <= set(home.servicer.seqs())
    stats = streamer.stats()
    assert stats.returns_home == 1
    assert stats.reconnects == 1  # the failover; going home is not a failure
    assert set(second.servicer.seqs()) | set(home.servicer.seqs()) == set(range(1, 7))


def test_a_flapping_home_does_not_drag_the_agent_back(spool, make_streamer, three):
    _, _, (home, second, _) = three
    clock = FakeClock()
    streamer = homing_streamer(make_streamer, three, clock, return_home_after_s=1.0)
    home.stop()
    enqueue(spool, Batcher("gpu-node-7", BOOT), 1)
    streamer.wake()
    wait_for(lambda: streamer.stats().address == second.address and spool.queued == 0)
    for up_at_s in (1.0, 2.0, 3.0):  # up for 0.8 s of every second: never 1 s in a row
        home.start()
        clock.now_s = up_at_s
        probes_after(streamer, 2)
        clock.now_s = up_at_s + 0.8
        probes_after(streamer, 2)
        home.stop()
        probes_after(streamer, 2)
        assert streamer.stats().address == second.address
    assert streamer.stats().returns_home == 0


def test_a_dns_name_with_several_addresses_is_several_collectors(spool, make_streamer):
    """One name, three addresses (a headless Service): the agent homes by rendezvous on
    the addresses, and follows a re-resolution that drops its home."""
    port = free_port()
    answer = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    servicers = {ip: FakeIngest() for ip in answer}
    servers: list[grpc.Server] = []
    for ip, servicer in servicers.items():
        server = grpc.server(ThreadPoolExecutor(max_workers=4))
        telemetry_pb2_grpc.add_IngestServicer_to_server(servicer, server)
        assert server.add_insecure_port(f"{ip}:{port}")
        server.start()
        servers.append(server)
    asked: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return list(answer)

    try:
        endpoints = [Endpoint(f"{ip}:{port}", "collectors.test") for ip in answer]
        home, other, _ = rendezvous_rank("gpu-node-7", endpoints)
        batcher = Batcher("gpu-node-7", BOOT)
        enqueue(spool, batcher, 3)
        streamer = make_streamer(
            [f"collectors.test:{port}"],
            agent_id="gpu-node-7",
            resolve=resolve,
            resolve_interval_s=0.05,
        )
        wait_for(lambda: spool.queued == 0)
        assert asked[0] == ("collectors.test", port)
        assert streamer.stats().home == home.address
        home_ip = home.address.split(":")[0]
        other_ip = other.address.split(":")[0]
        assert servicers[home_ip].seqs() == [1, 2, 3]
        answer.remove(home_ip)  # the home pod is gone from the Service
        wait_for(lambda: streamer.stats().address == other.address)
        enqueue(spool, batcher, 2)
        streamer.wake()
        wait_for(lambda: spool.queued == 0)
        assert {4, 5} <= set(servicers[other_ip].seqs())
        assert streamer.stats().failovers == 0  # a move, not a failure
    finally:
        for server in servers:
            server.stop(grace=None).wait(5)


def test_addresses_of_a_dns_name_are_verified_against_the_name_over_tls(
    tmp_path: Path, spool, make_streamer
):
    """Dialled by IP, the collector's certificate names the Service: TLS checks the name."""
    if OPENSSL is None:
        pytest.skip("no openssl CLI to make certificates")
    pki = Pki(tmp_path / "pki")
    ca = pki.ca("ca")
    cert = pki.issue("collector", ca="ca", cn="collectors.test",
                     sans=("DNS:collectors.test",), usage="serverAuth")  # fmt: skip
    port = free_port()
    servicer = FakeIngest()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    telemetry_pb2_grpc.add_IngestServicer_to_server(servicer, server)
    assert server.add_secure_port(
        f"127.0.0.2:{port}", grpc.ssl_server_credentials([cert.pem()])
    )
    server.start()
    try:
        enqueue(spool, Batcher("gpu-node-7", BOOT), 2)
        streamer = make_streamer(
            [f"collectors.test:{port}"],
            agent_id="gpu-node-7",
            channel_credentials=grpc.ssl_channel_credentials(ca.read_bytes()),
            # Two addresses, one collector up: the other fails its TLS dial at once.
            resolve=lambda host, port: ["127.0.0.2", "127.0.0.3"],
        )
        wait_for(lambda: spool.queued == 0)
        assert servicer.seqs() == [1, 2]
        assert streamer.stats().address == f"127.0.0.2:{port}"
    finally:
        server.stop(grace=None).wait(5)


# --- a return home: what another collector acked meanwhile is not missing (issue 13) ------


@pytest.fixture
def real_three() -> Iterator[tuple[list[str], Proxy, list[Fleet]]]:
    """Three real collectors, the first behind a proxy that can cut it off and back.

    Cut off, not restarted: home keeps its de-duplication marks, as a collector that
    was unreachable for a while (or restarted with its state_dir) does.
    """
    made = [start_server() for _ in range(3)]
    proxy = Proxy(made[0][0].port)
    addresses = [proxy.address, *(f"127.0.0.1:{server.port}" for server, _ in made[1:])]
    yield addresses, proxy, [fleet for _, fleet in made]
    proxy.close()
    for server, _ in made:
        server.shutdown(timeout_s=1)


def test_after_a_return_home_the_seqs_acked_elsewhere_are_not_missing_there(
    spool, make_streamer, real_three
):
    addresses, proxy, (home, *others) = real_three
    agent_id = homed_at(proxy.address, addresses)
    batcher = Batcher(agent_id, BOOT)
    clock = FakeClock()
    streamer = make_streamer(addresses, agent_id=agent_id, monotonic=clock,
                             return_home_after_s=1.0, home_probe_interval_s=0.05)  # fmt: skip
    enqueue_timed(spool, batcher, 5)
    wait_for(lambda: spool.queued == 0)
    proxy.cut()  # home unreachable: 6..10 go to the next-ranked collector
    enqueue_timed(spool, batcher, 5)
    streamer.wake()
    wait_for(lambda: spool.queued == 0 and streamer.stats().address != proxy.address)
    proxy.restore()
    probes_after(streamer, 2)
    clock.now_s = 5.0  # healthy for longer than the hysteresis
    wait_for(lambda: streamer.stats().address == proxy.address)
    enqueue_timed(spool, batcher, 3)
    streamer.wake()
    wait_for(lambda: spool.queued == 0 and home.counts().batches == 8)
    counts = home.counts()
    assert (counts.missing, counts.acked_elsewhere) == (0, 5)
    assert sum(fleet.counts().batches for fleet in others) == 5
    assert all(fleet.counts().missing == 0 for fleet in others)


# --- batch_format "auto": columns once the collector says it reads them ----------------------


def enqueue_timed(spool: Spool, batcher: Batcher, n: int, gpus: int = 4) -> None:
    """``n`` batches of GPU samples columns can carry (times in whole microseconds)."""
    for i in range(n):
        recs = [
            pb.TraceRecord(gpu=pb.GpuSample(
                gpu_index=g, busy_pct=50.0,
                time=Timestamp(seconds=1_790_000_000 + batcher.last_seq + i, nanos=1000 * g)))
            for g in range(gpus)
        ]  # fmt: skip
        for batch in batcher.make(recs):
            spool.append(batch)


def gpu_samples(batch: pb.Batch) -> int:
    return sum(rec.HasField("gpu") for rec in batch.records) + batch.gpu_columns.rows


def test_auto_sends_columns_after_the_collectors_ack_says_it_reads_them(
    spool, make_streamer, servers
):
    server = serve(servers, columns=True)
    batcher = Batcher("node-1", BOOT)
    enqueue_timed(spool, batcher, 1)
    make_streamer([server.address], auto_columns=True)
    wait_for(lambda: spool.queued == 0)  # the first batch, sent before any ack: records
    enqueue_timed(spool, batcher, 5)
    wait_for(lambda: spool.queued == 0)
    received = server.servicer.received
    assert [b.HasField("gpu_columns") for b in received] == [False] + [True] * 5
    assert [gpu_samples(b) for b in received] == [4] * 6
    assert all(not b.records for b in received[1:])


def test_auto_sends_records_throughout_to_a_collector_that_never_says_columns(
    spool, make_streamer, servers
):
    server = serve(servers)  # an older collector: its acks have no columns field
    batcher = Batcher("node-1", BOOT)
    enqueue_timed(spool, batcher, 1)
    make_streamer([server.address], auto_columns=True)
    wait_for(lambda: spool.queued == 0)
    enqueue_timed(spool, batcher, 5)
    wait_for(lambda: spool.queued == 0)
    received = server.servicer.received
    assert server.servicer.seqs() == list(range(1, 7))
    assert not any(b.HasField("gpu_columns") for b in received)
    assert [gpu_samples(b) for b in received] == [4] * 6


def homed_at_a_newer_collector(
    servers: list[Server], make_streamer: Callable[..., Streamer]
) -> tuple[Server, Server, Batcher, Streamer]:
    """A collector that reads columns (the agent's home), an older one, and the agent."""
    new = serve(servers, columns=True)
    old = serve(servers)
    agent_id = homed_at(new.address, [new.address, old.address])
    streamer = make_streamer([new.address, old.address], agent_id=agent_id, auto_columns=True)
    return new, old, Batcher(agent_id, BOOT), streamer


def test_auto_starts_over_with_records_after_a_failover_to_an_older_collector(
    spool, make_streamer, servers
):
    new, old, batcher, streamer = homed_at_a_newer_collector(servers, make_streamer)
    enqueue_timed(spool, batcher, 1)
    wait_for(lambda: spool.queued == 0)
    enqueue_timed(spool, batcher, 2)
    wait_for(lambda: spool.queued == 0)
    assert [b.HasField("gpu_columns") for b in new.servicer.received] == [False, True, True]
    new.stop()
    enqueue_timed(spool, batcher, 3)
    streamer.wake()
    wait_for(lambda: spool.queued == 0)
    assert streamer.stats().address == old.address
    assert set(new.servicer.seqs()) | set(old.servicer.seqs()) == set(range(1, 7))
    assert not any(b.HasField("gpu_columns") for b in old.servicer.received)
    assert all(gpu_samples(b) == 4 for b in old.servicer.received)


def test_auto_turns_columns_made_for_one_collector_into_records_for_an_older_one(
    spool, make_streamer, servers
):
    new, old, batcher, streamer = homed_at_a_newer_collector(servers, make_streamer)
    enqueue_timed(spool, batcher, 1)
    wait_for(lambda: spool.queued == 0 and streamer.collector_reads_columns)
    new.stop()
    # Made as the daemon makes them while its collector reads columns: the model's
    # samples straight into gpu_columns, a host sample beside them as a record.
    batcher.columns = True
    samples = [
        GpuSample(time_s=1_790_000_100 + i + g / 3, gpu_index=g, gpu_uuid=f"GPU-{g}",
                  busy_pct=50.0 + g, processes=(GpuProcess(4242 + g, 2**30, name="vllm"),))
        for i in range(3) for g in range(4)
    ]  # fmt: skip
    for i in range(3):
        host = HostSample(time_s=1_790_000_100.0 + i, cpu_pct=12.5)
        for batch in batcher.make([*samples[4 * i : 4 * i + 4], host]):
            assert batch.HasField("gpu_columns")
            spool.append(batch)
    streamer.wake()
    wait_for(lambda: spool.queued == 0)
    assert streamer.stats().address == old.address and not streamer.collector_reads_columns
    received = {b.seq: b for b in old.servicer.received}
    assert set(received) >= {2, 3, 4}
    assert not any(b.HasField("gpu_columns") for b in received.values())
    # Every sample, as the records path would have carried it (GPU records first).
    got = [record_from_proto(r) for seq in (2, 3, 4) for r in received[seq].records]
    want = [record_from_proto(record_to_proto(r))
            for i in range(3)
            for r in [*samples[4 * i : 4 * i + 4], HostSample(time_s=1_790_000_100.0 + i,
                                                               cpu_pct=12.5)]]  # fmt: skip
    assert got == want


def test_every_batch_carries_the_highest_seq_acked_so_far(spool, make_streamer, servers):
    server = serve(servers)
    batcher = Batcher("node-1", BOOT)
    enqueue(spool, batcher, 1)
    make_streamer([server.address])
    wait_for(lambda: spool.queued == 0)
    enqueue(spool, batcher, 1)
    wait_for(lambda: spool.queued == 0)
    assert [(b.seq, b.acked_seq) for b in server.servicer.received] == [(1, 0), (2, 1)]
