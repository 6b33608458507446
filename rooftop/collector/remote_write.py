"""Prometheus remote write 1.0: every GPU sample and verdict at the time it was measured.

The Prometheus endpoint and OTLP export one value per GPU per scrape or export interval;
a 10 Hz agent's samples reach the backend as one point per interval. This output sends
each sample with its own timestamp into anything that speaks remote write 1.0
(Prometheus with ``--web.enable-remote-write-receiver``, Thanos Receive, Mimir, Cortex,
VictoriaMetrics, an OpenTelemetry Collector's ``prometheusremotewrite`` receiver).

Flow: the ingest hands each applied batch to ``observe_batch`` (a bounded queue, never
blocking; the oldest samples are dropped, counted, when it is full); one sender thread
turns queued batches into series — the same names and labels the Prometheus endpoint
serves (``otel.SAMPLE_GAUGES`` for samples, ``Telemetry.points`` for verdicts) — and
POSTs ``WriteRequest`` protobufs, snappy block encoded, retrying 5xx, 429 and network
errors with exponential backoff and dropping (counted) what the receiver refuses as
malformed (other 4xx).

Idempotent under resends: the receiver refuses a sample older than its series' newest
(an agent's resend after a reconnect, a batch re-applied after a failover), and refuses
the whole request with it. So each series' newest sent timestamp is kept (bounded LRU)
and anything at or before it is skipped, counted as ``resent``. A batch re-applied by
*another* collector after a failover can still reach the receiver twice: the receiver's
out-of-order window (Prometheus ``storage.tsdb.out_of_order_time_window``) makes those
exact duplicates a no-op (docs/OPERATOR-GUIDE.md).

What is sent: ``include`` and ``exclude`` (shell-style globs over the metric names of
``SENDABLE_NAMES``) choose the series; each name is decided once, when the writer is
made, and a left-out series costs nothing per sample (no labels, no field read).
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import math
import ssl
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from typing import Any, Protocol, cast

from rooftop import __version__
from rooftop.collector.fleet import (
    CollectorCounts,
    DecodedBatch,
    FleetSnapshot,
    GpuState,
)
from rooftop.collector.otel import METRICS, SAMPLE_GAUGES, SampleGauge, gpu_attributes
from rooftop.collector.prometheus import prometheus_name, series_key
from rooftop.collector.snappy import compress, literal_block, varint
from rooftop.common.counters import Counters
from rooftop.common.errors import ConfigError
from rooftop.common.model import GpuSample, PodRef
from rooftop.v1 import telemetry_pb2 as pb

__all__ = [
    "RemoteWrite",
    "RemoteWriteStats",
    "RemoteWriter",
    "SENDABLE_NAMES",
    "Transport",
    "VERDICT_METRICS",
    "check_series_patterns",
    "redacted_url",
]

log = logging.getLogger(__name__)

# Each GPU sample becomes the series of otel.SAMPLE_GAUGES (the endpoint's GPU gauges);
# each verdict these, at its window's end.
VERDICT_METRICS: tuple[str, ...] = ("rooftop.gpu.bound", "rooftop.gpu.bound.confidence")
_SPECS = {m.name: m for m in METRICS}


def _sent_name(metric: str) -> str:
    """The name a metric's series carry on the wire (as the Prometheus endpoint's)."""
    spec = _SPECS[metric]
    return prometheus_name(spec.name, spec.unit, spec.instrument)


# Every metric name remote write can send, in the endpoint's order: what ``include``
# and ``exclude`` match against. The DCGM names (``prometheus.dcgm_names``) are the
# endpoint's alone: remote write sends these names only.
SENDABLE_NAMES: tuple[str, ...] = tuple(
    dict.fromkeys(_sent_name(m) for m in (*(g.metric for g in SAMPLE_GAUGES), *VERDICT_METRICS))
)

_Key = tuple[tuple[str, str], ...]  # sorted (label, value) pairs, ("__name__", ...) first
# (a sample naming the GPU, times in ms, gpm_stale flags, field -> its values or None)
_Columns = tuple[GpuSample, list[int], list[bool], Callable[[str], list[Any]]]

# A sample further ahead of the collector's clock than this is dated at its arrival
# (as the fleet clamps it); the receiver would refuse it as out of bounds otherwise.
_MAX_FUTURE_S = 300.0
_SERIES_REMEMBERED = 1_000_000  # newest timestamp per series: ~200 bytes each
_HAS_FIELD = cast(Callable[[Any, str], bool], pb.GpuSample.HasField)
# A GPU's identity in a columnar batch: the fields its series' labels come from.
_IDENTITY_FIELDS = ("gpu_index", "gpu_uuid", "gpu_name", "mig_uuid", "pods")


@dataclass(frozen=True, slots=True)
class RemoteWrite:
    """One ``[[remote_write]]`` destination.

    Attributes:
        url: the receiver's write endpoint (``http://prometheus:9090/api/v1/write``).
        timeout_s: one POST's timeout.
        queue_max_samples: records waiting to be sent; above it the oldest are dropped.
        max_samples_per_send: samples per ``WriteRequest`` (Prometheus' default 2,000).
        batch_send_deadline_s: the longest a sample waits for a full request.
        min_backoff_s / max_backoff_s: the retry backoff, doubling from min to max.
        bearer_token_file: sent as ``Authorization: Bearer``, re-read at each send.
        ca_file: CA bundle for an https ``url`` (system CAs otherwise).
        find_repeats: snappy with back-references (~6x smaller bodies, ~5x the output's
            CPU in pure Python); off: valid snappy holding the body as literals.
        include / exclude: ``fnmatch`` globs over ``SENDABLE_NAMES``; a series is sent
            when its metric name matches some ``include`` and no ``exclude``.
    """

    url: str
    timeout_s: float = 10.0
    queue_max_samples: int = 500_000
    max_samples_per_send: int = 2_000
    batch_send_deadline_s: float = 1.0
    min_backoff_s: float = 0.03
    max_backoff_s: float = 5.0
    bearer_token_file: Path | None = None
    ca_file: Path | None = None
    find_repeats: bool = False
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def sends(self, name: str) -> bool:
        """Whether series of the metric ``name`` are sent (``include``, then ``exclude``)."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(name, p) for p in self.exclude
        )


