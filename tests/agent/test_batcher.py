"""Batcher: seq numbering per boot, and splits that keep each batch within both limits."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from rooftop.agent.batcher import (
    DEFAULT_MAX_BATCH_BYTES,
    STATS_MAX_BYTES,
    Batcher,
    to_records,
)
from rooftop.collector.fleet import decode_batch
from rooftop.common.codec import record_to_proto
from rooftop.common.model import GpuProcess, GpuSample, HostSample
from rooftop.v1 import telemetry_pb2 as pb
from tests.support import BOOT


def _records(n: int, pad: int = 0) -> list[pb.TraceRecord]:
    return [
        pb.TraceRecord(gpu=pb.GpuSample(gpu_index=i % 8, gpu_uuid="GPU-" + "x" * pad))
        for i in range(n)
    ]


def test_batcher_makes_no_empty_batches():
    batcher = Batcher("node-1", BOOT)
    assert batcher.make([]) == []
    (only,) = batcher.make([], [pb.Verdict(gpu_index=1)])
    assert only.seq == 1 and len(only.verdicts) == 1


def test_batcher_splits_at_the_sample_limit_keeping_order_and_numbering_each_part():
    batcher = Batcher("node-1", BOOT, hostname="h", max_batch_samples=500)
    parts = batcher.make(_records(1201), [pb.Verdict(gpu_index=3)])
    assert [len(b.records) for b in parts] == [500, 500, 201]
    assert [b.seq for b in parts] == [1, 2, 3]
    assert [len(b.verdicts) for b in parts] == [0, 0, 1]  # verdicts ride with the last records
    assert all((b.agent_id, b.boot_id, b.hostname) == ("node-1", BOOT, "h") for b in parts)
    (nxt,) = batcher.make(_records(1))
    assert nxt.seq == 4 and batcher.last_seq == 4


def test_batcher_splits_at_the_byte_limit_before_giving_a_seq():
    limit = 64 * 1024
    batcher = Batcher("node-1", BOOT, hostname="h", max_batch_bytes=limit)
    parts = batcher.make(_records(300, pad=1000))
    assert len(parts) > 1
    assert all(b.ByteSize() <= limit for b in parts)
    assert sum(len(b.records) for b in parts) == 300
    assert [b.seq for b in parts] == list(range(1, len(parts) + 1))


# ---- columns (batch_format = "columns") and the stats reserve ---------------------------


def _timed_records(n: int) -> list[pb.TraceRecord]:
    """GPU samples as the sampler makes them (times in whole microseconds), and a host one."""
    out = [record_to_proto(GpuSample(time_s=1_790_000_000 + i * 0.1, gpu_index=i % 8,
                                     busy_pct=50.0)) for i in range(n)]  # fmt: skip
    out.append(record_to_proto(HostSample(time_s=1_790_000_000.0, cpu_pct=12.5)))
    return out


def test_the_batcher_sends_gpu_samples_as_columns_only_when_enabled():
    records = _timed_records(1200)
    (plain, *_) = Batcher("node-1", BOOT, hostname="h").make(records)
    assert len(plain.records) == 500 and not plain.HasField("gpu_columns")
    parts = Batcher("node-1", BOOT, hostname="h", columns=True).make(
        records, [pb.Verdict(gpu_index=3)]
    )
    assert [b.seq for b in parts] == [1, 2, 3]
    assert [b.gpu_columns.rows for b in parts] == [500, 500, 200]
    assert [len(b.records) for b in parts] == [0, 0, 1]  # the host sample stays a record
    assert [len(b.verdicts) for b in parts] == [0, 0, 1]
    assert all(b.ByteSize() <= DEFAULT_MAX_BATCH_BYTES for b in parts)
    decoded = decode_batch(parts[0], received_s=1_790_000_100.0)
    assert decoded.samples == 500 and [g.gpu_index for g in decoded.gpus] == list(range(8))


def test_gpu_samples_columns_cannot_carry_exactly_stay_records():
    records = _timed_records(3)
    records[1].gpu.time.nanos += 1  # not whole microseconds
    (only,) = Batcher("node-1", BOOT, columns=True).make(records)
    assert not only.HasField("gpu_columns") and len(only.records) == 4


def _samples(n: int, pad: int = 0) -> list[GpuSample | HostSample]:
    """The model's samples, as the daemon hands them over: GPUs, then the host."""
    out: list[GpuSample | HostSample] = [
        GpuSample(time_s=1_790_000_000 + i / 7, gpu_index=i % 8, gpu_uuid=f"GPU-{i % 8}",
                  busy_pct=50.0, power_w=float(i),
                  processes=(GpuProcess(i, name=f"{i}-" + "x" * pad),) if pad else ())
        for i in range(n)
    ]  # fmt: skip
    out.append(HostSample(time_s=1_790_000_000.0, cpu_pct=12.5))
    return out


