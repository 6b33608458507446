"""One fleet view across collectors: ``fleet_query.query_fleets`` and the CLI over it.

Real collectors (in-process gRPC servers on loopback), real agent streams, the real
CLI (``CliRunner``). The node ``agent-m`` moved from collector A to collector B (a
failover): both still report it, B's report is the newer one.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from rooftop.agent.credentials import ClientAuth
from rooftop.agent.fleet_query import merge_fleets, query_fleets
from rooftop.cli import main
from rooftop.collector.config import CollectorConfig
from rooftop.collector.ingest import IngestServer
from rooftop.common.codec import timestamp, timestamp_s
from rooftop.common.model import Bound
from rooftop.v1 import telemetry_pb2 as pb
from tests.collector.helpers import AgentStream, batch, gpu, start_server, verdict
from tests.security.pki import OPENSSL, Pki
from tests.test_cli_exit_codes import closed_port


def node_batch(agent_id: str, seq: int = 1, bound: Bound = Bound.MEMORY) -> pb.Batch:
    return batch(seq, agent_id=agent_id, boot_id=f"boot-{agent_id}", hostname=f"node-{agent_id}",
                 records=[gpu(0)], verdicts=[verdict(0, bound)])  # fmt: skip


def stream(address: str, *batches: pb.Batch) -> None:
    """Send ``batches`` to the collector at ``address``; return once all are acked."""
    with AgentStream(address) as s:
        s.send(*batches)
        seqs = {(b.boot_id, b.seq) for b in batches}
        s.wait(lambda acks: seqs <= {(a.boot_id, a.acked_seq) for a in acks})


def fill(a: str, b: str, c: str) -> None:
    """A holds agent-a and agent-m (older), B agent-b and agent-m (newer), C agent-c."""
    stream(a, node_batch("agent-a"), node_batch("agent-m", 1, Bound.COMPUTE))
    time.sleep(0.05)  # B's report of agent-m is later, on the same clock
    stream(b, node_batch("agent-b"), node_batch("agent-m", 2, Bound.MEMORY))
    stream(c, node_batch("agent-c"))


@dataclass
class Fleet3:
    a: str
    b: str
    c: str

    @property
    def flags(self) -> list[str]:
        return ["--collector", self.a, "--collector", self.b, "--collector", self.c, "--insecure"]


@pytest.fixture(scope="module")
def fleet3() -> Iterator[Fleet3]:
    """Three collectors, filled once: the tests only read them."""
    servers = [start_server()[0] for _ in range(3)]
    try:
        a, b, c = (f"127.0.0.1:{s.port}" for s in servers)
        fill(a, b, c)
        yield Fleet3(a, b, c)
    finally:
        for server in servers:
            server.shutdown(timeout_s=1)


@pytest.fixture
def hung() -> Iterator[str]:
    """An address that accepts connections and never answers (a wedged collector)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def status_rows(output: str) -> list[dict[str, str]]:
    """The table rows that start a node, as {column: cell}, cut where the header's columns start.

    Cells may hold a space (``disconnected 42s``, ``5.8 ms``): the header's offsets,
    not whitespace, say where each ends.
    """
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("NODE "))
    header = lines[start]
    names = header.split()
    offsets = [header.index(name) for name in names]  # each name once in the header
    cuts = list(zip(names, offsets, [*offsets[1:], None], strict=True))
    return [
        {name: line[begin:end].strip() for name, begin, end in cuts}
        for line in lines[start + 1:]
        if line and not line.startswith(" ")  # a node's further GPUs, the counters
    ]


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_status_over_three_collectors_shows_every_node_once_with_the_newest_report(fleet3):
    code, out, err = run("status", *fleet3.flags)
    assert code == 0, err
    title = out.splitlines()[0]
    assert title.startswith(f"Rooftop fleet — collectors {fleet3.a}, {fleet3.b}, {fleet3.c} ")
    assert "4 node(s), 4 GPU(s)" in title
    rows = status_rows(out)
    assert [r["AGENT"] for r in rows] == ["agent-a", "agent-b", "agent-c", "agent-m"]
    moved = rows[-1]
    assert (moved["GPU"], moved["VERDICT"]) == ("0", "memory-bound")  # B's, not A's
    assert "NOT ANSWERING" not in out
    assert "3 collectors (sum): 5 batches" in out


