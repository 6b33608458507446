"""OpenTelemetry export: the collector's only ``opentelemetry.sdk`` importer.

One ``MeterProvider`` with OTLP/gRPC and OTLP/HTTP readers (pushed periodically),
plus any reader a test passes in (``InMemoryMetricReader``). The Prometheus
endpoint (``rooftop.collector.prometheus``) writes the same instruments, names and labels
from the same callbacks without the SDK, which costs ~60 µs per series there.

GPU, agent and collector figures are **observable** instruments read from a
``Fleet`` snapshot at collection time: one callback per instrument per collection,
never one synchronous record per sample (the SDK's ``record`` costs 4.5-7 µs).
Engine latencies are histograms fed from each engine sample's per-request bucket
increases (``EngineSample.tpot_hist`` etc.: one observation per finished request), or
its interval mean where the source has no per-request counts.

Names follow DESIGN §6 exactly and are listed, one row each, in docs/METRICS.md
(``METRICS`` below is the same list, checked against the doc by a test):

- standard where one exists: ``hw.gpu.utilization`` (NVML util.gpu / 100, a duty
  cycle), ``hw.gpu.memory.usage``/``.limit``/``.utilization``, ``hw.power``,
  ``hw.temperature``, ``hw.errors`` (``error.type``), ``hw.status`` (``hw.state``
  ok / degraded / failed, from ``rooftop.common.health.assess``),
  ``gen_ai.server.time_per_output_token``/``time_to_first_token``/``request.duration``;
- Rooftop's own under ``rooftop.*``, activities as ratios 0-1 with a
  ``rooftop.source`` attribute (``gpm``/``nvml``) and the DCGM field each matches;
- the verdict as a state gauge in the ``hw.state`` pattern: ``rooftop.gpu.bound``
  is 1 for the current state and 0 for the others.

The collector's own host goes on the resource (``host.name``); each node's
``host.name`` and each GPU's ``hw.type`` (``gpu``), ``hw.id`` (uuid), ``hw.model`` and
``rooftop.gpu.index`` are metric attributes, because one collector serves many
hosts; on Kubernetes, so are the ``k8s.pod.name``, ``k8s.namespace.name`` and
``k8s.container.name`` of the containers holding the GPU (the kubelet's answer).
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
    OTLPMetricExporter as GrpcMetricExporter,
)
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HttpMetricExporter,
)
from opentelemetry.metrics import CallbackOptions, Histogram, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from rooftop import __version__
from rooftop.collector.dcgm import dcgm_families
from rooftop.collector.fleet import DecodedBatch, Fleet, FleetSnapshot, GpuState, LimitReason
from rooftop.collector.prometheus import (
    Family,
    NativeHistogram,
    PrometheusServer,
    prometheus_name,
    render,
    series_key,
    spread_buckets,
)
from rooftop.common.errors import ConfigError
from rooftop.common.health import HW_STATES, assess
from rooftop.common.model import (
    GPU_FIELD_PROVENANCE,
    INACCESSIBLE_CAUSE,
    Bound,
    EngineSample,
    GpuSample,
    HistogramDelta,
    PodRef,
    Provenance,
)
from rooftop.common.otlp import OtlpExport
from rooftop.common.text import printable
from rooftop.common.workload import WorkloadGpu, WorkloadKind, aggregate, workload_gpus

__all__ = [
    "METRICS",
    "REQUEST_DURATION_BUCKETS_S",
    "MetricReader",
    "TPOT_BUCKETS_S",
    "TTFT_BUCKETS_S",
    "MetricSpec",
    "SAMPLE_GAUGES",
    "SampleGauge",
    "Telemetry",
    "bound_value",
    "engine_provider",
    "gpu_attributes",
]

log = logging.getLogger(__name__)

# H100 decode is 4-6 ms per token (measured); the semconv advisory buckets start at
# 10 ms and would put every healthy token in the first bucket.
TPOT_BUCKETS_S = (
    0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.01, 0.0125, 0.015,
    0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
)  # fmt: skip
TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0,
    1.5, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
)  # fmt: skip
# The semantic conventions' advisory for gen_ai.server.request.duration.
REQUEST_DURATION_BUCKETS_S = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
# One engine sample's histogram increase enters the SDK one observation at a time
# (4.5-7 µs each); a sample claiming more requests than this is garbage, not load.
MAX_OBSERVATIONS_PER_SAMPLE = 100_000
LAG_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)

# Engine aggregates do not tell chat from completions; both are text generation.
GEN_AI_OPERATION = "text_completion"
_KNOWN_ENGINES = ("vllm", "sglang", "tgi", "tensorrt-llm", "trtllm", "transformers", "llama.cpp")


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One exported metric: the row docs/METRICS.md must carry."""

    name: str
    instrument: str  # gauge | updowncounter | counter | histogram (OTel instrument kinds)
    unit: str
    description: str


def _m(name: str, instrument: str, unit: str, description: str) -> MetricSpec:
    return MetricSpec(name, instrument, unit, description)


