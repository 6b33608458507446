"""Agent sampling overhead: CPU per GPU per tick, % of one core at 1 Hz and 10 Hz, RSS.

Method (DESIGN §8): each configuration runs in a fresh subprocess that samples N GPUs at
a rate for a fixed wall time, feeding every tick into the windowing + classifier the
daemon uses once per window. CPU is the subprocess's own user+sys time, with the CPU of
an identical subprocess that only sleeps for the same time (the baseline, same run)
subtracted; RSS is the peak resident set. Ratios against the baseline, not absolute
timings, are what carry between machines.

    .venv/bin/python bench/bench_sampling.py [--seconds 20] [--backend fake|nvml]

With ``--backend nvml`` (on a GPU host) the real NVML + GPM calls are measured.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(backend_name: str, gpus: int, rate_hz: float, seconds: float, idle: bool) -> None:
    from rooftop.agent.diagnose import FakeSpec, diagnose_records, open_backend
    from rooftop.agent.sampler import Sampler

    spec = FakeSpec("h100", ("decode",)) if backend_name == "fake" else None
    backend = open_backend(spec, gpus)
    if idle:  # the baseline: same imports and backend set-up, no sampling
        time.sleep(seconds)
        backend.close()
        emit(0, 0.0)
        return
    sampler = Sampler(backend)
    window: list = []
    window_s = 5.0
    last_classify = time.monotonic()
    cpu0 = time.process_time()

    def on_tick(records, _done):
        nonlocal last_classify, window
        window.extend(records)
        if time.monotonic() - last_classify >= window_s:
            diagnose_records(window)  # the daemon classifies once per window
            window = []
            last_classify = time.monotonic()

    sampler.run(seconds, rate_hz, on_tick)
    backend.close()
    emit(sampler.ticks, time.process_time() - cpu0)


def emit(ticks: int, loop_cpu_s: float) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "ticks": ticks,
        "loop_cpu_s": loop_cpu_s,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "rss_mib": usage.ru_maxrss / 1024,
    }))


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--backend", choices=["fake", "nvml"], default="fake")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--idle", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args.backend, args.gpus, args.rate, args.seconds, args.idle)
        return
    base = run_child("--idle", "--backend", args.backend, "--gpus", str(args.gpus),
                     "--seconds", str(args.seconds))
    print(f"backend={args.backend} gpus={args.gpus} seconds={args.seconds:g} per configuration")
    print(f"baseline (same imports and backend, sleeping): cpu {base['cpu_s']:.3f} s, "
          f"RSS {base['rss_mib']:.1f} MiB\n")
    print("| rate | ticks | loop CPU / tick / GPU | process CPU − baseline | % of one core | "
          "budget | RSS |")
    print("|---|---|---|---|---|---|---|")
    for rate, budget in ((1.0, 0.5), (10.0, 3.0)):
        r = run_child("--backend", args.backend, "--gpus", str(args.gpus),
                      "--rate", str(rate), "--seconds", str(args.seconds))
        extra_cpu_s = r["cpu_s"] - base["cpu_s"]
        pct_core = 100 * extra_cpu_s / args.seconds
        per_gpu_us = 1e6 * r["loop_cpu_s"] / max(1, r["ticks"]) / args.gpus
        print(f"| {rate:g} Hz | {r['ticks']} | {per_gpu_us:.0f} µs | {extra_cpu_s:.3f} s | "
              f"{pct_core:.2f} % | ≤ {budget} % | {r['rss_mib']:.1f} MiB |")


if __name__ == "__main__":
    main()
