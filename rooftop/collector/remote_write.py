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
"""

from __future__ import annotations

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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rooftop import __version__
from rooftop.collector.fleet import CollectorCounts, DecodedBatch, FleetSnapshot, GpuState
from rooftop.collector.otel import METRICS, SAMPLE_GAUGES, gpu_attributes
from rooftop.collector.prometheus import prometheus_labels, prometheus_name
from rooftop.collector.snappy import compress, literal_block, varint
from rooftop.common.counters import Counters
from rooftop.common.model import GpuSample, PodRef
from rooftop.v1 import telemetry_pb2 as pb

__all__ = [
    "RemoteWrite",
    "RemoteWriteStats",
    "RemoteWriter",
    "Transport",
    "VERDICT_METRICS",
    "redacted_url",
]

log = logging.getLogger(__name__)

# Each GPU sample becomes the series of otel.SAMPLE_GAUGES (the endpoint's GPU gauges);
# each verdict these, at its window's end.
VERDICT_METRICS: tuple[str, ...] = ("rooftop.gpu.bound", "rooftop.gpu.bound.confidence")
_SPECS = {m.name: m for m in METRICS}

_Key = tuple[tuple[str, str], ...]  # sorted (label, value) pairs, ("__name__", ...) first
# (a sample naming the GPU, times in ms, gpm_stale flags, field -> its values or None)
_Columns = tuple[GpuSample, list[int], list[bool], Callable[[str], list[Any]]]

# A sample further ahead of the collector's clock than this is dated at its arrival
# (as the fleet clamps it); the receiver would refuse it as out of bounds otherwise.
_MAX_FUTURE_S = 300.0
_SERIES_REMEMBERED = 1_000_000  # newest timestamp per series: ~200 bytes each


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
        find_repeats: snappy with back-references (~6x smaller bodies, ~3x the output's
            CPU in pure Python); off: valid snappy holding the body as literals.
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

    def clamped_s(self, t_s: float) -> float:
        """``t_s``, or the arrival time when it is further ahead than the fleet allows."""
        return t_s if t_s <= self.received_s + _MAX_FUTURE_S else self.received_s


class RemoteWriter:
    """A ``BatchObserver`` that remote-writes every GPU sample and verdict.

    Args:
        config: the destination.
        points: renders a snapshot's series: ``(metric name, labels, value)`` with the
            Prometheus endpoint's names (``Telemetry.points``), for the verdicts.
        transport: how a body is POSTed (tests inject one; ``urllib`` by default).
    """

    def __init__(
        self,
        config: RemoteWrite,
        points: PointsFn,
        *,
        transport: Transport | None = None,
    ) -> None:
        self.config = config
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
        # GPU identity -> the label set of each SAMPLE_GAUGES series.
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
            for ts_ms, snap in self._verdict_snapshots(item):
                for key, value in self._points(snap, VERDICT_METRICS):
                    if math.isfinite(value):
                        series.setdefault(key, []).append((ts_ms, value))
        chunks: list[bytes] = []
        samples = 0
        resent = 0
        for key, points in series.items():
            points.sort()
            newest = self._newest_ms.get(key)
            fresh = points if newest is None else [p for p in points if p[0] > newest]
            # One value per timestamp per series (two samples of one tick: keep the last).
            dedup = dict(fresh)
            resent += len(points) - len(dedup)
            if not dedup:
                continue
            chunks.append(_time_series(self._label_bytes(key), dedup))
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
        absent, never 0, as on the endpoint).
        """
        groups: dict[tuple[Any, ...], list[pb.GpuSample]] = {}
        for m in item.batch.gpu_messages():
            if m.lost:
                continue
            pods = tuple(PodRef(p.pod, p.namespace, p.container) for p in m.pods)
            ident = (m.gpu_index, m.gpu_uuid, m.gpu_name, m.mig_uuid, pods)
            groups.setdefault(ident, []).append(m)
        for ident, msgs in groups.items():
            times_ms = [
                round(item.clamped_s(m.time.seconds + m.time.nanos / 1e9) * 1000) for m in msgs
            ]
            stale = [m.gpm_stale for m in msgs]
            index, uuid, name, mig_uuid, pods = ident
            who = GpuSample(0.0, index, uuid, name, mig_uuid=mig_uuid, pods=pods)

            def column(field: str, msgs: list[Any] = msgs) -> list[Any]:
                return [getattr(m, field) if m.HasField(field) else None for m in msgs]

            yield who, times_ms, stale, column

    def _sample_points(
        self, item: _Queued, series: dict[_Key, list[tuple[int, float]]]
    ) -> None:
        # The series of SAMPLE_GAUGES, a whole column per GPU at a time: the labels of
        # a GPU's series are worked out once per GPU identity, and a point costs one
        # step of a comprehension (through the Telemetry callbacks, ~7 µs each).
        agent_id, hostname = item.batch.agent_id, item.batch.hostname
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
            for gauge, key in zip(SAMPLE_GAUGES, keys, strict=True):
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
                    # One arithmetic step over the column: no call per point.
                    k = step[1]
                    rows0 = zip(times_ms, cols[0], strict=True)
                    if step[0] == "/":
                        raw = [(t, v / k) for t, v in rows0 if v is not None]
                    else:
                        raw = [(t, v * k) for t, v in rows0 if v is not None]
                elif len(cols) == 1 and skip is None:
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
        for gauge in SAMPLE_GAUGES:
            spec = _SPECS[gauge.metric]
            name = prometheus_name(spec.name, spec.unit, spec.instrument)
            labels = sorted(prometheus_labels({**base, **gauge.attrs}).items())
            keys.append((("__name__", name), *labels))
        if len(self._keys) >= _SERIES_REMEMBERED // len(SAMPLE_GAUGES):
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
# point cost 0.7 µs, these 0.3 µs (bench/bench_remote_write.py). The generated classes
# parse what this writes in tests/collector/test_remote_write.py (and Prometheus does).
#   WriteRequest: 1 timeseries (message)      TimeSeries: 1 labels, 2 samples (messages)
#   Label: 1 name, 2 value (strings)           Sample: 1 value (double), 2 timestamp (int64)