METRICS: tuple[MetricSpec, ...] = (
    # --- per GPU, standard names ---
    _m("hw.gpu.utilization", "gauge", "1", "NVML util.gpu / 100: share of time a kernel ran"),
    _m("hw.gpu.memory.usage", "updowncounter", "By", "GPU memory used"),
    _m("hw.gpu.memory.limit", "updowncounter", "By", "GPU memory size"),
    _m("hw.power", "gauge", "W", "GPU power draw"),
    _m("hw.temperature", "gauge", "Cel", "GPU temperature"),
    _m(
        "hw.gpu.memory.utilization",
        "gauge",
        "1",
        "GPU memory used / size: capacity, not bandwidth (see rooftop.gpu.dram.activity)",
    ),
    _m(
        "hw.errors",
        "counter",
        "{error}",
        "GPU errors by error.type: xid (critical XID events this agent run, per code in "
        "rooftop.gpu.xid), ecc_corrected and ecc_uncorrected (the GPU's lifetime)",
    ),
    _m(
        "hw.status",
        "updowncounter",
        "1",
        "1 for the GPU's health (hw.state ok, degraded or failed), 0 for the other states",
    ),
    # --- per GPU, Rooftop's own ---
    _m("rooftop.gpu.sm.activity", "gauge", "1", "share of SMs busy (GPM SM_UTIL)"),
    _m("rooftop.gpu.sm.occupancy", "gauge", "1", "warps resident / max (GPM SM_OCCUPANCY)"),
    _m("rooftop.gpu.tensor.activity", "gauge", "1", "tensor pipe activity (GPM ANY_TENSOR_UTIL)"),
    _m("rooftop.gpu.pipe.activity", "gauge", "1", "FP16/FP32/FP64 pipe activity (GPM)"),
    _m("rooftop.gpu.dram.activity", "gauge", "1", "DRAM bandwidth used / peak (GPM DRAM_BW_UTIL)"),
    _m(
        "rooftop.gpu.memory_controller.utilization",
        "gauge",
        "1",
        "NVML util.memory / 100: memory-controller busy time (not capacity)",
    ),
    _m("rooftop.gpu.pcie.throughput", "gauge", "By/s", "PCIe traffic per direction (GPM)"),
    _m("rooftop.gpu.sm.clock", "gauge", "Hz", "SM clock"),
    _m("rooftop.gpu.bound", "gauge", "1", "1 for what bounds the GPU now, 0 for other states"),
    _m("rooftop.gpu.bound.confidence", "gauge", "1", "confidence of the current verdict"),
    _m(
        "rooftop.workload.bound",
        "gauge",
        "1",
        "share of a workload's GPUs in each verdict (rooftop.bound), 0-1",
    ),
    # --- engines ---
    _m(
        "gen_ai.server.time_per_output_token",
        "histogram",
        "s",
        "time per output token after the first, one observation per finished request",
    ),
    _m(
        "gen_ai.server.time_to_first_token",
        "histogram",
        "s",
        "time to first token, one observation per finished request",
    ),
    _m(
        "gen_ai.server.request.duration",
        "histogram",
        "s",
        "request arrival to last token, one observation per finished request",
    ),
    _m("rooftop.engine.requests", "gauge", "{request}", "requests running / waiting"),
    _m("rooftop.engine.time_per_output_token", "gauge", "s", "latest mean TPOT of an engine"),
    _m("rooftop.engine.time_to_first_token", "gauge", "s", "latest mean TTFT of an engine"),
    # --- agents (self-metrics carried in-band) ---
    _m("rooftop.agent.queued", "gauge", "{batch}", "batches in the agent's spool, not acked"),
    _m("rooftop.agent.sent", "counter", "{batch}", "batches the agent sent (per boot)"),
    _m("rooftop.agent.acked", "counter", "{batch}", "batches the agent had acked (per boot)"),
    _m("rooftop.agent.dropped", "counter", "{batch}", "batches the agent dropped, by reason"),
    _m("rooftop.agent.rejected", "counter", "{batch}", "batches the collector refused (per boot)"),
    _m("rooftop.agent.reconnects", "counter", "{reconnect}", "stream reconnects (per boot)"),
    _m(
        "rooftop.agent.acks_refused",
        "counter",
        "{ack}",
        "acks of seqs the agent never sent, refused: nothing discarded (per boot)",
    ),
    _m(
        "rooftop.agent.engine.scrape_errors",
        "counter",
        "{scrape}",
        "failed scrapes of engine /metrics endpoints (per boot)",
    ),
    _m("rooftop.agent.lag", "gauge", "s", "collector receive time - newest sample time"),
    _m("rooftop.agent.clock.offset", "gauge", "s", "collector receive time - agent send time"),
    _m("rooftop.agent.staleness", "gauge", "s", "time since the agent's last batch"),
    # --- the collector itself ---
    _m("rooftop.collector.batches", "counter", "{batch}", "batches applied"),
    _m("rooftop.collector.samples", "counter", "{sample}", "samples in applied batches"),
    _m("rooftop.collector.duplicates", "counter", "{batch}", "resent batches dropped"),
    _m(
        "rooftop.collector.restored_duplicates",
        "counter",
        "{batch}",
        "resent batches dropped by a mark restored from state_dir (applied before a restart)",
    ),
    _m("rooftop.collector.rejected", "counter", "{batch}", "poison batches refused, by reason"),
    _m(
        "rooftop.collector.refused",
        "counter",
        "{call}",
        "calls refused by authentication before any handler ran, by reason",
    ),
    _m(
        "rooftop.collector.limited",
        "counter",
        "{refusal}",
        "new agents, GPUs, engines and connections refused by a bound, by reason",
    ),
    _m(
        "rooftop.collector.remote_write.samples",
        "counter",
        "{sample}",
        "GPU samples and verdicts of each [[remote_write]], by outcome (sent, rejected, "
        "dropped, resent)",
    ),
    _m("rooftop.collector.skewed", "counter", "{sample}", "future-dated samples clamped"),
    _m("rooftop.collector.missing", "counter", "{batch}", "seqs agents skipped (spool drops)"),
    _m(
        "rooftop.collector.acked_elsewhere",
        "counter",
        "{batch}",
        "seqs a returning agent skipped because another collector acked them (not lost)",
    ),
    _m("rooftop.collector.streams", "updowncounter", "{stream}", "agent streams open"),
    _m(
        "rooftop.collector.batch.lag",
        "histogram",
        "s",
        "per batch: receive time - its oldest sample time",
    ),
)
_SPEC = {m.name: m for m in METRICS}