def check_series_patterns(config: RemoteWrite) -> None:
    """Refuse an ``include`` or ``exclude`` pattern that matches no sendable name.

    A typo must not silently send nothing (or exclude nothing): each pattern has to
    match at least one of ``SENDABLE_NAMES``, and together they must leave some.

    Raises:
        ConfigError: one line naming ``remote_write.<key>``, the pattern, and the
            nearest valid names (or the first few).
    """
    for key, patterns in (("include", config.include), ("exclude", config.exclude)):
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise ConfigError(f"remote_write.{key} must be a list of strings (got {pattern!r})")
            if any(fnmatch.fnmatchcase(n, pattern) for n in SENDABLE_NAMES):
                continue
            near = difflib.get_close_matches(pattern, SENDABLE_NAMES, n=3, cutoff=0.5)
            hint = "did you mean " if near else "e.g. "
            dcgm = (
                " (remote write sends the rooftop names, not prometheus.dcgm_names')"
                if pattern.upper().startswith("DCGM")
                else ""
            )
            raise ConfigError(
                f"remote_write.{key}: {pattern!r} matches no metric remote write sends"
                f"{dcgm}; {hint}{', '.join(near or SENDABLE_NAMES[:4])}"
            )
    if not any(config.sends(n) for n in SENDABLE_NAMES):
        key = "exclude" if config.exclude else "include"  # the line to point at
        raise ConfigError(
            f"remote_write.{key}: include {list(config.include)} less exclude "
            f"{list(config.exclude)} leaves no metric to send"
        )


@dataclass(frozen=True, slots=True)
class RemoteWriteStats:
    """What a remote-write output did since it started (counts of samples, not series)."""

    queued: int = 0  # GPU samples and verdicts taken off applied batches
    sent: int = 0  # samples in requests the receiver accepted (2xx)
    dropped_queue_full: int = 0  # oldest records dropped: the queue was full
    rejected: int = 0  # samples in requests the receiver refused (4xx other than 429)
    resent: int = 0  # samples at or before their series' newest sent time: skipped
    retries: int = 0  # POSTs retried (5xx, 429, network error)
    requests: int = 0  # requests accepted