def test_model_samples_make_the_batches_their_messages_make():
    samples = _samples(20)
    verdicts = [pb.Verdict(gpu_index=3)]
    for columns in (False, True):
        from_model = Batcher("node-1", BOOT, hostname="h", columns=columns).make(
            samples, verdicts
        )
        from_messages = Batcher("node-1", BOOT, hostname="h", columns=columns).make(
            [record_to_proto(s) for s in samples], verdicts
        )
        assert from_model == from_messages
        assert from_model[0].HasField("gpu_columns") is columns


def test_model_gpu_samples_go_as_columns_split_at_the_sample_limit_the_rest_after():
    parts = Batcher("node-1", BOOT, hostname="h", columns=True).make(
        _samples(1200), [pb.Verdict(gpu_index=3)]
    )
    assert [b.seq for b in parts] == [1, 2, 3]
    assert [b.gpu_columns.rows for b in parts] == [500, 500, 200]
    assert [len(b.records) for b in parts] == [0, 0, 1]  # the host sample, with the last
    assert [len(b.verdicts) for b in parts] == [0, 0, 1]
    decoded = decode_batch(parts[0], received_s=1_790_000_500.0)
    assert decoded.samples == 500 and [g.gpu_index for g in decoded.gpus] == list(range(8))


def test_model_gpu_columns_over_the_byte_limit_are_halved_until_they_fit():
    limit = 64 * 1024
    parts = Batcher("node-1", BOOT, hostname="h", max_batch_bytes=limit, columns=True).make(
        _samples(400, pad=900)  # a name of its own per row: ~1 kB a row
    )
    assert len(parts) > 1 and all(b.ByteSize() <= limit for b in parts)
    assert sum(b.gpu_columns.rows for b in parts) == 400
    assert sum(len(b.records) for b in parts) == 1
    assert [b.seq for b in parts] == list(range(1, len(parts) + 1))


def test_columns_go_back_to_the_records_their_samples_make():
    samples = _samples(12)
    (columnar,) = Batcher("node-1", BOOT, hostname="h", columns=True).make(
        samples, [pb.Verdict(gpu_index=3)]
    )
    (records,) = Batcher("node-1", BOOT, hostname="h").make(samples, [pb.Verdict(gpu_index=3)])
    assert to_records(columnar) and columnar == records
    assert not to_records(columnar)  # records already: unchanged
    assert columnar == records


def test_the_stats_reserve_holds_every_counter_at_its_largest_with_room_to_spare():
    largest = 2**64 - 1
    stats = pb.AgentStats(**{f.name: largest for f in pb.AgentStats.DESCRIPTOR.fields})
    msg = pb.Batch(stats=stats, acked_seq=largest)  # as the stream sets them, at their largest
    msg.sent_time.CopyFrom(Timestamp(seconds=253_402_300_799, nanos=999_999_999))  # year 9999
    # Room for four more counters (11 bytes each at their largest) before it is too small.
    assert msg.ByteSize() + 4 * 11 <= STATS_MAX_BYTES
