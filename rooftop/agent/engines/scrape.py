"""Scrapers of engine ``/metrics`` endpoints (vLLM, SGLang, TGI) into ``EngineSample``s.

For engines we cannot hook, their Prometheus endpoint is the next best thing.
Latency there is cumulative histograms, so per-interval TPOT and TTFT come from the
deltas of ``_sum`` and ``_count`` between two scrapes (p50/p99 from the bucket
deltas, interpolated within a bucket as PromQL's ``histogram_quantile`` does).
Queue depth is a gauge, read as is. The per-request histograms (TPOT where the engine
observes it once per request, TTFT, end-to-end request latency) also travel as they
are: their bucket increase since the last scrape, in the engine's own bounds
(``EngineSample.tpot_hist`` etc.), which the collector adds to its histograms.

Robustness, since the endpoint belongs to someone else:
- a counter that goes down means the engine restarted: that metric re-baselines
  (counted in ``resets``) and reports nothing for that interval rather than a
  negative or mixed figure;
- unreachable endpoints and malformed text are counted and retried next interval;
  ``scrape_once`` never raises.

Metric names are in ``VLLM``, ``SGLANG`` and ``TGI`` below (first present name wins;
label sets, e.g. vLLM's per-engine ``engine`` label, are summed). Current and older
names are both accepted: vLLM's ``vllm:request_time_per_output_token_seconds`` /
``vllm:inter_token_latency_seconds`` / older ``vllm:time_per_output_token_seconds``
for TPOT, ``vllm:kv_cache_usage_perc`` / older ``vllm:gpu_cache_usage_perc`` (both
0-1) for KV use. TGI has no TTFT metric, and its per-token time
(``tgi_request_mean_time_per_token_duration``) includes prefill: its results say so
in ``notes``.
"""

from __future__ import annotations

import http.client
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from rooftop.common.counters import Counters
from rooftop.common.model import EMPTY_HISTOGRAM, EngineSample, HistogramDelta, invalid_reason

__all__ = [
    "ENGINES",
    "EngineMetrics",
    "Scraper",
    "ScrapeResult",
    "ScraperStats",
    "detect_engine",
    "fetch_metrics",
    "histogram_quantile",
    "parse_samples",
]

_log = logging.getLogger(__name__)

# A /metrics page with every vLLM histogram is ~200 KiB; anything past this is not one.
_MAX_BODY_BYTES = 16 * 1024 * 1024
_MAX_KEPT_SAMPLES = 10_000

Labels = Mapping[str, str]
Samples = dict[str, list[tuple[Labels, float]]]


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """Where one engine keeps each figure in its ``/metrics`` (first present name wins)."""

    kind: str
    prefix: str
    tpot: tuple[str, ...]  # histogram base names, seconds
    ttft: tuple[str, ...]  # histogram base names, seconds
    running: tuple[str, ...]  # gauges
    waiting: tuple[str, ...]  # gauges
    output_tokens: tuple[str, ...]  # cumulative sample names (a counter, a histogram's _sum)
    kv_cache_usage: tuple[str, ...]  # gauges, 0-1
    notes: tuple[str, ...] = ()  # caveats every sample from this engine carries
    # Histograms observed once per finished request, whose bucket increases become
    # EngineSample.tpot_hist / ttft_hist / request_duration_hist. Per-token histograms
    # (vLLM's inter-token latency) are left out: they count tokens, not requests.
    tpot_per_request: tuple[str, ...] = ()
    request_duration: tuple[str, ...] = ()


