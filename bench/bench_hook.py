"""Per-token cost of the Rooftop hook on the caller's thread, against the usual alternatives.

    .venv/bin/python bench/bench_hook.py [--tokens N] [--repeat R]

Compares, in one process and one run (so on the same CPU and interpreter):
- ``Request.token()``: what an engine calls per token (reads the clock itself);
- ``RooftopStreamer.put(step)``: the transformers streamer, per decoding step;
- OpenTelemetry SDK ``histogram.record`` (MeterProvider + InMemoryMetricReader), with
  and without attributes;
- prometheus_client ``Histogram.observe``, bare and through a labelled child.

The alternatives are handed a ready value, so they do less than the hook (which
also reads a clock). Best of R repeats (timeit's advice: the minimum is the cost,
the rest is noise). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import timeit
from collections.abc import Callable

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, Histogram

from rooftop.agent.hooks import Aggregator
from rooftop.agent.hooks.hf import RooftopStreamer


def best_ns(fn: Callable[[], object], number: int, repeat: int) -> float:
    timer = timeit.Timer(fn)
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="calls per repeat")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    # No agent listening and no shipper thread: measure the caller's side alone.
    agg = Aggregator(engine_id="bench", socket_path="/nonexistent/rooftop.sock", autostart=False)
    req = agg.start_request()
    streamer = RooftopStreamer(agg)
    streamer.put([[1, 2, 3]])  # the prompt
    step = [42]

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    otel_hist = provider.get_meter("bench").create_histogram(
        "gen_ai.server.time_per_output_token", unit="s"
    )
    otel_attrs = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "vllm",
        "gen_ai.request.model": "llama-3-8b",
    }

    registry = CollectorRegistry()
    prom_hist = Histogram("tpot_seconds", "TPOT", registry=registry)
    prom_labelled = Histogram("tpot_l_seconds", "TPOT", ["model"], registry=registry)
    prom_child = prom_labelled.labels(model="llama-3-8b")

    cases: list[tuple[str, Callable[[], object]]] = [
        ("rooftop hook `Request.token()`", req.token),
        ("rooftop `RooftopStreamer.put(step)`", lambda: streamer.put(step)),
        ("OTel SDK `histogram.record(v)`", lambda: otel_hist.record(0.005)),
        (
            "OTel SDK `histogram.record(v, attributes)` (3 gen_ai attrs)",
            lambda: otel_hist.record(0.005, otel_attrs),
        ),
        ("prometheus_client `Histogram.observe(v)`", lambda: prom_hist.observe(0.005)),
        ("prometheus_client `.labels(...)` child `.observe(v)`", lambda: prom_child.observe(0.005)),
    ]
    # The lambda indirection costs the alternatives one extra call; measure it so the
    # table can show it is small next to what it wraps.
    noop = best_ns(lambda: None, args.tokens, args.repeat)

    results = [(name, best_ns(fn, args.tokens, args.repeat)) for name, fn in cases]
    hook_ns = results[0][1]
    print(
        f"Python {sys.version.split()[0]} on {platform.machine()}, "
        f"{args.tokens:,} calls x best of {args.repeat}; empty lambda call = {noop:.0f} ns\n"
    )
    print("| per token, caller's thread | ns | x hook |")
    print("|---|---:|---:|")
    for name, ns in results:
        print(f"| {name} | {ns:,.0f} | {ns / hook_ns:.1f} |")
    stats = agg.stats()
    assert stats.errors == 0, stats
    agg.shutdown(timeout_s=0.1)
    provider.shutdown()


if __name__ == "__main__":
    main()
