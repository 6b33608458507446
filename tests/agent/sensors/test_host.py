"""PsutilHostSensor against real processes (and a checked-in-style fake /proc/stat)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from rooftop.agent.sensors.base import HostSensor
from rooftop.agent.sensors.host import PsutilHostSensor

SPIN = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass\n"


@pytest.fixture
def spinner():
    proc = subprocess.Popen([sys.executable, "-c", SPIN])
    yield proc
    proc.kill()
    proc.wait()


def test_is_a_host_sensor():
    sensor: HostSensor = PsutilHostSensor()
    assert sensor.read(0.0, {}).processes == ()


def test_spinning_process_reads_near_one_core(spinner):
    sensor = PsutilHostSensor()
    first = sensor.read(1.0, {spinner.pid: (0,)})
    (proc,) = first.processes
    assert proc.pid == spinner.pid
    assert proc.gpu_indices == (0,)
    assert proc.cpu_pct is None  # no previous reading to take a rate from
    assert proc.name
    # two cores shared with other work: allow a few tries before calling it wrong
    readings = []
    for _ in range(4):
        time.sleep(0.5)
        (proc,) = sensor.read(2.0, {spinner.pid: (0,)}).processes
        readings.append(proc.cpu_pct)
        if proc.cpu_pct is not None and proc.cpu_pct > 50:
            break
    assert max(r for r in readings if r is not None) > 50, readings


def test_host_cpu_is_a_percentage_after_the_first_read(spinner):
    sensor = PsutilHostSensor()
    time.sleep(0.3)
    sample = sensor.read(1.0, {})
    assert sample.cpu_pct is not None
    assert 0 < sample.cpu_pct <= 100  # a core is spinning


def test_vanished_and_unknown_pids_are_skipped():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    sensor = PsutilHostSensor()
    try:
        assert [p.pid for p in sensor.read(1.0, {child.pid: (0,)}).processes] == [child.pid]
    finally:
        child.kill()
        child.wait()
    never = 2**22 + 77  # above Linux's PID_MAX_LIMIT: cannot exist
    sample = sensor.read(2.0, {child.pid: (0,), never: (1,)})
    assert sample.processes == ()


def test_proc_root_is_used(tmp_path, monkeypatch):
    monkeypatch.setattr("psutil.PROCFS_PATH", "/proc")  # restored after the test
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice (in clock ticks)
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\nbtime 1700000000\n")
    sensor = PsutilHostSensor(proc_root=tmp_path)
    stat.write_text("cpu  250 0 150 900 0 0 0 0 0 0\nbtime 1700000000\n")
    # busy +200 ticks of +300 total
    assert sensor.read(1.0, {}).cpu_pct == pytest.approx(66.7)
    # nothing moved: 0 busy, not an error
    assert sensor.read(2.0, {}).cpu_pct == 0.0


def test_two_sensors_do_not_share_a_baseline(tmp_path, monkeypatch):
    monkeypatch.setattr("psutil.PROCFS_PATH", "/proc")
    stat = tmp_path / "stat"
    stat.write_text("cpu  0 0 0 1000 0 0 0 0 0 0\n")
    a = PsutilHostSensor(proc_root=tmp_path)
    stat.write_text("cpu  100 0 0 1100 0 0 0 0 0 0\n")
    b = PsutilHostSensor(proc_root=tmp_path)
    stat.write_text("cpu  200 0 0 1200 0 0 0 0 0 0\n")
    assert a.read(1.0, {}).cpu_pct == pytest.approx(50.0)
    # with one shared baseline (psutil.cpu_percent's), a's read would leave b 0 %
    assert b.read(1.0, {}).cpu_pct == pytest.approx(50.0)
