"""``agentctl agent`` as a real subprocess (fake GPUs) against an in-test gRPC collector."""

from __future__ import annotations

import gc
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from rooftop.agent.config import load_config
from rooftop.agent.daemon import Agent
from rooftop.agent.diagnose import diagnose_records, overall
from rooftop.agent.spool import Spool
from rooftop.agent.trace import BUNDLED_RECORDINGS, read_trace
from rooftop.cli import main
from rooftop.common.errors import ConfigError
from rooftop.common.model import Bound
from tests.support import FakeIngest, Server

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def collector() -> Iterator[tuple[FakeIngest, str]]:
    server = Server(FakeIngest())
    yield server.servicer, server.address
    server.stop()


def write_config(tmp_path: Path, collector_address: str, **extra: object) -> Path:
    values: dict[str, object] = {
        "agent_id": "node-test",
        "collectors": [collector_address],
        "insecure": True,
        "backend": "fake:h100",
        "fake_gpus": 2,
        "rate_hz": 10,
        "window_s": 0.5,
        "batch_interval_s": 0.2,
        "spool_dir": str(tmp_path / "spool"),
        "fsync_interval_s": 0.05,
        "backoff_base_s": 0.1,
        "backoff_max_s": 0.5,
        "shutdown_timeout_s": 5,
    }
    values.update(extra)
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, list):
            lines.append(f"{key} = [{', '.join(repr(v) for v in value)}]".replace("'", '"'))
        elif isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        else:
            lines.append(f"{key} = {value}")
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(0.2)
    return sock, path


