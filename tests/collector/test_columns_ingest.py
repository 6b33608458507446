"""Columnar batches (``Batch.gpu_columns``) at the collector: applied exactly as records are.

The same samples sent as records to one real collector and as columns to another give
the same fleet state, the same Prometheus exposition and the same remote-write points;
poison in any column is refused in-band with the reason a record gets; a batch may mix
both; batches of records alone (older agents) are untouched.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Iterator

import pytest

from rooftop.collector.fleet import (
    DecodedBatch,
    Fleet,
    PoisonBatch,
    RejectReason,
    decode_batch,
)
from rooftop.collector.service import Collector
from rooftop.common.model import GpuProcess, GpuSample, PodRef
from rooftop.v1 import telemetry_pb2 as pb
from tests.collector.helpers import (
    AgentStream,
    as_columns,
    batch,
    engine,
    gpu,
    scrape,
    start_server,
)
from tests.collector.remote_write_receiver import Receiver, start_collector

_DOUBLES = [f.name for f in pb.GpuSample.DESCRIPTOR.fields if f.type == f.TYPE_DOUBLE]


def _samples(start_s: float, ticks: int = 10) -> list[GpuSample]:
    """Two GPUs and a MIG instance at 10 Hz, with processes, pods and health fields."""
    out = []
    for k in range(ticks):
        t = start_s + k * 0.1
        out.append(gpu(0, t, busy_pct=float(k), pods=(PodRef("llm-0", "serving", "vllm"),)))
        out.append(
            gpu(
                1,
                t,
                dram_bw_pct=None,
                xid_codes=(79,),
                xid_count=1,
                gpm_stale=k % 2 == 1,
                processes=(GpuProcess(7, None, name="python", slurm_job_id="12"),),
            )
        )
        out.append(gpu(1, t, mig_uuid="MIG-1a", gpu_instance_id=1, compute_instance_id=0,
                       busy_pct=None, remap_pending=True))  # fmt: skip
    return out


# ---- in process: decode_batch + Fleet ----------------------------------------------------


def _applied(msg: pb.Batch, received_s: float) -> tuple[DecodedBatch, Fleet]:
    fleet = Fleet(clock=lambda: received_s)
    decoded = decode_batch(msg, received_s=received_s)
    fleet.check_labels(decoded)
    fleet.apply(decoded, received_s=received_s)
    return decoded, fleet


def test_a_columnar_batch_decodes_and_applies_exactly_like_the_same_records():
    now = time.time()
    records = batch(1, records=[*_samples(now - 5), engine(now - 4.5)])
    columns = as_columns(records)
    assert not any(r.HasField("gpu") for r in columns.records) and columns.gpu_columns.rows == 30
    old, old_fleet = _applied(records, now)
    new, new_fleet = _applied(columns, now)
    assert dataclasses.replace(new, raw=None) == dataclasses.replace(old, raw=None)
    assert list(new.gpu_samples()) == list(old.gpu_samples())
    assert list(new.gpu_messages()) == list(old.gpu_messages())
    assert new.gpu_sample_count() == old.gpu_sample_count() == 30
    assert new_fleet.snapshot() == old_fleet.snapshot()


def test_future_columns_rows_are_clamped_and_counted_as_records_are():
    now = time.time()
    records = batch(1, records=[gpu(0, now - 1), gpu(0, now + 3600), gpu(1, now + 7200)])
    old = decode_batch(records, received_s=now)
    new = decode_batch(as_columns(records), received_s=now)
    assert new.skewed == old.skewed == 2
    assert [g.time_s for g in new.gpus] == [g.time_s for g in old.gpus] == [now, now]
    assert (new.newest_sample_s, new.oldest_sample_s) == (old.newest_sample_s, old.oldest_sample_s)


def test_a_mixed_batch_takes_its_columns_rows_as_the_newest_of_each_gpu():
    now = time.time()
    msg = as_columns(batch(1, records=[gpu(0, now - 1, busy_pct=10.0), gpu(2, now - 1)]))
    # Records: an older sample of GPU 0 and one of GPU 5 (columns have none), an engine.
    msg.records.extend(batch(1, records=[gpu(0, now - 2, busy_pct=99.0), gpu(5, now - 3),
                                         engine(now - 2)]).records)  # fmt: skip
    decoded, fleet = _applied(msg, now)
    assert decoded.samples == 5 and len(decoded.engines) == 1
    newest = {g.gpu_index: g for g in decoded.gpus}
    assert sorted(newest) == [0, 2, 5]
    assert newest[0].busy_pct == 10.0  # the columns' row: records come first in a batch
    assert decoded.oldest_sample_s == pytest.approx(now - 2)  # the first record's GPU sample
    assert [s.gpu_index for s in decoded.gpu_samples()] == [0, 5, 0, 2]
    assert len(fleet.snapshot().gpus) == 3


def _poisoned(name: str, value: float) -> pb.Batch:
    now = time.time()
    samples = _samples(now - 5, ticks=3)
    samples[4] = dataclasses.replace(samples[4], **{name: value})  # type: ignore[arg-type]
    return batch(1, records=samples)


def _reason(msg: pb.Batch) -> RejectReason:
    with pytest.raises(PoisonBatch) as caught:
        decoded = decode_batch(msg, received_s=time.time())
        Fleet().check_labels(decoded)
    return caught.value.reason


@pytest.mark.parametrize("name", _DOUBLES)
@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, 1e12 + 1e6])
def test_poison_in_any_column_is_refused_with_the_reason_a_record_gets(name: str, value: float):
    if value == 1e12 + 1e6 and name in ("pcie_rx_bytes_per_s", "pcie_tx_bytes_per_s"):
        value = 2e12  # over their own ceiling (1e12)
    msg = _poisoned(name, value)
    assert _reason(as_columns(msg)) == _reason(msg) == RejectReason.INVALID_VALUE


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"time_s": 900_000_000.0}, RejectReason.BAD_TIME),
        ({"gpu_uuid": "GPU-\x1b[2J"}, RejectReason.BAD_IDENTITY),
        ({"mig_uuid": "MIG-\n"}, RejectReason.BAD_IDENTITY),
        ({"gpu_name": "H" * 300}, RejectReason.LABEL_TOO_LONG),
        ({"pods": (PodRef("p" * 300, "ns", "c"),)}, RejectReason.LABEL_TOO_LONG),
    ],
)
def test_bad_times_identities_and_labels_in_columns_get_the_records_reasons(
    change: dict[str, object], reason: RejectReason
):
    samples = _samples(time.time() - 5, ticks=3)
    samples[-1] = dataclasses.replace(samples[-1], **change)  # type: ignore[arg-type]
    msg = batch(1, records=samples)
    assert _reason(as_columns(msg)) == _reason(msg) == reason


def test_columns_that_do_not_fit_together_are_refused_as_bad_columns():
    msg = as_columns(batch(1, records=_samples(time.time() - 5, ticks=2)))
    msg.gpu_columns.power_w = msg.gpu_columns.power_w[:-8]
    assert _reason(msg) == RejectReason.BAD_COLUMNS


def test_poison_columns_are_rejected_in_band_and_the_stream_goes_on():
    server, fleet = start_server()
    try:
        now = time.time()
        good = as_columns(batch(1, records=_samples(now - 5, ticks=2)))
        bad = as_columns(_poisoned("power_w", math.nan))
        bad.seq = 2
        last = as_columns(batch(3, records=_samples(now - 4, ticks=2)))
        with AgentStream(f"127.0.0.1:{server.port}") as stream:
            for msg in (good, bad, last):
                stream.send(msg)
            stream.wait_acked(3)
            rejected = [a for a in stream.acks if a.rejected_seq]
        assert [(a.rejected_seq, a.error) for a in rejected] == [
            (2, "INVALID_ARGUMENT: gpu row 4: power_w is nan")
        ]
        counts = fleet.counts()
        assert counts.batches == 2 and counts.samples == 12
        assert dict(counts.rejected) == {"invalid_value": 1}
    finally:
        server.shutdown(timeout_s=1)


# ---- two real collectors: the outputs ----------------------------------------------------


@pytest.fixture
def pair() -> Iterator[list[tuple[Collector, Receiver]]]:
    """Two collectors, each remote-writing to a receiver of its own."""
    made = []
    for _ in range(2):
        receiver = Receiver()
        made.append((start_collector(receiver), receiver))
    yield made
    for collector, receiver in made:
        collector.shutdown(timeout_s=2)
        receiver.close()


def _scrape(c: Collector) -> list[str]:
    text = scrape(c)
    # Times taken on the collector's clock (ingest timings, lag, clock offset, last seen)
    # differ between the two collectors; every other line must not.
    timed = re.compile(
        r"rooftop_(collector_\w*second|agent_(lag|clock_offset|last_seen|staleness)\w*)"
    )
    # ... and each writes to its own receiver's port.
    text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)
    return [line for line in text.splitlines() if not timed.match(line)]


def test_columns_and_records_give_the_same_exposition_and_remote_write_points(pair):
    now = time.time()
    batches = [batch(1, records=_samples(now - 10)), batch(2, records=_samples(now - 9))]
    for (collector, _), as_sent in zip(pair, (batches, [as_columns(b) for b in batches]),
                                       strict=True):  # fmt: skip
        with AgentStream(f"127.0.0.1:{collector.ingest.port}") as stream:
            for msg in as_sent:
                stream.send(msg)
            stream.wait_acked(2)
        assert collector.flush(10)
    (old, old_rx), (new, new_rx) = pair
    old_gpus = {(g.gpu_index, g.mig_uuid): g.sample for g in old.fleet.snapshot().gpus}
    assert {(g.gpu_index, g.mig_uuid): g.sample for g in new.fleet.snapshot().gpus} == old_gpus
    assert len(old_gpus) == 3
    assert _scrape(new) == _scrape(old)
    points = sorted(old_rx.points(), key=repr)
    assert len(points) > 60 * 10  # every sample of every series, not only the newest
    assert sorted(new_rx.points(), key=repr) == points
