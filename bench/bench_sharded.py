"""Three collectors under 1,000+ agents, one killed and brought back; the capacity table.

The scenario of ``tests/e2e/test_e2e_sharded.py`` (``tests/e2e/sharded.py``), longer,
with its figures: three real ``agentctl collector`` processes (state directories,
remote write optional), a real Prometheus scraping them (only ``rooftop_gpu_bound``
is stored, to spare the machine) and receiving remote write, and ``tests/loadgen.py``'s
simulated agents (8 GPUs each) in this process.

Two measured phases, each on fresh agents against the same collectors:

1. **1 Hz kill-and-return**: steady window (CPU, RSS per 1,000 agents), SIGKILL one
   collector, restart it after ``--away-s``, wait until its agents are home, settle;
   re-home times, seqs applied again, GPUs on two collectors, Prometheus series.
2. **10 Hz steady** (``--hz10-s``, ``--hz10-agents``: fewer, 10x the samples):
   batches of 10 samples per GPU (a 10 Hz agent batching every second); collector
   CPU per 1,000 agents, and the series per host of one endpoint.

From the two CPU points it solves ``cores = batches/s × c_batch + samples/s × c_sample``
and prints the capacity table (docs/OPERATOR-GUIDE.md, "Capacity"). RAM per agent
comes from RSS over an idle collector's; series per host from one scrape.
``--write-docs`` puts the results between the ``bench_sharded`` markers of
docs/PERFORMANCE.md.

Usage: .venv/bin/python bench/bench_sharded.py [--agents 2000] [--steady-s 30]
       [--remote-write] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from perfdoc import DOC, write_block  # bench/perfdoc.py, beside this script  # noqa: E402

from tests.e2e.sharded import (  # noqa: E402
    Sharded,
    collector_knows,
    proc_cpu_s,
    proc_rss_mib,
    summary,
)
from tests.loadgen import LoadGen  # noqa: E402

GPUS = 8
# Planning: a collector is one Python process (one core at most); plan each at half of
# it, and with one collector lost the rest must carry everything (N+1).
CORES_PER_COLLECTOR = 0.5
# Remote write of each GPU sample: 17 series (bench/bench_remote_write.py).
RW_SERIES_PER_SAMPLE = 17


def steady_cores(
    scenario: Sharded, agents: int, samples_per_gpu: int, seconds: float
) -> tuple[float, float]:
    """(collector cores per 1,000 agents, series per host) at ``samples_per_gpu`` per batch."""
    cols = scenario.collectors
    gen = LoadGen(
        [c.address for c in cols],
        agents=agents,
        samples_per_gpu=samples_per_gpu,
        start_spread_s=scenario.start_spread_s,
    ).start()
    try:
        deadline = time.monotonic() + 60
        while not all(led.acked_seq > 0 for led in gen.ledgers):
            if time.monotonic() > deadline:
                raise SystemExit("agents did not all get an ack in 60 s")
            time.sleep(0.2)
        time.sleep(2.0)
        cpu0 = [proc_cpu_s(c.pid) for c in cols]
        t0 = time.monotonic()
        time.sleep(seconds)
        wall = time.monotonic() - t0
        cores = sum(proc_cpu_s(c.pid) - c0 for c, c0 in zip(cols, cpu0, strict=True)) / wall
        spa = series_per_host(cols[1].metrics_port, gen.on(cols[1].address))
    finally:
        gen.stop()
    return cores / agents * 1000, spa


def series_per_host(port: int, agents_on: int) -> float:
    """Series on one collector's endpoint per agent streaming to it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as resp:
        text = resp.read().decode()
    series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    return series / max(1, agents_on)


