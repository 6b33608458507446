"""The hook socket protocol: one JSON object per unix datagram, version 1.

Encoding and decoding live here, apart from any socket, so both ends are tested
without one (the engine side in :mod:`rooftop.agent.hooks`, the agent side in
:mod:`rooftop.agent.engines.receiver`). Stdlib only: this module is imported inside engines.

One datagram is one interval summary from one engine process::

    {"v": 1, "kind": "rooftop.hooks.summary",
     "pid": 4242, "engine_id": "vllm-4242-0", "model": "llama-3-8b",
     "seq": 17,                  # per-process summary counter, starts at 1
     "time_s": 1767225600.25,    # engine wall clock (informational; the agent stamps its own)
     "interval_s": 1.002,        # span this summary covers
     "requests_running": 3,      # null when unknown
     "requests_waiting": 0,      # null when the engine did not say
     "requests_started": 2, "requests_finished": 1,
     "output_tokens": 512,
     "tpot_ms": {"count": 4, "mean": 5.8, "p50": 5.7, "p99": 6.4},   # null: no sample
     "ttft_ms": {"count": 2, "mean": 41.0, "p50": 40.2, "p99": 41.8},
     "kv_cache_usage_ratio": 0.31,   # optional, 0-1 (vLLM plugin)
     "tpot_hist": {"bounds_s": [0.001, ...], "bucket_counts": [0, ..., 0],
                   "sum_s": 0.0116, "count": 2},   # optional: requests finished here
     "ttft_hist": {...}, "request_duration_hist": {...},
     "dropped": 0, "errors": 0}  # cumulative: summaries dropped, hook errors swallowed

TPOT samples are per request per interval: the decode time the request spent in
the interval divided by the tokens it produced there. A request that starts and
ends in one interval gives exactly (last token - first token) / (tokens - 1).
Unknown keys are ignored by the reader, so fields can be added without a version bump.

The ``*_hist`` objects hold one observation per request that finished in the interval
(TPOT = (last token - first token) / (tokens after the first), TTFT, start to end),
counted into explicit buckets: ``bucket_counts[i]`` counts values in
``(bounds_s[i-1], bounds_s[i]]``, the last entry those above every bound. The hook
uses ``TPOT_BOUNDS_S``, ``TTFT_BOUNDS_S`` and ``REQUEST_DURATION_BOUNDS_S`` (the
collector's export buckets); the bounds travel with the counts all the same.
"""

from __future__ import annotations

import json
import math
import operator
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "KIND",
    "MAX_DATAGRAM_BYTES",
    "REQUEST_DURATION_BOUNDS_S",
    "TPOT_BOUNDS_S",
    "TTFT_BOUNDS_S",
    "VERSION",
    "EMPTY_BUCKETS",
    "Buckets",
    "Distribution",
    "HookSummary",
    "bucketize",
    "decode_summary",
    "encode_summary",
    "summarize",
]

VERSION = 1
KIND = "rooftop.hooks.summary"
# Far above a real summary (~400 bytes) and below Linux's default datagram limit
# (net.core.wmem_default, 208 KiB), so a summary never fails with EMSGSIZE.
MAX_DATAGRAM_BYTES = 64 * 1024
# Bucket bounds (seconds) for the per-request histograms: the collector's export
# buckets (rooftop.collector.otel; a test holds them equal), so its counts add as they
# are. TPOT is finer than the semantic conventions' advisory (which starts at 10 ms):
# H100 decode is 4-6 ms per token. Request duration is the conventions' advisory.
TPOT_BOUNDS_S: tuple[float, ...] = (
    0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.01, 0.0125, 0.015,
    0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
)  # fmt: skip
TTFT_BOUNDS_S: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0,
    1.5, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
)  # fmt: skip
REQUEST_DURATION_BOUNDS_S: tuple[float, ...] = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
# More bounds than any engine uses; a histogram past it is garbage, not a summary.
_MAX_BOUNDS = 256
# JSON's number types, exactly (bool, an int subclass, is never a bound or a count).
_NUMBER_TYPES = frozenset({int, float})
_INT_TYPES = frozenset({int})


@dataclass(frozen=True, slots=True)
class Distribution:
    """Mean and percentiles of one interval's samples (milliseconds)."""

    count: int
    mean: float
    p50: float
    p99: float


@dataclass(frozen=True, slots=True)
class Buckets:
    """Per-request observations (seconds) of one interval in explicit buckets.

    ``bucket_counts`` has ``len(bounds_s) + 1`` entries; the last counts values above
    every bound.
    """

    bounds_s: tuple[float, ...]
    bucket_counts: tuple[int, ...]
    sum_s: float
    count: int


# No request finished in the interval: said explicitly, so the agent and collector know
# this hook counts per request (an older hook sends no histogram at all).
EMPTY_BUCKETS = Buckets((), (0,), 0.0, 0)


