"""Rendezvous homing: a stable home per agent, 1/N moved per change, failover, return."""

from __future__ import annotations

from collections import Counter

import pytest

from rooftop.agent.homing import Endpoint, Homing, expand, rendezvous_rank

COLLECTORS = [Endpoint(f"10.0.0.{i}:4850") for i in range(1, 4)]
AGENTS = [f"gpu-node-{i:05d}" for i in range(3000)]


def homes(endpoints: list[Endpoint]) -> dict[str, Endpoint]:
    return {a: rendezvous_rank(a, endpoints)[0] for a in AGENTS}


def test_agents_spread_evenly_over_their_homes() -> None:
    counts = Counter(homes(COLLECTORS).values())
    assert set(counts) == set(COLLECTORS)
    assert all(800 <= n <= 1200 for n in counts.values())  # 1,000 each, within 20 %


def test_the_ranking_does_not_depend_on_the_listed_order() -> None:
    assert homes(COLLECTORS) == homes(list(reversed(COLLECTORS)))


def test_adding_a_collector_moves_only_the_agents_it_becomes_home_to() -> None:
    before = homes(COLLECTORS)
    new = Endpoint("10.0.0.4:4850")
    after = homes([*COLLECTORS, new])
    moved = [a for a in AGENTS if before[a] != after[a]]
    assert all(after[a] == new for a in moved)  # nobody moves between old collectors
    assert 600 <= len(moved) <= 900  # about 1/4


def test_removing_a_collector_moves_only_its_own_agents() -> None:
    before = homes(COLLECTORS)
    after = homes(COLLECTORS[:2])
    moved = {a for a in AGENTS if before[a] != after[a]}
    assert moved == {a for a in AGENTS if before[a] == COLLECTORS[2]}


def test_a_failure_moves_to_the_next_ranked_collector_and_its_own_fallback() -> None:
    h = Homing("gpu-node-00001", COLLECTORS)
    ranked = h.ranked
    assert h.current == ranked[0] and not h.away
    assert h.failed() == ranked[1] and h.away
    assert h.failed() == ranked[2]
    assert h.failed() == ranked[0]  # all failed: start again from home


def test_home_must_answer_for_the_whole_hysteresis_before_the_agent_returns() -> None:
    h = Homing("gpu-node-00001", COLLECTORS, return_after_s=30)
    h.failed()
    assert not h.probed_home(True, 100.0)
    assert not h.probed_home(True, 120.0)
    assert not h.probed_home(False, 125.0)  # one failed probe restarts the clock
    assert not h.probed_home(True, 126.0)
    assert not h.probed_home(True, 155.0)
    assert h.probed_home(True, 156.0)
    assert h.go_home() == h.home and not h.away
    assert not h.probed_home(True, 200.0)  # at home: nothing to do


def test_a_refresh_keeps_the_current_collector_when_it_is_still_listed() -> None:
    h = Homing("gpu-node-00001", COLLECTORS)
    away_at = h.failed()
    assert h.refresh([*COLLECTORS, Endpoint("10.0.0.9:4850")])
    assert h.current == away_at
    assert not h.refresh([*COLLECTORS, Endpoint("10.0.0.9:4850")])  # unchanged
    assert h.refresh([e for e in COLLECTORS if e != away_at])
    assert h.current == h.home  # gone: start from the new home


def test_one_name_with_several_addresses_is_several_collectors_verified_by_name() -> None:
    def resolve(host: str, port: int) -> list[str]:
        assert (host, port) == ("rooftop-collector.monitoring.svc", 4850)
        return ["10.1.0.7", "10.1.0.8", "fd00::9"]

    got = expand(["rooftop-collector.monitoring.svc:4850", "10.0.0.1:4850"], resolve)
    name = "rooftop-collector.monitoring.svc"
    assert got == (
        Endpoint("10.1.0.7:4850", name),
        Endpoint("10.1.0.8:4850", name),
        Endpoint("[fd00::9]:4850", name),
        Endpoint("10.0.0.1:4850"),
    )


def test_a_name_with_one_address_or_none_is_dialled_by_name() -> None:
    assert expand(["one.example:4850"], lambda h, p: ["10.0.0.5"]) == (
        Endpoint("one.example:4850"),
    )

    def fail(host: str, port: int) -> list[str]:
        raise OSError("no such host")

    assert expand(["gone.example:4850"], fail) == (Endpoint("gone.example:4850"),)


def test_an_address_without_a_port_is_refused() -> None:
    with pytest.raises(ValueError, match="host:port"):
        expand(["collector.example"])
