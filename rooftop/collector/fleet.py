"""Fleet state: what the collector knows about every agent, GPU and engine.

Two halves, both free of sockets:

- ``decode_batch`` validates one ``pb.Batch`` and decodes what the fleet keeps (the
  newest sample per GPU, every engine sample, the verdicts, the agent's in-band
  stats). A batch that cannot be applied raises ``PoisonBatch`` with a reason; the
  ingest rejects it in-band and the stream goes on.
- ``Fleet`` holds the latest state under one lock. Entries are frozen dataclasses
  replaced whole on update, so ``snapshot()`` is a cheap shallow copy that
  observable-gauge callbacks (other threads) and a query API can read without
  holding the lock.

Clock policy: a sample time more than ``max_future_skew_s`` ahead of the
collector's clock is **clamped** to the receive time and counted
(``rooftop.collector.skewed``), not rejected: a node with a broken NTP still
measures its GPUs correctly, and that is the moment an operator wants its
telemetry. Every timestamp a batch carries is clamped so, verdict windows included.
The agent's apparent clock offset stays visible per agent. Which sample or verdict
is the newest is decided by the agent's own order where its clock is not to be
believed: within one boot by ``seq`` (the batcher numbers batches as it samples),
across boots by arrival when the batch's clock offset is beyond
``max_future_skew_s``; agent timestamps decide only across boots of a sane clock.
Absurd values are poison (``bad_time``: nanos outside 0..999,999,999, before
2000-01-01; any time ahead is clamped instead; ``invalid_value``: beyond a
physical ceiling, ``model.UPPER_BOUNDS``; ``bad_identity``: an identity field with
control or non-printing characters, ``rooftop.common.text``; over-long ones are
``label_too_long``).

Cardinality is bounded (``FleetLimits``: agents, GPUs and engines, in all and per
agent, and label length): past a bound what is *new* is refused and counted
(``rooftop.collector.limited``), what is known goes on being updated, so memory and
the scrape stay the size of the limits whatever a client claims
(docs/OPERATOR-GUIDE.md, "Bounds under abuse").
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from itertools import chain
from math import isfinite
from operator import attrgetter
from typing import Protocol, TypeVar, cast

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.timestamp_pb2 import Timestamp

from rooftop.common.codec import record_from_proto, record_to_proto, verdict_from_proto
from rooftop.common.columns import Columns, micros_s
from rooftop.common.errors import RooftopError
from rooftop.common.model import (
    PCT_SLACK,
    PERCENT_FIELDS,
    UPPER_BOUNDS,
    EngineSample,
    GpuSample,
    HostSample,
    Verdict,
)
from rooftop.common.text import identity_problem
from rooftop.v1 import telemetry_pb2 as pb

__all__ = [
    "EARLIEST_TIME_S",
    "AgentCounters",
    "AgentState",
    "BatchObserver",
    "CollectorCounts",
    "DecodedBatch",
    "EngineState",
    "Fleet",
    "FleetLimits",
    "FleetSnapshot",
    "GpuState",
    "LimitReason",
    "OverLimit",
    "PoisonBatch",
    "RejectReason",
    "check_identity",
    "decode_batch",
]

_PCT = frozenset(PERCENT_FIELDS)
_FLOATING = frozenset({FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT})
_GPU_DOUBLES = [f.name for f in pb.GpuSample.DESCRIPTOR.fields if f.cpp_type in _FLOATING]
_GPU_PCT = attrgetter(*(n for n in _GPU_DOUBLES if n in _PCT))
_GPU_REST = attrgetter(*(n for n in _GPU_DOUBLES if n not in _PCT))
_SECONDS = attrgetter("time.seconds")
# A device: a GPU, or one MIG instance of it (its index is the parent's).
_GPU_DEVICE = attrgetter("gpu_index", "mig_uuid")
_GPU_NAME_FIELDS = ("gpu_uuid", "gpu_name", "mig_uuid")
_GPU_NAMES = attrgetter(*_GPU_NAME_FIELDS)
_GPU_NAME_GETTERS = tuple(map(attrgetter, _GPU_NAME_FIELDS))
_NANOS = attrgetter("time.nanos")
# Floating GPU fields with a physical ceiling: (position in a message's _GPU_REST
# values, ceiling), so a batch's values of one field are a slice of the flat list.
_REST_NAMES = [n for n in _GPU_DOUBLES if n not in _PCT]
_GPU_BOUNDED = [(i, UPPER_BOUNDS[n]) for i, n in enumerate(_REST_NAMES) if n in UPPER_BOUNDS]
# A timestamp before this (2000-01-01T00:00:00Z) is a clock that was never set (or
# year 0001, which no datetime can print): rejected, counted as ``bad_time``. One
# ahead of the collector, however far (year 9999), is clamped to the receive time
# instead: clamped, it can mislead nothing, and a node with a broken clock still
# measures its GPUs.
EARLIEST_TIME_S = 946_684_800
_MAX_NANOS = 999_999_999


class RejectReason(StrEnum):
    """Why a batch was refused (the ``rooftop.reject.reason`` attribute)."""

    MISSING_IDENTITY = "missing_identity"  # no agent_id / boot_id, or seq 0
    EMPTY_RECORD = "empty_record"  # a TraceRecord holding none of gpu, engine, host
    MISSING_TIME = "missing_time"  # a sample without a timestamp
    INVALID_VALUE = "invalid_value"  # NaN, infinite, negative, over 100 %, over a ceiling
    BAD_ENUM = "bad_enum"  # a verdict, cause, provenance or regime we do not know
    BAD_IDENTITY = "bad_identity"  # an identity string with control characters, or too long
    BAD_TIME = "bad_time"  # nanos outside 0..999,999,999, or dated before 2000
    LABEL_TOO_LONG = "label_too_long"  # an identity or label over max_label_bytes
    BAD_COLUMNS = "bad_columns"  # GPU columns that do not fit together (lengths, indices)
    UNREADABLE = "unreadable"  # not a Batch at all: the stream ends INVALID_ARGUMENT


class LimitReason(StrEnum):
    """What a cardinality or abuse bound refused (the ``rooftop.limit.reason`` attribute)."""

    AGENTS = "agents"  # a new agent past max_agents: its stream ends RESOURCE_EXHAUSTED
    GPUS = "gpus"  # a new GPU past max_gpus (the whole collector): not kept
    GPUS_PER_AGENT = "gpus_per_agent"  # a new GPU past max_gpus_per_agent: not kept
    ENGINES = "engines"  # a new engine past max_engines: not kept
    ENGINES_PER_AGENT = "engines_per_agent"  # a new engine past max_engines_per_agent
    UNREAD_ACKS = "unread_acks"  # a stream whose client stopped reading acks: closed
    SCRAPE_CONNECTIONS = "scrape_connections"  # a Prometheus connection closed by a bound


@dataclass(frozen=True, slots=True)
class FleetLimits:
    """Bounds on what the fleet holds, so a flood of identities costs bounded memory.

    Each bound refuses only what is *new* past it: agents, GPUs and engines already
    known keep being updated. Refusals are counted (``rooftop.collector.limited``).
    At the defaults a scrape stays well inside Prometheus' 10 s timeout
    (docs/OPERATOR-GUIDE.md, "Bounds under abuse").
    """

    max_agents: int = 2048
    max_gpus: int = 8192
    max_gpus_per_agent: int = 64  # 8 GPUs x 7 MIG instances fit
    max_engines: int = 8192
    max_engines_per_agent: int = 32
    max_label_bytes: int = 256


class OverLimit(RooftopError):
    """A batch from a new agent past ``max_agents``: nothing of it was applied.

    Raised by ``Fleet.apply``, caught by the ingest, which ends the stream with
    RESOURCE_EXHAUSTED (the agent keeps the batch and retries later).
    """

    def __init__(self, reason: LimitReason, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class PoisonBatch(RooftopError):
    """A batch that can never be applied; the ingest rejects it in-band and goes on.

    Raised by ``decode_batch`` only, caught by the ingest: it never reaches a user.
    """

    def __init__(self, reason: RejectReason, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class AgentCounters:
    """An agent's self-metrics as it reported them in-band (``pb.AgentStats``)."""

    queued: int = 0
    sent: int = 0
    acked: int = 0
    dropped_spool_full: int = 0
    dropped_corrupt: int = 0
    dropped_invalid: int = 0
    reconnects: int = 0
    rejected_batches: int = 0
    engine_scrape_errors: int = 0  # failed engine /metrics scrapes (per boot)
    acks_refused: int = 0  # acks of seqs the agent never sent: refused (per boot)

    @classmethod
    def from_proto(cls, msg: pb.AgentStats) -> AgentCounters:
        """Copy the in-band stats of one batch."""
        return cls(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(cls)})

    def to_proto(self) -> pb.AgentStats:
        """The same counters as the in-band message (the query API answers with it)."""
        return pb.AgentStats(**dataclasses.asdict(self))


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """What the fleet keeps from one valid batch."""

    agent_id: str
    boot_id: str
    seq: int
    hostname: str
    sent_s: float | None
    gpus: tuple[GpuSample, ...]  # the newest sample of each GPU in the batch
    engines: tuple[EngineSample, ...]  # every engine sample, oldest first
    host: HostSample | None  # the newest host sample
    verdicts: tuple[Verdict, ...]
    stats: AgentCounters | None
    samples: int  # records in the batch
    newest_sample_s: float | None  # after clamping
    oldest_sample_s: float | None
    skewed: int  # samples whose time was clamped
    # False when sent_time is further than max_future_skew_s from the receive time:
    # the fleet then orders this batch by arrival, not by its timestamps.
    clock_believed: bool = True
    # The batch as it arrived, for outputs that need every sample (remote write).
    raw: pb.Batch | None = None
    # Its GPU columns, read and checked once (remote write reads every row from them):
    # derived from ``raw``, so not part of the batch's equality. Shared between the
    # ingest thread and remote write's senders: those use ``Columns.field_values``,
    # whose caches only ever take one value (``samples`` keeps per-call state).
    columns: Columns | None = dataclasses.field(default=None, compare=False, repr=False)

    def gpu_samples(self) -> Iterator[GpuSample]:
        """Every GPU sample of the batch, records' then columns' rows, times as sent.

        Decodes as it goes; empty without ``raw``. (Remote write reads ``raw`` and
        ``columns`` field by field instead; tests hold the two batch formats equal here.)
        """
        if self.raw is None:
            return
        for rec in self.raw.records:
            if rec.WhichOneof("record") == "gpu":
                yield cast(GpuSample, record_from_proto(rec))
        columns = self.gpu_columns()
        if columns is not None:
            yield from columns.samples()

    def gpu_messages(self) -> Iterator[pb.GpuSample]:
        """``gpu_samples`` as protobuf messages: the records' own, columns' rows encoded."""
        if self.raw is None:
            return
        for rec in self.raw.records:
            if rec.HasField("gpu"):
                yield rec.gpu
        columns = self.gpu_columns()
        if columns is not None:
            for sample in columns.samples():
                yield record_to_proto(sample).gpu

    def gpu_columns(self) -> Columns | None:
        """``raw``'s GPU columns: ``columns`` as decode_batch read and checked them.

        Read again only for a batch decoded elsewhere without them; None when it has
        none (or they do not read, which decode_batch refuses before any output).
        """
        if self.columns is not None:
            return self.columns
        if self.raw is None or not self.raw.HasField("gpu_columns"):
            return None
        columns = Columns.read(self.raw.gpu_columns, earliest_s=EARLIEST_TIME_S)
        return columns if isinstance(columns, Columns) else None

    def gpu_sample_count(self) -> int:
        """How many GPU samples ``gpu_samples`` yields, without decoding them."""
        if self.raw is None:
            return 0
        records = sum(1 for rec in self.raw.records if rec.HasField("gpu"))
        return records + self.raw.gpu_columns.rows


