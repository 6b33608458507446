"""Per-token cost of the Rooftop hook on the caller's thread, against the usual alternatives.

    .venv/bin/python bench/bench_hook.py [--tokens N] [--repeat R] [--write-docs]

First the hot path against an empty loop in the same run: ``for ...: req.token()``
vs ``for ...: pass`` (ns per token, the difference, and the ratio), then what a
request costs once (``start_request()`` + ``end()`` on the caller's thread) and what
the shipper thread spends per finished request turning its marks into one TPOT,
TTFT and duration observation each (the per-request histograms), off the hot path.

Then compares, in one process and one run (so on the same CPU and interpreter):
- ``Request.token()``: what an engine calls per token (reads the clock itself);
- ``RooftopStreamer.put(step)``: the transformers streamer, per decoding step;
- OpenTelemetry SDK ``histogram.record`` (MeterProvider + InMemoryMetricReader), with
  and without attributes;
- prometheus_client ``Histogram.observe``, bare and through a labelled child.

The alternatives are handed a ready value, so they do less than the hook (which
also reads a clock). Best of R repeats (timeit's advice: the minimum is the cost,
the rest is noise). Prints markdown; ``--write-docs`` also puts it between the
``bench_hook`` markers of docs/PERFORMANCE.md (nothing else in that file changes).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import timeit
from collections.abc import Callable

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from perfdoc import write_block  # bench/perfdoc.py, beside this script  # noqa: E402
from prometheus_client import CollectorRegistry, Histogram

from rooftop.agent.hooks import Aggregator
from rooftop.agent.hooks.hf import RooftopStreamer

BUDGET_NS = 1000  # DESIGN §8: under 1 µs per token on the caller's thread


def best_ns(fn: Callable[[], object], number: int, repeat: int) -> float:
    timer = timeit.Timer(fn)
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e9


def best_stmt_ns(stmt: str, env: dict[str, object], number: int, repeat: int) -> float:
    """Best ns per iteration of timeit's own loop running ``stmt`` (no wrapper call)."""
    timer = timeit.Timer(stmt, globals=env)
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e9


def shipper_ns_per_request(requests: int, repeat: int) -> float:
    """Shipper-thread cost per finished request: its histogram observations and summary."""
    best = float("inf")
    for _ in range(repeat):
        agg = Aggregator(engine_id="bench", socket_path="/nonexistent/r.sock", autostart=False)
        for _ in range(requests):
            req = agg.start_request()
            for _ in range(8):
                req.token()
            req.end()
        empty = Aggregator(engine_id="bench", socket_path="/nonexistent/r.sock", autostart=False)
        t0 = timeit.default_timer()
        summary = agg._collect()
        t1 = timeit.default_timer()
        empty._collect()
        t2 = timeit.default_timer()
        assert summary.tpot_hist is not None and summary.tpot_hist.count == requests
        best = min(best, ((t1 - t0) - (t2 - t1)) / requests * 1e9)
        agg.shutdown(timeout_s=0.1)
        empty.shutdown(timeout_s=0.1)
    return best


def hot_path(tokens: int, repeat: int) -> list[str]:
    """The per-token hot path against an empty loop, and the per-request costs."""
    agg = Aggregator(engine_id="bench", socket_path="/nonexistent/rooftop.sock", autostart=False)
    req = agg.start_request()
    empty_ns = best_stmt_ns("pass", {}, tokens, repeat)
    token_ns = best_stmt_ns("token()", {"token": req.token}, tokens, repeat)
    request_ns = best_stmt_ns(
        "start().end()", {"start": agg.start_request}, max(1, tokens // 10), repeat
    )
    agg.shutdown(timeout_s=0.1)
    shipper_ns = shipper_ns_per_request(10_000, repeat)
    own_ns = token_ns - empty_ns
    verdict = "within" if token_ns <= BUDGET_NS else "OVER"
    return [
        f"**Results ({datetime.date.today().isoformat()}, {os.cpu_count()}-core "
        f"{platform.machine()} machine, Python {sys.version.split()[0]}; {tokens:,} "
        f"iterations x best of {repeat}):**",
        "",
        "| hot path | ns per token | × empty loop |",
        "|---|---:|---:|",
        f"| empty loop (`for ...: pass`), the baseline | {empty_ns:,.1f} | 1.0 |",
        f"| `for ...: req.token()` | {token_ns:,.1f} | {token_ns / empty_ns:.1f} |",
        f"| hook's own cost (difference) | {own_ns:,.1f} | — |",
        "",
        f"Per token the hook is {verdict} its {BUDGET_NS:,} ns budget ({token_ns:,.0f} ns with "
        f"the loop). Once per request on the caller's thread, `start_request()` + `end()`: "
        f"{request_ns:,.0f} ns. On the shipper thread, off the hot path, each finished "
        f"request's TPOT, TTFT and duration observations (bisect into the bucket arrays) and "
        f"its share of the summary: {shipper_ns:,.0f} ns (10,000 requests of 8 tokens).",
    ]


def write_docs(block: str) -> None:
    """Put ``block`` between this script's markers in docs/PERFORMANCE.md."""
    write_block("bench_hook", block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="calls per repeat")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--write-docs", action="store_true",
                        help="replace the bench_hook section of docs/PERFORMANCE.md")
    args = parser.parse_args()
    lines = hot_path(args.tokens, args.repeat)

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
    lines += [
        "",
        f"Against the alternatives, each called through `timeit` (empty lambda call = "
        f"{noop:.0f} ns):",
        "",
        "| per token, caller's thread | ns | × hook |",
        "|---|---:|---:|",
        *(f"| {name} | {ns:,.0f} | {ns / hook_ns:.1f} |" for name, ns in results),
    ]
    stats = agg.stats()
    assert stats.errors == 0, stats
    agg.shutdown(timeout_s=0.1)
    provider.shutdown()
    block = "\n".join(lines)
    print(block)
    if args.write_docs:
        write_docs(block)


if __name__ == "__main__":
    main()
