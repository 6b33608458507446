"""Several collectors, active-active (issue 13 item 1), with REAL processes.

Three ``agentctl collector`` subprocesses and one ``agentctl agent`` listing all three:
the agent streams to its rendezvous home; SIGKILL home and the next-ranked collector
applies its batches within seconds; restart home on its port and the agent returns
after ``return_home_after_s``, not before; once ``disconnected_series_s`` has passed
after a move, no scrape finds the agent's GPU series on two collectors; and every seq
is applied (once, or again on another collector: counted in the ledgers).
"""

from __future__ import annotations

import time

import pytest

from rooftop.agent.homing import Endpoint, rendezvous_rank
from tests.e2e.conftest import CollectorProc, Harness, holes, wait_for

pytestmark = pytest.mark.slow

AGENT_ID = "gpu-node-e2e"
HOSTNAME = "e2e-node"
RETURN_AFTER_S = 2.0
DISCONNECTED_SERIES_S = 1.0


def shows_gpus(collector: CollectorProc) -> bool:
    """Whether ``collector``'s Prometheus endpoint has the agent's GPU series."""
    return any(
        name.startswith("hw_") and ("host_name", HOSTNAME) in labels
        for name, labels in collector.metrics()
    )


def applied(collector: CollectorProc, since_s: float = 0.0) -> int:
    return sum(1 for b in collector.ledger().of(AGENT_ID) if b.received_s >= since_s)


def test_failover_to_the_next_ranked_return_home_and_no_gpu_shown_twice(e2e: Harness):
    collectors = [
        e2e.collector(f"collector-{i}", disconnected_series_s=DISCONNECTED_SERIES_S)
        for i in range(3)
    ]
    by_address = {c.address: c for c in collectors}
    ranked = rendezvous_rank(AGENT_ID, [Endpoint(c.address) for c in collectors])
    home, second, third = (by_address[e.address] for e in ranked)
    agent = e2e.agent(
        AGENT_ID,
        collectors[0].address,
        collectors=[c.address for c in collectors],  # the listed order does not matter
        hostname=HOSTNAME,
        return_home_after_s=RETURN_AFTER_S,
        home_probe_interval_s=0.2,
    )
    wait_for(lambda: applied(home) > 0, "batches at home", procs=(agent,))
    assert applied(second) == applied(third) == 0

    home.kill()  # SIGKILL
    killed_s = time.time()
    wait_for(lambda: applied(second, killed_s) > 0, "the next-ranked collector applying",
             timeout_s=10.0, procs=(agent,))  # fmt: skip
    assert applied(third) == 0

    restarted_s = time.time()
    home.start()  # the same port
    wait_for(lambda: applied(home, restarted_s) > 0, "the agent back home", procs=(agent,))
    back_s = min(b.received_s for b in home.ledger().of(AGENT_ID) if b.received_s >= restarted_s)
    assert back_s - restarted_s >= RETURN_AFTER_S  # the hysteresis, not the first probe
    assert "is healthy again" in agent.log()

    # The old stream closed before the new one opened: after disconnected_series_s no
    # scrape shows the GPUs on both (the one home exports them).
    settle_s = back_s + DISCONNECTED_SERIES_S + 0.5
    time.sleep(max(0.0, settle_s - time.time()))
    for _ in range(10):
        assert [shows_gpus(c) for c in (home, second, third)] == [True, False, False]
        time.sleep(0.1)

    last = agent.stop()
    seqs = set()
    for c in collectors:
        seqs |= set(c.ledger().seqs(AGENT_ID, agent.boot_id))
    assert holes(seqs, last) == []  # every seq applied somewhere, some maybe twice