# (GpuSample field, metric, scale, extra attributes)
_GPU_RATIOS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("sm_active_pct", "rooftop.gpu.sm.activity", {}),
    ("sm_occupancy_pct", "rooftop.gpu.sm.occupancy", {}),
    ("tensor_active_pct", "rooftop.gpu.tensor.activity", {}),
    ("fp16_active_pct", "rooftop.gpu.pipe.activity", {"rooftop.gpu.pipe": "fp16"}),
    ("fp32_active_pct", "rooftop.gpu.pipe.activity", {"rooftop.gpu.pipe": "fp32"}),
    ("fp64_active_pct", "rooftop.gpu.pipe.activity", {"rooftop.gpu.pipe": "fp64"}),
    ("dram_bw_pct", "rooftop.gpu.dram.activity", {}),
    ("mem_ctrl_pct", "rooftop.gpu.memory_controller.utilization", {}),
)
_BOUND_STATES = tuple(Bound)


def bound_value(bound: Bound) -> str:
    """The ``rooftop.bound`` attribute value: memory, compute, host, mixed, idle, lost, unknown."""
    return bound.value.removesuffix("-bound")


def engine_provider(engine_id: str) -> str:
    """``gen_ai.provider.name`` for an engine id: its family (vllm, sglang, tgi, ...).

    The id's leading word otherwise (``"myserver:9000"`` → ``"myserver"``).
    """
    low = engine_id.lower()
    for known in _KNOWN_ENGINES:
        if low.startswith(known):
            return known
    head = re.split(r"[:/@\s]", low, maxsplit=1)[0]
    return head or "unknown"


def gpu_attributes(g: GpuState) -> dict[str, Any]:
    """The attributes every series of GPU (or MIG instance) ``g`` carries (docs/METRICS.md)."""
    attrs: dict[str, Any] = {
        "host.name": g.hostname,
        # The hardware semantic conventions require hw.type on every hw.* metric; it
        # rides on Rooftop's GPU metrics too, so one selector finds all of a GPU's.
        "hw.type": "gpu",
        # uuid is globally unique; a GPU without one is named by its host and index.
        "hw.id": g.gpu_uuid or f"{g.hostname}/gpu{g.gpu_index}",
        "hw.model": g.gpu_name,
        "rooftop.gpu.index": g.gpu_index,
    }
    if g.mig_uuid:
        # A MIG instance shares its parent's index and uuid: its own MIG uuid is its
        # hw.id (else two instances would be one series), hw.parent the GPU's.
        attrs["hw.id"] = g.mig_uuid
        attrs["hw.parent"] = g.gpu_uuid or f"{g.hostname}/gpu{g.gpu_index}"
        attrs["rooftop.gpu.mig"] = g.mig_uuid
    pods = g.sample.pods if g.sample is not None else g.verdict.pods if g.verdict else ()
    if pods:
        attrs.update(_pod_attrs(pods))
    return attrs


def _pod_attrs(pods: Sequence[PodRef]) -> dict[str, str]:
    """``k8s.*`` attributes of the containers holding a GPU (docs/METRICS.md).

    One series per GPU, as for a GPU no pod holds: a GPU shared by several pods
    (time-slicing) lists each attribute's distinct values sorted and joined by ",", so
    sums over GPUs stay sums (dcgm-exporter repeats the GPU's series once per pod,
    which multiplies them) and ``k8s_pod_name=~"(.*,)?llm-0(,.*)?"`` finds them.
    """

    def joined(values: Iterable[str]) -> str:
        return ",".join(sorted(set(values)))

    return {
        "k8s.pod.name": joined(p.pod for p in pods),
        "k8s.namespace.name": joined(p.namespace for p in pods),
        "k8s.container.name": joined(p.container for p in pods),
    }


def _engine_attrs(e: EngineSample) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": GEN_AI_OPERATION,
        "gen_ai.provider.name": engine_provider(e.engine_id),
    }
    if e.model:
        attrs["gen_ai.request.model"] = e.model
    return attrs


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _otlp_exporter(exp: OtlpExport) -> MetricExporter:
    # Settings arrive resolved (file, then OTEL_EXPORTER_OTLP_*; rooftop.common.otlp): the
    # endpoint is the exact URL, so nothing is appended here. The exporter still reads
    # the TLS file and compression variables itself.
    headers = dict(exp.headers) or None
    if exp.protocol == "grpc":
        return GrpcMetricExporter(
            endpoint=exp.endpoint, insecure=exp.plaintext, headers=headers, timeout=exp.timeout_s
        )
    return HttpMetricExporter(endpoint=exp.endpoint, headers=headers, timeout=exp.timeout_s)


# Collecting a 1,000-node fleet takes seconds of SDK time (about 25 µs per point here):
# the readers' default 10 s collection deadline is too short for the first scrape.
COLLECT_TIMEOUT_S = 60.0


