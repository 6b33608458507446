"""Batcher: numbers the agent's batches and keeps each within the transport limits.

Batches are numbered per boot (agent_id, boot_id, seq 1, 2, 3 …) and split to stay
within ≤ 1 MiB and ≤ 500 samples *before* a seq is given, so a split never collides
with the collector's de-duplication by (agent, boot, seq). Pure: protobuf in and out.

With ``columns`` the GPU samples of each batch travel as ``Batch.gpu_columns``
(``rooftop.common.columns``): smaller, and a quarter of the collector's CPU per sample.
Only collectors that know the field read it (older ones ignore it: the samples would
be lost), so ``batch_format = "columns"`` is the operator's word that every collector
is upgraded (docs/OPERATOR-GUIDE.md, "Upgrade and roll back"). The default, ``"auto"``,
makes records here and lets the stream turn them into columns (``to_columns``) on a
stream whose collector has said it reads them (``Ack.columns``). A batch whose GPU
samples columns cannot carry exactly stays in records.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from rooftop.common.columns import columnable, encode
from rooftop.v1 import telemetry_pb2 as pb

__all__ = [
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_MAX_BATCH_SAMPLES",
    "STATS_MAX_BYTES",
    "Batcher",
    "to_columns",
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
        self, records: Sequence[pb.TraceRecord], verdicts: Sequence[pb.Verdict] = ()
    ) -> list[pb.Batch]:
        """Batches holding ``records`` then ``verdicts``, each within both limits.

        Records keep their order; verdicts ride with the last records (they describe
        the window that just ended). Nothing in, nothing out: no empty batches.
        """
        budget = self.max_batch_bytes - _BATCH_OVERHEAD_BYTES
        budget -= len(self.agent_id) + len(self.boot_id) + len(self.hostname)
        parts: list[pb.Batch] = []
        current: pb.Batch | None = None
        size = samples = 0
        items: list[pb.TraceRecord | pb.Verdict] = [*records, *verdicts]
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
        if self.columns:
            for batch in parts:
                to_columns(batch, self.max_batch_bytes)
        return parts

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