def bucketize(values_s: Sequence[float], bounds_s: tuple[float, ...]) -> Buckets:
    """Count ``values_s`` into ``bounds_s`` (upper bounds, inclusive).

    Args:
        values_s: finite, non-negative observations in seconds.
        bounds_s: ascending upper bounds.

    Returns:
        The buckets; ``EMPTY_BUCKETS`` without observations.
    """
    if not values_s:
        return EMPTY_BUCKETS
    counts = [0] * (len(bounds_s) + 1)
    for value in values_s:
        counts[bisect_left(bounds_s, value)] += 1  # first bound >= value: le semantics
    return Buckets(bounds_s, tuple(counts), math.fsum(values_s), len(values_s))


@dataclass(frozen=True, slots=True)
class HookSummary:
    """One decoded interval summary from one engine process."""

    pid: int
    engine_id: str
    seq: int
    time_s: float
    interval_s: float
    model: str | None = None
    requests_running: int | None = None
    requests_waiting: int | None = None
    requests_started: int = 0
    requests_finished: int = 0
    output_tokens: int = 0
    tpot_ms: Distribution | None = None
    ttft_ms: Distribution | None = None
    kv_cache_usage_ratio: float | None = None
    dropped: int = 0
    errors: int = 0
    gpu_indices: tuple[int, ...] = ()  # explicit attribution (ROOFTOP_ENGINE_GPUS)
    # One observation per request finished in the interval (EMPTY_BUCKETS: none
    # finished; None: a hook from before per-request histograms).
    tpot_hist: Buckets | None = None
    ttft_hist: Buckets | None = None
    request_duration_hist: Buckets | None = None