def spawn(config: Path, notify_path: str | None = None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOFTOP_")}
    if notify_path:
        env["NOTIFY_SOCKET"] = notify_path
    env["GRPC_VERBOSITY"] = "ERROR"
    return subprocess.Popen(
        [sys.executable, "-m", "rooftop", "agent", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(cond, timeout_s: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"agent exited early: {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def receive_until(sock: socket.socket, wanted: str, timeout_s: float = 20.0) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if any(wanted in g for g in got):
            return got
    raise AssertionError(f"no {wanted!r} from the agent (got {got})")


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"agent did not exit after SIGTERM: {err}") from None
    return proc.returncode, err


def last_seq(stderr: str) -> int:
    match = re.search(r"last seq (\d+)", stderr)
    assert match, stderr
    return int(match.group(1))


def test_agent_streams_and_exits_0_after_final_flush_on_sigterm(tmp_path, collector):
    servicer, address = collector
    sock, notify_path = notify_socket(tmp_path)
    proc = spawn(write_config(tmp_path, address), notify_path)
    try:
        receive_until(sock, "READY=1")
        # Records flow, and verdicts once a window has passed.
        wait_for(lambda: any(b.verdicts for b in servicer.received), proc=proc)
        code, err = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert code == 0, err
    assert any("STOPPING=1" in m for m in receive_until(sock, "STOPPING=1", timeout_s=2))
    sock.close()

    (boot,) = servicer.applied()
    # Every seq the agent made arrived: the final batch too (flushed before exit).
    assert servicer.applied()[boot] == set(range(1, last_seq(err) + 1))
    batches = servicer.received
    assert all(b.agent_id == "node-test" for b in batches)
    assert {r.gpu.gpu_index for b in batches for r in b.records if r.HasField("gpu")} == {0, 1}
    assert {v.gpu_index for b in batches for v in b.verdicts} == {0, 1}
    assert batches[-1].stats.sent >= batches[-1].seq
    # Nothing left unacked on disk.
    assert Spool(tmp_path / "spool").stats().queued == 0


@pytest.mark.slow
def test_agent_keeps_unacked_batches_and_resends_them_next_start(tmp_path, collector):
    servicer, address = collector
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_address = f"127.0.0.1:{dead.getsockname()[1]}"
    dead.close()
    config = write_config(tmp_path, dead_address, shutdown_timeout_s=1)
    proc = spawn(config)
    try:
        wait_for(lambda: (tmp_path / "spool").exists(), proc=proc)
        time.sleep(1.5)  # some batches spooled, none deliverable
        code, err = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert code == 0, err
    first_boot_last = last_seq(err)
    assert first_boot_last > 0
    assert "unacked" in err

    # Next start, with the collector there: the previous boot's batches go first.
    proc = spawn(write_config(tmp_path, address))
    try:
        wait_for(lambda: len(servicer.applied()) == 2, proc=proc)
        code, err = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert code == 0, err
    boots = servicer.applied()
    old = next(b for b in boots if boots[b] == set(range(1, first_boot_last + 1)))
    assert servicer.received[0].boot_id == old
    assert Spool(tmp_path / "spool").stats().queued == 0


def test_missing_collectors_or_plaintext_is_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["agent", "--fake", "h100"])
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0
    assert "collectors" in result.stderr
    path = tmp_path / "a.toml"
    path.write_text('collectors = ["127.0.0.1:1"]\nbackend = "fake:h100"\n')
    result = CliRunner().invoke(main, ["agent", "--config", str(path)])
    assert result.exit_code == 1
    assert "insecure" in result.stderr


def test_unknown_config_key_is_one_line_error(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text('collectors = ["127.0.0.1:1"]\nrate = 3\n')
    result = CliRunner().invoke(main, ["agent", "--config", str(path)])
    assert result.exit_code == 1
    assert "a.toml:2: unknown key 'rate'" in result.stderr


# Agent.run() in a process of its own, SIGTERM sent to one thread at a chosen moment.
# A poll of 0 s spins the main thread through its wait for the signal, so the handler
# runs at one spot of that loop or another, lock-holding ones included.
_SIGNAL_SCRIPT = """
import signal, sys, threading, time
from pathlib import Path
import rooftop.agent.daemon as daemon
import rooftop.common.systemd as systemd
from rooftop.agent.config import load_config

systemd._SIGNAL_POLL_S = {poll}
for i in range(5):
    overrides = dict(
        backend="fake:h100", insecure=True, collectors=["127.0.0.1:9"], hook_socket="",
        spool_dir=Path(sys.argv[1]) / str(i), shutdown_timeout_s=0,
    )
    agent = daemon.Agent(load_config(env={{}}, overrides=overrides), env={{}})
    sent, stopping = [], []
    shutdown = agent.shutdown
    agent.shutdown = lambda timeout_s: (stopping.append(time.monotonic()), shutdown(timeout_s))

    def send():
        target = next(t for t in threading.enumerate() if t.name == "{thread}")
        sent.append(time.monotonic())
        signal.pthread_kill(target.ident, signal.SIGTERM)

    threading.Timer(0.2, send).start()
    assert agent.run() == 0
    print(f"shutdown {{stopping[0] - sent[0]:.3f}} s after the signal", flush=True)
"""


@pytest.mark.parametrize(
    ("thread", "poll_s"),
    [
        # The handler once called Event.set() and ran inside Event.wait(), holding that
        # Event's lock: it waited for itself and SIGTERM hung the agent for good.
        ("MainThread", 0.0),
        # Delivered to another thread (gRPC's, the sampler), nothing interrupts the main
        # thread's wait: the signal wakes it all the same, long before a 60 s poll would.
        ("rooftop-sampler", 60.0),
    ],
)
def test_sigterm_stops_run_whenever_and_wherever_it_lands(tmp_path, thread, poll_s):
    script = _SIGNAL_SCRIPT.format(poll=poll_s, thread=thread)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOFTOP_")}
    env["GRPC_VERBOSITY"] = "ERROR"
    env["PYTHONFAULTHANDLER"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # it no longer answers SIGTERM; faulthandler: stacks
        out, err = proc.communicate()
        raise AssertionError(f"Agent.run() hung after SIGTERM:\n{out}\n{err[-2000:]}") from None
    assert proc.returncode == 0, err[-2000:]
    delays = [float(d) for d in re.findall(r"shutdown (\S+) s after", out)]
    assert len(delays) == 5, out
    assert max(delays) < 20, delays  # woken by the signal, not by the 60 s poll


def test_run_tunes_the_gc_while_sampling_and_restores_it_after(tmp_path, collector):
    # What start() loaded is frozen and young collections are rarer while the agent
    # runs (per-tick cost); a process that calls run() and goes on gets its GC back.
    servicer, address = collector
    agent = Agent(load_config(write_config(tmp_path, address), env={}), env={})
    before = gc.get_threshold()
    seen: list[tuple[tuple[int, int, int], int]] = []

    def stop_once_sampling() -> None:
        try:  # SIGTERM whatever happens: a failing wait must not leave run() waiting
            wait_for(lambda: len(servicer.received) >= 1 and gc.get_freeze_count() > 0)
            seen.append((gc.get_threshold(), gc.get_freeze_count()))
        finally:
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)

    stopper = threading.Thread(target=stop_once_sampling)
    stopper.start()
    assert agent.run() == 0
    stopper.join()
    assert seen and seen[0][0] != before and seen[0][1] > 0
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_agent_object_lifecycle_in_process(tmp_path, collector):
    servicer, address = collector
    cfg = load_config(write_config(tmp_path, address), env={})
    agent = Agent(cfg, env={})
    agent.start()
    try:
        wait_for(lambda: len(servicer.received) >= 3)
        assert agent.flush(5)
    finally:
        agent.shutdown(5)
        agent.shutdown(5)  # idempotent
    assert servicer.applied()[agent.boot_id] == set(range(1, agent.batcher.last_seq + 1))


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/<pid>/task is Linux's")
def test_agent_threads_carry_their_names_into_the_kernel_for_per_thread_cpu(tmp_path, collector):
    # top -H, ps -L and bench/bench_agent.py's per-thread table read /proc/<pid>/task/*/comm,
    # which Python 3.11 leaves as the process's name for every thread it starts.
    _, address = collector
    cfg = load_config(write_config(tmp_path, address, hook_socket=str(tmp_path / "h.sock")),
                      env={})  # fmt: skip
    agent = Agent(cfg, env={})
    agent.start()
    try:
        names = {
            t.name: Path(f"/proc/self/task/{t.native_id}/comm").read_text().strip()
            for t in threading.enumerate()
            if t.name.startswith("rooftop-")
        }
    finally:
        agent.shutdown(5)
    assert names["rooftop-sampler"] == "sampler"
    assert names["rooftop-spool"] == "spool"
    assert names["rooftop-hook-receiver"] == "hook-receiver"


def test_agent_refuses_without_collectors():
    cfg = load_config(env={}, overrides={"backend": "fake:h100", "insecure": True})
    with pytest.raises(ConfigError, match="collectors"):
        Agent(cfg, env={})


def test_daemon_verdicts_carry_the_engine_tpot_like_diagnose(tmp_path, collector):
    # The daemon once classified GPU and host samples only: its verdicts lacked the
    # engines' TPOT (and so the "starved" cause) that `agentctl diagnose` reports.
    servicer, address = collector
    recording = BUNDLED_RECORDINGS / "hf_1b_b1.jsonl"
    cfg = load_config(write_config(tmp_path, address, backend=f"replay:{recording}",
                                   fake_gpus=1, window_s=1.0, hook_socket=""), env={})  # fmt: skip
    agent = Agent(cfg, env={})
    agent.start()
    try:
        wait_for(lambda: any(b.verdicts for b in servicer.received), timeout_s=20)
    finally:
        agent.shutdown(5)
    verdicts = [v for b in servicer.received for v in b.verdicts]
    expected = overall(diagnose_records(read_trace(recording).records))[0]
    assert expected.verdict == Bound.HOST
    for v in verdicts:
        evidence = {e.name: e.value for e in v.evidence}
        assert v.verdict == "host-bound"
        assert evidence["tpot_ms"] == pytest.approx(78.3, abs=0.1)


def test_agent_reports_the_configured_hostname_and_a_uuid_of_its_own_for_a_zero_uuid_replay(
    tmp_path, collector
):
    """Two agents on one machine replaying the same anonymised recording must not look like
    one GPU to the collector: ``hostname`` sets Batch.hostname, and the all-zero recorded
    UUID becomes one derived from the agent id (the same at each start)."""
    servicer, address = collector
    recording = BUNDLED_RECORDINGS / "gemm_8192.jsonl"
    zero = "GPU-00000000-0000-0000-0000-000000000000"
    assert {r.gpu_uuid for r in read_trace(recording).records} == {zero}  # type: ignore[union-attr]
    uuids: dict[str, set[str]] = {}
    for run, agent_id in enumerate(("replay-a", "replay-b", "replay-a")):
        (tmp_path / str(run)).mkdir()
        cfg = load_config(write_config(tmp_path / str(run), address, agent_id=agent_id,
                                       hostname=f"host-{agent_id}", backend=f"replay:{recording}",
                                       fake_gpus=1, hook_socket="", host_sensor=False),
                          env={})  # fmt: skip
        agent = Agent(cfg, env={})
        agent.start()
        try:
            wait_for(lambda boot=agent.boot_id: any(
                b.records for b in list(servicer.received) if b.boot_id == boot))
        finally:
            agent.shutdown(5)
        batches = [b for b in servicer.received if b.boot_id == agent.boot_id]
        assert {b.hostname for b in batches} == {f"host-{agent_id}"}
        uuids.setdefault(agent_id, set()).update(
            r.gpu.gpu_uuid for b in batches for r in b.records if r.HasField("gpu"))
    # One UUID per node across its two starts, another for the other node; none all-zero.
    assert len(uuids["replay-a"]) == len(uuids["replay-b"]) == 1, uuids
    assert uuids["replay-a"] != uuids["replay-b"]
    assert zero not in uuids["replay-a"] | uuids["replay-b"]
