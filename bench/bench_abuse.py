"""Bounds under abuse: a scrape with the fleet full to its limits, and a flood of identities.

1. A ``Fleet`` filled to ``FleetLimits``' defaults (2,048 agents, 8,192 GPUs with a
   verdict each, 8,192 engines), then ``--identities`` more new agents and one agent
   claiming ``--uuids`` GPU uuids: reports what was admitted and refused, and the
   process's RSS growth (VmRSS) per admitted identity.
2. One real HTTP scrape of the Prometheus endpoint at that size (with gzip, as
   Prometheus asks), wall and CPU time, series and bytes: it must stay well within
   Prometheus' default 10 s scrape timeout.

Usage: .venv/bin/python bench/bench_abuse.py [--identities 70000] [--uuids 60000]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rooftop.collector.fleet import Fleet, FleetLimits, OverLimit, decode_batch  # noqa: E402
from rooftop.collector.otel import Telemetry  # noqa: E402
from rooftop.v1 import telemetry_pb2 as pb  # noqa: E402
from tests.collector.helpers import batch, engine, gpu, verdict  # noqa: E402


def rss_mib() -> float:
    text = Path("/proc/self/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+)", text)
    return int(match.group(1)) / 1024 if match else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--identities", type=int, default=70_000)
    parser.add_argument("--uuids", type=int, default=60_000)
    args = parser.parse_args()
    limits = FleetLimits()
    fleet = Fleet(forget_after_s=1e9, limits=limits)
    now = time.time()
    per_agent = limits.max_gpus // limits.max_agents
    base_mib = rss_mib()
    refused = 0
    for n in range(limits.max_agents + args.identities):
        gpus = per_agent if n < limits.max_agents else 1
        b = batch(1, agent_id=f"agent-{n}", hostname=f"node-{n}",
                  records=[gpu(i, time_s=now, gpu_uuid=f"GPU-{n}-{i}") for i in range(gpus)]
                  + [engine(time_s=now, engine_id=f"vllm:{8000 + i}") for i in range(gpus)],
                  verdicts=[verdict(i, gpu_uuid=f"GPU-{n}-{i}") for i in range(gpus)])  # fmt: skip
        try:
            fleet.apply(decode_batch(b, received_s=now), received_s=now)
        except OverLimit:
            refused += 1
    greedy = pb.Batch(agent_id="agent-0", boot_id="boot-1", seq=2, hostname="node-0")
    for i in range(args.uuids):
        rec = greedy.records.add()
        rec.gpu.gpu_index, rec.gpu.gpu_uuid = i, f"GPU-many-{i}"
        rec.gpu.time.FromSeconds(int(now))
    fleet.apply(decode_batch(greedy, received_s=now), received_s=now)
    snap = fleet.snapshot()
    grown_mib = rss_mib() - base_mib
    print(f"identities tried {limits.max_agents + args.identities}: admitted {len(snap.agents)}, "
          f"refused {refused}; GPUs {len(snap.gpus)}, engines {len(snap.engines)}; "
          f"limited {dict(snap.counts.limited)}")  # fmt: skip
    print(f"RSS growth {grown_mib:.0f} MiB ({grown_mib * 1024 / len(snap.agents):.0f} KiB "
          f"per admitted agent with {per_agent} GPUs)")  # fmt: skip
    telemetry = Telemetry(fleet, prometheus_listen="127.0.0.1:0")
    telemetry.start()
    try:
        url = f"http://127.0.0.1:{telemetry.prometheus_port}/metrics"
        for label, headers in (("plain", {}), ("gzip", {"Accept-Encoding": "gzip"})):
            c0, t0 = time.process_time(), time.perf_counter()
            req = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(req, timeout=60) as resp:
                body = resp.read()
            wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
            text = telemetry.prometheus_text() if label == "gzip" else body.decode()
            series = sum(1 for line in text.splitlines() if line and line[0] != "#")
            print(f"scrape ({label}) at the limits: {wall_s:.2f} s wall, {cpu_s:.2f} s CPU, "
                  f"{series} series, {len(body) / 2**20:.1f} MiB")  # fmt: skip
    finally:
        telemetry.shutdown(timeout_s=1.0)


if __name__ == "__main__":
    main()
