"""``agentctl collector`` under systemd's notify protocol (``Type=notify``, ``WatchdogSec``).

A real collector subprocess, ``$NOTIFY_SOCKET`` a Unix datagram socket bound here:
``READY=1`` once the ports are bound, ``WATCHDOG=1`` every ``WatchdogSec/2`` and
``STOPPING=1`` on SIGTERM, then exit 0.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rooftop.common.systemd import watchdog_interval_s
from tests.support import NotifySocket

REPO = Path(__file__).resolve().parents[2]


def test_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROOFTOP_", "WATCHDOG_"))}
    env.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="1000000", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rooftop", "collector", "--insecure",
         "--listen", "127.0.0.1:0", "--prometheus", "127.0.0.1:0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    messages = notify.messages
    try:
        notify.wait_for_watchdogs(proc)
        ready = [m for m in messages if m.startswith("READY=1")]
        assert ready, messages
        # READY=1 means the ingest port is bound: connecting to it succeeds now.
        match = re.search(r"STATUS=ingest on port (\d+)", ready[0])
        assert match, ready
        socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=5).close()
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
        notify.drain()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    assert messages.index(ready[0]) < messages.index("WATCHDOG=1"), messages
    assert messages.count("WATCHDOG=1") >= 2, (messages, output)
    assert messages[-1] == "STOPPING=1", (messages, output)
    assert proc.returncode == 0, output
    assert "rooftop collector: stopped" in output


def test_no_notify_socket_no_harm(tmp_path: Path) -> None:
    """Outside systemd (no $NOTIFY_SOCKET) the collector runs and stops as before."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROOFTOP_", "NOTIFY_"))}
    env.update(WATCHDOG_USEC="1000000", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rooftop", "collector", "--insecure",
         "--listen", "127.0.0.1:0", "--prometheus", ""],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "ingest on 127.0.0.1:" in line, line
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # another process's
    ],
)
def test_watchdog_interval_is_half_of_watchdog_sec(
    env: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval_s(env) == expected