_SAMPLE_6 = struct.Struct("<BBBdB6B")  # a Sample whose timestamp is a 6-byte varint
_MS_6_LOW, _MS_6_HIGH = 1 << 35, 1 << 42  # 1971-2109 in ms: 6 varint bytes


def _field(number: int, payload: bytes) -> bytes:
    return bytes(((number << 3) | 2,)) + varint(len(payload)) + payload


def _labels(key: _Key) -> bytes:
    """A series' ``labels`` fields (TimeSeries field 1, once per label)."""
    return b"".join(
        _field(1, _field(1, name.encode()) + _field(2, value.encode())) for name, value in key
    )


def _sample(ts_ms: int, value: float) -> bytes:
    if _MS_6_LOW <= ts_ms < _MS_6_HIGH:
        t = ts_ms
        return _SAMPLE_6.pack(
            0x12, 16, 0x09, value, 0x10,
            (t & 0x7F) | 0x80, ((t >> 7) & 0x7F) | 0x80, ((t >> 14) & 0x7F) | 0x80,
            ((t >> 21) & 0x7F) | 0x80, ((t >> 28) & 0x7F) | 0x80, t >> 35,
        )  # fmt: skip
    body = b"\x09" + struct.pack("<d", value) + b"\x10" + varint(ts_ms & (1 << 64) - 1)
    return _field(2, body)


def _time_series(labels: bytes, points: dict[int, float]) -> bytes:
    """One ``timeseries`` field of a WriteRequest: ``labels`` then each point in order."""
    body = labels + b"".join([_sample(t, v) for t, v in points.items()])
    return _field(1, body)
