"""Hostile clocks and terminal / log injection against a REAL collector process (issue 14,
items 4 and 5).

- Clocks: an agent whose clock steps back an hour, and one whose clock steps an hour
  ahead and back, stream to ``agentctl collector``; the newest sample and verdict the
  collector answers with keep following the agent's batches (before: frozen for an
  hour, the verdict stuck). Absurd values (1e308 W, year 0001, nanos out of range)
  are rejected in-band and counted by reason.
- Injection: a host name with an OSC sequence, CR and LF, and a boot id with a
  newline, are refused at ingest (``bad_identity``); no line of the collector's log
  starts with the forged text or holds an escape; ``agentctl status`` prints nothing
  raw.

Bounds, not durations: counts of rejections, of log lines, of raw control bytes.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from rooftop.agent.credentials import ClientAuth
from rooftop.agent.fleet_query import query_fleet_status
from rooftop.common.codec import timestamp
from rooftop.v1 import telemetry_pb2 as pb
from tests.collector.helpers import AgentStream, batch, gpu, verdict
from tests.e2e.adversarial.conftest import counter, log_lines, report
from tests.e2e.conftest import REPO, CollectorProc, Harness
from tests.support import subprocess_env

pytestmark = pytest.mark.slow

HOUR_S = 3600.0


def clocked(agent_id: str, seq: int, agent_s: float) -> pb.Batch:
    """Batch ``seq`` made by an agent whose clock reads ``agent_s``: GPU busy = seq,
    a verdict over the 5 s before, sent_time on the same clock."""
    b = batch(seq, agent_id=agent_id, boot_id=f"{agent_id}-boot",
              records=[gpu(0, agent_s, busy_pct=float(seq))],
              verdicts=[verdict(0, samples=seq, window_start_s=agent_s - 5,
                                window_end_s=agent_s)])  # fmt: skip
    b.sent_time.CopyFrom(timestamp(agent_s))
    return b


def newest(c: CollectorProc, agent_id: str) -> tuple[float, int]:
    """What the collector's Query answers for the agent's GPU: (busy_pct, verdict samples)."""
    fs = query_fleet_status(c.address, ClientAuth(insecure=True), node=agent_id, detail=True)
    (gpu_status,) = fs.nodes[0].gpus
    return gpu_status.sample.busy_pct, gpu_status.verdict.samples


@pytest.mark.parametrize(
    ("steps", "name"),
    [
        ((lambda seq: -HOUR_S if seq > 5 else 0.0), "minus_1h"),
        ((lambda seq: HOUR_S if 5 < seq <= 10 else 0.0), "plus_1h_and_back"),
    ],
    ids=["minus_1h", "plus_1h_and_back"],
)
def test_a_stepped_agent_clock_never_freezes_what_the_collector_answers(e2e: Harness, steps, name):
    c = e2e.collector()
    frozen = 0
    with AgentStream(c.address) as stream:
        for seq in range(1, 16):
            stream.send(clocked(name, seq, time.time() + steps(seq)))
            stream.wait_acked(seq)
            if newest(c, name) != (float(seq), seq):
                frozen += 1
    report(f"clock_{name}", {"batches": 15, "frozen_answers": frozen})
    assert frozen == 0  # before: 10 of 15 (minus_1h), 5 of 15 verdicts (plus_1h_and_back)


def test_absurd_values_are_rejected_in_band_and_counted(e2e: Harness):
    c = e2e.collector()
    now_s = time.time()
    poison = [batch(seq, agent_id="absurd", records=[gpu(0, now_s)]) for seq in range(1, 5)]
    poison[0].records[0].gpu.power_w = 1e308
    poison[1].records[0].gpu.time.seconds = -62_135_596_800  # 0001-01-01
    poison[2].records[0].gpu.time.nanos = 1_000_000_000
    poison[3].verdicts.append(pb.Verdict(gpu_index=0, verdict="memory-bound"))
    poison[3].verdicts[0].window_end.nanos = -1
    with AgentStream(c.address) as stream:
        stream.send(*poison, batch(5, agent_id="absurd", records=[gpu(0, now_s)]))
        acks = stream.wait_acked(5)
    rejected = sorted(a.rejected_seq for a in acks if a.rejected_seq)
    by_reason = {
        reason: counter(c, "rooftop_collector_rejected_total", "rooftop_reject_reason", reason)
        for reason in ("invalid_value", "bad_time")
    }
    report("absurd_values", {"sent": 5, "rejected": len(rejected), **by_reason})
    assert rejected == [1, 2, 3, 4]
    assert by_reason == {"invalid_value": 1, "bad_time": 3}


def test_injected_control_characters_never_reach_a_log_line_or_a_terminal(e2e: Harness):
    c = e2e.collector()
    forged = "ERROR rooftop.collector.ingest: forged"
    with AgentStream(c.address) as stream:
        stream.send(
            batch(1, agent_id="evil", boot_id=f"b\n{forged}", records=[gpu(0)]),
            batch(
                1, agent_id="evil", hostname=f"node\x1b]0;pwned\x07\r\n{forged}", records=[gpu(0)]
            ),
            batch(2, agent_id="evil", hostname="gpu-node-1", records=[gpu(0)]),
        )
        acks = stream.wait(lambda acks: sum(1 for a in acks if a.rejected_seq) >= 2)
        stream.wait_acked(2)
    refused = counter(c, "rooftop_collector_rejected_total", "rooftop_reject_reason",
                      "bad_identity")  # fmt: skip
    status = subprocess.run(
        [sys.executable, "-m", "rooftop", "status", "--collector", c.address, "--insecure"],
        capture_output=True, text=True, cwd=REPO, env=subprocess_env(), check=False,
    )  # fmt: skip
    log = c.log()
    raw_in_log = sum(log.count(ch) for ch in "\x1b\x07\r")
    forged_lines = log_lines(c, rf"^{forged}")
    report("injection", {"refused": refused, "raw_control_bytes_in_log": raw_in_log,
                         "forged_log_lines": len(forged_lines)})  # fmt: skip
    assert sorted(a.rejected_seq for a in acks if a.rejected_seq) == [1, 1]
    assert refused == 2
    assert raw_in_log == 0 and forged_lines == []
    assert log_lines(c, r"bad_identity|holds control"), log  # said, escaped
    assert status.returncode == 0, status.stderr
    assert not any(ch in status.stdout for ch in "\x1b\x07\r")
    assert "gpu-node-1" in status.stdout
