"""systemd notify: datagrams to $NOTIFY_SOCKET, path and abstract namespace."""

from __future__ import annotations

import os
import socket

from rooftop.common.systemd import sd_notify, watchdog_interval_s
from tests.support import NotifySocket


def test_sd_notify_sends_one_datagram_and_is_false_without_a_socket(tmp_path):
    notify = NotifySocket(tmp_path / "notify")
    try:
        assert sd_notify("READY=1", {"NOTIFY_SOCKET": str(notify.path)})
        notify.drain()
        assert notify.messages == ["READY=1"]
    finally:
        notify.close()
    assert not sd_notify("READY=1", {})
    assert not sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "absent")})


def test_sd_notify_reaches_an_abstract_namespace_socket():
    name = f"rooftop-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert sd_notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"WATCHDOG=1"


def test_watchdog_interval_is_half_of_watchdog_sec_and_only_for_this_pid():
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    mine = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval_s(mine) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval_s({}) is None
