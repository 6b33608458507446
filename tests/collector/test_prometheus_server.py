"""The Prometheus HTTP endpoint under abuse: real sockets on loopback.

Idle connections cost no thread and are closed after ``timeout_s``; past the bound on
silent connections the oldest goes; a client that stops mid-request frees its worker;
a failing client is one log line, never a traceback."""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Iterator

import pytest

from rooftop.collector import prometheus
from rooftop.collector.prometheus import PrometheusServer
from tests.support import wait_for


class Served:
    def __init__(self, **options: object) -> None:
        self.refused = 0
        self.sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.server = PrometheusServer("127.0.0.1", 0, lambda names: "up 1\n",
                                       on_refused=self._refuse, **options)  # type: ignore[arg-type]  # fmt: skip

    def _refuse(self) -> None:
        with self._lock:
            self.refused += 1

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.server.port))
        sock.settimeout(10)
        self.sockets.append(sock)  # closed by the fixture, even when a test fails
        return sock

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.server.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.read().decode()


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    s = Served(**getattr(request, "param", {}))
    yield s
    for sock in s.sockets:
        sock.close()
    s.server.close()


@pytest.mark.parametrize("served", [{"max_connections": 1}], indirect=True)
def test_idle_connections_take_no_worker_and_cost_no_thread(served: Served):
    before = threading.active_count()
    idle = [served.connect() for _ in range(50)]
    assert served.scrape() == "up 1\n"  # the one worker serves it, past 50 idle ones
    assert threading.active_count() == before
    for sock in idle:
        sock.close()


@pytest.mark.parametrize("served", [{"timeout_s": 0.2}], indirect=True)
def test_a_silent_connection_is_closed_after_timeout_s_and_counted(served: Served):
    silent = served.connect()
    assert silent.recv(1) == b""  # closed by the server
    assert served.refused == 1
    silent.close()


@pytest.mark.parametrize("served", [{"max_connections": 1, "timeout_s": 0.3}], indirect=True)
def test_a_client_that_stops_mid_request_frees_its_worker(served: Served, caplog):
    stuck = served.connect()
    stuck.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # ... and never the blank line
    assert served.scrape() == "up 1\n"  # served once the stuck one timed out
    assert "Traceback" not in caplog.text
    stuck.close()


def test_past_the_bound_on_silent_connections_the_oldest_is_closed(
    served: Served, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(prometheus, "_MAX_WAITING", 3)
    socks = [served.connect() for _ in range(5)]
    wait_for(lambda: served.refused == 2)
    assert socks[0].recv(1) == b"" and socks[1].recv(1) == b""
    assert served.scrape() == "up 1\n"
    for sock in socks:
        sock.close()


def test_close_is_idempotent_and_frees_the_port(served: Served):
    port = served.server.port
    served.server.close()
    served.server.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


@pytest.mark.parametrize("served", [{"max_connections": 1}], indirect=True)
def test_connections_that_hang_up_unheard_take_no_worker_and_are_not_refusals(served: Served):
    # A burst of hang-ups once filled the request queue and crowded out a real scrape.
    for sock in [served.connect() for _ in range(300)]:
        sock.close()
    assert served.scrape() == "up 1\n"
    assert served.refused == 0