class BatchObserver(Protocol):
    """Something told about every applied batch (the OTel histograms, a test)."""

    def observe_batch(self, batch: DecodedBatch, received_s: float) -> None:
        """Called on the ingest's thread after the batch is applied; must not block."""


def _ts_s(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos * 1e-9


def _invalid_field(msg: pb.GpuSample | pb.EngineSample | pb.HostSample) -> str | None:
    """Mirror of ``rooftop.common.model.invalid_reason`` on the proto, without decoding it.

    ``ListFields`` visits only the fields that are set (C code), which keeps the
    per-sample cost of validation a few microseconds at 80k samples/s.
    """
    for fd, value in msg.ListFields():
        if fd.cpp_type not in _FLOATING:
            # uint fields cannot be negative or NaN; messages are checked below.
            continue
        if math.isnan(value) or math.isinf(value):
            return f"{fd.name} is {value}"
        if value < 0:
            return f"{fd.name} is negative ({value})"
        if fd.name in _PCT and value > 100 + PCT_SLACK:
            return f"{fd.name} is over 100 ({value})"
        if value > UPPER_BOUNDS.get(fd.name, math.inf):
            return f"{fd.name} is over its ceiling {UPPER_BOUNDS[fd.name]:g} ({value:g})"
    if isinstance(msg, pb.HostSample):
        if msg.HasField("cpu_pct") and msg.cpu_pct > 100 + PCT_SLACK:
            return f"cpu_pct is out of range ({msg.cpu_pct})"
        for proc in msg.processes:
            # Percent of ONE core: above 100 is legal (multi-threaded), NaN/negative not.
            if proc.HasField("cpu_pct") and (math.isnan(proc.cpu_pct) or proc.cpu_pct < 0):
                return f"process {proc.pid} cpu_pct is out of range ({proc.cpu_pct})"
    return None


def _check_verdict(msg: pb.Verdict, i: int) -> Verdict:
    try:
        verdict = verdict_from_proto(msg)
    except ValueError as exc:
        raise PoisonBatch(RejectReason.BAD_ENUM, f"verdict {i}: {exc}") from None
    numbers = [("confidence", verdict.confidence)]
    numbers += [(f"evidence {e.name}", e.value) for e in verdict.evidence]
    numbers += [(f"regime {b.value} share", s) for b, s in verdict.regimes]
    for name, value in numbers:
        if math.isnan(value) or math.isinf(value) or value < 0:
            raise PoisonBatch(RejectReason.INVALID_VALUE, f"verdict {i}: {name} is {value}")
    if verdict.confidence > 1:
        raise PoisonBatch(
            RejectReason.INVALID_VALUE, f"verdict {i}: confidence is over 1 ({verdict.confidence})"
        )
    return verdict


def check_identity(batch: pb.Batch) -> None:
    """Refuse a batch whose identity is missing or unsafe, before anything keys on it.

    The ingest calls this before de-duplication, so a boot id holding a newline never
    becomes a key, a log line or a label.

    Raises:
        PoisonBatch: ``missing_identity`` (no agent_id / boot_id, seq 0) or
            ``bad_identity`` (agent_id, boot_id or hostname with control or
            non-printing characters).
    """
    if not batch.agent_id or not batch.boot_id or batch.seq == 0:
        missing = [n for n in ("agent_id", "boot_id") if not getattr(batch, n)]
        if batch.seq == 0:
            missing.append("seq")
        raise PoisonBatch(RejectReason.MISSING_IDENTITY, f"batch has no {', '.join(missing)}")
    for name in ("agent_id", "boot_id", "hostname"):
        problem = identity_problem(name, getattr(batch, name))
        if problem is not None:
            raise PoisonBatch(RejectReason.BAD_IDENTITY, problem)


def _time_problem(ts: Timestamp) -> str | None:
    """Why ``ts`` is no time at all (see ``EARLIEST_TIME_S``), else None."""
    if not 0 <= ts.nanos <= _MAX_NANOS:
        return f"time has nanos {ts.nanos} (outside 0..999,999,999)"
    if ts.seconds < EARLIEST_TIME_S:
        return f"time {ts.seconds} s is before 2000-01-01"
    return None


def _gpu_problem(i: int, msg: pb.GpuSample) -> PoisonBatch | None:
    problem = _time_problem(msg.time)
    if problem is not None:
        return PoisonBatch(RejectReason.BAD_TIME, f"record {i} (gpu): {problem}")
    for name, value in zip(_GPU_NAME_FIELDS, _GPU_NAMES(msg), strict=True):
        problem = identity_problem(name, value)
        if problem is not None:
            return PoisonBatch(RejectReason.BAD_IDENTITY, f"record {i} (gpu): {problem}")
    return None


def _verdict(msg: pb.Verdict, i: int, clamped: Callable[[Timestamp], float]) -> Verdict:
    # Window times are clamped like sample times: a verdict dated an hour ahead would
    # otherwise outrank every later one by its window_end.
    for name in ("window_start", "window_end"):
        if msg.HasField(name) and (problem := _time_problem(getattr(msg, name))):
            raise PoisonBatch(RejectReason.BAD_TIME, f"verdict {i}: {name} {problem}")
    for name in ("gpu_uuid", "mig_uuid"):
        if problem := identity_problem(name, getattr(msg, name)):
            raise PoisonBatch(RejectReason.BAD_IDENTITY, f"verdict {i}: {problem}")
    verdict = _check_verdict(msg, i)
    start_s, end_s = clamped(msg.window_start), clamped(msg.window_end)
    if (start_s, end_s) == (verdict.window_start_s, verdict.window_end_s):
        return verdict
    return dataclasses.replace(verdict, window_start_s=start_s, window_end_s=end_s)


def decode_batch(
    batch: pb.Batch, *, received_s: float, max_future_skew_s: float = 300.0
) -> DecodedBatch:
    """Validate ``batch`` and decode what the fleet keeps.

    Args:
        batch: one batch off the stream.
        received_s: the collector's clock when it arrived (Unix epoch seconds).
        max_future_skew_s: a sample dated further ahead than this is clamped to
            ``received_s`` and counted in ``DecodedBatch.skewed``.

    Returns:
        The decoded batch.

    Raises:
        PoisonBatch: the batch can never be applied (the message says which record
            and field).
    """
    check_identity(batch)
    if batch.HasField("sent_time"):
        problem = _time_problem(batch.sent_time)
        if problem is not None:
            raise PoisonBatch(RejectReason.BAD_TIME, f"sent_time: {problem}")

    limit_s = received_s + max_future_skew_s
    records = batch.records
    n = len(records)
    # Hot path (80k samples/s): GPU samples are checked a whole batch at a time with
    # C-level map/min/max/sum over their values; only a batch that fails the quick
    # check is walked field by field to name the culprit. A record that is not a GPU
    # sample reads as an empty GpuSample (time 0) here and is handled on its own.
    gpu_msgs = [rec.gpu for rec in records]
    secs = list(map(_SECONDS, gpu_msgs))
    pct = list(chain.from_iterable(map(_GPU_PCT, gpu_msgs)))
    rest = list(chain.from_iterable(map(_GPU_REST, gpu_msgs)))
    if n and (
        max(pct) > 100 + PCT_SLACK
        or min(pct) < 0
        or min(rest) < 0
        or not isfinite(sum(pct) + sum(rest))  # NaN and inf, whatever min/max made of them
        or any(max(rest[i :: len(_REST_NAMES)]) > ceiling for i, ceiling in _GPU_BOUNDED)
    ):
        for i, msg in enumerate(gpu_msgs):
            problem = _invalid_field(msg)
            if problem is not None:
                raise PoisonBatch(RejectReason.INVALID_VALUE, f"record {i} (gpu): {problem}")
    # Identities and times the same way: distinct names and extreme times first.
    names = {name for get in _GPU_NAME_GETTERS for name in map(get, gpu_msgs)}
    nanos = list(map(_NANOS, gpu_msgs))
    if n and (
        min(nanos) < 0
        or max(nanos) > _MAX_NANOS
        or not all(map(str.isprintable, names))
    ):
        for i, msg in enumerate(gpu_msgs):
            if msg.time.seconds >= EARLIEST_TIME_S and (poison := _gpu_problem(i, msg)):
                raise poison

    # Engine, host, no time, or a GPU sample dated before 2000 (rejected below).
    others = [i for i, sec in enumerate(secs) if sec < EARLIEST_TIME_S]
    skewed = 0
    if n and max(secs) >= math.floor(limit_s):
        skewed = sum(1 for m in gpu_msgs if m.time.seconds > 0 and _ts_s(m.time) > limit_s)
    engine_msgs: list[tuple[int, pb.EngineSample]] = []
    host_msgs: list[pb.HostSample] = []
    for i in others:
        rec = records[i]
        kind = rec.WhichOneof("record")
        if kind is None:
            raise PoisonBatch(
                RejectReason.EMPTY_RECORD, f"record {i} holds none of gpu, engine, host"
            )
        other: pb.GpuSample | pb.EngineSample | pb.HostSample = getattr(rec, kind)
        if not other.HasField("time"):
            raise PoisonBatch(RejectReason.MISSING_TIME, f"record {i} ({kind}) has no time")
        problem = _time_problem(other.time)
        if problem is not None:
            raise PoisonBatch(RejectReason.BAD_TIME, f"record {i} ({kind}): {problem}")
        if isinstance(other, pb.EngineSample):
            for name in ("engine_id", "model"):
                problem = identity_problem(name, getattr(other, name))
                if problem is not None:
                    raise PoisonBatch(RejectReason.BAD_IDENTITY, f"record {i} (engine): {problem}")
        problem = _invalid_field(other)
        if problem is not None:
            raise PoisonBatch(RejectReason.INVALID_VALUE, f"record {i} ({kind}): {problem}")
        skewed += _ts_s(other.time) > limit_s
        if isinstance(other, pb.EngineSample):
            engine_msgs.append((i, other))
        elif isinstance(other, pb.HostSample):  # a GPU sample here was dated before 2000
            host_msgs.append(other)

    # GPU samples as columns (``rooftop.common.columns``): checked a column at a time,
    # with the same reasons as records; their rows come after the records' samples.
    columns: Columns | None = None
    if batch.HasField("gpu_columns"):
        read = Columns.read(batch.gpu_columns, earliest_s=EARLIEST_TIME_S)
        if not isinstance(read, Columns):
            raise PoisonBatch(RejectReason(read.reason), read.message)
        columns = read
        skewed += columns.times_beyond(limit_s)

    def clamped(t: Timestamp) -> float:
        t_s = _ts_s(t)
        return received_s if t_s > limit_s else t_s

    verdicts = tuple(_verdict(v, i, clamped) for i, v in enumerate(batch.verdicts))

    # The newest sample of each GPU (and MIG instance) is its last in the batch: the
    # agent's batcher appends samples as it takes them. Only those are decoded: 8 of a
    # 500-sample batch.
    indices: list[tuple[int, str] | None] = list(map(_GPU_DEVICE, gpu_msgs))
    not_gpu = {i for i in others if not records[i].HasField("gpu")}
    for i in not_gpu:
        indices[i] = None
    last = dict(zip(indices, range(n), strict=True))
    last.pop(None, None)
    gpus = tuple(_gpu_from_proto(records[i], clamped(gpu_msgs[i].time)) for i in last.values())
    if columns is not None and columns.rows:
        # A device in both: its columns' row is the later sample. Its metrics are
        # decoded when first read (an export, a query): most are replaced by the next
        # batch before anything reads them.
        merged = {(g.gpu_index, g.mig_uuid): g for g in gpus}
        for key, row in columns.device_rows().items():
            time_s = micros_s(columns.time_us(row))
            merged[key] = columns.lazy_sample(row, received_s if time_s > limit_s else time_s)
        gpus = tuple(merged.values())
    engines = sorted(
        (
            _with_time(cast(EngineSample, record_from_proto(records[i])), clamped(m.time))
            for i, m in engine_msgs
        ),
        key=lambda e: e.time_s,
    )
    host: HostSample | None = None
    if host_msgs:
        newest_host = max(host_msgs, key=lambda m: _ts_s(m.time))
        decoded_host = cast(HostSample, record_from_proto(pb.TraceRecord(host=newest_host)))
        host = _with_time(decoded_host, clamped(newest_host.time))
    times = [g.time_s for g in gpus] + [e.time_s for e in engines]
    times += [host.time_s] if host is not None else []
    # Oldest: the first GPU sample (batches are in time order), or an older engine/host one.
    first_gpu = next((i for i in range(n) if i not in not_gpu), None)
    firsts = [clamped(gpu_msgs[first_gpu].time)] if first_gpu is not None else []
    if first_gpu is None and columns is not None and columns.rows:
        first_s = micros_s(columns.time_us(0))
        firsts.append(received_s if first_s > limit_s else first_s)
    firsts += [clamped(m.time) for _, m in engine_msgs] + [clamped(m.time) for m in host_msgs]
    oldest_s = min(firsts) if firsts else None
    sent_s = _ts_s(batch.sent_time) if batch.HasField("sent_time") else None
    return DecodedBatch(
        agent_id=batch.agent_id,
        boot_id=batch.boot_id,
        seq=batch.seq,
        hostname=batch.hostname or batch.agent_id,
        sent_s=sent_s,
        gpus=gpus,
        engines=tuple(engines),
        host=host,
        verdicts=verdicts,
        stats=AgentCounters.from_proto(batch.stats) if batch.HasField("stats") else None,
        samples=len(batch.records) + (columns.rows if columns is not None else 0),
        newest_sample_s=max(times) if times else None,
        oldest_sample_s=oldest_s,
        skewed=skewed,
        clock_believed=sent_s is None or abs(received_s - sent_s) <= max_future_skew_s,
        raw=batch,
        columns=columns,
    )


# GpuSample's optional fields (None: not measured), the ones ``record_from_proto`` reads.
_GPU_OPTIONAL = tuple(
    f.name
    for f in dataclasses.fields(GpuSample)
    if "None" in str(f.type) and f.name in pb.GpuSample.DESCRIPTOR.fields_by_name
)


def _gpu_from_proto(record: pb.TraceRecord, time_s: float) -> GpuSample:
    """``record_from_proto`` of a GPU record, dated ``time_s``: the ingest's hot path.

    Presence is asked with ``filter`` and the values read with one ``attrgetter`` (C
    loops, not a comprehension over ~30 names), and the time is set once rather than
    replaced: 8 of these are most of a batch's decode. A sample with processes or pods
    takes the general path; tests hold the two equal.
    """
    msg = record.gpu
    if msg.processes or msg.pods:
        return _with_time(cast(GpuSample, record_from_proto(record)), time_s)
    has_field: Callable[[str], bool] = msg.HasField  # type: ignore[assignment]
    present: tuple[str, ...] = tuple(filter(has_field, _GPU_OPTIONAL))
    # attrgetter of one name returns the value itself, not a 1-tuple.
    values = attrgetter(*present)(msg) if len(present) > 1 else [getattr(msg, n) for n in present]
    return GpuSample(
        time_s=time_s,
        gpu_index=msg.gpu_index,
        gpu_uuid=msg.gpu_uuid,
        gpu_name=msg.gpu_name,
        lost=msg.lost,
        gpm_stale=msg.gpm_stale,
        xid_codes=tuple(msg.xid_codes),
        xid_code_counts=tuple(msg.xid_code_counts),
        mig_uuid=msg.mig_uuid,
        **dict(zip(present, values, strict=True)),
    )


_R = TypeVar("_R", GpuSample, EngineSample, HostSample)


def _with_time(record: _R, time_s: float) -> _R:
    # A clamped (future-dated) time replaces the raw one; the rest pass through as they are.
    if record.time_s == time_s:
        return record
    return dataclasses.replace(record, time_s=time_s)


# --- fleet state -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentState:
    """One agent as the collector last heard from it."""

    agent_id: str
    hostname: str
    boot_id: str
    first_seen_s: float
    last_seen_s: float  # collector clock at the last applied batch
    lag_s: float | None  # receive time - newest sample time of the last batch
    clock_offset_s: float | None  # receive time - the agent's sent_time (clock skew + network)
    stats: AgentCounters
    batches: int  # applied since the collector started
    samples: int


@dataclass(frozen=True, slots=True)
class GpuState:
    """One GPU: its latest sample, verdict and the latest engine sample that runs on it."""

    agent_id: str
    hostname: str
    gpu_index: int
    gpu_uuid: str
    gpu_name: str
    sample: GpuSample | None
    verdict: Verdict | None
    engine: EngineSample | None
    updated_s: float  # collector clock
    # Set for a MIG instance of ``gpu_index``: its "MIG-..." UUID (``gpu_uuid`` is the
    # parent's), which keys it apart from the parent and the parent's other instances.
    mig_uuid: str = ""
    # (boot_id, seq) of the batches that brought ``sample`` and ``verdict``: the
    # agent's own order, which outranks its clock (``_older``).
    sample_from: tuple[str, int] = ("", 0)
    verdict_from: tuple[str, int] = ("", 0)


@dataclass(frozen=True, slots=True)
class EngineState:
    """One inference engine on one agent: its latest sample and the GPUs it runs on."""

    agent_id: str
    hostname: str
    engine: EngineSample
    gpu_indices: tuple[int, ...]
    updated_s: float
    engine_from: tuple[str, int] = ("", 0)  # (boot_id, seq) of the batch that brought it


def _runs(gpu: GpuState, pid: int) -> bool:
    """Whether ``pid`` is in the GPU's (or MIG instance's) newest NVML process list."""
    return gpu.sample is not None and any(p.pid == pid for p in gpu.sample.processes)


def _older(held_from: tuple[str, int], held_s: float, batch: DecodedBatch, time_s: float) -> bool:
    """Whether what ``batch`` brings (dated ``time_s``) is older than what is held.

    Within one boot the batch ``seq`` decides: the agent numbers batches as it samples,
    so a stepped clock (NTP, an operator) cannot make a later sample look older. Across
    boots the timestamps decide, unless this batch's clock is not believed
    (``DecodedBatch.clock_believed``): then arrival does, as an agent sends oldest first.
    """
    boot_id, seq = held_from
    if boot_id == batch.boot_id:
        return seq > batch.seq
    return batch.clock_believed and held_s > time_s


@dataclass(frozen=True, slots=True)
class CollectorCounts:
    """The collector's own counters since it started."""

    batches: int = 0  # applied
    samples: int = 0  # records in applied batches
    duplicates: int = 0  # batches already applied (agent, boot, seq), dropped
    # ... of which a mark restored from state_dir caught: applied before a restart
    restored_duplicates: int = 0
    rejected: tuple[tuple[str, int], ...] = ()  # (reason, batches)
    skewed: int = 0  # samples dated in the future, clamped
    missing: int = 0  # seqs an agent skipped (its spool dropped them before sending)
    # seqs a stream skipped that the agent saw acked by another collector (not lost)
    acked_elsewhere: int = 0
    streams: int = 0  # open now
    refused: tuple[tuple[str, int], ...] = ()  # (reason, calls) refused by authentication
    limited: tuple[tuple[str, int], ...] = ()  # (reason, items) refused by a bound (LimitReason)


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    """An immutable view of the whole fleet at one instant."""

    taken_s: float
    agents: tuple[AgentState, ...]
    gpus: tuple[GpuState, ...]
    engines: tuple[EngineState, ...]
    counts: CollectorCounts
    # Several collectors: agents with a stream open here now, and (agent_id, since)
    # for those whose streams all closed (collector clock). Neither lists an agent
    # that never streamed here (direct OTLP, a fleet fed in process).
    connected: frozenset[str] = frozenset()
    disconnected_s: tuple[tuple[str, float], ...] = ()


_GpuKey = tuple[str, str]  # (agent_id, MIG uuid, else gpu uuid, else "#<index>")


def _gpu_key(agent_id: str, uuid: str, index: int, mig_uuid: str = "") -> _GpuKey:
    # A MIG instance shares its parent's index and uuid; its own MIG uuid is unique.
    return (agent_id, mig_uuid or uuid or f"#{index}")


class Fleet:
    """Thread-safe latest state of every agent, GPU and engine.

    ``apply`` runs on the ingest's thread; ``snapshot`` from any thread. Entries not
    updated for ``forget_after_s`` are dropped, so a decommissioned node's series
    disappear from the exporters instead of freezing at their last value.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        forget_after_s: float = 900.0,
        limits: FleetLimits | None = None,
        disconnected_series_s: float = 10.0,
    ) -> None:
        self._clock = clock
        self._forget_after_s = forget_after_s
        self._disconnected_series_s = disconnected_series_s
        # agent_id -> streams open now; agent_id -> when its last stream closed.
        self._open_streams: dict[str, int] = {}
        self._disconnected_s: dict[str, float] = {}
        self.limits = limits or FleetLimits()
        self._lock = threading.Lock()
        self._agents: dict[str, AgentState] = {}
        self._gpus: dict[_GpuKey, GpuState] = {}
        # agent_id -> its GPUs' keys: engine attribution looks at one agent's GPUs,
        # never the whole fleet's 8,000.
        self._agent_gpus: dict[str, set[_GpuKey]] = {}
        self._engines: dict[tuple[str, str], EngineState] = {}
        self._agent_engines: dict[str, set[tuple[str, str]]] = {}
        self._batches = 0
        self._samples = 0
        self._duplicates = 0
        self._restored_duplicates = 0
        self._rejected: dict[str, int] = {}
        self._skewed = 0
        self._missing = 0
        self._acked_elsewhere = 0
        self._streams = 0
        self._refused: dict[str, int] = {}
        self._limited: dict[str, int] = {}
        self._last_sweep_s = clock()
        self._last_full_sweep_s = -math.inf

    # -- counters (ingest) --

    def count_duplicate(self, *, restored: bool = False) -> None:
        """A batch already applied arrived again (a resend after a lost ack).

        Args:
            restored: a mark restored from the state directory caught it: the batch
                was applied before the collector restarted.
        """
        with self._lock:
            self._duplicates += 1
            self._restored_duplicates += restored

    def count_rejected(self, reason: RejectReason | str) -> None:
        """A batch was refused (poison); it is consumed and the stream goes on."""
        with self._lock:
            self._rejected[str(reason)] = self._rejected.get(str(reason), 0) + 1

    def count_refused(self, reason: str) -> None:
        """A call was refused by authentication before any handler ran (nothing applied)."""
        with self._lock:
            self._refused[reason] = self._refused.get(reason, 0) + 1

    def count_limited(self, reason: LimitReason, items: int = 1) -> None:
        """Something new was refused by a bound (``FleetLimits``, an unread stream)."""
        with self._lock:
            self._refuse(reason, items)

    def count_missing(self, batches: int) -> None:
        """An agent skipped ``batches`` seqs: its spool dropped them before sending."""
        with self._lock:
            self._missing += batches

    def count_acked_elsewhere(self, batches: int) -> None:
        """A stream skipped ``batches`` seqs that the agent saw another collector ack."""
        with self._lock:
            self._acked_elsewhere += batches

    def stream_opened(self) -> None:
        """An agent stream opened."""
        with self._lock:
            self._streams += 1

    def stream_closed(self) -> None:
        """An agent stream closed."""
        with self._lock:
            self._streams -= 1

    def agent_connected(self, agent_id: str) -> None:
        """A stream of ``agent_id`` opened here (the ingest learns who at its first batch)."""
        with self._lock:
            self._open_streams[agent_id] = self._open_streams.get(agent_id, 0) + 1
            self._disconnected_s.pop(agent_id, None)

    def agent_disconnected(self, agent_id: str, now_s: float) -> None:
        """A stream of ``agent_id`` closed at ``now_s`` (collector clock).

        When it was the agent's last one here, the agent has moved to another collector
        or is down: ``export_snapshot`` leaves out its GPUs and engines from
        ``disconnected_series_s`` on, so no GPU is exported by two collectors.
        """
        with self._lock:
            left = self._open_streams.get(agent_id, 0) - 1
            if left > 0:
                self._open_streams[agent_id] = left
                return
            self._open_streams.pop(agent_id, None)
            self._disconnected_s[agent_id] = now_s

    # -- state --

    def apply(self, batch: DecodedBatch, *, received_s: float) -> None:
        """Fold one decoded batch into the fleet state, within ``limits``.

        GPUs and engines new past their bounds are left out (and counted); the rest
        of the batch is applied. The ingest calls ``check_labels`` first.

        Raises:
            OverLimit: a new agent past ``max_agents`` (nothing applied).
        """
        with self._lock:
            if batch.agent_id not in self._agents and not self._room_for_agent(received_s):
                self._refuse(LimitReason.AGENTS)
                raise OverLimit(
                    LimitReason.AGENTS,
                    f"this collector holds max_agents ({self.limits.max_agents}) agents",
                )
            self._batches += 1
            self._samples += batch.samples
            self._skewed += batch.skewed
            self._apply_agent(batch, received_s)
            for sample in batch.gpus:
                self._apply_gpu(batch, sample, received_s)
            for verdict in batch.verdicts:
                self._apply_verdict(batch, verdict, received_s)
            for engine in batch.engines:
                self._apply_engine(batch, engine, received_s)
            if received_s - self._last_sweep_s > min(60.0, self._forget_after_s / 4):
                self._sweep(received_s)

    def check_labels(self, batch: DecodedBatch) -> None:
        """Refuse a batch with an identity or label longer than ``max_label_bytes``.

        Raises:
            PoisonBatch: ``LABEL_TOO_LONG``, naming the field.
        """
        label = _long_label(batch, self.limits.max_label_bytes)
        if label is not None:
            raise PoisonBatch(
                RejectReason.LABEL_TOO_LONG,
                f"{label} is longer than max_label_bytes ({self.limits.max_label_bytes})",
            )

    def _room_for_agent(self, now_s: float) -> bool:
        if len(self._agents) < self.limits.max_agents:
            return True
        # Full: forget the silent ones first, at most once a second (a flood of new
        # identities must not buy a sweep of the whole fleet per batch).
        if now_s - self._last_full_sweep_s >= 1.0:
            self._last_full_sweep_s = now_s
            self._sweep(now_s)
        return len(self._agents) < self.limits.max_agents

    def _refuse(self, reason: LimitReason, items: int = 1) -> None:
        # Under the lock: the caller holds it.
        self._limited[reason.value] = self._limited.get(reason.value, 0) + items

    def _room_for_gpu(self, agent_id: str) -> bool:
        if len(self._agent_gpus.get(agent_id, ())) >= self.limits.max_gpus_per_agent:
            self._refuse(LimitReason.GPUS_PER_AGENT)
            return False
        if len(self._gpus) >= self.limits.max_gpus:
            self._refuse(LimitReason.GPUS)
            return False
        return True

    def _apply_agent(self, batch: DecodedBatch, received_s: float) -> None:
        prev = self._agents.get(batch.agent_id)
        lag_s = (
            max(0.0, received_s - batch.newest_sample_s)
            if batch.newest_sample_s is not None
            else (prev.lag_s if prev else None)
        )
        self._agents[batch.agent_id] = AgentState(
            agent_id=batch.agent_id,
            hostname=batch.hostname,
            boot_id=batch.boot_id,
            first_seen_s=prev.first_seen_s if prev else received_s,
            last_seen_s=received_s,
            lag_s=lag_s,
            clock_offset_s=received_s - batch.sent_s if batch.sent_s is not None else None,
            stats=batch.stats or (prev.stats if prev else AgentCounters()),
            batches=(prev.batches if prev else 0) + 1,
            samples=(prev.samples if prev else 0) + batch.samples,
        )

    def _apply_gpu(self, batch: DecodedBatch, sample: GpuSample, received_s: float) -> None:
        key = _gpu_key(batch.agent_id, sample.gpu_uuid, sample.gpu_index, sample.mig_uuid)
        prev = self._gpus.get(key)
        if prev is not None and prev.sample is not None:
            if _older(prev.sample_from, prev.sample.time_s, batch, sample.time_s):
                return  # an outage drain delivers old samples after newer ones: keep the newest
        if prev is None and not self._room_for_gpu(batch.agent_id):
            return
        self._agent_gpus.setdefault(batch.agent_id, set()).add(key)
        self._gpus[key] = GpuState(
            agent_id=batch.agent_id,
            hostname=batch.hostname,
            gpu_index=sample.gpu_index,
            gpu_uuid=sample.gpu_uuid,
            gpu_name=sample.gpu_name or (prev.gpu_name if prev else ""),
            sample=sample,
            verdict=prev.verdict if prev else None,
            engine=prev.engine if prev else None,
            updated_s=received_s,
            mig_uuid=sample.mig_uuid,
            sample_from=(batch.boot_id, batch.seq),
            verdict_from=prev.verdict_from if prev else ("", 0),
        )

    def _find_gpu(self, agent_id: str, uuid: str, index: int, mig_uuid: str = "") -> _GpuKey:
        key = _gpu_key(agent_id, uuid, index, mig_uuid)
        if key in self._gpus or uuid or mig_uuid:
            return key
        # A verdict or engine naming only an index: find that GPU's uuid-keyed entry
        # (the GPU's own, never one of its MIG instances).
        for k in self._agent_gpus.get(agent_id, ()):
            if self._gpus[k].gpu_index == index and not self._gpus[k].mig_uuid:
                return k
        return key

    def _apply_verdict(self, batch: DecodedBatch, verdict: Verdict, received_s: float) -> None:
        key = self._find_gpu(batch.agent_id, verdict.gpu_uuid, verdict.gpu_index,
                             verdict.mig_uuid)
        prev = self._gpus.get(key)
        if prev is not None and prev.verdict is not None:
            if _older(prev.verdict_from, prev.verdict.window_end_s, batch, verdict.window_end_s):
                return
        if prev is None and not self._room_for_gpu(batch.agent_id):
            return
        name = prev.gpu_name if prev else verdict.gpu_name
        self._agent_gpus.setdefault(batch.agent_id, set()).add(key)
        self._gpus[key] = GpuState(
            agent_id=batch.agent_id,
            hostname=batch.hostname,
            gpu_index=verdict.gpu_index,
            gpu_uuid=verdict.gpu_uuid or (prev.gpu_uuid if prev else ""),
            gpu_name=name,
            sample=prev.sample if prev else None,
            # A copy only when the name differs: one per verdict was most of applying it.
            verdict=verdict
            if verdict.gpu_name == name
            else dataclasses.replace(verdict, gpu_name=name),
            engine=prev.engine if prev else None,
            updated_s=received_s,
            mig_uuid=verdict.mig_uuid,
            sample_from=prev.sample_from if prev else ("", 0),
            verdict_from=(batch.boot_id, batch.seq),
        )

    def _apply_engine(self, batch: DecodedBatch, engine: EngineSample, received_s: float) -> None:
        ekey = (batch.agent_id, engine.engine_id)
        prev = self._engines.get(ekey)
        if prev is not None and _older(prev.engine_from, prev.engine.time_s, batch, engine.time_s):
            return
        if prev is None:
            if len(self._agent_engines.get(batch.agent_id, ())) >= (
                self.limits.max_engines_per_agent
            ):
                self._refuse(LimitReason.ENGINES_PER_AGENT)
                return
            if len(self._engines) >= self.limits.max_engines:
                self._refuse(LimitReason.ENGINES)
                return
            self._agent_engines.setdefault(batch.agent_id, set()).add(ekey)
        indices = engine.gpu_indices or self._gpus_of_pid(batch.agent_id, engine.pid)
        self._engines[ekey] = EngineState(
            agent_id=batch.agent_id,
            hostname=batch.hostname,
            engine=engine,
            gpu_indices=indices,
            updated_s=received_s,
            engine_from=(batch.boot_id, batch.seq),
        )
        runs_on = self._engine_gpus(batch.agent_id, indices, engine.pid)
        for key in runs_on:
            gpu = self._gpus[key]
            self._gpus[key] = dataclasses.replace(gpu, engine=engine, updated_s=received_s)
        if runs_on:
            # Placed now: it leaves the GPUs it was on before and is not (a MIG sibling
            # or parent it was given before NVML listed its pid on one instance).
            # Placed nowhere (its pid not listed yet): where it was stays.
            placed = set(runs_on)
            for key in self._agent_gpus.get(batch.agent_id, ()):
                gpu = self._gpus[key]
                if (key not in placed and gpu.engine is not None
                        and gpu.engine.engine_id == engine.engine_id):  # fmt: skip
                    self._gpus[key] = dataclasses.replace(gpu, engine=None)

    def _engine_gpus(
        self, agent_id: str, indices: tuple[int, ...], pid: int | None
    ) -> list[_GpuKey]:
        """The GPUs (and MIG instances) of ``agent_id`` an engine on ``indices`` runs on.

        A GPU index names the GPU and all its MIG instances; where one instance's
        process list has the engine's pid, the engine is that instance's alone (not its
        siblings', nor the parent's, whose activity is its instances'). Otherwise, as
        with no pid or no process list (an unprivileged agent), every one of them.
        """
        keys = [k for k in self._agent_gpus.get(agent_id, ()) if self._gpus[k].gpu_index in indices]
        if pid is None:
            return keys
        holding = [k for k in keys if self._gpus[k].mig_uuid and _runs(self._gpus[k], pid)]
        held = {self._gpus[k].gpu_index for k in holding}
        return [k for k in keys if self._gpus[k].gpu_index not in held or k in holding]

    def _gpus_of_pid(self, agent_id: str, pid: int | None) -> tuple[int, ...]:
        # Attribute an engine to GPUs by its pid in NVML's process list (DESIGN §5).
        if pid is None:
            return ()
        gpus = (self._gpus[k] for k in self._agent_gpus.get(agent_id, ()))
        return tuple(
            sorted(
                g.gpu_index
                for g in gpus
                if g.sample is not None and any(p.pid == pid for p in g.sample.processes)
            )
        )

    def _sweep(self, now_s: float) -> None:
        self._last_sweep_s = now_s
        cutoff = now_s - self._forget_after_s
        _drop_older(self._agents, cutoff)
        _drop_older(self._gpus, cutoff)
        self._agent_gpus = {}
        for key in self._gpus:
            self._agent_gpus.setdefault(key[0], set()).add(key)
        _drop_older(self._engines, cutoff)
        for agent_id in [a for a in self._disconnected_s if a not in self._agents]:
            del self._disconnected_s[agent_id]  # forgotten: nothing left to leave out
        self._agent_engines = {}
        for ekey in self._engines:
            self._agent_engines.setdefault(ekey[0], set()).add(ekey)

    def forget_stale(self, now_s: float | None = None) -> None:
        """Drop entries not updated for ``forget_after_s`` (also done while applying)."""
        with self._lock:
            self._sweep(self._clock() if now_s is None else now_s)

    def counts(self) -> CollectorCounts:
        """The collector's own counters."""
        with self._lock:
            return self._counts()

    def _counts(self) -> CollectorCounts:
        return CollectorCounts(
            batches=self._batches,
            samples=self._samples,
            duplicates=self._duplicates,
            restored_duplicates=self._restored_duplicates,
            rejected=tuple(sorted(self._rejected.items())),
            skewed=self._skewed,
            missing=self._missing,
            acked_elsewhere=self._acked_elsewhere,
            streams=self._streams,
            refused=tuple(sorted(self._refused.items())),
            limited=tuple(sorted(self._limited.items())),
        )

    def snapshot(self) -> FleetSnapshot:
        """An immutable view of the fleet, safe to read from any thread."""
        with self._lock:
            return FleetSnapshot(
                taken_s=self._clock(),
                agents=tuple(self._agents.values()),
                gpus=tuple(self._gpus.values()),
                engines=tuple(self._engines.values()),
                counts=self._counts(),
                connected=frozenset(self._open_streams),
                disconnected_s=tuple(self._disconnected_s.items()),
            )

    def export_snapshot(self) -> FleetSnapshot:
        """What the exporters show: ``snapshot()`` less the GPUs and engines of moved agents.

        Left out: agents whose streams here closed over ``disconnected_series_s`` ago.
        Such an agent streams to another collector now (which exports its GPUs), or is
        down; either way its series stop here, so a GPU is not shown twice for longer
        than that. The agent itself stays (``rooftop.agent.staleness`` grows, and a
        dead agent still alerts) until ``forget_after_s``. An agent that never streamed
        here (direct OTLP, a fleet fed in process) is never left out.
        """
        with self._lock:
            # Called once per exported family per scrape: no stream sets copied here.
            snap = FleetSnapshot(
                taken_s=self._clock(),
                agents=tuple(self._agents.values()),
                gpus=tuple(self._gpus.values()),
                engines=tuple(self._engines.values()),
                counts=self._counts(),
            )
            cutoff_s = snap.taken_s - self._disconnected_series_s
            gone = {a for a, since_s in self._disconnected_s.items() if since_s <= cutoff_s}
        if not gone:
            return snap
        return dataclasses.replace(
            snap,
            gpus=tuple(g for g in snap.gpus if g.agent_id not in gone),
            engines=tuple(e for e in snap.engines if e.agent_id not in gone),
        )


def _long_label(batch: DecodedBatch, max_bytes: int) -> str | None:
    """The first identity or label of ``batch`` longer than ``max_bytes`` (UTF-8), or None.

    Every string the exporters turn into a label value is checked: one 1 MB host name
    would otherwise sit in every series of that agent.
    """
    named: list[tuple[str, str | None]] = [
        ("agent_id", batch.agent_id),
        ("boot_id", batch.boot_id),
        ("hostname", batch.hostname),
    ]
    # A columns block's labels are all in its string table: when no string there is
    # long, its rows' pods need not be decoded to know that none of them is.
    strings = batch.columns.strings if batch.columns is not None else ()
    short = max(map(len, strings), default=0) * 4 <= max_bytes
    for g in batch.gpus:
        named += [("gpu_uuid", g.gpu_uuid), ("gpu_name", g.gpu_name), ("mig_uuid", g.mig_uuid)]
        if short and type(g) is not GpuSample:  # a columns row (Columns.lazy_sample)
            continue
        for ref in g.pods:
            named += [("pod", ref.pod), ("namespace", ref.namespace), ("container", ref.container)]
    for e in batch.engines:
        named += [("engine_id", e.engine_id), ("model", e.model)]
    for v in batch.verdicts:
        named += [("verdict gpu_uuid", v.gpu_uuid), ("verdict mig_uuid", v.mig_uuid)]
    for name, value in named:
        # Characters first: a UTF-8 character is at most 4 bytes, so most need no encode.
        if value and len(value) * 4 > max_bytes and len(value.encode()) > max_bytes:
            return name
    return None


_K = TypeVar("_K")


def _drop_older(
    table: dict[_K, AgentState] | dict[_K, GpuState] | dict[_K, EngineState], cutoff_s: float
) -> None:
    stale = [
        k
        for k, v in table.items()
        if (v.last_seen_s if isinstance(v, AgentState) else v.updated_s) < cutoff_s
    ]
    for k in stale:
        del table[k]
