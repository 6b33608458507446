"""The agent's hook socket: real unix datagram sockets, hostile input included."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time

import pytest

from rooftop.agent.engines.receiver import HookReceiver, kernel_queue_datagrams, summary_to_sample
from rooftop.agent.engines.sources import EngineSources
from rooftop.agent.hooks import Aggregator
from rooftop.agent.hooks.wire import Distribution, HookSummary, encode_summary
from rooftop.agent.sampler import Sampler
from rooftop.agent.sensors.base import GpuInfo
from rooftop.common.errors import ConfigError
from rooftop.common.model import EngineSample, GpuSample
from tests.support import wait_for


def summary(**kw) -> HookSummary:
    base = {
        "pid": 77,
        "engine_id": "e1",
        "seq": 1,
        "time_s": 1.0,
        "interval_s": 1.0,
        "model": "m",
        "requests_running": 2,
        "requests_waiting": 0,
        "output_tokens": 100,
        "tpot_ms": Distribution(3, 6.0, 5.5, 9.0),
        "ttft_ms": Distribution(1, 80.0, 80.0, 80.0),
    }
    base.update(kw)
    return HookSummary(**base)


def send(path: str, data: bytes) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.sendto(data, path)
    finally:
        s.close()


@pytest.fixture
def rx(sock_dir):
    r = HookReceiver(str(sock_dir / "h.sock"), clock=lambda: 123.0)
    r.start()
    yield r
    r.shutdown()


def test_summary_to_sample_maps_every_field():
    s = summary_to_sample(summary(), 5.0)
    assert s.time_s == 5.0
    assert (s.engine_id, s.pid, s.model) == ("e1", 77, "m")
    assert (s.requests_running, s.requests_waiting, s.output_tokens) == (2, 0, 100)
    assert (s.tpot_ms, s.tpot_p50_ms, s.tpot_p99_ms) == (6.0, 5.5, 9.0)
    assert (s.ttft_ms, s.ttft_p50_ms, s.ttft_p99_ms) == (80.0, 80.0, 80.0)
    empty = summary_to_sample(summary(tpot_ms=None, ttft_ms=None, requests_waiting=None), 5.0)
    assert empty.tpot_ms is None and empty.ttft_p99_ms is None and empty.requests_waiting is None


def test_receives_from_real_socket_and_drains(rx):
    send(rx.socket_path, encode_summary(summary()))
    send(rx.socket_path, encode_summary(summary(engine_id="e2", seq=2)))
    rx.flush()
    samples = rx.drain()
    assert [s.engine_id for s in samples] == ["e1", "e2"]
    assert all(s.time_s == 123.0 for s in samples)
    assert rx.drain() == []
    st = rx.stats()
    assert (st.received, st.accepted, st.malformed, st.engines) == (2, 2, 0, 2)


def test_socket_file_is_created_with_mode(sock_dir):
    path = sock_dir / "sub" / "dir" / "h.sock"
    r = HookReceiver(str(path), socket_mode=0o660)
    r.start()
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
    finally:
        r.shutdown()
    assert not path.exists()  # removed on shutdown


@pytest.mark.parametrize(
    "data",
    [
        b"garbage",
        b"\x00\xff" * 10,
        b"{}",
        json.dumps({"v": 1, "kind": "rooftop.hooks.summary"}).encode(),
        encode_summary(summary()).replace(b'"output_tokens":100', b'"output_tokens":-1'),
    ],
)
def test_malformed_datagrams_are_counted(rx, data):
    send(rx.socket_path, data)
    send(rx.socket_path, encode_summary(summary()))  # the next good one still gets through
    rx.flush()
    assert len(rx.drain()) == 1
    assert rx.stats().malformed == 1


def test_an_impossible_histogram_is_refused_once_as_malformed(rx):
    # The decoder checks the histograms; the model's check then skips them (once, not
    # twice): the datagram is malformed, and never also counted invalid.
    doc = json.loads(encode_summary(summary()))
    doc["ttft_hist"] = {"bounds_s": [0.2, 0.1], "bucket_counts": [1, 0, 0], "sum_s": 0.1,
                        "count": 1}  # fmt: skip
    send(rx.socket_path, json.dumps(doc).encode())
    send(rx.socket_path, encode_summary(summary()))
    rx.flush()
    assert len(rx.drain()) == 1
    stats = rx.stats()
    assert (stats.received, stats.malformed, stats.invalid, stats.accepted) == (2, 1, 0, 1)


def test_an_impossible_figure_is_counted_invalid_with_its_datagram(rx):
    # Well-formed, but a TPOT over a day: the model's range check still runs.
    send(rx.socket_path, encode_summary(summary(tpot_ms=Distribution(3, 1e12, 5.5, 9.0))))
    rx.flush()
    assert rx.drain() == []
    stats = rx.stats()
    assert (stats.received, stats.malformed, stats.invalid, stats.accepted) == (1, 0, 1, 0)


def test_thread_receives_without_flush(rx):
    import time

    send(rx.socket_path, encode_summary(summary()))
    deadline = time.monotonic() + 5
    while rx.stats().accepted == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(rx.drain()) == 1


def test_overflow_drops_oldest(sock_dir):
    r = HookReceiver(str(sock_dir / "h.sock"), max_samples=2)
    r.start()
    try:
        for seq in (1, 2, 3):
            send(r.socket_path, encode_summary(summary(seq=seq, output_tokens=seq)))
        r.flush()
        assert [s.output_tokens for s in r.drain()] == [2, 3]
        assert r.stats().overflowed == 1
    finally:
        r.shutdown()


@pytest.fixture
def decoded_in(monkeypatch):
    """The names of the threads that decoded each datagram, in order."""
    import rooftop.agent.engines.receiver as receiver_module  # noqa: PLC0415

    threads: list[str] = []
    real = receiver_module.decode_summary

    def recording(data):
        threads.append(threading.current_thread().name)
        return real(data)

    monkeypatch.setattr(receiver_module, "decode_summary", recording)
    return threads


class StampClock:
    """1001.0, 1002.0, ... and which thread asked for each."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def __call__(self) -> float:
        self.threads.append(threading.current_thread().name)
        return 1000.0 + len(self.threads)