class Telemetry:
    """The collector's OpenTelemetry pipeline over a ``Fleet``.

    Also a ``BatchObserver``: the ingest hands it every applied batch, from which it
    records the engine latency histograms and the batch lag.

    Args:
        fleet: read at every collection.
        prometheus_listen: HOST:PORT for the Prometheus endpoint (port 0 picks one;
            see ``prometheus_port``); empty or None: no Prometheus endpoint.
        prometheus_checks: health paths served beside ``/metrics`` (``PrometheusServer``).
        prometheus_max_connections: scrapes served at once (``PrometheusServer``).
        prometheus_timeout_s: the longest a scrape connection may stay silent.
        otlp: OTLP destinations (gRPC or HTTP/protobuf), pushed periodically.
        readers: extra readers (a test's ``InMemoryMetricReader``).
        max_series_per_metric: the cardinality limit of every instrument (the SDK
            default, 2,000, is far short of 1,000 nodes x 8 GPUs x 6 bound states).
        host_name: the collector's ``host.name`` resource attribute.
        clock: wall clock (Unix epoch seconds), for staleness.
        service_name: the ``service.name`` resource attribute.
        scope_name: the instrumentation scope (meter) name.
        metrics: create only these instruments (names from ``METRICS``); None: all.
            The agent's direct OTLP mode (``rooftop.agent.otlp``) leaves out the pipeline's own.
        dcgm_names: also write dcgm-exporter's ``DCGM_FI_*`` series on the Prometheus
            endpoint (``rooftop.collector.dcgm``).
    """

    def __init__(
        self,
        fleet: Fleet,
        *,
        prometheus_listen: str | None = None,
        prometheus_checks: Mapping[str, Callable[[], str | None]] | None = None,
        prometheus_max_connections: int = 16,
        prometheus_timeout_s: float = 10.0,
        otlp: Sequence[OtlpExport] = (),
        readers: Sequence[MetricReader] = (),
        max_series_per_metric: int = 65_536,
        host_name: str | None = None,
        clock: Callable[[], float] = time.time,
        service_name: str = "rooftop-collector",
        scope_name: str = "rooftop.collector",
        metrics: Collection[str] | None = None,
        dcgm_names: bool = False,
    ) -> None:
        unknown = set(metrics or ()) - set(_SPEC)
        if unknown:
            raise ValueError(f"not in METRICS: {sorted(unknown)}")
        self._only = None if metrics is None else frozenset(metrics)
        self._fleet = fleet
        self._clock = clock
        self._prometheus_listen = prometheus_listen or None
        self._prometheus_checks = prometheus_checks
        self._prometheus_max_connections = prometheus_max_connections
        self._prometheus_timeout_s = prometheus_timeout_s
        self._prometheus: PrometheusServer | None = None
        self._prometheus_port: int | None = None
        self._max_series = max_series_per_metric
        # What the Prometheus endpoint writes: every observable instrument, and the
        # histograms aggregated natively as they are recorded.
        self._families: list[Family] = []
        self._bodies: dict[str, Callable[[FleetSnapshot], Iterable[Observation]]] = {}
        self._remote_writes: list[tuple[str, Callable[[], Any]]] = []
        self._series_keys: dict[tuple[Any, ...], tuple[tuple[str, str], ...]] = {}
        self._native: dict[str, NativeHistogram] = {}
        self._bad_histograms: set[str] = set()  # logged once per field
        self._lock = threading.Lock()
        self._stopped = False
        all_readers: list[MetricReader] = list(readers)
        for exp in otlp:
            all_readers.append(
                PeriodicExportingMetricReader(
                    _otlp_exporter(exp),
                    export_interval_millis=exp.interval_s * 1000,
                    # Covers the collection (seconds for a large fleet) and the export.
                    export_timeout_millis=(COLLECT_TIMEOUT_S + exp.timeout_s) * 1000,
                )
            )
        resource = Resource.create(
            {
                "service.name": service_name,
                "service.version": __version__,
                "host.name": host_name or socket.gethostname(),
            }
        )
        self._resource = resource
        self._provider = MeterProvider(
            metric_readers=all_readers,
            resource=resource,
            views=_views(max_series_per_metric),
            # Gauges read from fleet state carry no trace context: exemplars would only
            # cost time at every collection.
            exemplar_filter=AlwaysOffExemplarFilter(),
            shutdown_on_exit=False,  # shutdown() is called by the service, once
        )
        self._meter = self._provider.get_meter(scope_name, __version__)
        self._create_instruments()
        if dcgm_names:
            self._families += dcgm_families(fleet)

    # -- lifecycle --

    @property
    def prometheus_port(self) -> int | None:
        """The Prometheus endpoint's bound port after ``start``; None without one."""
        return self._prometheus_port

    def start(self) -> None:
        """Start the Prometheus HTTP endpoint (the OTLP readers run from construction).

        Raises:
            ConfigError: the Prometheus address cannot be bound.
        """
        if self._prometheus_listen is None or self._prometheus is not None:
            return
        host, port = _split_address(self._prometheus_listen)
        try:
            self._prometheus = PrometheusServer(
                host,
                port,
                self.prometheus_text,
                checks=self._prometheus_checks,
                max_connections=self._prometheus_max_connections,
                timeout_s=self._prometheus_timeout_s,
                on_refused=lambda: self._fleet.count_limited(LimitReason.SCRAPE_CONNECTIONS),
            )
        except OSError as exc:
            raise ConfigError(
                f"prometheus.listen: cannot serve on {self._prometheus_listen}: {exc.strerror}"
            ) from exc
        self._prometheus_port = self._prometheus.port

    def prometheus_text(self, names: frozenset[str] | None = None) -> str:
        """What ``/metrics`` serves now (the text exposition format).

        With ``names``, only those families (a scrape's ``name[]``).
        """
        return render(
            self._families,
            list(self._native.values()),
            resource=self._resource.attributes,
            max_series=self._max_series,
            names=names,
        )

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Export now through every push reader; True when all finished in time."""
        return bool(self._provider.force_flush(timeout_millis=timeout_s * 1000))

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Final export, stop the readers and the Prometheus endpoint. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._provider.shutdown(timeout_millis=timeout_s * 1000)
        if self._prometheus is not None:
            self._prometheus.close()

    def points(
        self, snap: FleetSnapshot, names: Iterable[str]
    ) -> Iterator[tuple[tuple[tuple[str, str], ...], float]]:
        """``snap``'s series of the gauges ``names``, named as the Prometheus endpoint does.

        Yields ``(labels, value)``: ``labels`` sorted ``(name, value)`` pairs, the first
        ``("__name__", metric name)`` (the remote-write input).
        """
        cache = self._series_keys
        for name in names:
            body = self._bodies.get(name)
            if body is None:
                continue
            spec = _SPEC[name]
            family = prometheus_name(spec.name, spec.unit, spec.instrument)
            for obs in body(snap):
                # The same few label sets recur at every tick: convert each once.
                raw = (family, *(obs.attributes or {}).items())
                key = cache.get(raw)
                if key is None:
                    if len(cache) >= _SERIES_KEYS_CACHED:
                        cache.clear()  # GPUs come and go: start over, rarely
                    key = cache[raw] = series_key(family, obs.attributes)
                yield key, float(obs.value)

    # -- BatchObserver --

    def observe_batch(self, batch: DecodedBatch, received_s: float) -> None:
        """Record the engine latencies and the lag of one applied batch."""
        for e in batch.engines:
            attrs: dict[str, Any] | None = None
            for name, hist_field, mean_field in _ENGINE_HISTOGRAMS:
                hist: HistogramDelta | None = getattr(e, hist_field)
                if hist is not None:
                    # Per request (hooks, vLLM plugin, an engine's own histogram).
                    if hist.count > 0 and self._acceptable(e, hist_field, hist):
                        attrs = attrs or _engine_attrs(e)
                        self._record_delta(name, hist, attrs)
                    continue
                mean_ms = getattr(e, mean_field) if mean_field else None
                if mean_ms is not None:
                    # A source that does not count per request (an agent from before
                    # per-request histograms, an older engine): its interval mean.
                    attrs = attrs or _engine_attrs(e)
                    self._record(name, mean_ms / 1000.0, attrs)
        if batch.oldest_sample_s is not None:
            lag_s = max(0.0, received_s - batch.oldest_sample_s)
            self._record("rooftop.collector.batch.lag", lag_s, {})

    def _acceptable(self, e: EngineSample, field: str, hist: HistogramDelta) -> bool:
        problem = hist.problem()
        if problem is None and hist.count > MAX_OBSERVATIONS_PER_SAMPLE:
            problem = f"{hist.count} observations, over {MAX_OBSERVATIONS_PER_SAMPLE}"
        if problem is None:
            return True
        if field not in self._bad_histograms:
            self._bad_histograms.add(field)
            log.warning("engine %s: %s not exported: %s", printable(e.engine_id), field, problem)
        return False

    def _record_delta(self, name: str, hist: HistogramDelta, attrs: dict[str, Any]) -> None:
        histogram = self._histograms.get(name)
        if histogram is not None:
            for value, n in spread_buckets(hist.bounds_s, hist.bucket_counts, hist.sum_s):
                for _ in range(n):
                    histogram.record(value, attrs)
        native = self._native.get(name)
        if native is not None:
            native.add(hist.bounds_s, hist.bucket_counts, hist.sum_s, attrs)

    def _record(self, name: str, value: float, attrs: dict[str, Any]) -> None:
        histogram = self._histograms.get(name)
        if histogram is not None:
            histogram.record(value, attrs)
        native = self._native.get(name)
        if native is not None:
            native.record(value, attrs)

    # -- instruments --

    def _wanted(self, name: str) -> bool:
        return self._only is None or name in self._only

    def _histogram(self, name: str, bounds: Sequence[float]) -> None:
        if not self._wanted(name):
            return
        spec = _SPEC[name]
        self._histograms[name] = self._meter.create_histogram(
            spec.name, spec.unit, spec.description, explicit_bucket_boundaries_advisory=bounds
        )
        if self._prometheus_listen:
            self._native[name] = NativeHistogram(spec.name, spec.unit, spec.description, bounds)

    def _gauge(self, name: str, callback: Callable[[FleetSnapshot], Iterable[Observation]]) -> None:
        if not self._wanted(name):
            return
        spec = _SPEC[name]
        self._bodies[name] = callback
        cb = self._callback(callback)
        self._families.append(
            Family(
                spec.name,
                spec.instrument,
                spec.unit,
                spec.description,
                # Less the GPUs of agents that moved to another collector (Fleet).
                lambda: callback(self._fleet.export_snapshot()),
            )
        )
        if spec.instrument == "gauge":
            self._meter.create_observable_gauge(name, [cb], spec.unit, spec.description)
        elif spec.instrument == "counter":
            self._meter.create_observable_counter(name, [cb], spec.unit, spec.description)
        else:
            self._meter.create_observable_up_down_counter(name, [cb], spec.unit, spec.description)

    def _callback(
        self, body: Callable[[FleetSnapshot], Iterable[Observation]]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            del options
            # A snapshot per callback: a shallow copy of frozen entries, ~µs per 1k GPUs.
            return list(body(self._fleet.export_snapshot()))

        return callback

    def _create_instruments(self) -> None:
        self._histograms: dict[str, Histogram] = {}
        self._histogram("gen_ai.server.time_per_output_token", TPOT_BUCKETS_S)
        self._histogram("gen_ai.server.time_to_first_token", TTFT_BUCKETS_S)
        self._histogram("gen_ai.server.request.duration", REQUEST_DURATION_BUCKETS_S)
        self._histogram("rooftop.collector.batch.lag", LAG_BUCKETS_S)

        by_metric: dict[str, list[SampleGauge]] = {}
        for gauge in SAMPLE_GAUGES:
            by_metric.setdefault(gauge.metric, []).append(gauge)
        metrics = list(by_metric)
        # hw.errors and hw.status after the hw.* sample gauges, as the endpoint always had.
        split = metrics.index("rooftop.gpu.sm.clock")
        for name in metrics[:split]:
            self._gauge(name, _sample_series(by_metric[name]))
        self._gauge("hw.errors", _gpu_errors)
        self._gauge("hw.status", _health_states)
        for name in metrics[split:]:
            self._gauge(name, _sample_series(by_metric[name]))
        self._gauge("rooftop.gpu.bound", _bound_states)
        self._gauge("rooftop.gpu.bound.confidence", _bound_confidence)
        self._gauge("rooftop.workload.bound", _workload_states)

        self._gauge("rooftop.engine.requests", _engine_requests)
        self._gauge("rooftop.engine.time_per_output_token", _engine_latency("tpot_ms"))
        self._gauge("rooftop.engine.time_to_first_token", _engine_latency("ttft_ms"))

        self._gauge("rooftop.agent.queued", _agent_stat("queued"))
        self._gauge("rooftop.agent.sent", _agent_stat("sent"))
        self._gauge("rooftop.agent.acked", _agent_stat("acked"))
        self._gauge("rooftop.agent.rejected", _agent_stat("rejected_batches"))
        self._gauge("rooftop.agent.reconnects", _agent_stat("reconnects"))
        self._gauge("rooftop.agent.acks_refused", _agent_stat("acks_refused"))
        self._gauge("rooftop.agent.engine.scrape_errors", _agent_stat("engine_scrape_errors"))
        self._gauge("rooftop.agent.dropped", _agent_dropped)
        self._gauge("rooftop.agent.lag", _agent_lag)
        self._gauge("rooftop.agent.clock.offset", _agent_offset)
        self._gauge("rooftop.agent.staleness", self._agent_staleness)

        self._gauge("rooftop.collector.batches", _count("batches"))
        self._gauge("rooftop.collector.samples", _count("samples"))
        self._gauge("rooftop.collector.duplicates", _count("duplicates"))
        self._gauge("rooftop.collector.restored_duplicates", _count("restored_duplicates"))
        self._gauge("rooftop.collector.skewed", _count("skewed"))
        self._gauge("rooftop.collector.missing", _count("missing"))
        self._gauge("rooftop.collector.acked_elsewhere", _count("acked_elsewhere"))
        self._gauge("rooftop.collector.streams", _count("streams"))
        self._gauge("rooftop.collector.rejected", _rejected)
        self._gauge("rooftop.collector.refused", _refused)
        self._gauge("rooftop.collector.limited", _limited)

    def add_remote_write(self, url: str, stats: Callable[[], Any]) -> None:
        """Export a remote-write output's counters (``RemoteWriteStats``), by outcome."""
        first = not self._remote_writes
        self._remote_writes.append((url, stats))
        if first:
            self._gauge("rooftop.collector.remote_write.samples", self._remote_write_samples)

    def _remote_write_samples(self, snap: FleetSnapshot) -> Iterable[Observation]:
        del snap
        for url, stats in self._remote_writes:
            s = stats()
            for outcome, value in (
                ("sent", s.sent),
                ("rejected", s.rejected),
                ("dropped", s.dropped_queue_full),
                ("resent", s.resent),
            ):
                attrs = {"url.full": url, "rooftop.remote_write.outcome": outcome}
                yield Observation(value, attrs)

    def _agent_staleness(self, snap: FleetSnapshot) -> Iterable[Observation]:
        now_s = self._clock()
        for a in snap.agents:
            yield Observation(max(0.0, now_s - a.last_seen_s), _agent_attrs(a.hostname, a.agent_id))