VLLM = EngineMetrics(
    kind="vllm",
    prefix="vllm:",
    # Per-request TPOT first; inter-token latency (per token) is the fallback, and
    # time_per_output_token_seconds is its name before vLLM v1 renamed it.
    tpot=(
        "vllm:request_time_per_output_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:time_per_output_token_seconds",
    ),
    ttft=("vllm:time_to_first_token_seconds",),
    running=("vllm:num_requests_running",),
    waiting=("vllm:num_requests_waiting",),
    output_tokens=("vllm:generation_tokens_total",),
    kv_cache_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    tpot_per_request=("vllm:request_time_per_output_token_seconds",),
    request_duration=("vllm:e2e_request_latency_seconds",),
)
SGLANG = EngineMetrics(
    kind="sglang",
    prefix="sglang:",
    tpot=("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds"),
    ttft=("sglang:time_to_first_token_seconds",),
    running=("sglang:num_running_reqs",),
    waiting=("sglang:num_queue_reqs",),
    output_tokens=("sglang:generation_tokens_total",),
    kv_cache_usage=("sglang:token_usage",),
    # SGLang observes time_per_output_token once per finished request.
    tpot_per_request=("sglang:time_per_output_token_seconds",),
    request_duration=("sglang:e2e_request_latency_seconds",),
)
TGI = EngineMetrics(
    kind="tgi",
    prefix="tgi_",
    tpot=("tgi_request_mean_time_per_token_duration",),
    ttft=(),
    running=("tgi_batch_current_size",),
    waiting=("tgi_queue_size",),
    output_tokens=("tgi_request_generated_tokens_sum",),
    kv_cache_usage=(),
    tpot_per_request=("tgi_request_mean_time_per_token_duration",),
    request_duration=("tgi_request_duration",),
    notes=(
        "TGI exposes no time-to-first-token metric: ttft_ms is None",
        "tpot_ms is tgi_request_mean_time_per_token_duration, which includes prefill",
    ),
)
ENGINES: dict[str, EngineMetrics] = {e.kind: e for e in (VLLM, SGLANG, TGI)}


@dataclass(frozen=True, slots=True)
class ScrapeResult:
    """One scrape: the sample (None on failure), what engine it was, and caveats."""

    sample: EngineSample | None
    kind: str | None = None
    kv_cache_usage_ratio: float | None = None
    notes: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ScraperStats:
    """Cumulative scrape outcomes."""

    scrapes: int = 0
    ok: int = 0
    unreachable: int = 0  # connection refused, timeout, HTTP error status
    malformed: int = 0  # the body is not Prometheus text
    unrecognized: int = 0  # Prometheus text, but no vLLM / SGLang / TGI metric in it
    resets: int = 0  # a cumulative metric went down: the engine restarted
    last_error: str | None = None

    @property
    def errors(self) -> int:
        """Failed scrapes: unreachable, malformed or unrecognized."""
        return self.unreachable + self.malformed + self.unrecognized


def parse_samples(text: str) -> Samples:
    """Parse Prometheus text exposition into {sample name: [(labels, value), ...]}.

    Works on sample names (``x_bucket``, ``x_sum``, ``x_total``) rather than
    families, so a missing or wrong ``# TYPE`` line changes nothing. NaN values
    are dropped.

    Args:
        text: the body of a ``/metrics`` response.

    Returns:
        Samples by name.

    Raises:
        ValueError: the text is not Prometheus exposition format.
    """
    out: Samples = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                value = float(sample.value)
                if math.isnan(value):
                    continue
                out.setdefault(sample.name, []).append((sample.labels, value))
    except (IndexError, KeyError, TypeError) as exc:  # the parser's ValueError passes through
        raise ValueError(f"parser failed: {exc!r}") from exc
    return out


