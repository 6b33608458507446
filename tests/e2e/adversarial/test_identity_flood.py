"""A flood of agent ids and GPU uuids: held up to the limits, the rest refused and counted.

Before: every identity was kept (70k identities: RSS 1.16 GB and a 1.37 GB scrape
taking 15 s; one identity with 60k GPU uuids: 332 MB). Now a new agent past
``max_agents`` gets RESOURCE_EXHAUSTED (nothing applied; a real agent keeps the batch
and retries) and new GPUs past ``max_gpus_per_agent`` are left out, both counted in
``rooftop_collector_limited_total``; agents already known go on being served, and the
scrape stays the size of the limits.
"""

from __future__ import annotations

import grpc  # noqa: TID251 — the flooding client reads the status it is refused with
import pytest

from rooftop.v1 import telemetry_pb2 as pb
from tests.collector.helpers import AgentStream, batch, gpu
from tests.e2e.adversarial.conftest import limited, report, scrape, settled_rss_mib
from tests.e2e.conftest import Harness, wait_for

pytestmark = pytest.mark.slow

IDENTITIES = 5_000
MAX_AGENTS = 1_000
RETRIES = 20  # new identities tried again, each on a new stream, once the collector is full
UUIDS = 2_000  # GPU uuids claimed by one identity
MAX_GPUS_PER_AGENT = 8
# Held per admitted identity (its agent, GPU and engine state, and their series' cached
# label text): measured ~10 KB; the bound leaves room for the allocator.
PER_IDENTITY_KIB = 40
SLACK_MIB = 12
# Series one identity with one GPU adds to the scrape (every GPU and agent family).
SERIES_PER_IDENTITY = 80


def flood(address: str, first: int, count: int) -> grpc.RpcError | None:
    """Send one batch for each of ``count`` new identities on one stream; its error."""
    stream = AgentStream(address)
    stream.send(*(batch(1, agent_id=f"id-{i}", hostname=f"host-{i}",
                        records=[gpu(0, gpu_uuid=f"GPU-{i}")])
                  for i in range(first, first + count)))  # fmt: skip
    stream.wait_done(timeout_s=60)
    stream.close()
    return stream.error


def series(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def test_identities_past_the_limits_are_refused_counted_and_the_scrape_stays_bounded(
    e2e: Harness,
):
    c = e2e.collector(max_agents=MAX_AGENTS, max_gpus_per_agent=MAX_GPUS_PER_AGENT)
    with AgentStream(c.address) as good:
        good.send(batch(1, agent_id="good", records=[gpu(0)]))
        good.wait_acked(1)
        empty_series = series(scrape(c))
        base_mib = settled_rss_mib(c.pid)

        error = flood(c.address, 0, IDENTITIES)
        assert error is not None and error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert "max_agents" in (error.details() or "")
        for i in range(RETRIES):
            retried = flood(c.address, IDENTITIES + i, 1)
            assert retried is not None and retried.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

        # One identity already admitted claims UUIDS GPUs in one batch.
        many = [pb.TraceRecord(gpu=pb.GpuSample(gpu_index=i, gpu_uuid=f"GPU-many-{i}"))
                for i in range(UUIDS)]  # fmt: skip
        for rec in many:
            rec.gpu.time.GetCurrentTime()
        with AgentStream(c.address) as greedy:
            greedy.send(batch(2, agent_id="id-0", hostname="host-0", records=many))
            greedy.wait_acked(2)
        wait_for(lambda: limited(c, "gpus_per_agent") >= UUIDS - MAX_GPUS_PER_AGENT + 1,
                 "GPUs past max_gpus_per_agent counted")  # fmt: skip

        # The agent that was there before the flood is still served.
        good.send(batch(2, agent_id="good", records=[gpu(0)]))
        good.wait_acked(2)
        text = scrape(c)
        grown_mib = settled_rss_mib(c.pid) - base_mib
    admitted = len({b.agent_id for b in c.ledger().batches})
    refused_agents = limited(c, "agents")
    report("identity_flood", {"identities": IDENTITIES + RETRIES, "admitted": admitted,
                              "refused_agents": refused_agents,
                              "refused_gpus": limited(c, "gpus_per_agent"),
                              "rss_growth_mib": grown_mib, "series": series(text),
                              "scrape_mib": len(text) / 2**20})  # fmt: skip
    assert admitted == MAX_AGENTS  # "good" and 999 of the flood
    assert refused_agents == 1 + RETRIES
    assert limited(c, "gpus_per_agent") == UUIDS - (MAX_GPUS_PER_AGENT - 1)
    assert series(text) - empty_series < MAX_AGENTS * SERIES_PER_IDENTITY
    assert grown_mib < MAX_AGENTS * PER_IDENTITY_KIB / 1024 + SLACK_MIB
