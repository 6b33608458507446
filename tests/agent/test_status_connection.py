"""``agentctl status`` says which nodes' streams are closed, and what a restart caught.

Real collectors (in-process gRPC servers on loopback, each with its own wall clock so
that ages are exact), real agent streams opened and closed, the real CLI
(``CliRunner``) asking them over ``rooftop.v1.Query``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rooftop.agent.fleet_query import merge_fleets
from rooftop.agent.status import format_status
from rooftop.collector.config import CollectorConfig
from rooftop.collector.fleet import Fleet
from rooftop.collector.ingest import IngestServer
from rooftop.common.codec import timestamp, timestamp_s
from rooftop.v1 import telemetry_pb2 as pb
from tests.agent.test_fleet_query import node_batch, run, status_rows
from tests.collector.helpers import AgentStream

DOC = Path(__file__).parents[2] / "docs" / "INCIDENT.md"


@dataclass
class Clock:
    """A collector's wall clock, moved by hand (starts a few seconds past real time, so
    that samples stamped now are never from its future)."""

    now_s: float = field(default_factory=lambda: time.time() + 5.0)

    def __call__(self) -> float:
        return self.now_s


@dataclass
class Collector:
    server: IngestServer
    fleet: Fleet
    clock: Clock

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def wait_disconnected(self, agent_id: str, timeout_s: float = 10.0) -> None:
        """Until the collector has seen ``agent_id``'s stream end (it learns it a moment
        after the client closes)."""
        deadline = time.monotonic() + timeout_s
        while agent_id not in dict(self.fleet.snapshot().disconnected_s):
            assert time.monotonic() < deadline, f"{agent_id}'s stream never closed here"
            time.sleep(0.01)


@pytest.fixture
def collectors() -> Iterator[Callable[..., Collector]]:
    """Start collectors with their own clocks; every one is shut down after the test."""
    started: list[IngestServer] = []

    def start(clock: Clock | None = None, **config: object) -> Collector:
        clock = clock or Clock()
        cfg = CollectorConfig(listen="127.0.0.1:0", insecure=True, **config)  # type: ignore[arg-type]
        fleet = Fleet(clock=clock, forget_after_s=cfg.forget_after_s, limits=cfg.fleet_limits())
        server = IngestServer(fleet, cfg, clock=clock)
        server.start()
        started.append(server)
        return Collector(server, fleet, clock)

    yield start
    for server in started:
        server.shutdown(timeout_s=1)


def send(stream: AgentStream, *batches: pb.Batch) -> None:
    """Send ``batches`` (one agent's); return once the last is acked (acks are cumulative)."""
    stream.send(*batches)
    last = max(b.seq for b in batches)
    stream.wait(lambda acks: any(a.acked_seq >= last for a in acks))


def test_a_node_whose_stream_closed_shows_disconnected_with_its_age(collectors):
    c = collectors()
    with AgentStream(c.address) as up:
        send(up, node_batch("agent-up"))
        with AgentStream(c.address) as gone:
            send(gone, node_batch("agent-gone"))
        c.wait_disconnected("agent-gone")
        c.clock.now_s += 42
        send(up, node_batch("agent-up", 2))  # still streaming: seen just now
        code, out, err = run("status", "--collector", c.address, "--insecure")
        assert code == 0, err
        rows = {r["AGENT"]: r for r in status_rows(out)}
        assert (rows["agent-gone"]["SEEN"], rows["agent-gone"]["STREAM"]) == (
            "42s STALE", "disconnected 42s")
        assert (rows["agent-up"]["SEEN"], rows["agent-up"]["STREAM"]) == ("0s", "connected")
        assert "  disconnected = the node's stream to the collector that reports it" in out
        code, out, err = run("status", "--collector", c.address, "--insecure", "--json")
        assert code == 0, err
        nodes = {n["agent_id"]: n for n in json.loads(out)["nodes"]}
        assert nodes["agent-gone"]["connected"] is False
        assert nodes["agent-gone"]["seconds_since_disconnected"] == 42.0
        assert nodes["agent-gone"]["disconnected_time"].endswith("Z")
        assert nodes["agent-up"]["connected"] is True
        assert nodes["agent-up"]["disconnected_time"] is None
        assert nodes["agent-up"]["seconds_since_disconnected"] is None
        code, out, err = run("diagnose", "--collector", c.address, "--insecure",
                             "--node", "agent-gone")  # fmt: skip
        assert code == 0, err
        assert (f"node-agent-gone (agent-gone) via collector {c.address}, last seen 42s ago, "
                "disconnected 42s ago — STALE") in out


def test_a_node_connected_to_one_collector_is_connected_though_another_lists_it_closed(
    collectors,
):
    """agent-m left A for B. A's clock runs 10 s ahead of B's, so A's report has the
    later last-seen time; the live one is B's, where its stream is open."""
    home = collectors()
    ahead = collectors(Clock(home.clock.now_s + 10.0))
    with AgentStream(ahead.address) as left:
        send(left, node_batch("agent-m"))
    ahead.wait_disconnected("agent-m")
    with AgentStream(home.address) as now:
        send(now, node_batch("agent-m"), node_batch("agent-m", 2))
        flags = ["--collector", ahead.address, "--collector", home.address, "--insecure"]
        code, out, err = run("status", *flags)
        assert code == 0, err
        (row,) = status_rows(out)
        assert (row["AGENT"], row["STREAM"]) == ("agent-m", "connected")
        assert "disconnected" not in out
        code, out, err = run("status", *flags, "--json")
        assert code == 0, err
        (node,) = json.loads(out)["nodes"]
        assert (node["connected"], node["disconnected_time"], node["acked_seq"]) == (
            True, None, 2)  # B's report: A never saw seq 2
        code, out, err = run("diagnose", *flags, "--json")
        assert code == 0, err
        assert json.loads(out)["nodes"][0]["collector"] == home.address


def test_duplicates_caught_by_marks_restored_after_a_restart_are_counted(
    collectors, tmp_path: Path
):
    first = collectors(state_dir=tmp_path)
    batches = [node_batch("agent-1", seq) for seq in (1, 2, 3)]
    with AgentStream(first.address) as stream:
        send(stream, *batches)
    code, out, err = run("status", "--collector", first.address, "--insecure")
    assert code == 0, err
    assert "0 duplicate(s), 0 missing" in out  # none yet: nothing said
    first.server.shutdown(timeout_s=1)
    again = collectors(state_dir=tmp_path)  # the same marks, restored
    with AgentStream(again.address) as stream:
        send(stream, *batches, node_batch("agent-1", 4))  # a resend after the restart
    code, out, err = run("status", "--collector", again.address, "--insecure")
    assert code == 0, err
    assert "  collector: 1 batches, 1 samples, 3 duplicate(s) (3 across a restart), 0 missing;" \
        in out
    code, out, err = run("status", "--collector", again.address, "--insecure", "--json")
    assert code == 0, err
    counters = json.loads(out)["collector_status"]
    assert (counters["duplicates"], counters["restored_duplicates"]) == (3, 3)


def test_what_limits_refused_and_seqs_acked_elsewhere_are_on_the_counters_line(collectors):
    c = collectors(max_agents=1)
    with AgentStream(c.address) as stream:
        send(stream, node_batch("agent-1"))
        back = node_batch("agent-1", 5)
        back.acked_seq = 4  # seqs 2-4 were acked by another collector meanwhile
        send(stream, back)
    with AgentStream(c.address) as full:
        full.send(node_batch("agent-2"))  # a second agent: over max_agents
        deadline = time.monotonic() + 10
        while full.error is None:
            assert time.monotonic() < deadline, "the collector never refused agent-2"
            time.sleep(0.01)
    code, out, err = run("status", "--collector", c.address, "--insecure")
    assert code == 0, err
    assert "0 missing (3 acked elsewhere);" in out
    assert "; limited: agents=1" in out
    code, out, err = run("status", "--collector", c.address, "--insecure", "--json")
    assert code == 0, err
    counters = json.loads(out)["collector_status"]
    assert (counters["missing"], counters["acked_elsewhere"], counters["limited"]) == (
        0, 3, {"agents": 1})


def _disconnected(agent_id: str, last_seen_s: float, closed_s: float) -> pb.NodeStatus:
    node = pb.NodeStatus(agent_id=agent_id, hostname=agent_id, boot_id="b", batches=1)
    node.last_seen_time.CopyFrom(timestamp(last_seen_s))
    node.disconnected_time.CopyFrom(timestamp(closed_s))
    return node


def test_merge_moves_disconnected_time_with_its_collector_and_keeps_the_newest_closed_report():
    # A answered 2 s after B (clock or latency): B's times move by 2 s, like last_seen.
    a = pb.FleetStatus(nodes=[_disconnected("m", 990.0, 991.0)])
    a.taken_time.CopyFrom(timestamp(1002.0))
    b = pb.FleetStatus(nodes=[_disconnected("m", 995.0, 996.0), _disconnected("x", 998.0, 999.0)])
    b.taken_time.CopyFrom(timestamp(1000.0))
    merged = merge_fleets([a, b])
    got = {n.agent_id: n for n in merged.nodes}
    assert timestamp_s(got["m"].disconnected_time) == 998.0  # B's: seen later
    assert timestamp_s(got["x"].disconnected_time) == 1001.0  # 1 s before B's answer
    rows = {r["AGENT"]: r for r in status_rows(format_status(merged, collector="c"))}
    assert rows["x"]["STREAM"] == "disconnected 1s"


def test_a_node_from_a_collector_that_does_not_say_is_neither_connected_nor_disconnected():
    """An older collector sets neither field: ``-``, not a false alarm."""
    fs = pb.FleetStatus(nodes=[pb.NodeStatus(agent_id="old", hostname="old")])
    (row,) = status_rows(format_status(fs, collector="c"))
    assert row["STREAM"] == "-"
    assert "disconnected" not in format_status(fs, collector="c")


def _incident_fleet() -> pb.FleetStatus:
    """The answer docs/INCIDENT.md's first example shows: one node gone, one live."""
    now = 1_800_000_000.0
    fs = pb.FleetStatus(collector=pb.CollectorStatus(
        version="0.1.0", batches=1834, samples=91700, duplicates=2, restored_duplicates=1,
        streams=1, refused={"bad_token": 3}))  # fmt: skip
    fs.taken_time.CopyFrom(timestamp(now))
    gone = fs.nodes.add(agent_id="agent-2", hostname="gpu-node-0", lag_s=0.4)
    gone.last_seen_time.CopyFrom(timestamp(now - 120))
    gone.disconnected_time.CopyFrom(timestamp(now - 118))
    gone.gpus.add(gpu_index=0, verdict=pb.Verdict(verdict="compute-bound", confidence=0.9))
    live = fs.nodes.add(agent_id="agent-1", hostname="gpu-node-1", lag_s=0.3, connected=True,
                        stats=pb.AgentStats(queued=4, dropped_spool_full=2, dropped_corrupt=1,
                                            reconnects=3))  # fmt: skip
    live.last_seen_time.CopyFrom(timestamp(now))
    engine = pb.EngineSample(tpot_ms=5.8, ttft_ms=42.0)
    live.gpus.add(gpu_index=0, engine=engine,
                  verdict=pb.Verdict(verdict="memory-bound", confidence=0.9))
    live.gpus.add(gpu_index=1, engine=engine,
                  verdict=pb.Verdict(verdict="host-bound", cause="cpu", confidence=0.9))
    live.gpus.add(gpu_index=2, engine=engine, sample=pb.GpuSample(gpu_index=2, lost=True))
    return fs


def test_the_incident_guide_shows_what_status_prints_for_one_collector():
    """docs/INCIDENT.md's first example, rebuilt from its answer, line for line."""
    block = DOC.read_text(encoding="utf-8").split("$ agentctl status\n")[1].split("```")[0]
    printed = format_status(_incident_fleet(),
                            collector="rooftop-collector.example.internal:4850")
    assert printed.splitlines() == block.splitlines()