def held(r: HookReceiver, clock: StampClock, decoded_in: list[str]) -> Sender:
    """``r`` started and sent 8 datagrams a second until its thread holds off (the backstop).

    What the thread read and decoded meanwhile is drained and forgotten.
    """
    r.start()
    sender = Sender(r.socket_path)
    sender.send_for(1.3, per_s=8)  # no ticks: the thread reads them as they come
    assert r.hold_s() == pytest.approx(11 / 2 / 8, rel=0.3)
    r.receive()  # what is still queued: read and decoded here, then forgotten
    r.drain()
    decoded_in.clear()
    clock.threads.clear()
    return sender


def test_the_backstop_reads_and_stamps_datagrams_and_whoever_takes_samples_decodes(
    sock_dir, decoded_in
):
    # The backstop's wake is a recv and a time per datagram: the decoding happens in the
    # sampler's tick (here drain()), the summaries one after the other, not in a thread
    # woken for a few of them with cold caches.
    clock = StampClock()
    r = HookReceiver(str(sock_dir / "h.sock"), clock=clock, queue_datagrams=11)
    sender = held(r, clock, decoded_in)
    try:
        for seq in (101, 102):
            sender.send(seq)
        wait_for(lambda: clock.threads.count("rooftop-hook-receiver") == 2, timeout_s=5)
        time.sleep(0.05)
        assert decoded_in == []
        samples = r.drain()
        assert decoded_in == [threading.current_thread().name] * 2
        # stamped when the thread read them, not when they were decoded
        first_read = 1000.0 + clock.threads.index("rooftop-hook-receiver") + 1
        assert [s.time_s for s in samples] == [first_read, first_read + 1]
    finally:
        sender.close()
        r.shutdown()


def test_datagrams_read_but_not_taken_are_bounded_and_the_oldest_counted(sock_dir, decoded_in):
    clock = StampClock()
    r = HookReceiver(str(sock_dir / "h.sock"), clock=clock, max_samples=2, queue_datagrams=11)
    sender = held(r, clock, decoded_in)
    try:
        before = r.stats()
        for seq in (201, 202, 203):
            sender.send(seq)
        wait_for(lambda: clock.threads.count("rooftop-hook-receiver") == 3, timeout_s=5)
        assert decoded_in == []  # all three read by the thread, none decoded yet
        assert len(r.drain()) == 2
        assert len(decoded_in) == 2  # the dropped one is never decoded
        stats = r.stats()
        assert stats.received - before.received == 3
        assert stats.accepted - before.accepted == 2
        assert stats.overflowed - before.overflowed == 1
    finally:
        sender.close()
        r.shutdown()


def test_read_per_datagram_the_thread_decodes_each_as_it_comes(sock_dir, decoded_in):
    # Before the rate is known (and in a flood or a trickle) the thread is woken per
    # datagram: it decodes it then, so a flood's decoding never lands in one tick.
    clock = StampClock()
    r = HookReceiver(str(sock_dir / "h.sock"), clock=clock, queue_datagrams=11)
    r.start()
    try:
        assert r.hold_s() is None
        send(r.socket_path, encode_summary(summary(output_tokens=7)))
        wait_for(lambda: decoded_in == ["rooftop-hook-receiver"])
        [sample] = r.drain()
        assert sample.time_s == 1001.0 and sample.output_tokens == 7
        assert clock.threads == ["rooftop-hook-receiver"]
    finally:
        r.shutdown()