def redacted_url(url: str) -> str:
    """``url`` without a password, for labels and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class Transport(Protocol):
    """POSTs one body; returns the HTTP status (raises ``OSError`` on a network error)."""

    def __call__(self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> int:
        """Send ``body`` to ``url``."""


def urllib_transport(ca_file: Path | None = None) -> Transport:
    """The default transport: ``urllib`` over HTTP or HTTPS."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)

    def post(url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> int:
        request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s, context=context) as resp:
                resp.read()
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            exc.read()
            return int(exc.code)

    return post


# (snapshot, metric names) -> (sorted labels with __name__ first, value) per series:
# Telemetry.points, for the verdicts.
PointsFn = Callable[
    [FleetSnapshot, Iterable[str]], Iterator[tuple[tuple[tuple[str, str], ...], float]]
]


@dataclass(frozen=True, slots=True)
class _Queued:
    batch: DecodedBatch  # its GPU samples are decoded by the sender thread, not the ingest's
    received_s: float
    size: int  # GPU samples and verdicts: what the queue bound counts


class RemoteWriter:
    """A ``BatchObserver`` that remote-writes every GPU sample and verdict.

    Of each, the series ``config.include`` and ``config.exclude`` choose.

    Args:
        config: the destination.
        points: renders a snapshot's series: ``(metric name, labels, value)`` with the
            Prometheus endpoint's names (``Telemetry.points``), for the verdicts.
        transport: how a body is POSTed (tests inject one; ``urllib`` by default).

    Raises:
        ConfigError: an ``include`` or ``exclude`` pattern that matches no metric
            (``check_series_patterns``).
    """

    def __init__(
        self,
        config: RemoteWrite,
        points: PointsFn,
        *,
        transport: Transport | None = None,
    ) -> None:
        check_series_patterns(config)
        self.config = config
        # What is sent, decided once per metric name: a left-out series is never built.
        self._gauges: tuple[SampleGauge, ...] = tuple(
            g for g in SAMPLE_GAUGES if config.sends(_sent_name(g.metric)))
        self._verdict_metrics = tuple(m for m in VERDICT_METRICS if config.sends(_sent_name(m)))
        self._url = redacted_url(config.url)
        self._points = points
        self._transport = transport or urllib_transport(config.ca_file)
        self._stats = Counters(RemoteWriteStats)
        self._queue: deque[_Queued] = deque()
        self._queued_samples = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        # (series key) -> newest timestamp sent, LRU-bounded.
        self._newest_ms: OrderedDict[tuple[tuple[str, str], ...], int] = OrderedDict()
        self._gpu_names: dict[tuple[str, str], str] = {}
        # GPU identity -> the label set of each sent SAMPLE_GAUGES series (self._gauges).
        self._keys: dict[tuple[Any, ...], list[_Key]] = {}
        self._encoded_labels: dict[_Key, bytes] = {}  # a series' labels, wire-encoded
        self._thread = threading.Thread(target=self._run, name="remote-write", daemon=True)
        self._idle = threading.Event()
        self._idle.set()
        self._warned_status: set[int] = set()

    # -- lifecycle --

    def start(self) -> None:
        """Start the sender thread."""
        self._thread.start()

    def stats(self) -> RemoteWriteStats:
        """The counters now."""
        return self._stats.get()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything queued now was sent or refused; True if it was in time."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._cond.notify_all()
        while time.monotonic() < deadline:
            with self._cond:
                empty = not self._queue
            if empty and self._idle.is_set():
                return True
            time.sleep(0.01)
        return False

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (within ``timeout_s``), then stop. Idempotent."""
        if self._thread.is_alive():
            self.flush(timeout_s)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # -- BatchObserver --

    def observe_batch(self, batch: DecodedBatch, received_s: float) -> None:
        """Queue a batch's GPU samples and verdicts (the ingest thread: never blocks)."""
        raw = batch.raw
        if raw is None:
            return
        gpus = batch.gpu_sample_count()  # records and columns (Batch.gpu_columns)
        if not gpus and not batch.verdicts:
            return
        # Decoding is left to the sender thread: here only a reference is kept.
        item = _Queued(batch, received_s, gpus + len(batch.verdicts))
        with self._cond:
            self._queue.append(item)
            self._queued_samples += item.size
            self._stats.add(queued=item.size)
            while self._queued_samples > self.config.queue_max_samples and len(self._queue) > 1:
                dropped = self._queue.popleft()
                self._queued_samples -= dropped.size
                self._stats.add(dropped_queue_full=dropped.size)
            self._cond.notify()

    # -- the sender --

    def _take(self) -> list[_Queued]:
        # Up to max_samples_per_send records, waiting up to the deadline for them.
        deadline = time.monotonic() + self.config.batch_send_deadline_s
        with self._cond:
            while not self._stop.is_set():
                if self._queued_samples >= self.config.max_samples_per_send:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            taken: list[_Queued] = []
            count = 0
            while self._queue and (not taken or count < self.config.max_samples_per_send):
                item = self._queue.popleft()
                self._queued_samples -= item.size
                count += item.size
                taken.append(item)
            if taken:
                self._idle.clear()
            return taken

    def _run(self) -> None:
        while not self._stop.is_set():
            taken = self._take()
            if not taken:
                self._idle.set()
                continue
            try:
                raw, samples = self._build(taken)
                if samples:
                    self._send(raw, samples)
            except Exception:  # one bad batch never stops the output
                log.exception("remote write: could not send a batch")
            finally:
                with self._cond:
                    if not self._queue:
                        self._idle.set()

    def _build(self, taken: list[_Queued]) -> tuple[bytes, int]:
        """The ``WriteRequest`` (encoded) for ``taken``, and how many samples it holds."""
        # Series -> [(ts_ms, value)], in time order per series (the receiver needs it).
        series: dict[_Key, list[tuple[int, float]]] = {}
        for item in taken:
            self._sample_points(item, series)
            if not self._verdict_metrics:
                continue
            for ts_ms, snap in self._verdict_snapshots(item):
                for key, value in self._points(snap, self._verdict_metrics):
                    if math.isfinite(value):
                        series.setdefault(key, []).append((ts_ms, value))
        chunks: list[bytes] = []
        samples = 0
        resent = 0
        ts_fields: dict[int, bytes] = {}  # a timestamp's wire bytes: shared by its series
        for key, points in series.items():
            points.sort()
            newest = self._newest_ms.get(key)
            fresh = points if newest is None else [p for p in points if p[0] > newest]
            # One value per timestamp per series (two samples of one tick: keep the last).
            dedup = dict(fresh)
            resent += len(points) - len(dedup)
            if not dedup:
                continue
            chunks.append(_time_series(self._label_bytes(key), dedup, ts_fields))
            samples += len(dedup)
            self._newest_ms[key] = max(dedup)
            self._newest_ms.move_to_end(key)
        while len(self._newest_ms) > _SERIES_REMEMBERED:
            self._newest_ms.popitem(last=False)
        if resent:
            self._stats.add(resent=resent)
        return b"".join(chunks), samples

    def _label_bytes(self, key: _Key) -> bytes:
        encoded = self._encoded_labels.get(key)
        if encoded is None:
            if len(self._encoded_labels) >= _SERIES_REMEMBERED:
                self._encoded_labels.clear()  # series come and go: start over, rarely
            encoded = self._encoded_labels[key] = _labels(key)
        return encoded

    def _gpu_columns(self, item: _Queued) -> Iterator[_Columns]:
        """A queued batch's GPU samples, grouped by GPU: the one place that reads them.

        Per GPU (identity as the labels need it): a sample carrying that identity, the
        points' times (ms), their gpm_stale flags, and a reader of one field's values
        across them (None where a sample lacks it). Lost samples are left out (no data:
        absent, never 0, as on the endpoint). Records are read as the protobuf messages
        they arrived as; columns a field at a time over every row
        (``Columns.field_values``), with no ``GpuSample`` or message made per row.
        """
        raw = item.batch.raw
        if raw is None:
            return
        received_s = item.received_s
        # A time further ahead than the fleet allows is dated at the batch's arrival.
        limit_s = received_s + _MAX_FUTURE_S
        groups: dict[tuple[Any, ...], list[pb.GpuSample]] = {}
        for rec in raw.records:
            if not rec.HasField("gpu") or rec.gpu.lost:
                continue
            m = rec.gpu
            # Plain tuples per sample; PodRefs once per GPU, below.
            rows = tuple([(p.pod, p.namespace, p.container) for p in m.pods]) if m.pods else ()
            ident = (m.gpu_index, m.gpu_uuid, m.gpu_name, m.mig_uuid, rows)
            groups.setdefault(ident, []).append(m)
        for ident, msgs in groups.items():
            times_s = [m.time.seconds + m.time.nanos / 1e9 for m in msgs]
            times_ms = [round((t if t <= limit_s else received_s) * 1000) for t in times_s]
            stale = [m.gpm_stale for m in msgs]
            index, uuid, name, mig_uuid, pod_rows = ident
            pods = tuple(PodRef(*row) for row in pod_rows)
            who = GpuSample(0.0, index, uuid, name, mig_uuid=mig_uuid, pods=pods)

            def column(field: str, msgs: list[Any] = msgs) -> list[Any]:
                # A field every sample has (the usual case): two C-level passes, 35%
                # cheaper than asking each sample in Python.
                if all(map(_HAS_FIELD, msgs, repeat(field))):
                    return list(map(getattr, msgs, repeat(field)))
                return [getattr(m, field) if m.HasField(field) else None for m in msgs]

            yield who, times_ms, stale, column
        # Read and checked once, by decode_batch (refused there if they do not read).
        columns = item.batch.gpu_columns()
        if columns is None:
            return
        # Column by column: no GpuSample per row (most of a columnar batch's cost), only
        # the fields the chosen series read, each over every row once.
        lost = columns.field_values("lost")
        idents = zip(*(columns.field_values(f) for f in _IDENTITY_FIELDS), strict=True)
        rows_by: dict[tuple[Any, ...], list[int]] = {}
        for row, ident in enumerate(idents):
            if not lost[row]:
                rows_by.setdefault(ident, []).append(row)
        if not rows_by:
            return
        every_time_s = columns.field_values("time_s")
        every_stale = columns.field_values("gpm_stale")
        read: dict[str, Sequence[Any]] = {}
        for key, at in rows_by.items():
            pick = itemgetter(*at) if len(at) > 1 else lambda v, r=at[0]: (v[r],)
            times_ms = [round((t if t <= limit_s else received_s) * 1000)
                        for t in pick(every_time_s)]  # fmt: skip
            stale = list(pick(every_stale))
            who = GpuSample(0.0, key[0], key[1], key[2], mig_uuid=key[3], pods=key[4])

            def rows_column(field: str, pick: Callable[[Any], Any] = pick) -> list[Any]:
                values = read.get(field)
                if values is None:
                    values = read[field] = columns.field_values(field)
                return list(pick(values))  # None where a row lacks it

            yield who, times_ms, stale, rows_column

    def _sample_points(
        self, item: _Queued, series: dict[_Key, list[tuple[int, float]]]
    ) -> None:
        # The series of SAMPLE_GAUGES, a whole column per GPU at a time: the labels of
        # a GPU's series are worked out once per GPU identity, and a point costs one
        # step of a comprehension (through the Telemetry callbacks, ~7 µs each).
        agent_id, hostname = item.batch.agent_id, item.batch.hostname
        if not self._gauges:
            # Verdicts only: their gpu_name label still comes from the samples, here the
            # newest of each GPU, which the fleet decoded already (no row read again).
            for who in item.batch.gpus:
                if who.gpu_name:
                    self._gpu_names[(who.gpu_uuid, who.mig_uuid)] = who.gpu_name
            return
        for who, times_ms, stale, column in self._gpu_columns(item):
            ident = (agent_id, hostname, who.gpu_index, who.gpu_uuid,
                     who.gpu_name, who.mig_uuid, who.pods)  # fmt: skip
            keys = self._keys.get(ident)
            if keys is None:
                keys = self._series_keys(agent_id, hostname, ident, who)
            if who.gpu_name:
                self._gpu_names[(who.gpu_uuid, who.mig_uuid)] = who.gpu_name
            columns: dict[str, list[Any]] = {}
            any_stale = any(stale)
            for gauge, key in zip(self._gauges, keys, strict=True):
                cols = []
                for f in gauge.fields:
                    if f not in columns:
                        columns[f] = column(f)
                    cols.append(columns[f])
                skip = [st and gauge.gpm for st in stale] if any_stale else None
                value = gauge.value
                raw: list[tuple[int, float | None]]
                step = gauge.step
                if step is not None and skip is None:
                    # One arithmetic step over the column: no call per point, and its
                    # results are floats already (v / k, v * float k): no second pass.
                    k = step[1]
                    rows0 = zip(times_ms, cols[0], strict=True)
                    if step[0] == "/":
                        stepped = [(t, v / k) for t, v in rows0 if v is not None]
                    else:
                        stepped = [(t, v * k) for t, v in rows0 if v is not None]
                    if stepped:
                        series.setdefault(key, []).extend(stepped)
                    continue
                if len(cols) == 1 and skip is None:
                    rows0 = zip(times_ms, cols[0], strict=True)
                    raw = [(t, value(v)) for t, v in rows0 if v is not None]
                elif len(cols) == 1:
                    rows1 = zip(times_ms, cols[0], skip or (), strict=True)
                    raw = [(t, value(v)) for t, v, sk in rows1 if v is not None and not sk]
                else:
                    rows = zip(times_ms, *cols, strict=True)
                    raw = [(r[0], value(*r[1:])) for r in rows if None not in r]
                points = [(t, float(v)) for t, v in raw if v is not None]
                if points:
                    series.setdefault(key, []).extend(points)

    def _series_keys(
        self, agent_id: str, hostname: str, ident: tuple[Any, ...], who: GpuSample
    ) -> list[_Key]:
        state = GpuState(
            agent_id,
            hostname,
            who.gpu_index,
            who.gpu_uuid,
            who.gpu_name,
            who,
            None,
            None,
            0.0,
            mig_uuid=who.mig_uuid,
        )
        base = gpu_attributes(state)
        keys: list[_Key] = []
        for gauge in self._gauges:
            keys.append(series_key(_sent_name(gauge.metric), {**base, **gauge.attrs}))
        if len(self._keys) >= _SERIES_REMEMBERED // max(1, len(self._gauges)):
            self._keys.clear()  # GPUs come and go: start over, rarely
        self._keys[ident] = keys
        return keys

    def _verdict_snapshots(self, item: _Queued) -> Iterator[tuple[int, FleetSnapshot]]:
        # A verdict at its window's end, through the Telemetry callbacks (one per 5 s
        # per GPU: not worth a path of its own).
        # The fleet decoded and clamped them already (DecodedBatch.verdicts).
        for verdict in item.batch.verdicts:
            name = self._gpu_names.get((verdict.gpu_uuid, verdict.mig_uuid), "")
            t_s = verdict.window_end_s
            state = GpuState(
                item.batch.agent_id,
                item.batch.hostname,
                verdict.gpu_index,
                verdict.gpu_uuid,
                name,
                None,
                verdict,
                None,
                item.received_s,
                mig_uuid=verdict.mig_uuid,
            )
            yield round(t_s * 1000), _snapshot(t_s, [state])

    def _headers(self) -> dict[str, str]:
        headers = {
            "Content-Encoding": "snappy",
            "Content-Type": "application/x-protobuf",
            "User-Agent": f"rooftop-collector/{__version__}",
            "X-Prometheus-Remote-Write-Version": "0.1.0",
        }
        if self.config.bearer_token_file is not None:
            token = self.config.bearer_token_file.read_text(encoding="utf-8").strip()
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _send(self, raw: bytes, samples: int) -> None:
        body = compress(raw) if self.config.find_repeats else literal_block(raw)
        backoff_s = self.config.min_backoff_s
        while True:
            try:
                status = self._transport(
                    self.config.url, body, self._headers(), self.config.timeout_s
                )
            except OSError as exc:
                status = 0
                self._warn_once(0, f"remote write to {self._url}: {exc}; retrying")
            if 200 <= status < 300:
                self._stats.add(sent=samples)
                self._stats.add(requests=1)
                return
            if 400 <= status < 500 and status != 429:
                # Malformed to the receiver (or out of order beyond its window): a
                # retry would be refused again.
                self._stats.add(rejected=samples)
                self._warn_once(
                    status,
                    f"remote write to {self._url}: HTTP {status}, {samples} samples "
                    "refused (not retried)",
                )
                return
            if status:
                message = f"remote write to {self._url}: HTTP {status}; retrying"
                self._warn_once(status, message)
            if self._stop.is_set():
                self._stats.add(rejected=samples)
                return
            self._stats.add(retries=1)
            self._stop.wait(backoff_s)
            backoff_s = min(backoff_s * 2, self.config.max_backoff_s)

    def _warn_once(self, status: int, message: str) -> None:
        # One line per distinct status: a receiver down for an hour logs once, not per try.
        if status not in self._warned_status:
            self._warned_status.add(status)
            log.warning("%s", message)


