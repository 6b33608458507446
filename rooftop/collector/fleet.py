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
telemetry. The agent's apparent clock offset stays visible per agent.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from itertools import chain
from math import isfinite
from operator import attrgetter
from typing import Protocol, TypeVar, cast

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.timestamp_pb2 import Timestamp

from rooftop.common.codec import record_from_proto, verdict_from_proto
from rooftop.common.errors import RooftopError
from rooftop.common.model import (
    PERCENT_FIELDS,
    EngineSample,
    GpuSample,
    HostSample,
    Verdict,
)
from rooftop.v1 import telemetry_pb2 as pb

__all__ = [
    "AgentCounters",
    "AgentState",
    "BatchObserver",
    "CollectorCounts",
    "DecodedBatch",
    "EngineState",
    "Fleet",
    "FleetSnapshot",
    "GpuState",
    "PoisonBatch",
    "RejectReason",
    "decode_batch",
]

# NVML / GPM rounding can overshoot 100 by a hair (rooftop.common.model uses the same slack).
_PCT_SLACK = 0.5
_PCT = frozenset(PERCENT_FIELDS)
_FLOATING = frozenset({FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT})
_GPU_DOUBLES = [f.name for f in pb.GpuSample.DESCRIPTOR.fields if f.cpp_type in _FLOATING]
_GPU_PCT = attrgetter(*(n for n in _GPU_DOUBLES if n in _PCT))
_GPU_REST = attrgetter(*(n for n in _GPU_DOUBLES if n not in _PCT))
_SECONDS = attrgetter("time.seconds")
# A device: a GPU, or one MIG instance of it (its index is the parent's).
_GPU_DEVICE = attrgetter("gpu_index", "mig_uuid")


