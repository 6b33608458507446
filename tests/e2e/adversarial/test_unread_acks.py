"""A client that never reads its acks and sends poison: the stream is closed, logs stay short.

Before: every poison batch queued an ack the client never read (the queue grew
without bound: 83 → 240 MB in 38 s) and wrote one WARNING (300k lines). Now past
``max_unread_acks`` queued acks the stream is closed and counted (``unread_acks``),
and one kind of refusal writes one line a minute.
"""

from __future__ import annotations

import grpc  # noqa: TID251 — a raw client that misbehaves on purpose
import pytest

from rooftop.v1 import telemetry_pb2 as pb
from rooftop.v1 import telemetry_pb2_grpc
from tests.collector.helpers import AgentStream, batch, gpu
from tests.e2e.adversarial.conftest import limited, log_lines, report, settled_rss_mib
from tests.e2e.conftest import Harness, wait_for

pytestmark = pytest.mark.slow

MAX_UNREAD_ACKS = 64
# Poison batches offered; how many the collector reads before the client's window
# fills and the stream closes varies with the machine's load.
FLOOD_BATCHES = 100_000
# What the collector may keep after the flood: the closed stream's last ack and gRPC's
# buffers for one call, far under the ack queued and line written per batch by the old code.
GROWTH_BOUND_MIB = 16
LOG_LINES_BOUND = 4  # one per kind of line a minute: poison, and the closed stream


def test_a_client_that_never_reads_acks_is_closed_and_logs_stay_bounded(e2e: Harness):
    c = e2e.collector(max_unread_acks=MAX_UNREAD_ACKS)
    base_mib = settled_rss_mib(c.pid)
    sent = 0

    def poison():
        nonlocal sent
        for seq in range(1, FLOOD_BATCHES + 1):
            flood = pb.Batch(agent_id="flood", boot_id="b", seq=seq)
            flood.records.add()  # an empty record: poison, rejected in-band
            sent = seq
            yield flood

    # No BDP probing: the client's receive window stays at 64 KiB, so unread acks back
    # up into the collector after a few hundred, as they would behind a slow reader.
    channel = grpc.insecure_channel(c.address, options=[("grpc.http2.bdp_probe", 0)])
    with AgentStream(c.address) as good:
        good.send(batch(1, agent_id="good", records=[gpu(0)]))
        good.wait_acked(1)
        call = telemetry_pb2_grpc.IngestStub(channel).Stream(poison())  # never read
        wait_for(lambda: limited(c, "unread_acks") >= 1, "the flooding stream closed",
                 timeout_s=60)  # fmt: skip
        closed = limited(c, "unread_acks")
        # A legitimate agent goes on being served.
        good.send(batch(2, agent_id="good", records=[gpu(0)]))
        good.wait_acked(2)
        grown_mib = settled_rss_mib(c.pid) - base_mib
        call.cancel()
    channel.close()
    lines = log_lines(c, r"rejected batch flood|acks unread")
    report("unread_acks", {"flood_sent": sent, "closed_streams": closed,
                           "rss_growth_mib": grown_mib, "log_lines": len(lines)})  # fmt: skip
    assert closed == 1
    assert grown_mib < GROWTH_BOUND_MIB
    assert len(lines) <= LOG_LINES_BOUND, lines[:10]