_NO_COUNTS = CollectorCounts()


def _snapshot(taken_s: float, gpus: list[GpuState]) -> FleetSnapshot:
    return FleetSnapshot(taken_s, (), tuple(gpus), (), _NO_COUNTS)


# --- the wire format of a remote-write 1.0 WriteRequest ---------------------------------
# Encoded here rather than through the generated prompb classes: a Sample object per
# point cost 0.7 µs, a struct per point 0.3 µs, one struct per series 0.1 µs (its
# timestamps' bytes shared by the GPU's series; bench/bench_remote_write.py). The generated classes
# parse what this writes in tests/collector/test_remote_write.py (and Prometheus does).
#   WriteRequest: 1 timeseries (message)      TimeSeries: 1 labels, 2 samples (messages)
#   Label: 1 name, 2 value (strings)           Sample: 1 value (double), 2 timestamp (int64)

_MS_6_LOW, _MS_6_HIGH = 1 << 35, 1 << 42  # 1971-2109 in ms: 6 varint bytes
# A Sample with such a timestamp is 18 bytes: this head (samples field 2, 16 bytes; the
# value's tag, field 1 double), the value, then its timestamp field (tag 0x10, 6 bytes).
_SAMPLE_HEAD = b"\x12\x10\x09"
_SERIES_STRUCTS: dict[int, struct.Struct] = {}  # points in a series -> its samples' layout


