"""Idle connections to the Prometheus endpoint: no thread each, bounded, scrapes still served.

Before: a thread per connection and no read timeout; 400 idle connections under the
unit's ``TasksMax`` broke scrapes with 690 tracebacks. Now connections wait for their
request on one thread, ``max_connections`` workers serve requests, a silent
connection is closed after ``timeout_s``, and past the bound on silent connections
the oldest is closed and counted (``scrape_connections``).
"""

from __future__ import annotations

import socket

import pytest

from rooftop.collector import prometheus
from tests.e2e.adversarial.conftest import (
    limited,
    log_lines,
    proc_status,
    report,
    scrape,
    settled_rss_mib,
)
from tests.e2e.conftest import Harness, wait_for

pytestmark = pytest.mark.slow

IDLE = prometheus._MAX_WAITING + 100
WORKERS = 4
THREADS_SLACK = 4  # threads the collector may start meanwhile (an OTLP export, gRPC's)
GROWTH_BOUND_MIB = 16  # the connections' sockets and bookkeeping, not a thread stack each


def test_idle_scrape_connections_cost_no_thread_and_a_scrape_still_succeeds(e2e: Harness):
    c = e2e.collector(prometheus={"max_connections": WORKERS})
    scrape(c)
    threads_before = proc_status(c.pid, "Threads")
    base_mib = settled_rss_mib(c.pid)
    socks = []
    try:
        for _ in range(IDLE):
            socks.append(socket.create_connection(("127.0.0.1", c.metrics_port)))
        wait_for(lambda: limited(c, "scrape_connections") >= IDLE - prometheus._MAX_WAITING,
                 "the oldest idle connections closed")  # fmt: skip
        text = scrape(c)
        threads = proc_status(c.pid, "Threads")
        grown_mib = settled_rss_mib(c.pid) - base_mib
    finally:
        for sock in socks:
            sock.close()
    tracebacks = log_lines(c, "Traceback")
    report("scrape_connections", {"idle": IDLE, "threads_before": threads_before,
                                  "threads_during": threads, "rss_growth_mib": grown_mib,
                                  "refused": limited(c, "scrape_connections"),
                                  "tracebacks": len(tracebacks)})  # fmt: skip
    assert "rooftop_collector_batches_total" in text
    assert threads <= threads_before + THREADS_SLACK
    assert grown_mib < GROWTH_BOUND_MIB
    assert tracebacks == []
