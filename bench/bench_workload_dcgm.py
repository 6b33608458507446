"""Scrape cost of the opt-in DCGM names and of the workload gauge.

A ``Fleet`` of N nodes x 8 GPUs (each with a pod, a verdict, an engine on GPU 0),
one ``Telemetry`` with ``dcgm_names`` off and one with it on. Reports CPU per
Prometheus exposition (``time.process_time``, best of ``--repeat``), series count,
and the CPU of the ``rooftop.workload.bound`` callback alone.

Usage: .venv/bin/python bench/bench_workload_dcgm.py [--nodes 100 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rooftop.collector.fleet import Fleet, decode_batch  # noqa: E402
from rooftop.collector.otel import Telemetry, _workload_states  # noqa: E402
from rooftop.common.model import PodRef  # noqa: E402
from tests.collector.helpers import batch, engine, gpu, verdict  # noqa: E402


def fleet_of(nodes: int) -> Fleet:
    now = time.time()
    fleet = Fleet(forget_after_s=1e9)
    for n in range(nodes):
        pods = [(PodRef(f"svc{n % 50}-7d9f8b6c5d-x2k4p", f"ns{n % 7}", "main"),) for _ in range(8)]
        b = batch(1, agent_id=f"agent-{n}", hostname=f"node-{n}",
                  records=[gpu(i, time_s=now, pods=pods[i]) for i in range(8)]
                  + [engine(time_s=now, gpu_indices=(0,), pid=None)],
                  verdicts=[verdict(i) for i in range(8)])  # fmt: skip
        fleet.apply(decode_batch(b, received_s=now), received_s=now)
    return fleet


def best_cpu_s(fn: object, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()  # type: ignore[operator]
        best = min(best, time.process_time() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for nodes in args.nodes:
        fleet = fleet_of(nodes)
        for dcgm in (False, True):
            t = Telemetry(fleet, prometheus_listen="127.0.0.1:0", dcgm_names=dcgm)
            text = t.prometheus_text()
            series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
            cpu_s = best_cpu_s(t.prometheus_text, args.repeat)
            print(f"{nodes} nodes x 8 GPUs, dcgm_names={dcgm}: {series} series, "
                  f"{cpu_s:.2f} s CPU per scrape")  # fmt: skip
            t.shutdown(timeout_s=1)
        snap = fleet.snapshot()
        cpu_s = best_cpu_s(lambda s=snap: list(_workload_states(s)), args.repeat)
        print(f"{nodes} nodes: rooftop.workload.bound callback {cpu_s * 1000:.0f} ms CPU")


if __name__ == "__main__":
    main()
