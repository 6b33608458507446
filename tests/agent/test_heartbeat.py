"""The liveness heartbeat: the sampling loop touches ``heartbeat_file``; ``agentctl alive``
(the DaemonSet's exec probe) passes while it is fresh and fails, in one line, once not."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from rooftop.agent.config import load_config
from rooftop.agent.daemon import Agent
from rooftop.agent.heartbeat import Heartbeat, heartbeat_problem
from rooftop.cli import main
from tests.support import FakeIngest, Server, wait_for


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_beats_are_spaced_so_a_fast_loop_writes_at_most_once_a_second(tmp_path: Path):
    path = tmp_path / "hb"
    clock = Clock()
    beat = Heartbeat(path, every_s=1.0, monotonic=clock)
    beat.beat()
    assert path.exists()
    os.utime(path, (0, 0))
    clock.now_s += 0.5
    beat.beat()  # too soon: not written
    assert path.stat().st_mtime == 0
    clock.now_s += 0.5
    beat.beat()
    assert path.stat().st_mtime > 0
    beat.clear()
    assert not path.exists()
    beat.clear()  # idempotent


def test_no_heartbeat_file_configured_writes_nothing(tmp_path: Path):
    beat = Heartbeat(None)
    beat.beat()
    beat.clear()
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_heartbeat_is_logged_once_and_sampling_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    beat = Heartbeat(tmp_path / "missing-dir" / "hb", every_s=0.0)
    for _ in range(3):
        beat.beat()
    assert [r.getMessage() for r in caplog.records if "heartbeat_file" in r.getMessage()] == [
        f"heartbeat_file {tmp_path / 'missing-dir' / 'hb'}: "
        f"[Errno 2] No such file or directory: '{tmp_path / 'missing-dir' / 'hb'}' "
        "(liveness probes will fail)"
    ]


def test_problem_says_missing_stale_or_nothing(tmp_path: Path):
    path = tmp_path / "hb"
    assert "has not completed a sampling tick" in (heartbeat_problem(path, 30) or "")
    path.touch()
    os.utime(path, (1000.0, 1000.0))
    assert heartbeat_problem(path, 30, now_s=lambda: 1029.0) is None
    stale = heartbeat_problem(path, 30, now_s=lambda: 1100.0)
    assert stale == f"no sampling tick for 100 s (more than 30 s; {path})"


def test_alive_exits_0_when_fresh_and_1_with_one_line_when_stale(tmp_path: Path):
    path = tmp_path / "hb"
    runner = CliRunner()
    missing = runner.invoke(main, ["alive", str(path)])
    assert missing.exit_code == 1
    (line,) = missing.stderr.splitlines()  # one line, never a traceback
    assert line.startswith("agentctl: not alive: no heartbeat at ")
    path.touch()
    assert runner.invoke(main, ["alive", str(path), "--max-age-s", "30"]).exit_code == 0
    os.utime(path, (1.0, 1.0))  # 1970: far older than any --max-age-s
    stale = runner.invoke(main, ["alive", str(path), "--max-age-s", "30"])
    assert stale.exit_code == 1
    assert "no sampling tick for" in stale.stderr
    assert runner.invoke(main, ["alive", str(path), "--max-age-s", "0"]).exit_code == 2


def runner_alive(path: Path) -> int:
    return CliRunner().invoke(main, ["alive", str(path)]).exit_code


@pytest.fixture
def ingest() -> Iterator[str]:
    server = Server(FakeIngest())
    yield server.address
    server.stop()


def test_the_sampling_loop_keeps_the_heartbeat_fresh_and_stops_with_it(tmp_path: Path, ingest: str):
    path = tmp_path / "hb"
    path.touch()
    os.utime(path, (1.0, 1.0))  # a previous container's: must not count for this one
    overrides = {
        "agent_id": "node-hb", "collectors": (ingest,), "insecure": True,
        "backend": "fake:h100", "rate_hz": 20.0, "window_s": 0.5, "hook_socket": "",
        "host_sensor": False, "spool_dir": tmp_path / "spool", "heartbeat_file": path,
    }  # fmt: skip
    agent = Agent(load_config(env={}, overrides=overrides), env={})
    # Wedge the sampler after its first ticks: the heartbeat must then go stale.
    release = threading.Event()
    ticks = 0
    real_tick = agent.sampler.tick

    def tick() -> list[object]:
        nonlocal ticks
        ticks += 1
        if ticks > 3:
            release.wait(30)  # a driver call that does not return
        return real_tick()  # type: ignore[return-value]

    agent.sampler.tick = tick  # type: ignore[method-assign]
    agent.heartbeat = Heartbeat(path, every_s=0.01)  # every tick, not once a second
    agent.start()
    try:
        wait_for(lambda: path.exists() and path.stat().st_mtime > 1.0)
        assert heartbeat_problem(path, 30) is None
        assert runner_alive(path) == 0
        wait_for(lambda: ticks > 3)
        wedged_mtime = path.stat().st_mtime_ns
        release.wait(0.5)  # 10 ticks' time at 20 Hz, none of them done
        assert path.stat().st_mtime_ns == wedged_mtime  # so a probe would see it age
    finally:
        release.set()
        agent.shutdown(5)
    assert not path.exists()  # stopped: no heartbeat claims otherwise
