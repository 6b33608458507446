"""Batcher: numbers the agent's batches and keeps each within the transport limits.

Batches are numbered per boot (agent_id, boot_id, seq 1, 2, 3 …) and split to stay
within ≤ 1 MiB and ≤ 500 samples *before* a seq is given, so a split never collides
with the collector's de-duplication by (agent, boot, seq). Pure: the model's samples
(or messages) in, protobuf out.

With ``columns`` the GPU samples of each batch travel as ``Batch.gpu_columns``
(``rooftop.common.columns``): smaller, and a quarter of the collector's CPU per sample.
Only collectors that know the field read it (older ones ignore it: the samples would
be lost), so ``batch_format = "columns"`` is the operator's word that every collector
is upgraded (docs/OPERATOR-GUIDE.md, "Upgrade and roll back"). The default, ``"auto"``,
sets ``columns`` while the last ack said the collector reads them (``Ack.columns``);
the stream turns a batch into what the collector it goes to reads
(``to_columns``, ``to_records``). The model's GPU samples are encoded straight into
columns (``encode_samples``); GPU samples handed over as messages go as columns only
where columns carry them exactly (a time in whole microseconds), else stay records.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Sequence

from rooftop.common.codec import record_to_proto
from rooftop.common.columns import Columns, ColumnsProblem, columnable, encode, encode_samples
from rooftop.common.model import GpuSample, Record
from rooftop.v1 import telemetry_pb2 as pb

__all__ = [
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_MAX_BATCH_SAMPLES",
    "STATS_MAX_BYTES",
    "Batcher",
    "to_columns",
    "to_records",
]

DEFAULT_MAX_BATCH_BYTES = 1024 * 1024
DEFAULT_MAX_BATCH_SAMPLES = 500
_BATCH_OVERHEAD_BYTES = 1024  # ids, seq, stats, sent_time: a few hundred bytes in practice
# AgentStats, sent_time and acked_seq as the stream sets them on a numbered batch: 10
# counters and acked_seq at their largest (2^64 - 1) and a year-9999 sent_time take
# 140 bytes; the rest is room for counters to come (tests/agent/test_batcher.py holds
# the sum to this).
STATS_MAX_BYTES = 256
_FIELD_OVERHEAD_BYTES = 6  # tag + length varint of one repeated element (≤ 1 MiB)


class Batcher:
    """Numbers batches per boot and keeps each within the transport limits."""

    def __init__(
        self,
        agent_id: str,
        boot_id: str,
        *,
        hostname: str | None = None,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_batch_samples: int = DEFAULT_MAX_BATCH_SAMPLES,
        columns: bool = False,
    ) -> None:
        self.agent_id = agent_id
        self.boot_id = boot_id
        self.hostname = socket.gethostname() if hostname is None else hostname
        self.max_batch_bytes = max_batch_bytes
        self.max_batch_samples = max_batch_samples
        self.columns = columns  # GPU samples as Batch.gpu_columns (newer collectors only)
        self.last_seq = 0

    def make(
        self, records: Sequence[Record | pb.TraceRecord], verdicts: Sequence[pb.Verdict] = ()
    ) -> list[pb.Batch]:
        """Batches holding ``records`` then ``verdicts``, each within both limits.

        Records are the model's samples (as the daemon hands them over) or messages.
        Records keep their order; verdicts ride with the last records (they describe
        the window that just ended). With ``columns`` the model's GPU samples come first,
        encoded straight into ``gpu_columns`` (``encode_samples``: no message made of
        each), the other records after them. Nothing in, nothing out: no empty batches.
        """
        budget = self.max_batch_bytes - _BATCH_OVERHEAD_BYTES
        budget -= len(self.agent_id) + len(self.boot_id) + len(self.hostname)
        parts: list[pb.Batch] = []
        size = samples = 0
        gpus = [r for r in records if isinstance(r, GpuSample)] if self.columns else []
        if gpus:
            chunks = self._gpu_chunks(gpus, budget)
            for cols, _, _ in chunks:
                parts.append(self._new())
                parts[-1].gpu_columns.CopyFrom(cols)
            _, size, samples = chunks[-1]  # the other records fill the last one up
            records = [r for r in records if not isinstance(r, GpuSample)]
        items: list[pb.TraceRecord | pb.Verdict] = [
            r if isinstance(r, pb.TraceRecord) else record_to_proto(r) for r in records
        ]
        items.extend(verdicts)
        current = parts[-1] if parts else None
        for item in items:
            item_bytes = item.ByteSize() + _FIELD_OVERHEAD_BYTES
            is_sample = isinstance(item, pb.TraceRecord)
            full = size + item_bytes > budget or (is_sample and samples >= self.max_batch_samples)
            if current is None or (full and (size or samples)):
                current = self._new()
                parts.append(current)
                size = samples = 0
            if isinstance(item, pb.TraceRecord):
                current.records.append(item)
                samples += 1
            else:
                current.verdicts.append(item)
            size += item_bytes
        if self.columns and not gpus:
            for batch in parts:  # GPU samples handed over as messages
                to_columns(batch, self.max_batch_bytes)
        return parts

    def _gpu_chunks(
        self, gpus: Sequence[GpuSample], budget: int
    ) -> list[tuple[pb.GpuColumns, int, int]]:
        """``gpus`` as columns, in order: (columns, bytes, rows) per batch's worth.

        At most ``max_batch_samples`` rows each; a chunk over ``budget`` bytes is halved
        until it fits (a lone row goes as it is: the stream drops what is over its cap).
        """
        step = max(1, self.max_batch_samples)
        pending = [gpus[i : i + step] for i in range(0, len(gpus), step)]
        out: list[tuple[pb.GpuColumns, int, int]] = []
        while pending:
            chunk = pending.pop(0)
            cols = encode_samples(chunk)
            size = cols.ByteSize() + _FIELD_OVERHEAD_BYTES
            if size > budget and len(chunk) > 1:
                half = len(chunk) // 2
                pending[:0] = [chunk[:half], chunk[half:]]
                continue
            out.append((cols, size, len(chunk)))
        return out

    def _new(self) -> pb.Batch:
        self.last_seq += 1
        return pb.Batch(
            agent_id=self.agent_id,
            boot_id=self.boot_id,
            seq=self.last_seq,
            hostname=self.hostname,
        )


def to_columns(batch: pb.Batch, max_bytes: int) -> bool:
    """Move ``batch``'s GPU samples into ``gpu_columns``, if all of them fit exactly.

    Other records (engine, host) stay records. The split above sized the batch by its
    records; columns are smaller in practice, and a batch they would make larger than
    ``max_bytes`` (few samples, many small integers) stays as it is. Only the batch as
    the batcher makes it is carried over (identity, records, verdicts): the stream
    calls this before it sets stats, sent_time and acked_seq.

    Returns:
        Whether the GPU samples now travel as columns.
    """
    gpus = [rec.gpu for rec in batch.records if rec.HasField("gpu")]
    if not gpus or batch.HasField("gpu_columns") or not all(map(columnable, gpus)):
        return False
    columnar = pb.Batch(
        agent_id=batch.agent_id, boot_id=batch.boot_id, seq=batch.seq, hostname=batch.hostname
    )
    columnar.records.extend(rec for rec in batch.records if not rec.HasField("gpu"))
    columnar.verdicts.extend(batch.verdicts)
    columnar.gpu_columns.CopyFrom(encode(gpus))
    if columnar.ByteSize() + _BATCH_OVERHEAD_BYTES > max_bytes:
        return False
    batch.CopyFrom(columnar)
    return True


def to_records(batch: pb.Batch) -> bool:
    """Move ``batch``'s ``gpu_columns`` back into records (GPU records first), in place.

    For a batch made as columns that goes to a collector that has not said it reads
    them (batch format ``auto``: a failover, or a new stream before its first ack). The
    agent's own columns always decode; their values are not judged here (the collector
    judges them as records). Records take more bytes (~1.6x at 10 Hz, bench_spool.py):
    within the default limits (1 MiB batches, 4 MiB messages) a batch always fits; the
    stream drops and counts one that would not. Returns whether the batch changed.
    """
    if not batch.HasField("gpu_columns"):
        return False
    reader = Columns.read(batch.gpu_columns, earliest_s=-math.inf, values=False)
    if isinstance(reader, ColumnsProblem):  # not what encode_samples makes: leave it be
        return False
    records = pb.Batch(
        agent_id=batch.agent_id, boot_id=batch.boot_id, seq=batch.seq, hostname=batch.hostname
    )
    records.records.extend(record_to_proto(sample) for sample in reader.samples())
    records.records.extend(batch.records)
    records.verdicts.extend(batch.verdicts)
    batch.CopyFrom(records)
    return True