def capacity_rows(
    c_batch_us: float,
    c_sample_us: float,
    idle_mib: float,
    mib_per_agent: float,
    spa: float,
    rw_us: float,
) -> list[str]:
    """The capacity table's rows (markdown); ``rw_us``: remote write's CPU per sample."""
    rows = []
    for hosts in (100, 1_000, 10_000, 100_000):
        for hz in (1, 10):
            samples = hosts * GPUS * hz
            cores = (hosts * c_batch_us + samples * c_sample_us) / 1e6
            # N+1: with one collector gone the rest still run at CORES_PER_COLLECTOR.
            n = max(2, math.ceil(cores / CORES_PER_COLLECTOR) + 1)
            ram_gib = (n * idle_mib + hosts * mib_per_agent) / 1024
            series = hosts * spa
            rw_cores = cores + samples * rw_us / 1e6
            n_rw = max(2, math.ceil(rw_cores / CORES_PER_COLLECTOR) + 1)
            rows.append(
                f"| {hosts:,} | {hz} Hz | {samples:,} | {n} | {cores:.2f} | {n_rw} / "
                f"{rw_cores:.1f} | {ram_gib:.1f} GiB | {series / 1e6:.2f} M | "
                f"{samples * RW_SERIES_PER_SAMPLE / 1e6:.2f} M/s | {topology(hosts)} |"
            )
    return rows


def topology(hosts: int) -> str:
    """The recommended topology at ``hosts`` GPU hosts (docs/OPERATOR-GUIDE.md)."""
    if hosts <= 100:
        return "2 collectors (HA pair), one Prometheus scraping both"
    if hosts <= 1_000:
        return "collectors N+1, one Prometheus (or an HA pair) scraping all"
    if hosts <= 10_000:
        return "collectors N+1; Prometheus shards by collector, or remote write"
    return "collectors N+1, not scraped: remote write to Mimir/Thanos/VM or OTLP to a gateway"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--steady-s", type=float, default=30.0)
    parser.add_argument("--hz10-s", type=float, default=20.0)
    parser.add_argument("--hz10-agents", type=int, default=300)
    parser.add_argument("--away-s", type=float, default=15.0)
    parser.add_argument("--scrape-interval-s", type=int, default=10)
    parser.add_argument(
        "--remote-write",
        action="store_true",
        help="the collectors remote-write to the Prometheus (the verdicts' confidence: "
        "tests/e2e/sharded.py, remote_write_include)",
    )
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument(
        "--remote-write-us", type=float, default=8.8,
        help="remote write's CPU per GPU sample, sending everything, columnar batches "
        "(bench/bench_remote_write.py: 8.8 µs, 2026-12-06)",
    )  # fmt: skip
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rooftop-bench-sharded-"))
    scenario = Sharded(
        root,
        agents=args.agents,
        steady_s=args.steady_s,
        away_s=args.away_s,
        scrape_interval_s=args.scrape_interval_s,
        remote_write=args.remote_write,
    )
    try:
        with scenario.prometheus() as base:
            cols = scenario.start_collectors(base)
            time.sleep(1.0)
            idle_mib = statistics.mean(proc_rss_mib(c.pid) for c in cols)
            print(f"collectors idle: RSS {idle_mib:.0f} MiB each", flush=True)
            out = scenario.run(base, kill=0)
            figures = summary(out)
            print({k: round(v, 3) for k, v in figures.items()}, flush=True)
            for c in cols:  # the run stopped them; the 10 Hz phase needs them back
                c.start()
            scenario.write_targets()
            per_k_10, spa = steady_cores(scenario, args.hz10_agents, 10, args.hz10_s)
            print(f"10 Hz: {per_k_10:.3f} collector cores per 1,000 agents", flush=True)
    finally:
        for c in scenario.collectors:
            c.kill()
        shutil.rmtree(root, ignore_errors=True)
    per_k_1 = figures["cores_per_1000_agents"]
    # cores per 1,000 agents = 1,000 × (c_batch + samples_per_batch × c_sample) / 1e6
    c_sample_us = max(0.0, (per_k_10 - per_k_1) / (1000 * GPUS * (10 - 1)) * 1e6)
    c_batch_us = max(0.0, per_k_1 / 1000 * 1e6 - GPUS * c_sample_us)
    mib_per_agent = max(0.0, (figures["collector_rss_mib"] - idle_mib) / (args.agents / 3))
    lines = report(args, figures, per_k_10, c_batch_us, c_sample_us, idle_mib, mib_per_agent, spa)
    print("\n".join(lines))
    if args.write_docs:
        write_block("bench_sharded", "\n".join(lines))
        print(f"\nwrote {DOC.relative_to(REPO)}")