class RejectReason(StrEnum):
    """Why a batch was refused (the ``rooftop.reject.reason`` attribute)."""

    MISSING_IDENTITY = "missing_identity"  # no agent_id / boot_id, or seq 0
    EMPTY_RECORD = "empty_record"  # a TraceRecord holding none of gpu, engine, host
    MISSING_TIME = "missing_time"  # a sample without a timestamp
    INVALID_VALUE = "invalid_value"  # NaN, infinite, negative, a percentage over 100
    BAD_ENUM = "bad_enum"  # a verdict, cause, provenance or regime we do not know


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
        if fd.name in _PCT and value > 100 + _PCT_SLACK:
            return f"{fd.name} is over 100 ({value})"
    if isinstance(msg, pb.HostSample):
        if msg.HasField("cpu_pct") and msg.cpu_pct > 100 + _PCT_SLACK:
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
    if not batch.agent_id or not batch.boot_id or batch.seq == 0:
        missing = [n for n in ("agent_id", "boot_id") if not getattr(batch, n)]
        if batch.seq == 0:
            missing.append("seq")
        raise PoisonBatch(RejectReason.MISSING_IDENTITY, f"batch has no {', '.join(missing)}")

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
        max(pct) > 100 + _PCT_SLACK
        or min(pct) < 0
        or min(rest) < 0
        or not isfinite(sum(pct) + sum(rest))  # NaN and inf, whatever min/max made of them
    ):
        for i, msg in enumerate(gpu_msgs):
            problem = _invalid_field(msg)
            if problem is not None:
                raise PoisonBatch(RejectReason.INVALID_VALUE, f"record {i} (gpu): {problem}")

    others = [i for i, sec in enumerate(secs) if sec <= 0]  # engine, host, or no time
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
        if isinstance(other, pb.GpuSample):
            continue  # dated at or before the epoch: odd, but a GPU sample all the same
        problem = _invalid_field(other)
        if problem is not None:
            raise PoisonBatch(RejectReason.INVALID_VALUE, f"record {i} ({kind}): {problem}")
        skewed += _ts_s(other.time) > limit_s
        if isinstance(other, pb.EngineSample):
            engine_msgs.append((i, other))
        else:
            host_msgs.append(other)

    verdicts = tuple(_check_verdict(v, i) for i, v in enumerate(batch.verdicts))

    def clamped(t: Timestamp) -> float:
        t_s = _ts_s(t)
        return received_s if t_s > limit_s else t_s

    # The newest sample of each GPU (and MIG instance) is its last in the batch: the
    # agent's batcher appends samples as it takes them. Only those are decoded: 8 of a
    # 500-sample batch.
    indices: list[tuple[int, str] | None] = list(map(_GPU_DEVICE, gpu_msgs))
    not_gpu = {i for i in others if not records[i].HasField("gpu")}
    for i in not_gpu:
        indices[i] = None
    last = dict(zip(indices, range(n), strict=True))
    last.pop(None, None)
    gpus = tuple(
        _with_time(cast(GpuSample, record_from_proto(records[i])), clamped(gpu_msgs[i].time))
        for i in last.values()
    )
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
    firsts += [clamped(m.time) for _, m in engine_msgs] + [clamped(m.time) for m in host_msgs]
    oldest_s = min(firsts) if firsts else None
    return DecodedBatch(
        agent_id=batch.agent_id,
        boot_id=batch.boot_id,
        seq=batch.seq,
        hostname=batch.hostname or batch.agent_id,
        sent_s=_ts_s(batch.sent_time) if batch.HasField("sent_time") else None,
        gpus=gpus,
        engines=tuple(engines),
        host=host,
        verdicts=verdicts,
        stats=AgentCounters.from_proto(batch.stats) if batch.HasField("stats") else None,
        samples=len(batch.records),
        newest_sample_s=max(times) if times else None,
        oldest_sample_s=oldest_s,
        skewed=skewed,
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


@dataclass(frozen=True, slots=True)
class EngineState:
    """One inference engine on one agent: its latest sample and the GPUs it runs on."""

    agent_id: str
    hostname: str
    engine: EngineSample
    gpu_indices: tuple[int, ...]
    updated_s: float


@dataclass(frozen=True, slots=True)
class CollectorCounts:
    """The collector's own counters since it started."""

    batches: int = 0  # applied
    samples: int = 0  # records in applied batches
    duplicates: int = 0  # batches already applied (agent, boot, seq), dropped
    rejected: tuple[tuple[str, int], ...] = ()  # (reason, batches)
    skewed: int = 0  # samples dated in the future, clamped
    missing: int = 0  # seqs an agent skipped (its spool dropped them before sending)
    streams: int = 0  # open now
    refused: tuple[tuple[str, int], ...] = ()  # (reason, calls) refused by authentication


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    """An immutable view of the whole fleet at one instant."""

    taken_s: float
    agents: tuple[AgentState, ...]
    gpus: tuple[GpuState, ...]
    engines: tuple[EngineState, ...]
    counts: CollectorCounts


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
        self, *, clock: Callable[[], float] = time.time, forget_after_s: float = 900.0
    ) -> None:
        self._clock = clock
        self._forget_after_s = forget_after_s
        self._lock = threading.Lock()
        self._agents: dict[str, AgentState] = {}
        self._gpus: dict[_GpuKey, GpuState] = {}
        # agent_id -> its GPUs' keys: engine attribution looks at one agent's GPUs,
        # never the whole fleet's 8,000.
        self._agent_gpus: dict[str, set[_GpuKey]] = {}
        self._engines: dict[tuple[str, str], EngineState] = {}
        self._batches = 0
        self._samples = 0
        self._duplicates = 0
        self._rejected: dict[str, int] = {}
        self._skewed = 0
        self._missing = 0
        self._streams = 0
        self._refused: dict[str, int] = {}
        self._last_sweep_s = clock()

    # -- counters (ingest) --

    def count_duplicate(self) -> None:
        """A batch already applied arrived again (a resend after a lost ack)."""
        with self._lock:
            self._duplicates += 1

    def count_rejected(self, reason: RejectReason | str) -> None:
        """A batch was refused (poison); it is consumed and the stream goes on."""
        with self._lock:
            self._rejected[str(reason)] = self._rejected.get(str(reason), 0) + 1

    def count_refused(self, reason: str) -> None:
        """A call was refused by authentication before any handler ran (nothing applied)."""
        with self._lock:
            self._refused[reason] = self._refused.get(reason, 0) + 1

    def count_missing(self, batches: int) -> None:
        """An agent skipped ``batches`` seqs: its spool dropped them before sending."""
        with self._lock:
            self._missing += batches

    def stream_opened(self) -> None:
        """An agent stream opened."""
        with self._lock:
            self._streams += 1

    def stream_closed(self) -> None:
        """An agent stream closed."""
        with self._lock:
            self._streams -= 1

    # -- state --

    def apply(self, batch: DecodedBatch, *, received_s: float) -> None:
        """Fold one decoded batch into the fleet state."""
        with self._lock:
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
        if prev is not None and prev.sample is not None and prev.sample.time_s > sample.time_s:
            return  # an outage drain delivers old samples after newer ones: keep the newest
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
            if prev.verdict.window_end_s > verdict.window_end_s:
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
            verdict=dataclasses.replace(verdict, gpu_name=name),
            engine=prev.engine if prev else None,
            updated_s=received_s,
            mig_uuid=verdict.mig_uuid,
        )

    def _apply_engine(self, batch: DecodedBatch, engine: EngineSample, received_s: float) -> None:
        ekey = (batch.agent_id, engine.engine_id)
        prev = self._engines.get(ekey)
        if prev is not None and prev.engine.time_s > engine.time_s:
            return
        indices = engine.gpu_indices or self._gpus_of_pid(batch.agent_id, engine.pid)
        self._engines[ekey] = EngineState(
            agent_id=batch.agent_id,
            hostname=batch.hostname,
            engine=engine,
            gpu_indices=indices,
            updated_s=received_s,
        )
        for key in self._agent_gpus.get(batch.agent_id, ()):
            gpu = self._gpus[key]
            if gpu.gpu_index in indices:
                self._gpus[key] = dataclasses.replace(gpu, engine=engine, updated_s=received_s)

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
            rejected=tuple(sorted(self._rejected.items())),
            skewed=self._skewed,
            missing=self._missing,
            streams=self._streams,
            refused=tuple(sorted(self._refused.items())),
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
            )


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