def test_stale_socket_file_is_replaced(sock_dir):
    path = str(sock_dir / "h.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(path)
    dead.close()  # a crashed agent leaves its file behind
    r = HookReceiver(path)
    r.start()
    try:
        send(path, encode_summary(summary()))
        r.flush()
        assert len(r.drain()) == 1
    finally:
        r.shutdown()


def test_live_socket_is_not_stolen(rx):
    other = HookReceiver(rx.socket_path)
    with pytest.raises(ConfigError, match="another process"):
        other.start()


def test_non_socket_file_is_not_touched(sock_dir):
    path = sock_dir / "h.sock"
    path.write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        HookReceiver(str(path)).start()
    assert path.read_text() == "precious"


def test_unbindable_path_is_config_error(sock_dir):
    blocker = sock_dir / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError):
        HookReceiver(str(blocker / "h.sock")).start()


def test_abstract_namespace(sock_dir):
    name = f"@rooftop-test-{os.getpid()}-{id(sock_dir)}"
    agg = Aggregator(engine_id="abs", socket_path=name, autostart=False)
    with HookReceiver(name) as r:
        agg.start_request().token()
        assert agg.flush() is True
        r.flush()
        assert [s.engine_id for s in r.drain()] == ["abs"]
    agg.shutdown()


def test_shutdown_is_idempotent_and_start_after_is_noop(rx):
    rx.shutdown()
    rx.shutdown()
    rx.start()
    assert rx.drain() == []