def test_status_json_lists_each_collector_with_its_outcome_and_sums_the_counters(fleet3):
    code, out, err = run("status", *fleet3.flags, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert [(c["address"], c["ok"], c["nodes"], c["error"]) for c in doc["collectors"]] == [
        (fleet3.a, True, 2, None), (fleet3.b, True, 2, None), (fleet3.c, True, 1, None)]
    per_collector = [c["collector_status"]["batches"] for c in doc["collectors"]]
    assert per_collector == [2, 2, 1] and doc["collector_status"]["batches"] == 5
    nodes = {n["agent_id"]: n for n in doc["nodes"]}
    assert len(doc["nodes"]) == len(nodes) == 4
    assert nodes["agent-m"]["gpus"][0]["verdict"] == "memory-bound"
    assert nodes["agent-m"]["batches"] == 1 and nodes["agent-m"]["acked_seq"] == 2  # B's


def test_a_collector_that_does_not_answer_is_marked_and_the_others_nodes_shown(fleet3, hung):
    code, out, err = run("status", "--collector", fleet3.a, "--collector", hung,
                         "--collector", fleet3.c, "--insecure", "--timeout", "1")
    assert code == 0, err  # some answered: the view, with the gap marked
    lines = out.splitlines()
    assert lines[1].startswith(f"collector {hung}: NOT ANSWERING (DEADLINE_EXCEEDED")
    assert [r["AGENT"] for r in status_rows(out)] == ["agent-a", "agent-c", "agent-m"]
    assert "2 collectors (sum)" in out
    down = f"127.0.0.1:{closed_port()}"
    code, out, err = run("status", "--collector", fleet3.a, "--collector", down,
                         "--insecure", "--json")
    assert code == 0, err
    outcome = json.loads(out)["collectors"][1]
    assert (outcome["address"], outcome["ok"], outcome["nodes"]) == (down, False, None)
    assert outcome["error"].startswith("UNAVAILABLE")


def test_when_no_collector_answers_status_exits_1_with_one_line_naming_each():
    down1, down2 = closed_port(), closed_port()
    code, out, err = run("status", "--collector", f"127.0.0.1:{down1}",
                         "--collector", f"127.0.0.1:{down2}", "--insecure", "--timeout", "2")
    assert code == 1 and out == ""
    (line,) = err.splitlines()
    assert line.startswith(
        f"agentctl: error: no collector answered: 127.0.0.1:{down1}: UNAVAILABLE")
    assert f"; 127.0.0.1:{down2}: UNAVAILABLE" in line


def test_a_dns_name_with_several_addresses_is_every_collector_behind_it():
    """Three collectors on one port of 127.0.0.1, .2 and .3: one name resolving to all."""
    first, _ = start_server()
    servers: list[IngestServer] = [first]
    try:
        port = first.port
        for ip in ("127.0.0.2", "127.0.0.3"):
            config = CollectorConfig(listen=f"{ip}:{port}", insecure=True)
            servers.append(start_server(config=config)[0])
        fill(f"127.0.0.1:{port}", f"127.0.0.2:{port}", f"127.0.0.3:{port}")
        asked: list[tuple[str, int]] = []

        def resolve(host: str, p: int) -> list[str]:
            asked.append((host, p))
            return ["127.0.0.1", "127.0.0.2", "127.0.0.3"]

        view = query_fleets([f"collectors.test:{port}"], ClientAuth(insecure=True),
                            resolve=resolve)
    finally:
        for server in servers:
            server.shutdown(timeout_s=1)
    assert asked == [("collectors.test", port)]
    assert [(c.address, c.tls_name, c.ok) for c in view.collectors] == [
        (f"127.0.0.{i}:{port}", "collectors.test", True) for i in (1, 2, 3)]
    assert [n.agent_id for n in view.status.nodes] == ["agent-a", "agent-b", "agent-c", "agent-m"]
    assert view.origins["agent-m"] == f"127.0.0.2:{port}"  # the newer report's collector


@pytest.mark.skipif(OPENSSL is None, reason="no openssl CLI to make certificates")
def test_each_address_of_a_dns_name_is_verified_against_the_name(tmp_path: Path):
    """The certificate names only ``collectors.test``, not the addresses dialled."""
    pki = Pki(tmp_path)
    pki.ca("ca")
    server_cert = pki.issue("server", ca="ca", cn="collectors.test",
                            sans=("DNS:collectors.test",), usage="serverAuth")

    def tls(listen: str) -> CollectorConfig:
        return CollectorConfig(listen=listen, tls_cert_file=server_cert.cert,
                               tls_key_file=server_cert.key).validated()

    first, _ = start_server(config=tls("127.0.0.1:0"))
    servers = [first, start_server(config=tls(f"127.0.0.2:{first.port}"))[0]]
    try:
        view = query_fleets([f"collectors.test:{first.port}"],
                            ClientAuth(ca_file=pki.root / "ca.crt"),
                            resolve=lambda host, port: ["127.0.0.1", "127.0.0.2"])
    finally:
        for server in servers:
            server.shutdown(timeout_s=1)
    assert [(c.address, c.ok, c.error) for c in view.collectors] == [
        (f"127.0.0.{i}:{first.port}", True, "") for i in (1, 2)]


def test_diagnose_over_several_collectors_names_where_each_node_was_seen(fleet3):
    code, out, err = run("diagnose", *fleet3.flags)
    assert code == 0, err
    heads = [line for line in out.splitlines() if line.startswith("Rooftop diagnosis — ")]
    assert [h.split()[3] for h in heads] == ["node-agent-a", "node-agent-b", "node-agent-c",
                                            "node-agent-m"]  # fmt: skip
    assert f"node-agent-m (agent-m) via collector {fleet3.b}," in heads[-1]
    code, out, err = run("diagnose", *fleet3.flags, "--node", "agent-m", "--json")
    assert code == 0, err  # A and C do not know it: it is where it is, once
    doc = json.loads(out)
    (node,) = doc["nodes"]
    assert node["collector"] == fleet3.b and node["gpus"][0]["verdict"] == "memory-bound"
    assert [c["ok"] for c in doc["collectors"]] == [True, True, True]


def test_status_by_workload_over_several_collectors_counts_each_gpu_once(fleet3):
    code, out, err = run("status", *fleet3.flags, "--by", "node", "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert sorted(r["key"] for r in rows) == ["node-agent-a", "node-agent-b", "node-agent-c",
                                              "node-agent-m"]  # fmt: skip
    assert sum(r["gpus"] for r in rows) == 4
    code, out, err = run("status", *fleet3.flags, "--by", "workload", "--json")
    assert code == 0, err
    assert sum(r["gpus"] for r in json.loads(out)["rows"]) == 4


def test_status_asks_every_collector_of_the_agent_config(fleet3, tmp_path: Path, monkeypatch):
    config = tmp_path / "agent.toml"
    config.write_text(f'collectors = ["{fleet3.a}", "{fleet3.b}", "{fleet3.c}"]\n'
                      "insecure = true\n")
    monkeypatch.setenv("ROOFTOP_CONFIG", str(config))
    code, out, err = run("status")
    assert code == 0, err
    assert [r["AGENT"] for r in status_rows(out)] == ["agent-a", "agent-b", "agent-c", "agent-m"]


def _node(agent_id: str, last_seen_s: float, batches: int, boot_id: str = "b") -> pb.NodeStatus:
    node = pb.NodeStatus(agent_id=agent_id, hostname=agent_id, boot_id=boot_id, batches=batches)
    node.last_seen_time.CopyFrom(timestamp(last_seen_s))
    return node


def _answer(taken_s: float, *nodes: pb.NodeStatus, **counters: object) -> pb.FleetStatus:
    fs = pb.FleetStatus(nodes=nodes, collector=pb.CollectorStatus(**counters))  # type: ignore[arg-type]
    fs.taken_time.CopyFrom(timestamp(taken_s))
    return fs


def test_merge_keeps_the_newest_report_then_more_batches_and_sums_counters():
    a = _answer(1000.0, _node("m", 990.0, 5), _node("t", 995.0, 1), _node("x", 999.0, 1),
                batches=6, rejected={"bad_enum": 1}, version="0.1.0")
    b = _answer(1002.0, _node("m", 998.0, 1), _node("t", 995.0, 3),
                batches=4, rejected={"bad_enum": 2, "too_big": 1}, version="0.2.0")
    merged = merge_fleets([a, b])
    got = {n.agent_id: n for n in merged.nodes}
    assert [n.agent_id for n in merged.nodes] == ["m", "t", "x"]
    assert got["m"].batches == 1  # newest last_seen wins over more batches
    assert got["t"].batches == 3  # a tie on last_seen: more batches
    assert timestamp_s(merged.taken_time) == 1002.0
    # x was seen 1 s before A's answer: still 1 s before the merged (B's) answer.
    assert timestamp_s(merged.taken_time) - timestamp_s(got["x"].last_seen_time) == 1.0
    assert merged.collector.batches == 10
    assert dict(merged.collector.rejected) == {"bad_enum": 3, "too_big": 1}
    assert merged.collector.version == "0.1.0, 0.2.0"


def test_the_incident_guide_shows_what_status_prints_over_several_collectors():
    """docs/INCIDENT.md's example, rebuilt from the same answers, line for line."""
    from rooftop.agent.fleet_query import CollectorOutcome  # noqa: PLC0415
    from rooftop.agent.status import format_status  # noqa: PLC0415

    doc = (Path(__file__).parents[2] / "docs" / "INCIDENT.md").read_text(encoding="utf-8")
    block = doc.split("$ agentctl status --collector 10.0.0.1:4850 ")[1].split("```")[0]
    shown = block.splitlines()[1:]
    now = 1_800_000_000.0
    fs = _answer(now, batches=4, samples=4, streams=2, version="0.1.0")
    for name in ("a", "b", "m"):
        node = fs.nodes.add()
        node.CopyFrom(_node(f"agent-{name}", now, 1))
        node.hostname, node.lag_s = f"node-agent-{name}", 0.0
        node.gpus.add(gpu_index=0, verdict=pb.Verdict(verdict="memory-bound", confidence=0.9))
        node.connected = name != "m"
    gone = fs.nodes[2]  # its stream closed 12 s ago, and no collector that answered has it
    gone.last_seen_time.CopyFrom(timestamp(now - 12))
    gone.disconnected_time.CopyFrom(timestamp(now - 12))
    answered = [CollectorOutcome(f"10.0.0.{i}:4850", version="0.1.0") for i in (1, 2)]
    down = CollectorOutcome("10.0.0.3:4850", error="DEADLINE_EXCEEDED: Deadline Exceeded")
    printed = format_status(fs, collector="", collectors=[*answered, down])
    assert printed.splitlines() == shown
