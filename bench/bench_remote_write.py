"""Remote-write output cost: CPU per GPU sample to turn applied batches into requests.

In one process and one run, over the same batches (8 GPUs x 60 ticks, every field an
H100 reports, 17 series per sample): the **baseline** is the collector's own
``decode_batch`` of those batches (what every batch costs at ingest, output or not);
then the remote-write output's series building (``RemoteWriter._build``: decode every
GPU record, the label set of each series from its GPU's cache, one protobuf
``WriteRequest``, encoded), and the two snappy encodings: literal blocks (the
default) and ``find_repeats``. CPU is ``time.process_time``; each figure is the best
of ``--repeat`` runs (the machine is shared: the best is the least disturbed). Bodies:
bytes per sample and the compression ratio. Prints markdown; ``--write-docs`` also
puts it between the ``bench_remote_write`` markers of docs/PERFORMANCE.md.

Usage: .venv/bin/python bench/bench_remote_write.py [--repeat 7] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from perfdoc import write_block  # bench/perfdoc.py, beside this script  # noqa: E402

from rooftop.collector.fleet import Fleet, decode_batch  # noqa: E402
from rooftop.collector.otel import Telemetry  # noqa: E402
from rooftop.collector.remote_write import RemoteWrite, RemoteWriter  # noqa: E402
from rooftop.collector.snappy import compress, literal_block  # noqa: E402
from tests.collector.helpers import batch, gpu  # noqa: E402

GPUS, TICKS = 8, 60


def best(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    """The least CPU seconds ``fn`` took over ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return min(times)


def main() -> None:
    """Measure and print (and with ``--write-docs`` record) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    start = time.time() - 600
    records = [gpu(i, start + k * 0.1) for k in range(TICKS) for i in range(GPUS)]
    msg = batch(1, records=records)
    n = len(records)
    writer = RemoteWriter(RemoteWrite(url="http://unused/"), Telemetry(Fleet()).points)

    def decode() -> None:
        decode_batch(msg, received_s=time.time())

    decoded = decode_batch(msg, received_s=time.time())

    def build() -> None:
        writer._newest_ms.clear()  # every run writes every point again
        writer.observe_batch(decoded, time.time())
        writer._build(writer._take())

    build()  # warm the label cache, as a running output has it
    writer._newest_ms.clear()
    writer.observe_batch(decoded, time.time())
    raw, points = writer._build(writer._take())

    t_decode = best(decode, args.repeat) / n
    t_build = best(build, args.repeat) / n
    t_literal = best(lambda: literal_block(raw), args.repeat) / n
    t_repeats = best(lambda: compress(raw), max(2, args.repeat // 3)) / n
    compressed = compress(raw)

    def us(seconds: float) -> str:
        return f"{seconds * 1e6:.1f}"

    total_literal = t_build + t_literal
    total_repeats = t_build + t_repeats
    day = datetime.date.today().isoformat()
    lines = [
        f"**Results ({day}, {platform.machine()}, Python {platform.python_version()}; "
        f"{GPUS} GPUs x {TICKS} ticks = {n} samples, {points // n} series each; "
        f"best of {args.repeat}):**",
        "",
        "| step | µs CPU per GPU sample | × ingest decode |",
        "|---|---|---|",
        f"| baseline: collector `decode_batch` (ingest, every batch) | {us(t_decode)} | 1.0 |",
        f"| series and `WriteRequest` (`_build`) | {us(t_build)} | {t_build / t_decode:.1f} |",
        f"| snappy, literal blocks (default) | {us(t_literal)} | {t_literal / t_decode:.2f} |",
        f"| snappy, `find_repeats = true` | {us(t_repeats)} | {t_repeats / t_decode:.1f} |",
        f"| **output total, default** | **{us(total_literal)}** | "
        f"{total_literal / t_decode:.1f} |",
        f"| output total, `find_repeats` | {us(total_repeats)} | "
        f"{total_repeats / t_decode:.1f} |",
        "",
        f"Body per sample: {len(raw) / n:.0f} bytes as literal blocks, "
        f"{len(compressed) / n:.0f} bytes with `find_repeats` "
        f"({len(raw) / len(compressed):.1f}x smaller).",
    ]
    block = "\n".join(lines)
    print(block)
    if args.write_docs:
        write_block("bench_remote_write", block)


if __name__ == "__main__":
    main()
