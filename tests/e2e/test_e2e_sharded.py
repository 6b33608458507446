"""Proven under load and loss (issue 13.6): three collectors, 2,000 agents, one killed.

Three real ``agentctl collector`` processes (state directories; each remote-writes into
the Prometheus), a real Prometheus scraping all three and receiving their remote write,
and 2,000 simulated agents of 8 GPUs at 1 Hz from one process (``tests.loadgen``: real
gRPC streams, the agent's homing, columnar batches as agents send them by default).
One collector is SIGKILLed mid-run and started again 15 s later on the same port and
state directory (``tests.e2e.sharded`` drives it). Then:

- every seq of every agent was applied; a seq applied more than once was resent (on a
  new stream, to another collector) before its ack: the dead one may have applied it
  (applied again, and counted); the restarted collector applied nothing a second time
  that its marks on disk held at the kill;
- no collector counted a seq missing; the restarted home counted the seqs the others
  applied while it was down as acked elsewhere (``Batch.acked_seq``);
- the killed collector's agents streamed to another within 10 s, and went home after
  it came back;
- no GPU's series stayed on two collectors' endpoints past the grace
  (``disconnected_series_s``) plus one scrape;
- remote write came through the kill and the restart: samples sent, none refused or
  dropped.

The figures (collector CPU and RSS per 1,000 agents, re-home times, duplicates) are
printed (``-s``); ``bench/bench_sharded.py`` runs the same scenario longer, with its
capacity table.

What makes 2,000 agents fit a 2-core CI machine (with the generator, Prometheus and
pytest on it): the scrape asks for the verdict family only (``name[]``; the whole
exposition of ~5,000 GPUs costs a collector ~1 s of CPU per scrape), and remote write
sends one chosen series (``include``: the verdicts' confidence, a point per GPU per
window: ~3k points/s into Prometheus; everything would be 17 points per GPU sample),
and Prometheus runs at nice 10, so that in the failover the collectors come first.
docs/PERFORMANCE.md ("Three collectors, one killed") has the figures.
"""

from __future__ import annotations

import pprint

import pytest

from tests.e2e.sharded import Outcome, Sharded, collector_knows, summary
from tests.loadgen import AgentLedger
from tests.support import PROMETHEUS, require_tool

pytestmark = pytest.mark.slow

AGENTS = 2000
REHOME_MAX_S = 10.0


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    """One run of the scenario, shared by the checks below (it takes about 2 minutes)."""
    require_tool("prometheus", PROMETHEUS)
    root = tmp_path_factory.mktemp("sharded")
    # See the module docstring for the size. Prometheus scrapes only the verdict family;
    # every collector remote-writes (the killed one is cut mid-request, starts again).
    scenario = Sharded(root, agents=AGENTS, remote_write=True, remote_writers=(0, 1, 2),
                       scrape_interval_s=10, settle_scrapes=2)  # fmt: skip
    with scenario.prometheus() as base:
        try:
            scenario.start_collectors(base)
            result = scenario.run(base, kill=0)
        finally:
            for proc in scenario.collectors:
                proc.kill()
    print("\nsharded run:", {k: round(v, 3) for k, v in summary(result).items()})
    return result


def test_every_seq_of_every_agent_is_applied(outcome: Outcome):
    applied = [set(a) for a in outcome.applied]
    union = set().union(*applied)
    missing = [
        (led.agent_id, seq)
        for led in outcome.ledgers
        for seq in range(1, led.last_seq + 1)
        if (led.agent_id, seq) not in union
    ]
    assert missing == []
    assert sum(len(led.unacked) for led in outcome.ledgers) == 0
    assert all(led.acked_seq == led.last_seq for led in outcome.ledgers)


def test_no_collector_counts_a_seq_missing_and_home_counts_the_away_seqs_acked_elsewhere(
    outcome: Outcome,
):
    # No spool dropped anything: every gap a collector saw was delivered elsewhere.
    assert [c["missing"] for c in outcome.counts] == [0, 0, 0]
    # The restarted home saw its returning agents start past its marks, by what the
    # other collectors applied while it was down: said, not counted as lost.
    assert outcome.counts[outcome.killed]["acked_elsewhere"] > 0


