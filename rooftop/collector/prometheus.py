"""The Prometheus endpoint: fleet state written straight to the text format.

The OpenTelemetry SDK's Prometheus reader costs about 60 µs per series: a scrape
of 1,000 nodes x 8 GPUs (200k series) took 12 s of CPU, past Prometheus' default
10 s scrape timeout, and held the GIL that ingest needs. This module writes the
same series, under the same names, labels and values as the OpenTelemetry
Prometheus exporter would (a test holds it to that), from the same callbacks the
OTLP path uses, at a few µs per series:

- names: the instrument name with ``.`` → ``_``, the unit's Prometheus suffix
  (``By`` → ``_bytes``, ``{call}`` → none), ``_total`` on counters; labels: the
  attributes with ``.`` → ``_``, sorted; values as prometheus_client writes them;
- histograms (engine TPOT/TTFT, batch lag) are aggregated here, cumulatively, as
  they are recorded (``NativeHistogram``);
- ``target_info`` carries the resource, as the OpenTelemetry exporter's does.

An attribute absent on some series of a family is left out rather than written
as ``label=""`` (the OpenTelemetry exporter's way): Prometheus reads both the same.
Past ``max_series`` series in one family the rest are left out and logged once.

The HTTP server (``PrometheusServer``) is bounded: no thread per connection, a
fixed pool of workers, read and write timeouts (see its docstring).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import math
import queue
import re
import selectors
import socket
import threading
import time
import urllib.parse
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol, cast

from rooftop.common.ratelimit import RateLimitedLog

__all__ = [
    "CONTENT_TYPE",
    "Family",
    "NativeHistogram",
    "PrometheusServer",
    "format_value",
    "metric_name",
    "prometheus_labels",
    "prometheus_name",
    "render",
    "series_key",
    "spread_buckets",
]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_NAME_RE = re.compile(r"[^a-zA-Z0-9:]+")
_LABEL_RE = re.compile(r"[^a-zA-Z0-9]+")
_UNIT_ANNOTATION = re.compile(r"{.*}")
# OTel unit → Prometheus suffix, for the units METRICS uses (the OTel exporter's map).
_UNITS = {"1": "", "s": "seconds", "By": "bytes", "W": "watts", "Cel": "celsius", "Hz": "hertz"}
_PER = {"s": "second"}


class Point(Protocol):
    """One value and its attributes (``opentelemetry.metrics.Observation``)."""

    @property
    def value(self) -> float | int: ...

    @property
    def attributes(self) -> Mapping[str, Any] | None: ...


@dataclass(frozen=True, slots=True)
class Family:
    """One exported metric read from fleet state at every scrape.

    Attributes:
        name: the OpenTelemetry instrument name (``hw.gpu.utilization``).
        kind: ``gauge``, ``counter`` or ``updowncounter`` (written as a gauge).
        unit: the OpenTelemetry unit (``By``, ``1``, ``{batch}``).
        description: the HELP text.
        points: the current points (the same callback the OTLP path reads).
        exposed_name: the Prometheus name written as is (no unit suffix, no
            ``_total``), for names set elsewhere (dcgm-exporter's); "" derives it.
    """

    name: str
    kind: str
    unit: str
    description: str
    points: Callable[[], Iterable[Point]]
    exposed_name: str = ""


def metric_name(name: str, unit: str) -> str:
    """The Prometheus family name: ``hw.gpu.memory.usage``, ``By`` → ``..._usage_bytes``."""
    base = _NAME_RE.sub("_", name)
    unit = _UNIT_ANNOTATION.sub("", unit)
    if unit in _UNITS:
        suffix = _UNITS[unit]
    elif "/" in unit:
        top, bottom = unit.split("/", 1)
        suffix = f"{_UNITS.get(top, top)}_per_{_PER.get(bottom, bottom)}"
    else:
        suffix = _NAME_RE.sub("_", unit).strip("_")
    return f"{base}_{suffix}" if suffix and not base.endswith("_" + suffix) else base


def format_value(value: float) -> str:
    """A sample value as prometheus_client writes it (Go's float formatting)."""
    value = float(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go switches to exponents sooner than Python
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


_label_names: dict[str, str] = {}
_label_keys: dict[str, str] = {}  # label name -> the first attribute key that made it
# Label names two attribute keys sanitize to (host.name, host_name): their series take
# the merged path in _labels. Empty in practice, so the hot path checks one empty set.
_ambiguous: set[str] = set()


def _label_name(key: str) -> str:
    name = _label_names.get(key)
    if name is None:
        name = _LABEL_RE.sub("_", key)
        if name[:1].isdigit():
            name = "_" + name[1:]
        _label_names[key] = name
        if _label_keys.setdefault(name, key) != key:
            _ambiguous.add(name)
    return name


def _merged(attributes: Mapping[str, Any]) -> dict[str, str]:
    # The OpenTelemetry → Prometheus rule: the values of keys that sanitize to one label
    # name are joined with ";", in the lexicographic order of the original keys.
    merged: dict[str, list[str]] = {}
    for key in sorted(attributes):
        text = _label_text(attributes[key])
        if text != "":
            merged.setdefault(_label_name(key), []).append(text)
    return {name: ";".join(values) for name, values in merged.items()}


def _collides(attributes: Mapping[str, Any]) -> bool:
    # _label_name registers each key first, so the check sees this series' own keys.
    names = [_label_name(k) for k in attributes] if len(attributes) > 1 else []
    return bool(_ambiguous) and any(n in _ambiguous for n in names)


def _label_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, default=str)  # what the OpenTelemetry exporter writes


def _escape(text: str) -> str:
    if "\\" in text or '"' in text or "\n" in text:
        text = text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return text


def _label_value(value: Any) -> str:
    return _escape(_label_text(value))


# ('host.name', 'node-7') -> 'host_name="node-7"': the same few thousand pairs recur in
# every family at every scrape, and formatting them is most of a scrape's cost.
_pairs: dict[tuple[str, Any], str] = {}
_MAX_PAIRS = 262_144


def _pair(item: tuple[str, Any]) -> str:
    try:
        return _pairs[item]
    except KeyError:
        pass
    except TypeError:  # an unhashable value (a sequence attribute)
        return f'{_label_name(item[0])}="{_label_value(item[1])}"'
    key, value = item
    text = "" if value == "" else f'{_label_name(key)}="{_label_value(value)}"'
    if len(_pairs) >= _MAX_PAIRS:
        _pairs.clear()  # label values churn (hosts come and go): start over, rarely
    _pairs[item] = text
    return text


def _labels(attributes: Mapping[str, Any] | None, extra: str = "") -> str:
    # Sorted for a stable output; Prometheus does not care about label order.
    parts = sorted([p for p in map(_pair, (attributes or {}).items()) if p])
    # After _pair: it has registered every key's label name, so a collision is known.
    if _ambiguous and attributes and _collides(attributes):
        parts = sorted(f'{n}="{_escape(v)}"' for n, v in _merged(attributes).items())
    if extra:
        parts.append(extra)
    return f"{{{','.join(parts)}}}" if parts else ""


def prometheus_name(name: str, unit: str, instrument: str) -> str:
    """A metric's family name as ``render`` writes it (counters end in ``_total``)."""
    family = metric_name(name, unit)
    return family.removesuffix("_total") + "_total" if instrument == "counter" else family


def prometheus_labels(attributes: Mapping[str, Any] | None) -> dict[str, str]:
    """Attributes as ``render``'s labels, unescaped (label name -> value; empty dropped)."""
    if attributes and _collides(attributes):
        return _merged(attributes)
    return {
        _label_name(k): _label_text(v) for k, v in (attributes or {}).items() if v != ""
    }


def series_key(family: str, attributes: Mapping[str, Any] | None) -> tuple[tuple[str, str], ...]:
    """A series as remote write names it: ``("__name__", family)``, then sorted labels."""
    return (("__name__", family), *sorted(prometheus_labels(attributes).items()))


def _help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def spread_buckets(
    bounds: Sequence[float], bucket_counts: Sequence[int], sum_value: float
) -> list[tuple[float, int]]:
    """Stand-in observations for bucketed ones: ``(value, how many)`` per non-empty bucket.

    Each value lies inside its bucket (``(lower, upper]``, the last one above every
    bound), at the same relative place in every finite bucket, chosen so that the
    values add up to ``sum_value`` where the buckets allow it. Recording them gives
    a histogram with the same buckets, count and (nearly always) sum: how a bucketed
    increase enters an instrument that only takes single observations, or other bounds.

    Args:
        bounds: ascending finite upper bounds.
        bucket_counts: ``len(bounds) + 1`` counts, the last above every bound.
        sum_value: the sum of the original observations.

    Returns:
        The stand-in values with their counts, lowest first.
    """
    finite: list[tuple[float, float, int]] = []
    lower = 0.0
    for upper, n in zip(bounds, bucket_counts, strict=False):
        if n > 0:
            finite.append((min(lower, upper), upper, n))
        lower = upper
    over = bucket_counts[len(bounds)] if len(bucket_counts) > len(bounds) else 0
    low = math.fsum(n * lo for lo, _, n in finite)
    high = math.fsum(n * hi for _, hi, n in finite)
    floor_over = math.nextafter(lower, math.inf)  # just above the last bound
    # The share of each finite bucket's width to add to its lower bound: what makes the
    # sum come out when nothing overflowed; the middle when something did, unless the
    # overflow would then fall below the last bound.
    if over == 0:
        t = (sum_value - low) / (high - low) if high > low else 1.0
    else:
        t = 0.5
        if high > low and sum_value - (low + high) / 2 < over * floor_over:
            t = (sum_value - over * floor_over - low) / (high - low)
    t = min(1.0, max(t, 0.0))
    out: list[tuple[float, int]] = []
    for lo, hi, n in finite:
        value = lo + t * (hi - lo)
        out.append((min(hi, max(value, math.nextafter(lo, math.inf))), n))
    if over > 0:
        rest = sum_value - math.fsum(v * n for v, n in out)
        out.append((max(rest / over, floor_over), over))
    return out


class NativeHistogram:
    """A cumulative histogram per attribute set, recorded as observations arrive.

    Args:
        name: the OpenTelemetry instrument name.
        unit: its unit.
        description: the HELP text.
        bounds: the explicit bucket upper bounds (the same as the OTel view's).
    """

    def __init__(self, name: str, unit: str, description: str, bounds: Sequence[float]) -> None:
        self.name = metric_name(name, unit)
        self.description = description
        self.bounds = tuple(bounds)
        self._les = [format_value(b) for b in self.bounds] + ["+Inf"]
        self._series: dict[tuple[tuple[str, Any], ...], list[float]] = {}
        self._lock = threading.Lock()

    def record(self, value: float, attributes: Mapping[str, Any] | None = None) -> None:
        """Count one observation."""
        key = tuple(sorted((attributes or {}).items()))
        bucket = bisect_left(self.bounds, value)  # the first bound >= value; past them: +Inf
        with self._lock:
            counts = self._series.get(key)
            if counts is None:
                # per bucket (non-cumulative), then count and sum
                counts = self._series[key] = [0.0] * (len(self.bounds) + 3)
            counts[bucket] += 1
            counts[-2] += 1
            counts[-1] += value

    def add(
        self,
        bounds: Sequence[float],
        bucket_counts: Sequence[int],
        sum_value: float,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        """Add a bucketed increase (another histogram's, in its ``bounds``).

        With our bounds the counts add as they are; with others each bucket's count
        goes where ``spread_buckets`` places it. The sum adds exactly either way.
        """
        key = tuple(sorted((attributes or {}).items()))
        if tuple(bounds) == self.bounds:
            placed = list(enumerate(bucket_counts))
        else:
            placed = [
                (bisect_left(self.bounds, value), n)
                for value, n in spread_buckets(bounds, bucket_counts, sum_value)
            ]
        with self._lock:
            counts = self._series.get(key)
            if counts is None:
                counts = self._series[key] = [0.0] * (len(self.bounds) + 3)
            for bucket, n in placed:
                counts[bucket] += n
                counts[-2] += n
            counts[-1] += sum_value

    def lines(self) -> list[str]:
        """The family in the text format; empty before the first observation."""
        with self._lock:
            series = [(dict(k), list(v)) for k, v in self._series.items()]
        if not series:
            return []
        out = [f"# HELP {self.name} {_help(self.description)}", f"# TYPE {self.name} histogram"]
        for attributes, counts in series:
            cumulative = 0.0
            for le, count in zip(self._les, counts, strict=False):
                cumulative += count
                labels = _labels(attributes, f'le="{le}"')
                out.append(f"{self.name}_bucket{labels} {format_value(cumulative)}")
            labels = _labels(attributes)
            out.append(f"{self.name}_count{labels} {format_value(counts[-2])}")
            out.append(f"{self.name}_sum{labels} {format_value(counts[-1])}")
        return out


_warned: set[str] = set()
_HISTOGRAM_ENDS = ("", "_bucket", "_count", "_sum")


def render(
    families: Sequence[Family],
    histograms: Sequence[NativeHistogram] = (),
    *,
    resource: Mapping[str, Any] | None = None,
    max_series: int = 65_536,
    names: frozenset[str] | None = None,
) -> str:
    """The whole exposition: ``target_info``, the histograms, then every family.

    ``names``: only the families with these exposed names (``name[]`` in the scrape's
    query string, as prometheus/client_python serves it); None: all of them. A family
    left out costs nothing: its points are never computed.
    """
    out: list[str] = []
    if resource and (names is None or "target_info" in names):
        out += [
            "# HELP target_info Target metadata",
            "# TYPE target_info gauge",
            f"target_info{_labels(resource)} 1.0",
        ]
    for histogram in histograms:
        # By its name or any of its series' (as prometheus/client_python matches).
        if names is None or any(histogram.name + end in names for end in _HISTOGRAM_ENDS):
            out += histogram.lines()
    for family in families:
        name = family.exposed_name or metric_name(family.name, family.unit)
        counter = family.kind == "counter"
        if counter and not family.exposed_name:
            name = name.removesuffix("_total") + "_total"
        if names is not None and name not in names and name.removesuffix("_total") not in names:
            continue
        # One value per label set, as the SDK makes it: a gauge keeps the last value, a
        # (up-down) counter the sum. Two nodes reporting the same host name and GPU
        # uuid (clones, the demo's replays) would otherwise be duplicate series, which
        # Prometheus drops.
        series: dict[str, float] = {}
        if family.kind == "gauge":
            series = {_labels(p.attributes): p.value for p in family.points()}
        else:
            for p in family.points():
                labels = _labels(p.attributes)
                series[labels] = series.get(labels, 0) + p.value
        if not series:
            continue
        lines = [f"{name}{labels} {format_value(value)}" for labels, value in series.items()]
        if len(lines) > max_series:
            if family.name not in _warned:
                _warned.add(family.name)
                log.warning(
                    "prometheus: %s has %d series, over max_series_per_metric (%d): "
                    "the rest are left out",
                    name,
                    len(lines),
                    max_series,
                )
            del lines[max_series:]
        out.append(f"# HELP {name} {_help(family.description)}")
        out.append(f"# TYPE {name} {'counter' if counter else 'gauge'}")
        out += lines
    out.append("")
    return "\n".join(out)


class PrometheusServer:
    """``GET /metrics`` over HTTP (gzip when asked for), bounded under abuse.

    No thread per connection: one thread waits on every accepted connection at once
    (a selector) and hands a connection to one of ``max_connections`` worker threads
    only when its request has begun to arrive. A connection that sends nothing for
    ``timeout_s`` is closed; past ``_MAX_WAITING`` idle connections the oldest is
    closed; past ``_MAX_QUEUED`` requests waiting for a worker a new one is closed.
    Each counts through ``on_refused``. A worker reads and writes with ``timeout_s``
    per socket operation, so a client that stops mid-request frees it. Errors are
    one log line (rate-limited), never a traceback.

    Args:
        host: the address to bind.
        port: the port (0 picks one; see ``port``).
        exposition: makes the body, once per scrape: given the ``name[]`` values of
            the query string (only those families), or None (all of them).
        max_connections: requests served at once (worker threads).
        timeout_s: the longest a connection may stay silent, and each read or write.
        on_refused: told once for every connection closed by a bound.
        checks: health paths (``/healthz``, ``/readyz``) for Kubernetes' probes, each
            answering 200 ``ok`` when its check returns None, else 503 and the reason.

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(
        self,
        host: str,
        port: int,
        exposition: Callable[[frozenset[str] | None], str],
        *,
        max_connections: int = 16,
        timeout_s: float = 10.0,
        on_refused: Callable[[], None] | None = None,
        checks: Mapping[str, Callable[[], str | None]] | None = None,
    ) -> None:
        self._handler = _handler_class(exposition, timeout_s, checks)
        self._timeout_s = timeout_s
        self._on_refused = on_refused or (lambda: None)
        self._errors = RateLimitedLog(log, interval_s=60.0)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, port))
            self._sock.listen(128)
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise
        self.port = int(self._sock.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._ready: queue.Queue[tuple[socket.socket, Any] | None] = queue.Queue(_MAX_QUEUED)
        self._closed = threading.Event()
        self._workers = [
            threading.Thread(target=self._work, name=f"rooftop-prometheus-{i}", daemon=True)
            for i in range(max(1, max_connections))
        ]
        for worker in self._workers:
            worker.start()
        self._thread = threading.Thread(target=self._wait, name="rooftop-prometheus", daemon=True)
        self._thread.start()

    def _refuse(self, conn: socket.socket) -> None:
        # Counted before the close: a client that sees the hang-up also sees the count.
        self._on_refused()
        with contextlib.suppress(OSError):
            conn.close()

    def _wait(self) -> None:
        """Accept connections and hold them, thread-free, until their request begins."""
        selector = selectors.DefaultSelector()
        selector.register(self._sock, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        # Accepted, silent connections, oldest first: socket -> (address, deadline).
        waiting: OrderedDict[socket.socket, tuple[Any, float]] = OrderedDict()
        try:
            while not self._closed.is_set():
                for key, _ in selector.select(timeout=1.0):
                    if key.fileobj is self._sock:
                        self._accept(selector, waiting)
                    elif key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)
                    elif key.fileobj in waiting:  # not closed by _accept meanwhile
                        conn = cast(socket.socket, key.fileobj)
                        state = _peek(conn)
                        if state is None:
                            continue  # a spurious wake-up: still silent
                        selector.unregister(conn)
                        address, _ = waiting.pop(conn)
                        if state:
                            self._dispatch(conn, address)
                        else:  # hung up before a request: nothing to serve or count
                            conn.close()
                now_s = time.monotonic()
                while waiting and next(iter(waiting.values()))[1] <= now_s:
                    conn, _ = waiting.popitem(last=False)
                    selector.unregister(conn)
                    self._refuse(conn)  # silent for timeout_s
        except Exception:  # thread boundary: a bug, not a client
            log.exception("prometheus: the endpoint stopped")
        finally:
            for conn in waiting:
                conn.close()
            selector.close()

    def _accept(
        self,
        selector: selectors.BaseSelector,
        waiting: OrderedDict[socket.socket, tuple[Any, float]],
    ) -> None:
        for _ in range(64):  # a burst at a time; the rest on the next wake-up
            try:
                conn, address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: say so, once a minute
                self._errors.log(logging.ERROR, "accept", "prometheus: accept failed: %s", exc)
                return
            conn.setblocking(False)
            waiting[conn] = (address, time.monotonic() + self._timeout_s)
            selector.register(conn, selectors.EVENT_READ)
            if len(waiting) > _MAX_WAITING:
                oldest, (address, _) = waiting.popitem(last=False)
                selector.unregister(oldest)
                if _peek(oldest):  # it just sent its request: serve, not drop, it
                    self._dispatch(oldest, address)
                else:
                    self._refuse(oldest)

    def _dispatch(self, conn: socket.socket, address: Any) -> None:
        """Hand a connection whose request has begun to a worker (closed if none can)."""
        try:
            self._ready.put_nowait((conn, address))
        except queue.Full:  # every worker busy and the queue full
            self._refuse(conn)

    def _work(self) -> None:
        while True:
            item = self._ready.get()
            if item is None:
                return
            conn, address = item
            try:
                conn.setblocking(True)
                conn.settimeout(self._timeout_s)
                self._handler(conn, address, cast(Any, self))
            except OSError as exc:  # a client gone mid-response, a timeout: one line
                self._errors.log(
                    logging.INFO,
                    type(exc).__name__,
                    "prometheus: a scrape from %s failed: %s",
                    address,
                    exc or type(exc).__name__,
                )
            finally:
                with contextlib.suppress(OSError):
                    conn.close()

    def close(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout=5.0)
        for _ in self._workers:
            with contextlib.suppress(queue.Full):
                self._ready.put(None, timeout=1.0)
        self._sock.close()
        self._wake_r.close()
        self._wake_w.close()


def _peek(conn: socket.socket) -> bool | None:
    """Whether a request waits: True (bytes), None (nothing yet), False (hung up)."""
    try:
        return bool(conn.recv(1, socket.MSG_PEEK))
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return False


# Bounds of the Prometheus endpoint beyond its settings: silent connections held, and
# requests (their first bytes arrived) waiting for a worker.
_MAX_WAITING = 1024
_MAX_QUEUED = 64


def _scrape_names(query: str) -> frozenset[str] | None:
    """The ``name[]`` values of a scrape's query string; None when there are none.

    A Prometheus job restricts a scrape with ``params: {'name[]': [...]}``, as for
    prometheus/client_python: a large collector then renders only what is kept.
    """
    values = urllib.parse.parse_qs(query).get("name[]")
    return frozenset(values) if values else None


def _handler_class(
    exposition: Callable[[frozenset[str] | None], str],
    timeout_s: float,
    checks: Mapping[str, Callable[[], str | None]] | None = None,
) -> type[BaseHTTPRequestHandler]:
    health = dict(checks or {})

    class Handler(BaseHTTPRequestHandler):
        timeout = timeout_s

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path, _, query = self.path.partition("?")
            if path in health:
                self._health(health[path])
                return
            if path not in ("/metrics", "/"):
                self.send_error(404, "only /metrics here")
                return
            try:
                body = exposition(_scrape_names(query)).encode()
            except Exception:
                log.exception("prometheus: the exposition failed")
                self.send_error(500, "exposition failed: see the collector's log")
                return
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            if "gzip" in self.headers.get("Accept-Encoding", ""):
                # Level 1: 30 MB of text for 1,000 nodes compresses 10x in ~0.2 s.
                body = gzip.compress(body, compresslevel=1)
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _health(self, check: Callable[[], str | None]) -> None:
            # A probe's answer: cheap (no exposition), plain text, never cached.
            problem = check()
            body = ("ok" if problem is None else problem).encode() + b"\n"
            self.send_response(200 if problem is None else 503)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # one line per scrape is noise

    return Handler