def report(
    args: argparse.Namespace,
    f: dict[str, float],
    per_k_10: float,
    c_batch_us: float,
    c_sample_us: float,
    idle_mib: float,
    mib_per_agent: float,
    spa: float,
) -> list[str]:
    """The markdown block: the run's figures, the fitted costs, the capacity table."""
    when = datetime.date.today().isoformat()
    grace = "on" if collector_knows("disconnected_series_s") else "absent (no such key yet)"
    return [
        f"**Results ({when}, {os.cpu_count()}-core {platform.machine()} machine, Python "
        f"{platform.python_version()}; the generator, three collectors and Prometheus share "
        f"it).** {int(f['agents']):,} agents × {GPUS} GPUs, remote write "
        f"{'on' if args.remote_write else 'off'}, scrape every {args.scrape_interval_s} s, "
        f"`disconnected_series_s` {grace}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| collector CPU per 1,000 agents, 1 Hz (8 samples/batch) | "
        f"{f['cores_per_1000_agents']:.3f} cores |",
        f"| collector CPU per 1,000 agents, 10 Hz (80 samples/batch; {args.hz10_agents} agents) | "
        f"{per_k_10:.3f} cores |",
        f"| ⇒ per batch / per sample | {c_batch_us:.0f} µs / {c_sample_us:.1f} µs |",
        f"| collector CPU per sample at 1 Hz, all in | {f['cpu_us_per_sample']:.1f} µs |",
        f"| collector RSS per 1,000 agents (idle {idle_mib:.0f} MiB) | "
        f"{f['rss_mib_per_1000_agents']:.0f} MiB ({mib_per_agent * 1000:.0f} MiB above idle) |",
        f"| generator CPU ({int(f['agents']):,} agents, one process) | "
        f"{f['generator_cores']:.2f} cores |",
        f"| re-home after SIGKILL, p50 / max | {f['rehome_p50_s']:.2f} s / "
        f"{f['rehome_max_s']:.2f} s |",
        f"| home again after restart, max (return_after_s 3 s) | {f['home_again_max_s']:.1f} s |",
        f"| batches / applied again (resent after the failover) / resends | "
        f"{int(f['batches']):,} / {int(f['applied_again']):,} / {int(f['resends']):,} |",
        f"| GPUs seen on two collectors / longest span | {int(f['duplicate_gpus']):,} / "
        f"{f['duplicate_span_max_s']:.0f} s |",
        f"| Prometheus head series (scraped bound + remote write) | "
        f"{int(f['prometheus_series']):,} |",
        "",
        "Capacity (docs/OPERATOR-GUIDE.md): cores = hosts × c_batch + samples/s × c_sample; "
        f"collectors = ⌈cores / {CORES_PER_COLLECTOR}⌉ + 1; RAM = collectors × idle + "
        f"hosts × {mib_per_agent * 1024:.0f} KiB; series = hosts × {spa:.0f}; remote write "
        f"adds samples/s × {args.remote_write_us:g} µs of CPU and sends "
        f"{RW_SERIES_PER_SAMPLE} points per sample.",
        "",
        "| GPU hosts | rate | samples/s | collectors | cores | with remote write: collectors"
        " / cores | RAM | Prometheus series (scraped) | remote-write points | topology |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *capacity_rows(c_batch_us, c_sample_us, idle_mib, mib_per_agent, spa, args.remote_write_us),
    ]


if __name__ == "__main__":
    main()
