"""De-duplication survives a collector restart (issue 13.2): its marks live in ``state_dir``.

A real collector process (recording every batch it applies, across its runs, in one
ledger) is SIGKILLed or SIGTERMed and started again on the same state directory:

- a client that resends every seq from 1 (an agent whose ``acked.json`` did not
  survive its own crash) gets nothing applied twice: what it saw acked was durable;
- a real agent streaming through the kill: every seq applied, and none the collector
  had acked (its mark on disk at the kill) applied again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from rooftop.collector.marks import MARKS_FILE
from tests.collector.helpers import AgentStream, batch, gpu
from tests.e2e.conftest import CollectorProc, Harness, assert_each_once, holes, wait_for

pytestmark = pytest.mark.slow


def durable_marks(state_dir: Path) -> dict[tuple[str, str], int]:
    """The marks file as a restarted collector reads it (the last line of a pair wins)."""
    marks: dict[tuple[str, str], int] = {}
    for line in (state_dir / MARKS_FILE).read_text().splitlines():
        try:
            agent_id, boot_id, mark = json.loads(line)
        except ValueError:
            break  # a torn last line: the collector keeps what came before it too
        marks[(agent_id, boot_id)] = mark
    return marks


@pytest.fixture
def collector(e2e: Harness, tmp_path: Path) -> Iterator[CollectorProc]:
    yield e2e.collector(state_dir=tmp_path / "state", ack_interval_s=0.05)


@pytest.mark.parametrize("stop", ["SIGKILL", "SIGTERM"])
def test_a_restarted_collector_applies_no_acked_seq_twice(
    collector: CollectorProc, tmp_path: Path, stop: str
):
    with AgentStream(collector.address) as stream:
        stream.send(*(batch(s, records=[gpu(0)]) for s in range(1, 41)))
        assert stream.wait_acked(40)[-1].acked_seq == 40
    if stop == "SIGKILL":
        collector.kill()
    else:
        assert collector.terminate() == 0
    collector.start()
    with AgentStream(collector.address) as stream:
        stream.send(*(batch(s, records=[gpu(0)]) for s in range(1, 46)))
        assert stream.wait_acked(45)[-1].acked_seq == 45
    assert_each_once(collector.ledger().seqs("agent-1", "boot-1"), 45)
    assert collector.metric("rooftop_collector_duplicates_total") == 40
    assert collector.metric("rooftop_collector_restored_duplicates_total") == 40
    assert collector.metric("rooftop_collector_batches_total") == 5


def test_a_real_agent_streaming_through_a_sigkill_loses_nothing_and_gets_no_acked_seq_twice(
    e2e: Harness, collector: CollectorProc, tmp_path: Path
):
    agent = e2e.agent("node-1", collector.address)
    wait_for(lambda: len(collector.ledger().of("node-1")) >= 15, "batches before the kill",
             procs=(collector, agent))  # fmt: skip
    collector.kill()
    acked_at_kill = durable_marks(tmp_path / "state").get(("node-1", agent.boot_id), 0)
    assert acked_at_kill > 0
    wait_for(lambda: "reconnecting" in agent.log() or "UNAVAILABLE" in agent.log(),
             "the agent noticing", procs=(agent,))  # fmt: skip
    collector.start()
    applied_then = len(collector.ledger().of("node-1"))
    wait_for(lambda: len(collector.ledger().of("node-1")) >= applied_then + 10,
             "batches after the restart", procs=(collector, agent))  # fmt: skip
    last = agent.stop()
    seqs = collector.ledger().seqs("node-1", agent.boot_id)
    assert holes(seqs, last) == []
    twice = sorted(s for s, n in seqs.items() if n > 1)
    print(f"\nacked at the kill: {acked_at_kill}; applied again after the restart: {twice}")
    assert all(s > acked_at_kill for s in twice), "an acked seq was applied again"
    # Only what was applied but not yet durable (one flush interval, a few batches).
    assert len(twice) <= 10