# (histogram, EngineSample field with the per-request increase, interval-mean fallback)
_ENGINE_HISTOGRAMS: tuple[tuple[str, str, str | None], ...] = (
    ("gen_ai.server.time_per_output_token", "tpot_hist", "tpot_ms"),
    ("gen_ai.server.time_to_first_token", "ttft_hist", "ttft_ms"),
    ("gen_ai.server.request.duration", "request_duration_hist", None),
)


_SERIES_KEYS_CACHED = 262_144  # remote write: attributes -> labels, ~1 KiB each


def _views(limit: int) -> list[View]:
    # One view per instrument, by exact name: wildcard views would overlap and
    # export a metric twice.
    views: list[View] = []
    for spec in METRICS:
        buckets = {
            "gen_ai.server.time_per_output_token": TPOT_BUCKETS_S,
            "gen_ai.server.time_to_first_token": TTFT_BUCKETS_S,
            "gen_ai.server.request.duration": REQUEST_DURATION_BUCKETS_S,
        }.get(spec.name)
        if buckets is not None:
            views.append(
                View(
                    instrument_name=spec.name,
                    aggregation=ExplicitBucketHistogramAggregation(boundaries=buckets),
                    aggregation_cardinality_limit=limit,
                )
            )
        else:
            views.append(View(instrument_name=spec.name, aggregation_cardinality_limit=limit))
    return views


