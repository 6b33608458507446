"""Remote-write output cost: CPU per GPU sample to turn applied batches into requests.

In one process and one run, over the same batch (8 GPUs x 60 ticks at 10 Hz, every
field an H100 reports, 17 series per sample, and one verdict per GPU): the **baseline**
is the collector's own ``decode_batch`` of it (what every batch costs at ingest, output
or not); then the remote-write output's series building (``RemoteWriter._build``: read
every GPU record, the label set of each series from its GPU's cache, one protobuf
``WriteRequest``, encoded) sending everything, and beside it, interleaved run by run,
the same with ``include`` narrowed to the verdict and one gauge (``INCLUDE``); then the
two snappy encodings of the full request: literal blocks (the default) and
``find_repeats``. CPU is ``time.process_time``; each figure is the best of ``--repeat``
runs (the machine is shared: the best is the least disturbed). Bodies: bytes per
sample and the compression ratio. Prints markdown; ``--write-docs`` also puts it
between the ``bench_remote_write`` markers of docs/PERFORMANCE.md.

Usage: .venv/bin/python bench/bench_remote_write.py [--repeat 7] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from perfdoc import write_block  # bench/perfdoc.py, beside this script  # noqa: E402

from rooftop.collector.fleet import DecodedBatch, Fleet, decode_batch  # noqa: E402
from rooftop.collector.otel import Telemetry  # noqa: E402
from rooftop.collector.remote_write import RemoteWrite, RemoteWriter  # noqa: E402
from rooftop.collector.snappy import compress, literal_block  # noqa: E402
from rooftop.common.model import Bound  # noqa: E402
from rooftop.v1 import telemetry_pb2 as pb  # noqa: E402
from tests.collector.helpers import as_columns, batch, gpu, verdict  # noqa: E402

GPUS, TICKS = 8, 60
# A large fleet's choice (docs/OPERATOR-GUIDE.md): the verdict and one gauge.
INCLUDE = ("rooftop_gpu_bound", "rooftop_gpu_dram_activity")


def best(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    """The least CPU seconds ``fn`` took over ``repeat`` runs."""
    return interleaved([fn], repeat)[0]


def interleaved(fns, repeat: int) -> list[float]:  # type: ignore[no-untyped-def]
    """The least CPU seconds each of ``fns`` took, run in turn ``repeat`` times: a
    disturbance of the shared machine falls on all of them alike."""
    least = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t = time.process_time()
            fn()
            least[i] = min(least[i], time.process_time() - t)
    return least


def builder(config: RemoteWrite, decoded: DecodedBatch):  # type: ignore[no-untyped-def]
    """A writer's ``_build`` of ``decoded``, every point written again at each call,
    with its caches warm (as a running output has them); and the writer."""
    writer = RemoteWriter(config, Telemetry(Fleet()).points)

    def build() -> tuple[bytes, int]:
        writer._newest_ms.clear()  # every run writes every point again
        writer.observe_batch(decoded, time.time())
        return writer._build(writer._take())

    build()  # warm the label cache
    return build


def main() -> None:
    """Measure and print (and with ``--write-docs`` record) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    start = time.time() - 600
    records = [gpu(i, start + k * 0.1) for k in range(TICKS) for i in range(GPUS)]
    end_s = start + TICKS * 0.1
    verdicts = [verdict(i, Bound.MEMORY, window_start_s=end_s - 5, window_end_s=end_s)
                for i in range(GPUS)]
    msgs = {"records": batch(1, records=records, verdicts=verdicts)}
    msgs["columns"] = as_columns(msgs["records"])
    n = len(records)
    decoded = {kind: decode_batch(msg, received_s=time.time()) for kind, msg in msgs.items()}

    def decoder(msg: pb.Batch):  # type: ignore[no-untyped-def]
        return lambda: decode_batch(msg, received_s=time.time())

    # No wait for a fuller request (batch_send_deadline_s): _take returns at once.
    every = RemoteWrite(url="http://unused/", batch_send_deadline_s=1e-9)
    narrow = RemoteWrite(url="http://unused/", batch_send_deadline_s=1e-9, include=INCLUDE)
    builds = {(kind, name): builder(config, decoded[kind])
              for kind in msgs for name, config in (("every", every), ("narrow", narrow))}
    made = {key: build() for key, build in builds.items()}
    assert made[("records", "every")] == made[("columns", "every")]  # the same request
    raw, points = made[("records", "every")]
    narrow_raw, narrow_points = made[("records", "narrow")]

    # All the builds in turn, round after round: what the comparison rests on.
    cpu = dict(zip(builds, (t / n for t in interleaved(list(builds.values()), args.repeat)),
                   strict=True))  # fmt: skip
    t_decode = {kind: best(decoder(msg), args.repeat) / n for kind, msg in msgs.items()}
    t_literal = best(lambda: literal_block(raw), args.repeat) / n
    t_narrow_literal = best(lambda: literal_block(narrow_raw), args.repeat) / n
    t_repeats = best(lambda: compress(raw), max(2, args.repeat // 3)) / n
    compressed = compress(raw)

    def us(seconds: float) -> str:
        return f"{seconds * 1e6:.1f}"

    def row(step: str, records_s: float, columns_s: float, pts: str = "") -> str:
        return f"| {step} | {us(records_s)} | {us(columns_s)} | {pts} |"

    every_pts, narrow_pts = f"{points / n:.1f}", f"{narrow_points / n:.1f}"
    total = {k: cpu[(k, "every")] + t_literal for k in msgs}
    total_narrow = {k: cpu[(k, "narrow")] + t_narrow_literal for k in msgs}
    day = datetime.date.today().isoformat()
    lines = [
        f"**Results ({day}, {platform.machine()}, Python {platform.python_version()}; "
        f"{GPUS} GPUs x {TICKS} ticks = {n} samples and {len(verdicts)} verdicts, sent as "
        f"records and as columns; best of {args.repeat}):**",
        "",
        "| step | µs CPU per GPU sample, records | µs, columns | points per GPU sample |",
        "|---|---|---|---|",
        row("baseline: collector `decode_batch` (ingest, every batch)",
            t_decode["records"], t_decode["columns"]),
        row("series and `WriteRequest` (`_build`), everything",
            cpu[("records", "every")], cpu[("columns", "every")], every_pts),
        row(f"the same, `include = {json.dumps(list(INCLUDE))}`",
            cpu[("records", "narrow")], cpu[("columns", "narrow")], narrow_pts),
        row("snappy, literal blocks (default), everything", t_literal, t_literal),
        row("snappy, `find_repeats = true`, everything", t_repeats, t_repeats),
        row("**output total, default**", total["records"], total["columns"], every_pts),
        row("output total, `find_repeats`", cpu[("records", "every")] + t_repeats,
            cpu[("columns", "every")] + t_repeats, every_pts),
        row("**output total, default, `include` as above**", total_narrow["records"],
            total_narrow["columns"], narrow_pts),
        "",
        f"Output total (default) per GPU sample over ingest's decode: "
        f"{total['records'] / t_decode['records']:.1f}x (records), "
        f"{total['columns'] / t_decode['columns']:.1f}x (columns); with the `include`: "
        f"{total_narrow['records'] / t_decode['records']:.1f}x, "
        f"{total_narrow['columns'] / t_decode['columns']:.1f}x. "
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
