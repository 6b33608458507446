"""Prometheus export cost: the native exposition against the OpenTelemetry SDK exporter.

A ``Fleet`` holding N nodes x 8 GPUs (each with a verdict, an engine and agent
stats), one ``Telemetry`` over it with both the native endpoint and, as the
baseline in the same run, the SDK's ``PrometheusMetricReader`` on its own registry.
Reports CPU per scrape for each (``time.process_time`` around building the text,
best of ``--repeat``), series count and size, and the ratio; then one real HTTP
scrape of the native endpoint (with gzip, as Prometheus asks).

Usage: .venv/bin/python bench/bench_export.py [--nodes 100 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from opentelemetry.exporter.prometheus import PrometheusMetricReader  # noqa: E402
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402

from rooftop.collector.fleet import Fleet, decode_batch  # noqa: E402
from rooftop.collector.otel import Telemetry  # noqa: E402
from tests.collector.helpers import batch, engine, gpu, verdict  # noqa: E402


def fleet_of(nodes: int) -> tuple[Fleet, list]:
    now = time.time()
    fleet = Fleet(forget_after_s=1e9)
    decoded = []
    for n in range(nodes):
        b = batch(1, agent_id=f"agent-{n}", hostname=f"node-{n}",
                  records=[gpu(i, time_s=now) for i in range(8)] + [engine(time_s=now)],
                  verdicts=[verdict(i) for i in range(8)])  # fmt: skip
        d = decode_batch(b, received_s=now)
        fleet.apply(d, received_s=now)
        decoded.append(d)
    return fleet, decoded


def best_cpu_s(fn: object, repeat: int) -> tuple[float, str]:
    best, out = float("inf"), ""
    for _ in range(repeat):
        c0 = time.process_time()
        out = fn()  # type: ignore[operator]
        best = min(best, time.process_time() - c0)
    return best, out if isinstance(out, str) else out.decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{'nodes':>6} {'series':>8} {'MB':>6} {'SDK exporter':>13} {'native':>8} {'ratio':>6}"
          f" {'HTTP+gzip':>10}")  # fmt: skip
    for nodes in args.nodes:
        fleet, decoded = fleet_of(nodes)
        oracle = CollectorRegistry(auto_describe=True)
        telemetry = Telemetry(
            fleet,
            prometheus_listen="127.0.0.1:0",
            readers=[PrometheusMetricReader(registry=oracle, scope_info_enabled=False)],
        )
        for d in decoded:
            telemetry.observe_batch(d, time.time())
        telemetry.start()
        try:
            sdk_s, _ = best_cpu_s(lambda o=oracle: generate_latest(o), args.repeat)
            native_s, text = best_cpu_s(telemetry.prometheus_text, args.repeat)
            url = f"http://127.0.0.1:{telemetry.prometheus_port}/metrics"
            request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
            c0 = time.process_time()
            with urllib.request.urlopen(request, timeout=300) as resp:
                resp.read()
            http_s = time.process_time() - c0
        finally:
            telemetry.shutdown(timeout_s=5)
        series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        print(f"{nodes:>6} {series:>8,} {len(text) / 1e6:>6.1f} {sdk_s:>11.2f} s"
              f" {native_s:>6.2f} s {sdk_s / native_s:>5.1f}x {http_s:>8.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