# --- callbacks: pure functions of a snapshot -------------------------------------------------


def _ratio(pct: float) -> float:
    return pct / 100.0  # division, not * 0.01: 95.5 / 100 is exactly 0.955


def _same(value: float) -> float:
    return value


def _mhz_to_hz(mhz: float) -> float:
    return mhz * 1e6


@dataclass(frozen=True, slots=True)
class SampleGauge:
    """One series a GPU sample makes: ``metric`` with ``attrs``, from ``fields``.

    ``value`` takes the fields' values (none of them None) and returns the series' value,
    or None for no series. The Prometheus endpoint and OTLP read these from each GPU's
    newest sample; remote write from every sample (``rooftop.collector.remote_write``).
    """

    metric: str
    fields: tuple[str, ...]
    value: Callable[..., float | None]
    attrs: Mapping[str, str]
    gpm: bool  # from GPM: not written again for a sample marked gpm_stale
    # ``value`` as one arithmetic step, ("*", k) or ("/", k), where it is one: remote
    # write applies it to whole columns without a call per point.
    step: tuple[str, float] | None = None


_STEPS: dict[Callable[[float], float], tuple[str, float]] = {
    _ratio: ("/", 100.0),
    _same: ("*", 1.0),
    _mhz_to_hz: ("*", 1e6),
}