def detect_engine(samples: Samples) -> EngineMetrics | None:
    """The engine whose metric prefix the most sample names carry, if any."""
    best, best_count = None, 0
    for spec in ENGINES.values():
        count = sum(1 for name in samples if name.startswith(spec.prefix))
        if count > best_count:
            best, best_count = spec, count
    return best


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The q-quantile of a histogram, interpolating linearly within a bucket.

    Same rule as PromQL's ``histogram_quantile``: the lowest bucket starts at 0, and
    a quantile that falls in the ``+Inf`` bucket is the highest finite bound.

    Args:
        q: quantile, 0-1.
        buckets: (upper bound ``le``, cumulative count) pairs, any order.

    Returns:
        The estimate, or None without observations or finite buckets.
    """
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    total = ordered[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in ordered:
        if count >= rank:
            if math.isinf(le):
                return prev_le if prev_le > 0 or prev_count > 0 else None
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


@dataclass(frozen=True, slots=True)
class _Histogram:
    sum: float
    count: float
    buckets: tuple[tuple[float, float], ...]  # (le, cumulative count), sorted


@dataclass(frozen=True, slots=True)
class _Interval:
    mean_s: float
    p50_s: float | None
    p99_s: float | None


def _sum_series(samples: Samples, name: str) -> float | None:
    series = samples.get(name)
    if not series:
        return None
    return math.fsum(value for _, value in series)


def _histogram(samples: Samples, base: str) -> _Histogram | None:
    total_sum = _sum_series(samples, base + "_sum")
    total_count = _sum_series(samples, base + "_count")
    if total_sum is None or total_count is None:
        return None
    by_le: dict[float, float] = {}
    for labels, value in samples.get(base + "_bucket", ()):
        try:
            le = float(labels.get("le", "nan"))
        except ValueError:
            continue
        if not math.isnan(le):
            by_le[le] = by_le.get(le, 0.0) + value
    return _Histogram(total_sum, total_count, tuple(sorted(by_le.items())))


def _first_present(samples: Samples, names: Iterable[str], suffix: str = "") -> str | None:
    return next((n for n in names if n + suffix in samples), None)


def fetch_metrics(url: str, timeout_s: float) -> str:
    """GET ``url`` and return the body as text.

    Args:
        url: the ``/metrics`` URL.
        timeout_s: connect and read timeout.

    Returns:
        The decoded body.

    Raises:
        OSError: unreachable, timed out, or an HTTP error status (urllib's HTTPError).
        http.client.HTTPException: the server broke the HTTP exchange.
        ValueError: the URL is not an http(s) URL.
    """
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url!r}")
    request = urllib.request.Request(url, headers={"Accept": "text/plain;version=0.0.4"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # scheme checked above
        body: bytes = response.read(_MAX_BODY_BYTES + 1)
    if len(body) > _MAX_BODY_BYTES:
        raise ValueError(f"{url}: body over {_MAX_BODY_BYTES} bytes")
    return body.decode("utf-8", errors="replace")


class Scraper:
    """Polls one engine's ``/metrics`` and turns each interval into an ``EngineSample``.

    Args:
        url: the metrics URL, e.g. ``http://127.0.0.1:8000/metrics``.
        engine_id: names the engine in samples; default the URL.
        kind: ``vllm``, ``sglang`` or ``tgi``; default detected from the metric names
            on every scrape (an endpoint may be redeployed as another engine).
        interval_s: seconds between scrapes once started.
        timeout_s: per-request timeout.
        clock: epoch-seconds clock stamped on samples.
        fetch: ``(url, timeout_s) -> text``; injectable for tests.
        pid: the engine's pid when known (to attribute it to GPUs).
    """

    def __init__(
        self,
        url: str,
        *,
        engine_id: str | None = None,
        kind: str | None = None,
        interval_s: float = 1.0,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
        fetch: Callable[[str, float], str] = fetch_metrics,
        pid: int | None = None,
    ) -> None:
        if kind is not None and kind not in ENGINES:
            raise ValueError(f"unknown engine kind {kind!r}; expected one of {sorted(ENGINES)}")
        self.url = url
        self.engine_id = engine_id or url
        self._spec = ENGINES[kind] if kind else None
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._fetch = fetch
        self._pid = pid
        self._prev_hist: dict[str, _Histogram] = {}
        # name -> (sum, _per_bucket) at the last scrape: each histogram is split once.
        self._prev_buckets: dict[str, tuple[float, _PerBucket | None]] = {}
        self._prev_total: dict[str, float] = {}
        # This scrape's histograms by name (under _scrape_lock): TTFT, and TPOT where one
        # metric serves both (TGI), feed the interval figures and the bucket delta alike.
        self._parsed: dict[str, _Histogram | None] = {}
        self._samples: deque[EngineSample] = deque(maxlen=_MAX_KEPT_SAMPLES)
        self._scrape_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counts = Counters(ScraperStats)
        self._reset_seen = False

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start polling every ``interval_s`` on a daemon thread (idempotent)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rooftop-scrape", daemon=True)
        self._thread.start()

    def flush(self, timeout_s: float = 1.0) -> None:
        """Scrape now, so the next ``drain`` has a fresh sample.

        Args:
            timeout_s: how long to wait for a scrape already in progress.
        """
        if self._scrape_lock.acquire(timeout=max(0.0, timeout_s)):
            self._scrape_lock.release()
            self.scrape_once()

    def shutdown(self, timeout_s: float = 1.0) -> None:
        """Stop polling (idempotent); samples already taken stay drainable."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.scrape_once()
            except Exception:  # noqa: BLE001 - thread boundary: log, keep polling
                _log.exception("scraper %s: unexpected error", self.url)
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def drain(self) -> list[EngineSample]:
        """Take the samples scraped since the last drain, oldest first."""
        out: list[EngineSample] = []
        while self._samples:
            out.append(self._samples.popleft())
        return out

    def stats(self) -> ScraperStats:
        """Counters of scrape outcomes."""
        return self._counts.get()

    # -- one scrape ----------------------------------------------------------------

    def scrape_once(self) -> ScrapeResult:
        """Fetch, parse and turn one scrape into a sample; never raises.

        Returns:
            The result; ``sample`` is None when the endpoint was unreachable or
            its text malformed or unrecognized (``error`` says which).
        """
        with self._scrape_lock:
            self._counts.add(scrapes=1)
            now_s = self._clock()
            try:
                text = self._fetch(self.url, self.timeout_s)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self._counts.add(unreachable=1)
                return self._fail(f"{self.url}: {exc}")
            try:
                samples = parse_samples(text)
            except ValueError as exc:
                self._counts.add(malformed=1)
                # repr: the parser quotes the offending text, which may hold control bytes.
                return self._fail(f"{self.url}: malformed metrics text: {str(exc)[:200]!r}")
            spec = self._spec or detect_engine(samples)
            if spec is None:
                self._counts.add(unrecognized=1)
                return self._fail(f"{self.url}: no vLLM, SGLang or TGI metrics")
            result = self._interpret(spec, samples, now_s)
            if result.sample is not None:
                self._counts.add(ok=1)
                self._samples.append(result.sample)
            return result

    def _fail(self, error: str) -> ScrapeResult:
        self._counts.set(last_error=error)
        return ScrapeResult(sample=None, error=error)

    def _interpret(self, spec: EngineMetrics, samples: Samples, now_s: float) -> ScrapeResult:
        notes = list(spec.notes)
        self._reset_seen = False
        self._parsed = {}
        tpot = self._latency(samples, spec.tpot, notes, "TPOT")
        ttft = self._latency(samples, spec.ttft, notes, "TTFT") if spec.ttft else None
        tokens = self._increase(samples, spec.output_tokens)
        tpot_hist = self._bucket_delta(samples, spec.tpot_per_request)
        ttft_hist = self._bucket_delta(samples, spec.ttft)
        duration_hist = self._bucket_delta(samples, spec.request_duration)
        kv = _gauge(samples, spec.kv_cache_usage)
        sample = EngineSample(
            time_s=now_s,
            engine_id=self.engine_id,
            requests_running=_as_count(_gauge(samples, spec.running)),
            requests_waiting=_as_count(_gauge(samples, spec.waiting)),
            tpot_ms=_ms(tpot.mean_s) if tpot else None,
            ttft_ms=_ms(ttft.mean_s) if ttft else None,
            output_tokens=_as_count(tokens),
            pid=self._pid,
            model=_model_name(samples, spec.prefix),
            tpot_p50_ms=_ms(tpot.p50_s) if tpot else None,
            tpot_p99_ms=_ms(tpot.p99_s) if tpot else None,
            ttft_p50_ms=_ms(ttft.p50_s) if ttft else None,
            ttft_p99_ms=_ms(ttft.p99_s) if ttft else None,
            tpot_hist=tpot_hist,
            ttft_hist=ttft_hist,
            request_duration_hist=duration_hist,
        )
        if self._reset_seen:
            self._counts.add(resets=1)  # one restart, however many metrics showed it
        reason = invalid_reason(sample)
        if reason is not None:
            error = f"{self.url}: impossible value: {reason}"
            self._counts.add(malformed=1)
            self._counts.set(last_error=error)
            return ScrapeResult(sample=None, kind=spec.kind, error=error)
        return ScrapeResult(
            sample=sample,
            kind=spec.kind,
            kv_cache_usage_ratio=kv if kv is not None and 0.0 <= kv <= 1.0 else None,
            notes=tuple(notes),
        )

    def _latency(
        self, samples: Samples, names: tuple[str, ...], notes: list[str], what: str
    ) -> _Interval | None:
        name = _first_present(samples, names, "_count")
        if name is None:
            notes.append(f"no {what} histogram (looked for {', '.join(names)})")
            return None
        current = self._histogram(samples, name)
        if current is None:
            notes.append(f"{name} has no _sum")
            return None
        previous = self._prev_hist.get(name)
        self._prev_hist[name] = current
        if previous is None:
            return None  # the first scrape is only a baseline
        d_count = current.count - previous.count
        d_sum = current.sum - previous.sum
        prev_buckets = dict(previous.buckets)
        bucket_deltas = [(le, c - prev_buckets.get(le, 0.0)) for le, c in current.buckets]
        if d_count < 0 or d_sum < 0 or any(d < 0 for _, d in bucket_deltas):
            self._reset_seen = True
            notes.append(f"{name} went down: engine restarted; baseline taken again")
            return None
        if d_count == 0:
            return None  # nothing finished in this interval
        same_bounds = set(prev_buckets) == {le for le, _ in current.buckets}
        return _Interval(
            mean_s=d_sum / d_count,
            p50_s=histogram_quantile(0.5, bucket_deltas) if same_bounds else None,
            p99_s=histogram_quantile(0.99, bucket_deltas) if same_bounds else None,
        )

    def _histogram(self, samples: Samples, name: str) -> _Histogram | None:
        """``_histogram(samples, name)``, parsed once per scrape."""
        if name not in self._parsed:
            self._parsed[name] = _histogram(samples, name)
        return self._parsed[name]

    def _bucket_delta(self, samples: Samples, names: tuple[str, ...]) -> HistogramDelta | None:
        """The engine histogram's bucket increase since the last scrape, in its own bounds.

        The first scrape is a baseline (None). A count, sum or bucket that went down,
        or bounds that changed, is a restart: everything now in the histogram arrived
        since then, so the current values are the increase.
        """
        name = _first_present(samples, names, "_count")
        if name is None:
            return None
        current = self._histogram(samples, name)
        if current is None or not current.buckets:
            return None
        cur = _per_bucket(current)
        previous = self._prev_buckets.get(name)
        self._prev_buckets[name] = (current.sum, cur)
        if previous is None or cur is None:
            return None
        bounds, counts = cur
        prev_sum, prev = previous
        d_sum = current.sum - prev_sum
        deltas: list[int] = []
        if prev is not None and prev[0] == bounds and d_sum >= 0:
            deltas = [c - p for c, p in zip(counts, prev[1], strict=True)]
        if not deltas or any(d < 0 for d in deltas):
            self._reset_seen = True
            deltas, d_sum = counts, current.sum
        total = sum(deltas)
        if total == 0:
            return EMPTY_HISTOGRAM  # nothing finished in this interval
        return HistogramDelta(bounds, tuple(deltas), max(0.0, d_sum), total)

    def _increase(self, samples: Samples, names: tuple[str, ...]) -> float | None:
        name = _first_present(samples, names)
        if name is None:
            return None
        current = _sum_series(samples, name)
        if current is None:
            return None
        previous = self._prev_total.get(name)
        self._prev_total[name] = current
        if previous is None:
            return None
        if current < previous:
            self._reset_seen = True
            return None
        return current - previous


_PerBucket = tuple[tuple[float, ...], list[int]]  # finite bounds, per-bucket counts


def _per_bucket(hist: _Histogram) -> _PerBucket | None:
    """Finite bounds and per-bucket (not cumulative) counts, the last above every bound."""
    finite = [(le, c) for le, c in hist.buckets if math.isfinite(le)]
    inf = [c for le, c in hist.buckets if math.isinf(le) and le > 0]
    total = inf[0] if inf else hist.count
    counts: list[int] = []
    below = 0
    for _, cumulative in [*finite, (math.inf, total)]:
        n = round(cumulative)
        if n < below:
            return None  # cumulative buckets that go down: not a histogram
        counts.append(n - below)
        below = n
    return tuple(le for le, _ in finite), counts


def _gauge(samples: Samples, names: tuple[str, ...]) -> float | None:
    name = _first_present(samples, names)
    return _sum_series(samples, name) if name else None


def _as_count(value: float | None) -> int | None:
    if value is None or not math.isfinite(value) or value < 0:
        return None
    return round(value)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _model_name(samples: Samples, prefix: str) -> str | None:
    names = {
        labels["model_name"]
        for name, series in samples.items()
        if name.startswith(prefix)
        for labels, _ in series
        if "model_name" in labels
    }
    return names.pop() if len(names) == 1 else None