_HIST_KEYS = ("tpot_hist", "ttft_hist", "request_duration_hist")


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (no interpolation: few samples)."""
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def summarize(values: Sequence[float]) -> Distribution | None:
    """Count, mean, p50 and p99 of ``values``; None when there are none.

    Args:
        values: finite, non-negative samples (the caller filters garbage out).

    Returns:
        The distribution, or None for an empty sequence.
    """
    if not values:
        return None
    ordered = sorted(values)
    return Distribution(
        count=len(ordered),
        mean=math.fsum(ordered) / len(ordered),
        p50=_percentile(ordered, 0.50),
        p99=_percentile(ordered, 0.99),
    )


def _dist_dict(dist: Distribution | None) -> dict[str, float] | None:
    if dist is None:
        return None
    return {"count": dist.count, "mean": dist.mean, "p50": dist.p50, "p99": dist.p99}


def encode_summary(summary: HookSummary) -> bytes:
    """Serialize ``summary`` to one datagram payload (compact UTF-8 JSON).

    Args:
        summary: the interval summary.

    Returns:
        The bytes to send.
    """
    doc: dict[str, Any] = {
        "v": VERSION,
        "kind": KIND,
        "pid": summary.pid,
        "engine_id": summary.engine_id,
        "model": summary.model,
        "gpu_indices": list(summary.gpu_indices),
        "seq": summary.seq,
        "time_s": summary.time_s,
        "interval_s": summary.interval_s,
        "requests_running": summary.requests_running,
        "requests_waiting": summary.requests_waiting,
        "requests_started": summary.requests_started,
        "requests_finished": summary.requests_finished,
        "output_tokens": summary.output_tokens,
        "tpot_ms": _dist_dict(summary.tpot_ms),
        "ttft_ms": _dist_dict(summary.ttft_ms),
        "dropped": summary.dropped,
        "errors": summary.errors,
    }
    if summary.kv_cache_usage_ratio is not None:
        doc["kv_cache_usage_ratio"] = summary.kv_cache_usage_ratio
    for key in _HIST_KEYS:
        hist: Buckets | None = getattr(summary, key)
        if hist is not None:
            doc[key] = {
                "bounds_s": list(hist.bounds_s),
                "bucket_counts": list(hist.bucket_counts),
                "sum_s": hist.sum_s,
                "count": hist.count,
            }
    # allow_nan=False: NaN is not JSON; the aggregator never produces it, so a
    # ValueError here is a bug that the shipper counts rather than sends.
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _opt_int(doc: Mapping[str, Any], key: str) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if type(value) is int and value >= 0:  # the common case first: ~25 reads a datagram
        return value
    # bool is an int subclass; true/false is never a count.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
    return value


def _int(doc: Mapping[str, Any], key: str) -> int:
    value = _opt_int(doc, key)
    if value is None:
        raise ValueError(f"{key} is missing")
    return value


def _opt_float(doc: Mapping[str, Any], key: str) -> float | None:
    value = doc.get(key)
    if value is None:
        return None
    if type(value) is float and math.isfinite(value):  # the common case first
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _float(doc: Mapping[str, Any], key: str) -> float:
    value = _opt_float(doc, key)
    if value is None:
        raise ValueError(f"{key} is missing")
    return value


def _object(doc: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    """``doc[key]`` when it is a JSON object; None when absent or null."""
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be an object or null")  # noqa: TRY004 - one error type
    return value


def _dist(doc: Mapping[str, Any], key: str) -> Distribution | None:
    value = _object(doc, key)
    if value is None:
        return None
    count = _int(value, "count")
    if count == 0:
        return None
    mean, p50, p99 = (_float(value, name) for name in ("mean", "p50", "p99"))
    if min(mean, p50, p99) < 0:
        raise ValueError(f"{key} has a negative value")
    return Distribution(count=count, mean=mean, p50=p50, p99=p99)


def _buckets(doc: Mapping[str, Any], key: str) -> Buckets | None:
    value = _object(doc, key)
    if value is None:
        return None
    bounds, counts = value.get("bounds_s"), value.get("bucket_counts")
    if not isinstance(bounds, list) or not isinstance(counts, list):
        raise ValueError(f"{key}: bounds_s and bucket_counts must be lists")  # noqa: TRY004
    if len(bounds) > _MAX_BOUNDS or len(counts) != len(bounds) + 1:
        raise ValueError(f"{key}: {len(counts)} bucket counts for {len(bounds)} bounds")
    # map() over exact types, not a generator of isinstance calls: ~3x cheaper per
    # summary (json.loads yields exact int/float/bool/str, so type() needs no subclass care).
    if (
        not _NUMBER_TYPES.issuperset(map(type, bounds))
        or not all(map(math.isfinite, bounds))
        or not all(map(operator.lt, bounds, bounds[1:]))
    ):
        raise ValueError(f"{key}: bounds_s must be finite and strictly increasing")
    # counts is never empty here: it has one entry more than bounds.
    if not _INT_TYPES.issuperset(map(type, counts)) or min(counts) < 0:
        raise ValueError(f"{key}: bucket_counts must be non-negative integers")
    count = _int(value, "count")
    if count != sum(counts):
        raise ValueError(f"{key}: count {count} is not the sum of bucket_counts")
    sum_s = _float(value, "sum_s")
    if sum_s < 0:
        raise ValueError(f"{key}: sum_s is negative")
    if count == 0:
        return EMPTY_BUCKETS
    return Buckets(tuple(map(float, bounds)), tuple(counts), sum_s, count)


def decode_summary(data: bytes) -> HookSummary:
    """Parse and validate one datagram.

    Args:
        data: the datagram payload.

    Returns:
        The summary.

    Raises:
        ValueError: not JSON, not a version-1 summary, or a field of the wrong type
            or out of range (negative counts, NaN).
    """
    if len(data) > MAX_DATAGRAM_BYTES:
        raise ValueError(f"datagram of {len(data)} bytes is over {MAX_DATAGRAM_BYTES}")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError("a summary is a JSON object")  # noqa: TRY004 - one error type
    if doc.get("kind") != KIND or doc.get("v") != VERSION:
        raise ValueError(f"not a v{VERSION} {KIND}: kind={doc.get('kind')!r} v={doc.get('v')!r}")
    engine_id = doc.get("engine_id")
    if not isinstance(engine_id, str) or not engine_id:
        raise ValueError("engine_id must be a non-empty string")
    model = doc.get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError("model must be a string or null")
    gpus = doc.get("gpu_indices") or []
    if not isinstance(gpus, list) or not all(
        isinstance(g, int) and not isinstance(g, bool) and 0 <= g < 1024 for g in gpus
    ):
        raise ValueError("gpu_indices must be a list of GPU indices")
    kv = _opt_float(doc, "kv_cache_usage_ratio")
    if kv is not None and not 0.0 <= kv <= 1.0:
        raise ValueError(f"kv_cache_usage_ratio must be within 0-1, got {kv}")
    return HookSummary(
        pid=_int(doc, "pid"),
        engine_id=engine_id,
        seq=_int(doc, "seq"),
        time_s=_float(doc, "time_s"),
        interval_s=_float(doc, "interval_s"),
        model=model,
        requests_running=_opt_int(doc, "requests_running"),
        requests_waiting=_opt_int(doc, "requests_waiting"),
        requests_started=_opt_int(doc, "requests_started") or 0,
        requests_finished=_opt_int(doc, "requests_finished") or 0,
        output_tokens=_opt_int(doc, "output_tokens") or 0,
        tpot_ms=_dist(doc, "tpot_ms"),
        ttft_ms=_dist(doc, "ttft_ms"),
        kv_cache_usage_ratio=kv,
        dropped=_opt_int(doc, "dropped") or 0,
        errors=_opt_int(doc, "errors") or 0,
        gpu_indices=tuple(gpus),
        tpot_hist=_buckets(doc, "tpot_hist"),
        ttft_hist=_buckets(doc, "ttft_hist"),
        request_duration_hist=_buckets(doc, "request_duration_hist"),
    )