def _field(number: int, payload: bytes) -> bytes:
    return bytes(((number << 3) | 2,)) + varint(len(payload)) + payload


def _labels(key: _Key) -> bytes:
    """A series' ``labels`` fields (TimeSeries field 1, once per label)."""
    return b"".join(
        _field(1, _field(1, name.encode()) + _field(2, value.encode())) for name, value in key
    )


def _sample(ts_ms: int, value: float) -> bytes:
    """One Sample field, any timestamp width (``_samples``' path for the rare ones)."""
    body = b"\x09" + struct.pack("<d", value) + b"\x10" + varint(ts_ms & (1 << 64) - 1)
    return _field(2, body)


def _ts_field(ts_ms: int) -> bytes:
    """A Sample's timestamp field for a time in ``[_MS_6_LOW, _MS_6_HIGH)``: 7 bytes."""
    t = ts_ms
    return bytes((
        0x10,
        (t & 0x7F) | 0x80, ((t >> 7) & 0x7F) | 0x80, ((t >> 14) & 0x7F) | 0x80,
        ((t >> 21) & 0x7F) | 0x80, ((t >> 28) & 0x7F) | 0x80, t >> 35,
    ))  # fmt: skip


def _samples(points: dict[int, float], ts_fields: dict[int, bytes]) -> bytes:
    """``points`` as Sample fields, in one ``struct.pack`` for the whole series.

    ``ts_fields`` caches each timestamp's bytes: a GPU sample's series share its time.
    """
    flat: list[bytes | float] = []
    extend = flat.extend
    for t, v in points.items():
        field = ts_fields.get(t)
        if field is None:
            if not _MS_6_LOW <= t < _MS_6_HIGH:
                return b"".join([_sample(t, v) for t, v in points.items()])  # rare widths
            field = ts_fields[t] = _ts_field(t)
        extend((_SAMPLE_HEAD, v, field))
    n = len(points)
    layout = _SERIES_STRUCTS.get(n)
    if layout is None:
        if len(_SERIES_STRUCTS) >= 4096:
            _SERIES_STRUCTS.clear()  # point counts vary with rates: start over, rarely
        layout = _SERIES_STRUCTS[n] = struct.Struct("<" + "3sd7s" * n)
    return layout.pack(*flat)


def _time_series(
    labels: bytes, points: dict[int, float], ts_fields: dict[int, bytes] | None = None
) -> bytes:
    """One ``timeseries`` field of a WriteRequest: ``labels`` then each point in order."""
    return _field(1, labels + _samples(points, {} if ts_fields is None else ts_fields))
