"""Batcher: seq numbering per boot, and splits that keep each batch within both limits."""

from __future__ import annotations

from rooftop.agent.batcher import Batcher
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
