"""The in-process hook: marks on the caller's thread, summaries over a real unix socket."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
import warnings

import pytest

from rooftop.agent import hooks
from rooftop.agent.engines.receiver import HookReceiver
from rooftop.agent.hooks import Aggregator


def make_agg(sock_path, clock, **kw) -> Aggregator:
    return Aggregator(
        engine_id="eng-1",
        model="tiny",
        socket_path=sock_path,
        clock_ns=clock,
        wall_clock_s=lambda: 1_767_225_600.0,
        autostart=False,
        **kw,
    )


def one_sample(rx: HookReceiver):
    rx.flush()
    samples = rx.drain()
    assert len(samples) == 1, samples
    return samples[0]


def test_roundtrip_gives_known_ttft_and_tpot(receiver, sock_path, clock):
    agg = make_agg(sock_path, clock)
    req = agg.start_request()
    clock.advance_ms(50)  # prefill
    req.token()
    for _ in range(9):
        clock.advance_ms(10)
        req.token()
    req.end()

    assert agg.flush() is True
    s = one_sample(receiver)
    assert s.engine_id == "eng-1"
    assert s.model == "tiny"
    assert s.pid == os.getpid()
    assert s.time_s == 1_767_225_600.0  # the agent's clock, not the engine's
    assert s.ttft_ms == pytest.approx(50.0)
    assert s.tpot_ms == pytest.approx(10.0)  # (last - first) / (10 - 1)
    assert s.tpot_p50_ms == pytest.approx(10.0)
    assert s.output_tokens == 10
    assert s.requests_running == 0
    assert s.requests_waiting is None  # not reported by the engine: unknown, not 0
    assert agg.stats().sent == 1 and agg.stats().dropped == 0


def test_tpot_distribution_across_requests(receiver, sock_path, clock):
    agg = make_agg(sock_path, clock)
    fast, slow = agg.start_request(), agg.start_request()
    clock.advance_ms(20)
    fast.token()
    slow.token()
    for _ in range(4):
        clock.advance_ms(5)
        fast.token()
    clock.advance_ms(20)
    slow.token()  # slow: 1 decode token 40 ms after its first
    fast.end()
    slow.end()

    agg.flush()
    s = one_sample(receiver)
    # fast: 20 ms / 4 tokens = 5 ms; slow: 40 ms / 1 token
    assert s.tpot_ms == pytest.approx((5.0 + 40.0) / 2)
    assert s.tpot_p50_ms == pytest.approx(5.0)
    assert s.tpot_p99_ms == pytest.approx(40.0)
    assert s.ttft_ms == pytest.approx(20.0)
    assert s.output_tokens == 7


def test_in_flight_request_reports_each_interval(receiver, sock_path, clock):
    agg = make_agg(sock_path, clock)
    req = agg.start_request()
    clock.advance_ms(30)
    req.token()
    for _ in range(5):
        clock.advance_ms(8)
        req.token()
    agg.flush()
    first = one_sample(receiver)
    assert first.requests_running == 1
    assert first.ttft_ms == pytest.approx(30.0)
    assert first.tpot_ms == pytest.approx(8.0)
    assert first.output_tokens == 6

    for _ in range(4):
        clock.advance_ms(12)
        req.token()
    req.end()
    agg.flush()
    second = one_sample(receiver)
    assert second.ttft_ms is None  # TTFT is reported once, in the interval it happened
    assert second.tpot_ms == pytest.approx(12.0)  # only this interval's decode
    assert second.output_tokens == 4
    assert second.requests_running == 0


def test_token_chunks_and_batched_sequences(receiver, sock_path, clock):
    agg = make_agg(sock_path, clock)
    req = agg.start_request(sequences=4)
    clock.advance_ms(10)
    req.token(3)  # first chunk of 3 tokens per sequence
    clock.advance_ms(30)
    req.token(3)
    req.end()
    agg.flush()
    s = one_sample(receiver)
    assert s.tpot_ms == pytest.approx(10.0)  # 30 ms for 3 tokens
    assert s.output_tokens == 6 * 4


def test_idle_engine_still_reports(receiver, sock_path, clock):
    agg = make_agg(sock_path, clock)
    agg.flush()
    s = one_sample(receiver)
    assert s.requests_running == 0
    assert s.tpot_ms is None and s.ttft_ms is None
    assert s.output_tokens == 0


def test_engine_reported_figures(receiver, sock_path, clock):
    agg = make_agg(sock_path, clock)
    agg.set_queue(running=7, waiting=3)
    agg.observe_tpot_s(0.006)
    agg.observe_tpot_s(0.004)
    agg.observe_ttft_s(0.120)
    agg.add_tokens(250)
    agg.set_kv_cache_usage(0.4)
    agg.flush()
    s = one_sample(receiver)
    assert (s.requests_running, s.requests_waiting) == (7, 3)
    assert s.tpot_ms == pytest.approx(5.0)
    assert s.ttft_ms == pytest.approx(120.0)
    assert s.output_tokens == 250
    agg.add_tokens(10)
    agg.flush()
    assert one_sample(receiver).output_tokens == 10  # per interval, not cumulative


def test_context_manager_ends_request_and_lets_exceptions_through(receiver, sock_path, clock):
    agg = make_agg(sock_path, clock)
    with pytest.raises(KeyError), agg.start_request() as req:
        req.token()
        raise KeyError("the engine's own error")
    agg.flush()
    s = one_sample(receiver)
    assert s.requests_running == 0
    with hooks.Aggregator(socket_path=sock_path, autostart=False).start_request() as r2:
        r2.first_token()


def test_no_agent_listening_drops_and_counts(sock_path, clock):
    agg = make_agg(sock_path, clock)  # nothing bound at sock_path
    req = agg.start_request()
    req.token()
    req.end()
    assert agg.flush() is False
    assert agg.flush() is False
    stats = agg.stats()
    assert stats.sent == 0
    assert stats.dropped == 2
    assert "hooks.sock" in (stats.last_error or "")


def test_a_full_agent_queue_drops_and_counts_without_blocking_the_engine(sock_path, clock):
    # The agent is alive but has not read (a late tick): the kernel queues at most
    # net.unix.max_dgram_qlen + 1 datagrams. Beyond that a send is refused at once
    # (non-blocking), counted, and the count travels in the next summary.
    import socket

    from rooftop.agent.engines.receiver import kernel_queue_datagrams
    from rooftop.agent.hooks.wire import decode_summary

    queue = kernel_queue_datagrams()
    if queue > 600:
        pytest.skip(f"this host queues {queue} datagrams")
    agent = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    agent.bind(sock_path)
    try:
        agg = make_agg(sock_path, clock)
        done = threading.Event()

        def engine() -> None:
            for _ in range(queue + 3):
                agg.flush()
            done.set()

        threading.Thread(target=engine, daemon=True).start()
        assert done.wait(10), "a send blocked the engine"
        assert (agg.stats().sent, agg.stats().dropped) == (queue, 3)
        agent.recv(65536)  # room for one more
        assert agg.flush() is True
        summaries = [decode_summary(agent.recv(65536)) for _ in range(queue)]
        assert summaries[-1].dropped == 3
    finally:
        agent.close()


def test_stale_socket_file_without_listener_drops(sock_dir, clock):
    import socket

    path = str(sock_dir / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.close()  # the file stays, nobody receives: ECONNREFUSED
    agg = make_agg(path, clock)
    assert agg.flush() is False
    assert agg.stats().dropped == 1


def test_background_thread_ships_and_counts_drops(sock_path):
    agg = Aggregator(engine_id="bg", socket_path=sock_path, interval_s=0.02)
    agg.start_request().token()  # starts the shipper lazily
    deadline = time.monotonic() + 5
    while agg.stats().dropped < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert agg.stats().dropped >= 3  # no agent yet

    rx = HookReceiver(sock_path)
    rx.start()
    try:
        deadline = time.monotonic() + 5
        while agg.stats().sent < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        agg.shutdown(timeout_s=1.0)
        rx.flush()
        samples = rx.drain()
    finally:
        rx.shutdown()
    assert len(samples) >= 2
    assert {s.engine_id for s in samples} == {"bg"}
    assert agg.stats().errors == 0


@pytest.mark.parametrize(
    "garbage",
    ["x", None, 1.5, -5, math.nan, math.inf, 10**30, object(), [1], True],
)
def test_hook_never_raises_on_garbage(receiver, sock_path, clock, garbage):
    agg = make_agg(sock_path, clock)
    req = agg.start_request(sequences=garbage)  # type: ignore[arg-type]
    clock.advance_ms(5)
    req.token(garbage)  # type: ignore[arg-type]
    clock.advance_ms(5)
    req.token()
    req.end()
    req.end()  # twice
    agg.set_queue(garbage, garbage)  # type: ignore[arg-type]
    agg.observe_tpot_s(garbage)  # type: ignore[arg-type]
    agg.observe_ttft_s(garbage)  # type: ignore[arg-type]
    agg.add_tokens(garbage)  # type: ignore[arg-type]
    agg.set_kv_cache_usage(garbage)  # type: ignore[arg-type]
    agg.flush()
    # Whatever came in, what goes out is a valid summary the receiver accepts.
    s = one_sample(receiver)
    assert s.engine_id == "eng-1"
    assert receiver.stats().malformed == 0 and receiver.stats().invalid == 0


def test_shutdown_is_idempotent_and_final(receiver, sock_path, clock):
    agg = make_agg(sock_path, clock)
    agg.start_request().token()
    agg.shutdown()
    agg.shutdown()
    assert one_sample(receiver).output_tokens == 1  # the final flush
    assert agg.flush() is False  # closed
    agg.start_request().token()  # still harmless after shutdown


def test_module_level_api(receiver, sock_path, monkeypatch):
    monkeypatch.setattr(hooks, "_default", None)
    agg = hooks.configure(engine_id="mod", model="m", socket_path=sock_path, interval_s=30)
    agg.autostart = False
    try:
        with hooks.request() as req:
            req.token()
            req.token()
        hooks.start_request().end()
        hooks.set_queue(running=1, waiting=2)
        hooks.observe_tpot_s(0.01)
        hooks.observe_ttft_s(0.02)
        hooks.add_tokens(5)
        assert hooks.flush() is True
        assert hooks.stats().sent == 1
        s = one_sample(receiver)
        assert (s.engine_id, s.model) == ("mod", "m")
        assert s.output_tokens == 7
        assert (s.requests_running, s.requests_waiting) == (1, 2)
    finally:
        hooks.shutdown()


def test_environment_configures_default(monkeypatch, sock_path):
    monkeypatch.setenv(hooks.ENV_SOCKET, sock_path)
    monkeypatch.setenv(hooks.ENV_ENGINE_ID, "from-env")
    monkeypatch.setenv(hooks.ENV_MODEL, "env-model")
    monkeypatch.setenv(hooks.ENV_INTERVAL_S, "not-a-number")
    monkeypatch.setattr(hooks, "_default", None)
    agg = hooks.aggregator()
    try:
        assert agg.socket_path == sock_path
        assert (agg.engine_id, agg.model) == ("from-env", "env-model")
        assert agg.interval_s == hooks.DEFAULT_INTERVAL_S  # bad value: default, no exception
    finally:
        agg.shutdown()


def test_defaults_without_environment(monkeypatch):
    monkeypatch.setattr(hooks, "_default", None)
    agg = Aggregator(autostart=False)
    assert agg.socket_path == "/run/rooftop/hooks.sock"
    assert agg.engine_id == f"pid-{os.getpid()}"
    assert agg.interval_s == 1.0


def test_importing_hooks_pulls_in_no_heavy_dependency():
    code = (
        "import sys\n"
        "import rooftop.agent.hooks, rooftop.agent.hooks.hf, rooftop.agent.hooks.vllm\n"
        "import rooftop.agent.hooks.wire\n"
        "bad = [m for m in ('grpc', 'pynvml', 'psutil', 'google.protobuf', 'prometheus_client',"
        " 'opentelemetry', 'click', 'rooftop.common.model', 'rooftop.common.errors')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert not [t for t in __import__('threading').enumerate() if t.name == 'rooftop-hooks']\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_fork_child_starts_afresh(receiver, sock_path):
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    agg = Aggregator(socket_path=sock_path, interval_s=30)
    agg.start_request().token()  # parent starts its shipper and has one open request
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        # 3.12+ warns about fork() with threads running; this test is about exactly that.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # child: report what it sees, then exit without running atexit
        try:
            ok = agg._thread is None and not agg._active and agg.pid == os.getpid()
            ok = ok and agg.engine_id == f"pid-{os.getpid()}" and agg.flush() is True
            os.write(write_fd, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    assert os.read(read_fd, 1) == b"1"
    os.close(read_fd)
    agg.shutdown()
    receiver.flush()
    pids = {s.pid for s in receiver.drain()}
    assert pid in pids and os.getpid() in pids