def test_remote_write_through_a_sigkill_and_restart_has_no_refusals_or_drops(outcome: Outcome):
    counts = outcome.remote_write_samples
    assert counts.get("sent", 0) > 0
    assert counts.get("rejected", 0) == 0  # re-applied batches are no-ops (out-of-order window)
    assert counts.get("dropped", 0) == 0
    assert outcome.remote_write_series > 0  # in Prometheus, without a job label
    assert all(sent > 0 for sent in outcome.remote_write_sent_by)  # from every collector


def test_a_seq_applied_twice_was_resent_after_a_failover_before_its_ack(outcome: Outcome):
    by_id = {led.agent_id: led for led in outcome.ledgers}
    total: dict[tuple[str, int], int] = {}
    for applied in outcome.applied:
        for key, n in applied.items():
            total[key] = total.get(key, 0) + n
    again = [key for key, n in total.items() if n > 1]
    unexplained = [key for key in again if key[1] not in by_id[key[0]].multi_sent]
    assert unexplained == []
    # Only the killed collector's agents moved: nobody else has anything applied twice.
    homed = set(outcome.killed_homed)
    assert {agent_id for agent_id, _ in again} <= homed


def test_a_restarted_collector_applies_nothing_twice_that_was_durable_at_the_kill(
    outcome: Outcome,
):
    for index, applied in enumerate(outcome.applied):
        twice = [key for key, n in applied.items() if n > 1]
        if index != outcome.killed:
            assert twice == [], f"collector {index} applied a seq twice without a restart"
            continue
        boots = {led.agent_id: led.boot_id for led in outcome.ledgers}
        durable = [
            key for key in twice if key[1] <= outcome.marks_at_kill.get((key[0], boots[key[0]]), 0)
        ]
        assert durable == []


def test_the_killed_collectors_agents_rehome_within_10_s_and_return_home(outcome: Outcome):
    assert len(outcome.killed_homed) > AGENTS // 5  # about a third of them
    slow = {a: round(s, 2) for a, s in outcome.rehome_s.items() if s > REHOME_MAX_S}
    by_id = {led.agent_id: led for led in outcome.ledgers}
    # What the first few slow ones went through after the kill (the streams' errors).
    story = {a: _since(by_id[a], outcome.kill_s)[:12] for a in list(slow)[:3]}
    assert slow == {}, pprint.pformat(story, width=200)
    not_home = [a for a, s in outcome.home_s.items() if s == float("inf")]
    assert not_home == []
    # Home at the end (streams that broke on a live collector during the settle, and
    # their agents' way back, were given their time): what the ones still away went
    # through after the restart.
    away_at_end = {
        led.agent_id: _since(led, outcome.restart_s)[-6:]
        for led in outcome.ledgers
        if led.current != led.home
    }
    assert away_at_end == {}, pprint.pformat(dict(list(away_at_end.items())[:3]), width=200)


def _since(led: AgentLedger, t0_s: float) -> list[tuple[float, str, str, str]]:
    """``led``'s homing events after ``t0_s``: (seconds after it, kind, address, why)."""
    return [(round(e.time_s - t0_s, 2), e.kind, e.address, e.detail[:120])
            for e in led.events if e.time_s > t0_s]  # fmt: skip


@pytest.mark.skipif(
    not collector_knows("disconnected_series_s"),
    reason="the collector has no disconnected_series_s yet: a GPU stays on the collector "
    "it left until forget_after_s",
)
def test_no_gpu_is_on_two_collectors_past_the_grace_and_one_scrape(outcome: Outcome):
    assert outcome.duplicates_after_grace == 0
    # Each GPU that came home was on both for at most the grace and one scrape (and the
    # step the query rounds to).
    limit_s = outcome.grace_s + 2 * outcome.scrape_interval_s
    long = {gpu: span for gpu, span in outcome.duplicate_spans_s.items() if span > limit_s}
    assert long == {}
