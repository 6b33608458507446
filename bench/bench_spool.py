"""Spool growth per batch format: how long the default spool lasts through an outage.

A real ``agentctl agent`` (8 busy fake H100s, the fake host sensor, verdicts every
``window_s`` = 5 s, no engines) streams to an address where nothing listens, so
nothing is acked and every batch stays in the spool, as in a collector outage. After
``--warmup-s`` the spool directory's size is read, and again ``--seconds`` later: the
growth per hour, per format (``batch_format = "records"`` / ``"columns"``; ``"auto"``
makes columns through an outage when the last collector said it reads them) and rate.
The spool's files hold each batch as the wire does, with CRC framing.

``--write-docs`` puts the table between the ``bench_spool`` markers of
docs/OPERATOR-GUIDE.md ("Size the spool").

Usage: .venv/bin/python bench/bench_spool.py [--seconds 45] [--warmup-s 6] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench_agent import GPUS, free_port, start_agent, stop_agent  # beside this script
from perfdoc import write_block

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs" / "OPERATOR-GUIDE.md"
FORMATS = ("records", "columns")
RATES_HZ = (1.0, 10.0)
DEFAULT_SPOOL_MIB = 256


def spool_bytes(directory: Path) -> int:
    """Bytes in the spool's files (segments and their index)."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def growth_bytes_per_h(rate_hz: float, batch_format: str, seconds: float, warmup_s: float,
                       workdir: Path) -> float:  # fmt: skip
    """Spool growth of one agent run, in bytes per hour, nothing acked."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    extra: dict[str, object] = {"batch_format": batch_format, "hook_socket": ""}
    proc = start_agent(workdir, free_port(), rate_hz, busy=True, extra=extra)
    try:
        time.sleep(warmup_s)
        if proc.poll() is not None:
            raise SystemExit((workdir / "agent.log").read_text())
        b0, t0 = spool_bytes(workdir / "spool"), time.monotonic()
        time.sleep(seconds)
        b1, t1 = spool_bytes(workdir / "spool"), time.monotonic()
    finally:
        stop_agent(proc)
    return (b1 - b0) / (t1 - t0) * 3600


def lasts(bytes_per_h: float) -> str:
    """Hours the default spool lasts, as coarse as the measurement is good for (runs of
    the same code differ by a few %: one window's verdicts more or less in the span)."""
    hours = DEFAULT_SPOOL_MIB * 2**20 / bytes_per_h
    if hours >= 10:
        return f"≈ {5 * round(hours / 5)} h"
    return f"≈ {hours:.0f} h" if hours >= 2 else f"≈ {hours:.1f} h"


def table(results: dict[tuple[float, str], float], seconds: float) -> list[str]:
    """Markdown: growth and how long the default spool lasts, per rate and format."""
    out = [
        f"Measured by `bench/bench_spool.py` ({datetime.date.today().isoformat()}): a real "
        f"agent, {GPUS} busy fake H100s, host samples and a verdict per GPU every 5 s, "
        f"nothing acked, the spool's files over {seconds:g} s, with CRC framing.",
        "",
        f"| GPUs × rate | records: growth | records: default {DEFAULT_SPOOL_MIB} MiB lasts "
        f"| columns: growth | columns: default {DEFAULT_SPOOL_MIB} MiB lasts |",
        "|---|---:|---:|---:|---:|",
    ]
    for rate_hz in RATES_HZ:
        cells = []
        for fmt in FORMATS:
            per_h = results[(rate_hz, fmt)]
            cells += [f"≈ {per_h / 1e6:.1f} MB/h", lasts(per_h)]
        default = " (the default)" if rate_hz == 1.0 else ""
        out.append(f"| {GPUS} × {rate_hz:g} Hz{default} | " + " | ".join(cells) + " |")
    ratios = ", ".join(
        f"{results[(r, 'columns')] / results[(r, 'records')]:.2f}× at {r:g} Hz" for r in RATES_HZ
    )
    out += ["", f"Columns take {ratios} the bytes of records (a batch a second: at 1 Hz "
            "its 8 GPU rows are a small part of it; host samples, verdicts and framing "
            "weigh the same in both)."]  # fmt: skip
    # Per GPU per second = rate_hz × per sample + the rest, fitted through both rates.
    lo, hi = RATES_HZ
    rules = []
    for fmt in FORMATS:
        per_gpu_s = {r: results[(r, fmt)] / 3600 / GPUS for r in RATES_HZ}
        per_sample = (per_gpu_s[hi] - per_gpu_s[lo]) / (hi - lo)
        rest = per_gpu_s[lo] - lo * per_sample
        rules.append(f"{fmt}: rate_hz × {per_sample:.0f} B + {rest:.0f} B")
    out += ["", "Rule: `spool_max_bytes` ≥ (longest collector outage to survive, in seconds) × "
            f"GPUs × ({'; '.join(rules)}) — per GPU sample, plus host samples, verdicts and "
            "framing per GPU per second. With `batch_format = \"auto\"` the spool holds "
            "columns once a collector has said it reads them."]  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--warmup-s", type=float, default=6.0)
    parser.add_argument("--write-docs", action="store_true",
                        help="put the table into docs/OPERATOR-GUIDE.md")  # fmt: skip
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="bench-spool-"))
    results: dict[tuple[float, str], float] = {}
    try:
        for rate_hz in RATES_HZ:
            for fmt in FORMATS:
                per_h = growth_bytes_per_h(rate_hz, fmt, args.seconds, args.warmup_s,
                                           workdir / f"{fmt}-{rate_hz:g}")  # fmt: skip
                results[(rate_hz, fmt)] = per_h
                print(f"  {rate_hz:g} Hz {fmt:8} {per_h / 1e6:.2f} MB/h", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    block = "\n".join(table(results, args.seconds))
    print(block)
    if args.write_docs:
        write_block("bench_spool", block, doc=GUIDE)
        print(f"\nwritten to {GUIDE.relative_to(REPO)}")


if __name__ == "__main__":
    main()