def _used_share(used: float, total: float) -> float | None:
    return used / total if total else None


def _sample_gauges() -> tuple[SampleGauge, ...]:
    def one(
        metric: str, field: str, convert: Callable[[float], float], **attrs: str
    ) -> SampleGauge:
        gpm = GPU_FIELD_PROVENANCE.get(field) is Provenance.GPM
        return SampleGauge(metric, (field,), convert, attrs, gpm, _STEPS.get(convert))

    gauges = [
        one("hw.gpu.utilization", "busy_pct", _ratio, **{"hw.gpu.task": "general"}),
        one("hw.gpu.memory.usage", "mem_used_bytes", _same),
        one("hw.gpu.memory.limit", "mem_total_bytes", _same),
        one("hw.power", "power_w", _same),
        one("hw.temperature", "temperature_c", _same),
        SampleGauge(
            "hw.gpu.memory.utilization",
            ("mem_used_bytes", "mem_total_bytes"),
            _used_share,
            {},
            False,
        ),
        one("rooftop.gpu.sm.clock", "sm_clock_mhz", _mhz_to_hz),
    ]
    for field, name, extra in _GPU_RATIOS:
        source = GPU_FIELD_PROVENANCE.get(field)
        source_attr = {"rooftop.source": source.value if source else "nvml"}
        gauges.append(one(name, field, _ratio, **extra, **source_attr))
    for field, direction in (
        ("pcie_rx_bytes_per_s", "receive"),
        ("pcie_tx_bytes_per_s", "transmit"),
    ):
        attrs = {"network.io.direction": direction, "rooftop.source": "gpm"}
        gauges.append(one("rooftop.gpu.pcie.throughput", field, _same, **attrs))
    return tuple(gauges)


def _sample_series(
    gauges: Sequence[SampleGauge],
) -> Callable[[FleetSnapshot], Iterable[Observation]]:
    def body(snap: FleetSnapshot) -> Iterable[Observation]:
        for g in snap.gpus:
            s = g.sample
            if s is None or s.lost:
                continue  # absent means "not measured", never 0
            base = None
            for gauge in gauges:
                values = [getattr(s, f) for f in gauge.fields]
                if None in values:
                    continue
                value = gauge.value(*values)
                if value is None:
                    continue
                base = base or gpu_attributes(g)
                yield Observation(value, {**base, **gauge.attrs})

    return body


# Every series a GPU sample makes, in the order the endpoint writes them.
SAMPLE_GAUGES: tuple[SampleGauge, ...] = _sample_gauges()


# (GpuSample field, error.type): each a count that only grows while its source lives.
_ERROR_COUNTS = (
    ("xid_count", "xid"),
    ("ecc_corrected_aggregate", "ecc_corrected"),
    ("ecc_uncorrected_aggregate", "ecc_uncorrected"),
)


def _gpu_errors(snap: FleetSnapshot) -> Iterable[Observation]:
    for g in snap.gpus:
        if g.sample is None:
            continue
        base = None
        for field, error_type in _ERROR_COUNTS:
            value = getattr(g.sample, field)
            if value is None:
                continue  # not measured (no ECC, no XID events): absent, never 0
            base = base or gpu_attributes(g)
            if field == "xid_count":
                yield from _xid_errors(g.sample, value, base)
            else:
                yield Observation(value, {**base, "error.type": error_type})


def _xid_errors(s: GpuSample, total: int, base: dict[str, Any]) -> Iterator[Observation]:
    """``error.type="xid"`` split by code: ``rooftop.gpu.xid`` names each code's series.

    error.type stays the class ("xid"), the code a domain attribute of its own, as the
    semantic conventions advise for a domain with its own error codes, so
    ``sum by (error_type)`` still counts every XID. The series without a code holds what
    no code accounts for: 0 before any XID, events past the agent's distinct-code
    bound, or all of them from an agent that counts only the total.
    """
    counts = s.xid_code_counts if len(s.xid_code_counts) == len(s.xid_codes) else ()
    for code, count in zip(s.xid_codes if counts else (), counts, strict=True):
        yield Observation(count, {**base, "error.type": "xid", "rooftop.gpu.xid": code})
    yield Observation(max(0, total - sum(counts)), {**base, "error.type": "xid"})


def _health_states(snap: FleetSnapshot) -> Iterable[Observation]:
    for g in snap.gpus:
        s = g.sample
        if s is None or s.inaccessible is not None:
            continue  # no data: its health is unknown, not ok
        current = assess(s).state
        base = gpu_attributes(g)
        for state in HW_STATES:
            yield Observation(1 if state is current else 0, {**base, "hw.state": state.value})