def test_the_receiving_thread_sleeps_until_a_datagram_or_shutdown(sock_dir, monkeypatch):
    # It used to wake every 0.2 s to look at its stop flag (five idle wakeups a second);
    # a datagram or shutdown()'s wake pipe now ends its one untimed wait.
    import rooftop.agent.engines.receiver as receiver_module  # noqa: PLC0415

    waits: list[object] = []
    real_select = receiver_module.select.select

    def counting_select(*args: object) -> object:
        if threading.current_thread().name == "rooftop-hook-receiver":
            waits.append(args[3] if len(args) > 3 else None)
        return real_select(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(receiver_module.select, "select", counting_select)
    r = HookReceiver(str(sock_dir / "h.sock"), clock=lambda: 123.0)
    r.start()
    try:
        time.sleep(1.0)  # idle: the old loop waited 5 times in this second
        assert len(waits) <= 2 and set(waits) == {None}, waits
        send(r.socket_path, encode_summary(summary()))
        wait_for(lambda: r.stats().accepted == 1)  # and a datagram still wakes it
    finally:
        r.shutdown()
    assert r._thread is not None and not r._thread.is_alive()


class Sender:
    """An engine's side of the socket: non-blocking sends, as the hooks send."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sent = self.refused = 0

    def send(self, seq: int) -> None:
        try:
            self.sock.sendto(encode_summary(summary(seq=seq)), self.path)
            self.sent += 1
        except BlockingIOError:  # the kernel's queue is full: the hook drops it
            self.refused += 1

    def send_for(self, seconds: float, per_s: float, tick=None, tick_s: float = 0.0) -> None:
        """Send ``per_s`` datagrams a second for ``seconds``; call ``tick`` every ``tick_s``."""
        start = time.monotonic()
        n, next_tick = 0, start + tick_s
        while (now := time.monotonic()) < start + seconds:
            if now >= start + n / per_s:
                n += 1
                self.send(n)
            if tick is not None and now >= next_tick:
                tick()
                next_tick += tick_s
            time.sleep(0.005)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def reads_by_thread(monkeypatch):
    """Read passes the receiver's own thread made (the sampler's are not counted)."""
    passes: list[float] = []
    real = HookReceiver._read_queued

    def counting(self, sock, deadline):
        if threading.current_thread().name == "rooftop-hook-receiver":
            passes.append(time.monotonic())
        return real(self, sock, deadline)

    monkeypatch.setattr(HookReceiver, "_read_queued", counting)
    return passes


def test_ticks_that_read_the_socket_leave_the_thread_asleep(sock_dir, reads_by_thread):
    # 8 engines a second on the kernel's default queue (11): the thread may leave the
    # socket unread 11 / 2 / 8 = 0.69 s. The sampler's ticks (here every 0.25 s) read
    # it sooner, so once the rate is known the thread stops reading per datagram.
    r = HookReceiver(str(sock_dir / "h.sock"), queue_datagrams=11)
    r.start()
    sender = Sender(r.socket_path)
    try:
        sender.send_for(1.3, per_s=8)  # no ticks yet: the thread reads them as they come
        assert len(reads_by_thread) >= 3
        assert r.hold_s() == pytest.approx(11 / 2 / 8, rel=0.3)
        before = len(reads_by_thread)
        sender.send_for(1.5, per_s=8, tick=r.receive, tick_s=0.25)
        r.receive()
        assert len(reads_by_thread) - before <= 1  # about 12 datagrams, no thread read
        assert r.stats().accepted == sender.sent and sender.refused == 0
    finally:
        sender.close()
        r.shutdown()


def test_without_ticks_the_thread_reads_before_the_queue_fills(sock_dir, reads_by_thread):
    # A sampler that stalls (or ticks once a minute) must not cost summaries: 20
    # datagrams a second would fill a queue of 11 in 0.55 s; the thread reads at least
    # every 11 / 2 / 20 = 0.28 s, in a few passes of several datagrams each.
    r = HookReceiver(str(sock_dir / "h.sock"), queue_datagrams=11)
    r.start()
    sender = Sender(r.socket_path)
    try:
        sender.send_for(1.2, per_s=20)
        assert r.hold_s() is not None  # the backstop's timed wait, not per datagram
        before, accepted_before = len(reads_by_thread), r.stats().accepted
        sender.send_for(2.0, per_s=20)
        wait_for(lambda: r.stats().accepted == sender.sent)
        assert sender.refused == 0
        assert len(reads_by_thread) - before < (r.stats().accepted - accepted_before) / 2
    finally:
        sender.close()
        r.shutdown()


def test_a_full_queue_shortens_the_wait_at_once(sock_dir, monkeypatch):
    # With the thread idle, a tick finds the kernel's queue full: datagrams may have
    # been refused, so the rate is raised from that one read, not a window later.
    monkeypatch.setattr(HookReceiver, "_run", lambda self: None)
    r = HookReceiver(str(sock_dir / "h.sock"), queue_datagrams=11)
    r.start()
    sender = Sender(r.socket_path)
    try:
        assert r.hold_s() is None  # nothing measured: per datagram
        time.sleep(0.5)
        for seq in range(30):
            sender.send(seq)
        # The kernel's bound, not the socket's buffer, refused the rest.
        assert sender.sent == min(30, kernel_queue_datagrams())
        r.receive()
        assert r.stats().accepted == sender.sent
        hold_s = r.hold_s()
        assert hold_s is not None and hold_s < 0.5  # ~11 / 2 / (11 in 0.5 s)
    finally:
        sender.close()
        r.shutdown()


def test_a_quiet_socket_is_read_per_datagram(sock_dir):
    # Under one datagram in 5 s (here none): no timer at all; a datagram wakes the thread.
    r = HookReceiver(str(sock_dir / "h.sock"), queue_datagrams=11)
    r.start()
    try:
        r.receive()
        time.sleep(1.05)
        r.receive()  # a window with nothing in it
        assert r.hold_s() is None
        send(r.socket_path, encode_summary(summary()))
        wait_for(lambda: r.stats().accepted == 1)
    finally:
        r.shutdown()


def test_the_kernel_queue_bound_is_read_from_the_sysctl(tmp_path):
    path = tmp_path / "max_dgram_qlen"
    path.write_text("512\n")
    assert kernel_queue_datagrams(path) == 513
    path.write_text("garbage")
    assert kernel_queue_datagrams(path) == 11  # the kernel's default, 10 + 1
    assert kernel_queue_datagrams(tmp_path / "absent") == 11


class _OneGpu:
    """A GpuBackend with one idle GPU."""

    def devices(self) -> tuple[GpuInfo, ...]:
        return (GpuInfo(0, "GPU-1", "NVIDIA H100 80GB HBM3", has_gpm=False),)

    def read(self, gpu_index: int, time_s: float) -> GpuSample:
        return GpuSample(time_s=time_s, gpu_index=gpu_index, gpu_uuid="GPU-1")

    def close(self) -> None:
        pass


def test_a_tick_reads_the_socket_before_its_clock(sock_dir, monkeypatch):
    # The receiver's thread left out: the tick itself must take the summary off the
    # socket, and stamp it at or before the tick's own time, so the window pairs it
    # with this tick's GPU samples as it did when a thread read it on arrival.
    monkeypatch.setattr(HookReceiver, "_run", lambda self: None)
    engines = EngineSources(str(sock_dir / "h.sock"))
    engines.start()
    sampler = Sampler(_OneGpu(), engines=engines)
    agg = Aggregator(engine_id="tick", socket_path=str(sock_dir / "h.sock"), autostart=False)
    try:
        agg.start_request().token()
        assert agg.flush() is True
        records = sampler.tick()
    finally:
        agg.shutdown()
        engines.shutdown()
    (gpu,) = [r for r in records if isinstance(r, GpuSample)]
    (engine,) = [r for r in records if isinstance(r, EngineSample)]
    assert engine.engine_id == "tick"
    assert engine.time_s <= gpu.time_s
