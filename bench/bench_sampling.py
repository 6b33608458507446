"""Agent sampling overhead: CPU per GPU per tick, % of one core at 1 Hz and 10 Hz, RSS.

Method (DESIGN §8): each configuration runs in a fresh subprocess that opens the
backend, then samples N GPUs at a rate for a fixed wall time, feeding every tick into
the windowing + classifier the daemon uses once per window. CPU is the process's own
CPU time (every thread, ``time.process_time``) over the timed span only, from the end
of the first (warm-up) tick to the end of the run, so imports, set-up and the first
tick, which vary by tens of ms between identical processes, are not in it. The
noise floor is measured the same way: an identical subprocess (same imports, same
backend opened) that sleeps for the span instead of sampling.

Every configuration, the floor included, runs ``--repeats`` times, interleaved (floor,
1 Hz, 10 Hz, floor, ...) so drift on a shared machine hits all alike; each figure is
the median with the min-max over the runs. A rate is *within noise* when its lowest
run is no higher than the floor's highest: it cannot then be told apart from sleeping.
RSS is the peak resident set. Ratios, not absolute timings, are what carry between
machines.

    .venv/bin/python bench/bench_sampling.py [--seconds 10] [--repeats 5] [--backend fake|nvml]
    .venv/bin/python bench/bench_sampling.py --write-docs    # also into docs/PERFORMANCE.md

With ``--backend nvml`` (on a GPU host) the real NVML + GPM calls are measured.
``--write-docs`` replaces what lies between the ``bench_sampling`` markers in
docs/PERFORMANCE.md with this run's results (nothing else in that file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from perfdoc import write_block  # bench/perfdoc.py, beside this script  # noqa: E402

RATES = ((1.0, 0.5), (10.0, 3.0))  # (Hz, budget in % of one core), DESIGN §8
RSS_BUDGET_MIB = 80


def child(backend_name: str, gpus: int, rate_hz: float, seconds: float, idle: bool) -> None:
    from rooftop.agent.diagnose import FakeSpec, diagnose_records, open_backend
    from rooftop.agent.sampler import Sampler

    spec = FakeSpec("h100", ("decode",)) if backend_name == "fake" else None
    backend = open_backend(spec, gpus)
    if idle:  # the floor: same imports and backend set-up, no sampling
        cpu0, wall0 = time.process_time(), time.monotonic()
        time.sleep(seconds)
        emit(0, time.process_time() - cpu0, time.monotonic() - wall0)
        backend.close()
        return
    sampler = Sampler(backend)
    window: list = []
    window_s = 5.0
    last_classify = time.monotonic()
    span: dict[str, float] = {}  # starts after the first (warm-up) tick: steady state only

    def on_tick(records, _done):
        nonlocal last_classify, window
        window.extend(records)
        if time.monotonic() - last_classify >= window_s:
            diagnose_records(window)  # the daemon classifies once per window
            window = []
            last_classify = time.monotonic()
        if not span:
            span.update(cpu0=time.process_time(), wall0=time.monotonic())

    sampler.run(seconds, rate_hz, on_tick)
    emit(sampler.ticks - 1, time.process_time() - span["cpu0"], time.monotonic() - span["wall0"])
    backend.close()


def emit(ticks: int, span_cpu_s: float, span_wall_s: float) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "ticks": ticks,
        "span_cpu_s": span_cpu_s,
        "span_wall_s": span_wall_s,
        "process_cpu_s": usage.ru_utime + usage.ru_stime,
        "rss_mib": usage.ru_maxrss / 1024,
    }))


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float], fmt: str) -> str:
    """Median (min–max) of ``values``."""
    med, lo, hi = statistics.median(values), min(values), max(values)
    return f"{med:{fmt}} ({lo:{fmt}}–{hi:{fmt}})"


def pct_core(r: dict) -> float:
    return 100 * r["span_cpu_s"] / r["span_wall_s"]


def report(args: argparse.Namespace, runs: dict[str, list[dict]]) -> str:
    floor = [pct_core(r) for r in runs["floor"]]
    floor_hi = max(floor)
    lines = [
        f"**Results, {args.backend} backend ({datetime.date.today().isoformat()}, "
        f"{os.cpu_count()}-core {platform.machine()} machine, Python "
        f"{platform.python_version()}; {args.gpus} GPUs, {args.seconds:g} s per run, "
        f"{args.repeats} runs of each configuration, interleaved; median (min–max)):**",
        "",
        "| rate | ticks (after warm-up) | CPU / tick / GPU | % of one core | − floor (median) | "
        "vs noise | budget | RSS |",
        "|---|---|---|---|---|---|---|---|",
        f"| floor (sleeps) | 0 | — | {spread(floor, '.3f')} % | — | — | — | "
        f"{spread([r['rss_mib'] for r in runs['floor']], '.1f')} MiB |",
    ]
    verdicts = []
    for rate, budget in RATES:
        rs = runs[f"{rate:g} Hz"]
        pct = [pct_core(r) for r in rs]
        per_gpu_us = [1e6 * r["span_cpu_s"] / max(1, r["ticks"]) / args.gpus for r in rs]
        extra = statistics.median(pct) - statistics.median(floor)
        noise = "**within noise**" if min(pct) <= floor_hi else "above noise"
        if max(pct) <= budget:
            within = "within budget in every run"
        elif min(pct) > budget:
            within = "**over budget in every run**"
        else:
            within = "**straddles its budget** (some runs over)"
        verdicts.append(f"{rate:g} Hz: {within}, lowest run {min(pct):.3f} % vs the floor's "
                        f"highest {floor_hi:.3f} % ({noise.strip('*')}).")
        lines.append(
            f"| {rate:g} Hz | {spread([r['ticks'] for r in rs], '.0f')} | "
            f"{spread(per_gpu_us, '.0f')} µs | {spread(pct, '.3f')} % | {extra:+.3f} % | "
            f"{noise} | ≤ {budget} % | {spread([r['rss_mib'] for r in rs], '.1f')} MiB |"
        )
    process_floor = [r["process_cpu_s"] for r in runs["floor"]]
    lines += [
        "",
        f"Noise floor: the sleeping process's CPU over the span is "
        f"{spread(floor, '.3f')} % of a core; a rate whose lowest run is no higher than "
        f"{floor_hi:.3f} % is reported as within noise. RSS budget ≤ {RSS_BUDGET_MIB} MiB. "
        f"For scale, the whole sleeping process (imports and set-up included, which the "
        f"span leaves out) took {spread(process_floor, '.3f')} s of CPU: a spread of "
        f"{1000 * (max(process_floor) - min(process_floor)):.0f} ms between identical runs, "
        f"which is why whole-process differences cannot resolve the 1 Hz cost.",
        "",
        *(f"- {v}" for v in verdicts),
    ]
    return "\n".join(lines)


def write_docs(block: str) -> None:
    """Put ``block`` between this script's markers in docs/PERFORMANCE.md."""
    write_block("bench_sampling", block)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--backend", choices=["fake", "nvml"], default="fake")
    parser.add_argument("--write-docs", action="store_true",
                        help="replace the bench_sampling section of docs/PERFORMANCE.md")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--idle", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args.backend, args.gpus, args.rate, args.seconds, args.idle)
        return
    common = ("--backend", args.backend, "--gpus", str(args.gpus), "--seconds", str(args.seconds))
    configs = [("floor", ("--idle",))] + [(f"{r:g} Hz", ("--rate", str(r))) for r, _ in RATES]
    runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
    for i in range(args.repeats):
        for name, extra in configs:
            runs[name].append(run_child(*extra, *common))
            print(f"run {i + 1}/{args.repeats} {name}: {pct_core(runs[name][-1]):.3f} % of a core",
                  file=sys.stderr)
    block = report(args, runs)
    print(block)
    if args.write_docs:
        write_docs(block)


if __name__ == "__main__":
    main()