def _current_bound(g: GpuState) -> tuple[Bound, str | None] | None:
    """The GPU's bound state now and the cause riding on it, if any.

    A GPU NVML refuses the agent is ``unknown`` (nothing measures it), with the cause
    ``inaccessible``, never ``lost``: it needs access, and the lost alert drains nodes.
    """
    s = g.sample
    if s is not None and s.lost:
        if s.inaccessible is not None:
            return Bound.UNKNOWN, INACCESSIBLE_CAUSE
        return Bound.LOST, None
    if g.verdict is None:
        return None
    cause = g.verdict.cause
    return g.verdict.verdict, cause.value if cause is not None else None


def _bound_states(snap: FleetSnapshot) -> Iterable[Observation]:
    for g in snap.gpus:
        now = _current_bound(g)
        if now is None:
            continue
        current, cause = now
        base = gpu_attributes(g)
        for state in _BOUND_STATES:
            attrs = {**base, "rooftop.bound": bound_value(state)}
            if state is current and cause is not None:
                # The cause rides on the one series that is 1, as hw.state's do.
                attrs["rooftop.bound.cause"] = cause
            yield Observation(1 if state is current else 0, attrs)


def _bound_confidence(snap: FleetSnapshot) -> Iterable[Observation]:
    for g in snap.gpus:
        if g.verdict is None:
            continue
        attrs = {**gpu_attributes(g), "rooftop.bound": bound_value(g.verdict.verdict)}
        yield Observation(g.verdict.confidence, attrs)


def _workload_gpus(snap: FleetSnapshot) -> Iterable[WorkloadGpu]:
    for g in snap.gpus:
        yield from workload_gpus(
            node=g.hostname,
            device=f"{g.gpu_index}/{g.mig_uuid}" if g.mig_uuid else str(g.gpu_index),
            gpu_name=g.gpu_name,
            sample=g.sample,
            verdict=g.verdict,
            engine=g.engine,
        )


def _workload_states(snap: FleetSnapshot) -> Iterable[Observation]:
    # The GPU gauge's pattern per workload: one series per state, valued at the share
    # of the workload's GPUs in it (1 and 0s for a one-GPU workload).
    for row in aggregate(_workload_gpus(snap)):
        w = row.workload
        if w is None or w.kind is WorkloadKind.NONE or row.dominant is None:
            continue
        base: dict[str, Any] = {
            "rooftop.workload.name": w.name,
            "rooftop.workload.kind": w.kind.value,
        }
        if w.namespace:
            base["k8s.namespace.name"] = w.namespace
        if w.node:
            base["host.name"] = w.node  # a process is named on its own node only
        for state in _BOUND_STATES:
            yield Observation(row.share(state), {**base, "rooftop.bound": bound_value(state)})


def _engine_base(hostname: str, e: EngineSample) -> dict[str, Any]:
    return {"host.name": hostname, "rooftop.engine.id": e.engine_id, **_engine_attrs(e)}


def _engine_requests(snap: FleetSnapshot) -> Iterable[Observation]:
    for es in snap.engines:
        e = es.engine
        base = _engine_base(es.hostname, e)
        for state, value in (("running", e.requests_running), ("waiting", e.requests_waiting)):
            if value is not None:
                yield Observation(value, {**base, "rooftop.engine.state": state})


def _engine_latency(field: str) -> Callable[[FleetSnapshot], Iterable[Observation]]:
    def body(snap: FleetSnapshot) -> Iterable[Observation]:
        for es in snap.engines:
            value = getattr(es.engine, field)
            if value is not None:
                yield Observation(value / 1000.0, _engine_base(es.hostname, es.engine))

    return body


def _agent_attrs(hostname: str, agent_id: str) -> dict[str, Any]:
    return {"host.name": hostname, "rooftop.agent.id": agent_id}


def _agent_stat(field: str) -> Callable[[FleetSnapshot], Iterable[Observation]]:
    def body(snap: FleetSnapshot) -> Iterable[Observation]:
        for a in snap.agents:
            yield Observation(getattr(a.stats, field), _agent_attrs(a.hostname, a.agent_id))

    return body


def _agent_dropped(snap: FleetSnapshot) -> Iterable[Observation]:
    for a in snap.agents:
        base = _agent_attrs(a.hostname, a.agent_id)
        for reason, value in (
            ("spool_full", a.stats.dropped_spool_full),
            ("corrupt", a.stats.dropped_corrupt),
            ("invalid", a.stats.dropped_invalid),
        ):
            yield Observation(value, {**base, "rooftop.drop.reason": reason})


def _agent_lag(snap: FleetSnapshot) -> Iterable[Observation]:
    for a in snap.agents:
        if a.lag_s is not None:
            yield Observation(a.lag_s, _agent_attrs(a.hostname, a.agent_id))


def _agent_offset(snap: FleetSnapshot) -> Iterable[Observation]:
    for a in snap.agents:
        if a.clock_offset_s is not None:
            yield Observation(a.clock_offset_s, _agent_attrs(a.hostname, a.agent_id))


def _count(field: str) -> Callable[[FleetSnapshot], Iterable[Observation]]:
    def body(snap: FleetSnapshot) -> Iterable[Observation]:
        yield Observation(getattr(snap.counts, field))

    return body


def _rejected(snap: FleetSnapshot) -> Iterable[Observation]:
    for reason, value in snap.counts.rejected:
        yield Observation(value, {"rooftop.reject.reason": reason})


def _refused(snap: FleetSnapshot) -> Iterable[Observation]:
    for reason, value in snap.counts.refused:
        yield Observation(value, {"rooftop.refuse.reason": reason})


def _limited(snap: FleetSnapshot) -> Iterable[Observation]:
    for reason, value in snap.counts.limited:
        yield Observation(value, {"rooftop.limit.reason": reason})
