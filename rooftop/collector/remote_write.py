"""Prometheus remote write 1.0: every GPU sample and verdict at the time it was measured.

The Prometheus endpoint and OTLP export one value per GPU per scrape or export interval;
a 10 Hz agent's samples reach the backend as one point per interval. This output sends
each sample with its own timestamp into anything that speaks remote write 1.0
(Prometheus with ``--web.enable-remote-write-receiver``, Thanos Receive, Mimir, Cortex,
VictoriaMetrics, an OpenTelemetry Collector's ``prometheusremotewrite`` receiver).

Flow: the ingest hands each applied batch to ``observe_batch`` (a bounded queue, never
blocking; the oldest samples are dropped, counted, when it is full); one sender thread
turns queued batches into series — the same names and labels the Prometheus endpoint
serves, from ``Telemetry.points`` — and POSTs ``WriteRequest`` protobufs, snappy block
encoded, retrying 5xx, 429 and network errors with exponential backoff and dropping
(counted) what the receiver refuses as malformed (other 4xx).

Idempotent under resends: the receiver refuses a sample older than its series' newest
(an agent's resend after a reconnect, a batch re-applied after a failover), and refuses
the whole request with it. So each series' newest sent timestamp is kept (bounded LRU)
and anything at or before it is skipped, counted as ``resent``. A batch re-applied by
*another* collector after a failover can still reach the receiver twice: the receiver's
out-of-order window (Prometheus ``storage.tsdb.out_of_order_time_window``) makes those
exact duplicates a no-op (docs/OPERATOR-GUIDE.md).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rooftop import __version__
from rooftop.collector.fleet import CollectorCounts, DecodedBatch, FleetSnapshot, GpuState
from rooftop.collector.snappy import compress, literal_block
from rooftop.common.codec import record_from_proto, timestamp_s, verdict_from_proto
from rooftop.common.counters import Counters
from rooftop.common.model import GPU_FIELD_PROVENANCE, GpuSample, Provenance
from rooftop.prompb import remote_pb2, types_pb2
from rooftop.v1 import telemetry_pb2 as pb

__all__ = [
    "GPU_SAMPLE_METRICS",
    "RemoteWrite",
    "RemoteWriteStats",
    "RemoteWriter",
    "Transport",
    "VERDICT_METRICS",
]

log = logging.getLogger(__name__)

# What each GPU sample becomes (OTel names; Telemetry.points renders them as the
# Prometheus endpoint names them) and what each verdict becomes, at window end.
GPU_SAMPLE_METRICS: tuple[str, ...] = (
    "hw.gpu.utilization",
    "hw.gpu.memory.usage",
    "hw.gpu.memory.limit",
    "hw.gpu.memory.utilization",
    "hw.power",
    "hw.temperature",
    "rooftop.gpu.sm.activity",
    "rooftop.gpu.sm.occupancy",
    "rooftop.gpu.tensor.activity",
    "rooftop.gpu.pipe.activity",
    "rooftop.gpu.dram.activity",
    "rooftop.gpu.memory_controller.utilization",
    "rooftop.gpu.pcie.throughput",
    "rooftop.gpu.sm.clock",
)
VERDICT_METRICS: tuple[str, ...] = ("rooftop.gpu.bound", "rooftop.gpu.bound.confidence")

# The GPM fields of a sample marked gpm_stale repeat the previous reading: not sent
# again under a new timestamp.
_GPM_FIELDS = tuple(f for f, p in GPU_FIELD_PROVENANCE.items() if p is Provenance.GPM)
_STALE_CLEARED: dict[str, Any] = dict.fromkeys(_GPM_FIELDS)

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
        find_repeats: snappy with back-references (3-6x smaller bodies, ~40x the CPU in
            pure Python); off: valid snappy holding the body as literals.
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


PointsFn = Callable[[FleetSnapshot, Iterable[str]], Iterator[tuple[str, Mapping[str, str], float]]]


@dataclass(slots=True)
class _Queued:
    agent_id: str
    hostname: str
    received_s: float
    gpus: list[pb.TraceRecord]  # decoded by the sender thread, not the ingest's
    verdicts: list[pb.Verdict]

    @property
    def size(self) -> int:
        return len(self.gpus) + len(self.verdicts)


class RemoteWriter:
    """A ``BatchObserver`` that remote-writes every GPU sample and verdict.

    Args:
        config: the destination.
        points: renders a snapshot's series: ``(metric name, labels, value)`` with the
            Prometheus endpoint's names (``Telemetry.points``).
        transport: how a body is POSTed (tests inject one; ``urllib`` by default).
        sleep: waits between retries (tests).
    """

    def __init__(
        self,
        config: RemoteWrite,
        points: PointsFn,
        *,
        transport: Transport | None = None,
        sleep: Callable[[float], Any] | None = None,
    ) -> None:
        self.config = config
        self._points = points
        self._transport = transport or urllib_transport(config.ca_file)
        self._stats = Counters(RemoteWriteStats)
        self._queue: deque[_Queued] = deque()
        self._queued_samples = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        # (series key) -> newest timestamp sent, LRU-bounded.
        self._newest_ms: OrderedDict[tuple[tuple[str, str], ...], int] = OrderedDict()
        self._gpu_names: dict[tuple[str, str], str] = {}
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
        gpus = [rec for rec in raw.records if rec.WhichOneof("record") == "gpu"]
        if not gpus and not raw.verdicts:
            return
        # Decoding is left to the sender thread: here only references are kept.
        item = _Queued(batch.agent_id, batch.hostname, received_s, gpus, list(raw.verdicts))
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
                request, samples = self._build(taken)
                if samples:
                    self._send(request, samples)
            except Exception:  # one bad batch never stops the output
                log.exception("remote write: could not send a batch")
            finally:
                with self._cond:
                    if not self._queue:
                        self._idle.set()

    def _build(self, taken: list[_Queued]) -> tuple[remote_pb2.WriteRequest, int]:
        # Series -> [(ts_ms, value)], in time order per series (the receiver needs it).
        series: dict[tuple[tuple[str, str], ...], list[tuple[int, float]]] = {}
        for item in taken:
            for ts_ms, snap in self._snapshots(item):
                names = VERDICT_METRICS if snap.gpus[0].verdict is not None else GPU_SAMPLE_METRICS
                for name, labels, value in self._points(snap, names):
                    if not math.isfinite(value):
                        continue
                    key = (("__name__", name), *sorted(labels.items()))
                    series.setdefault(key, []).append((ts_ms, value))
        request = remote_pb2.WriteRequest()
        samples = 0
        resent = 0
        for key, points in series.items():
            points.sort()
            newest = self._newest_ms.get(key)
            fresh = [p for p in points if newest is None or p[0] > newest]
            # One value per timestamp per series (two samples of one tick: keep the last).
            dedup = dict(fresh)
            resent += len(points) - len(dedup)
            if not dedup:
                continue
            ts = request.timeseries.add()
            ts.labels.extend(types_pb2.Label(name=n, value=v) for n, v in key)
            ts.samples.extend(types_pb2.Sample(value=v, timestamp=t) for t, v in dedup.items())
            samples += len(dedup)
            self._newest_ms[key] = max(dedup)
            self._newest_ms.move_to_end(key)
        while len(self._newest_ms) > _SERIES_REMEMBERED:
            self._newest_ms.popitem(last=False)
        if resent:
            self._stats.add(resent=resent)
        return request, samples

    def _snapshots(self, item: _Queued) -> Iterator[tuple[int, FleetSnapshot]]:
        # One snapshot per tick (all GPUs sampled at one time) and one per verdict: the
        # Telemetry callbacks walk snap.gpus, so a tick costs one pass per metric.
        by_time: dict[float, list[GpuState]] = {}
        limit_s = item.received_s + _MAX_FUTURE_S
        for rec in item.gpus:
            sample = record_from_proto(rec)
            assert isinstance(sample, GpuSample)
            t_s = sample.time_s if sample.time_s <= limit_s else item.received_s
            if sample.gpm_stale:
                sample = dataclasses.replace(sample, **_STALE_CLEARED)
            key = (sample.gpu_uuid, sample.mig_uuid)
            if sample.gpu_name:
                self._gpu_names[key] = sample.gpu_name
            by_time.setdefault(t_s, []).append(
                GpuState(
                    item.agent_id,
                    item.hostname,
                    sample.gpu_index,
                    sample.gpu_uuid,
                    sample.gpu_name,
                    sample,
                    None,
                    None,
                    item.received_s,
                    mig_uuid=sample.mig_uuid,
                )
            )
        for t_s, gpus in sorted(by_time.items()):
            yield round(t_s * 1000), _snapshot(t_s, gpus)
        for msg in item.verdicts:
            end_s = timestamp_s(msg.window_end)
            name = self._gpu_names.get((msg.gpu_uuid, msg.mig_uuid), "")
            verdict = verdict_from_proto(msg, gpu_name=name)
            t_s = end_s if end_s <= limit_s else item.received_s
            state = GpuState(
                item.agent_id,
                item.hostname,
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

    def _send(self, request: remote_pb2.WriteRequest, samples: int) -> None:
        raw = request.SerializeToString()
        body = compress(raw) if self.config.find_repeats else literal_block(raw)
        backoff_s = self.config.min_backoff_s
        while True:
            try:
                status = self._transport(
                    self.config.url, body, self._headers(), self.config.timeout_s
                )
            except OSError as exc:
                status = 0
                self._warn_once(0, f"remote write to {self.config.url}: {exc}; retrying")
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
                    f"remote write to {self.config.url}: HTTP {status}, {samples} samples "
                    "refused (not retried)",
                )
                return
            if status:
                message = f"remote write to {self.config.url}: HTTP {status}; retrying"
                self._warn_once(status, message)
            if self._stop.is_set():
                self._stats.add(rejected=samples)
                return
            self._stats.add(retries=1)
            self._sleep(backoff_s)
            backoff_s = min(backoff_s * 2, self.config.max_backoff_s)

    def _warn_once(self, status: int, message: str) -> None:
        # One line per distinct status: a receiver down for an hour logs once, not per try.
        if status not in self._warned_status:
            self._warned_status.add(status)
            log.warning("%s", message)


_NO_COUNTS = CollectorCounts()


def _snapshot(taken_s: float, gpus: list[GpuState]) -> FleetSnapshot:
    return FleetSnapshot(taken_s, (), tuple(gpus), (), _NO_COUNTS)
