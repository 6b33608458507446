"""Failed engine scrapes ride in-band on every batch (AgentStats.engine_scrape_errors)."""

from __future__ import annotations

import socket
from pathlib import Path

from rooftop.agent.batcher import Batcher
from rooftop.agent.engines.sources import EngineEndpoint, EngineSources
from rooftop.agent.spool import Spool
from rooftop.agent.stream import Streamer
from rooftop.v1 import telemetry_pb2 as pb
from tests.support import BOOT, FakeIngest, Server, wait_for


def closed_port_url() -> str:
    with socket.socket() as s:  # bound then closed: nothing listens there (ECONNREFUSED)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/metrics"


def test_failed_scrapes_of_a_dead_engine_url_reach_the_collector(tmp_path: Path):
    sources = EngineSources(None, [EngineEndpoint.parse(closed_port_url())])
    scraper = sources._scrapers[0][0]
    for _ in range(3):
        scraper.scrape_once()
    server = Server(FakeIngest())
    spool = Spool(tmp_path / "spool", fsync_interval_s=0.05)
    spool.start()
    streamer = Streamer(
        spool, [server.address], engine_scrape_errors=sources.scrape_errors, poll_interval_s=0.02
    )
    try:
        batcher = Batcher("node-1", BOOT)
        for b in batcher.make([pb.TraceRecord(gpu=pb.GpuSample(gpu_index=0))]):
            spool.append(b)
        streamer.start()
        wait_for(lambda: spool.queued == 0)
    finally:
        streamer.shutdown(2)
        spool.shutdown(5)
        server.stop()
    assert server.servicer.received[-1].stats.engine_scrape_errors == 3
