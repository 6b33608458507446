"""Per-request TPOT / TTFT / request-duration histograms: hook marks in, bucket counts out."""

from __future__ import annotations

import json

import pytest

from rooftop.agent.hooks import Aggregator
from rooftop.agent.hooks.vllm import RooftopStatLogger
from rooftop.agent.hooks.wire import (
    REQUEST_DURATION_BOUNDS_S,
    TPOT_BOUNDS_S,
    TTFT_BOUNDS_S,
    decode_summary,
    encode_summary,
)
from rooftop.common.model import EMPTY_HISTOGRAM, HistogramDelta
from tests.agent.hooks.test_hooks_vllm import (
    FinishedRequestStats,
    FinishedRequestStatsWithTtft,
    IterationStats,
    SchedulerStats,
    VllmConfig,
)


def make_agg(sock_path, clock) -> Aggregator:
    return Aggregator(engine_id="eng-1", socket_path=sock_path, clock_ns=clock, autostart=False)


def flushed_sample(agg, rx):
    assert agg.flush()
    rx.flush()
    (sample,) = rx.drain()
    return sample


def bucket_of(hist: HistogramDelta, value_s: float) -> int:
    """Index of the bucket ``value_s`` belongs in: the first bound >= it."""
    return next((i for i, b in enumerate(hist.bounds_s) if value_s <= b), len(hist.bounds_s))


def only_bucket(hist: HistogramDelta) -> tuple[int, int]:
    (found,) = [(i, n) for i, n in enumerate(hist.bucket_counts) if n]
    return found


def run_request(agg, clock, *, ttft_ms: float, tokens: int, tpot_ms: float, tail_ms: float = 1.0):
    req = agg.start_request()
    clock.advance_ms(ttft_ms)
    req.token()
    for _ in range(tokens - 1):
        clock.advance_ms(tpot_ms)
        req.token()
    clock.advance_ms(tail_ms)
    req.end()


@pytest.mark.parametrize("n", [1, 7, 50])
def test_n_finished_requests_are_n_observations_in_each_histogram(receiver, sock_path, clock, n):
    agg = make_agg(sock_path, clock)
    for _ in range(n):
        run_request(agg, clock, ttft_ms=30.0, tokens=11, tpot_ms=5.0)
    s = flushed_sample(agg, receiver)
    assert s.tpot_hist is not None and s.ttft_hist is not None
    assert s.request_duration_hist is not None
    assert (s.tpot_hist.count, s.ttft_hist.count, s.request_duration_hist.count) == (n, n, n)
    # Our bounds, and each request in the bucket its own figures fall in.
    assert s.tpot_hist.bounds_s == TPOT_BOUNDS_S
    assert s.ttft_hist.bounds_s == TTFT_BOUNDS_S
    assert s.request_duration_hist.bounds_s == REQUEST_DURATION_BOUNDS_S
    assert only_bucket(s.tpot_hist) == (bucket_of(s.tpot_hist, 0.005), n)
    assert only_bucket(s.ttft_hist) == (bucket_of(s.ttft_hist, 0.030), n)
    duration_s = 0.030 + 10 * 0.005 + 0.001
    assert only_bucket(s.request_duration_hist) == (bucket_of(s.request_duration_hist, 0.081), n)
    assert s.tpot_hist.sum_s == pytest.approx(n * 0.005)
    assert s.ttft_hist.sum_s == pytest.approx(n * 0.030)
    assert s.request_duration_hist.sum_s == pytest.approx(n * duration_s)
    assert receiver.stats().malformed == 0 and receiver.stats().invalid == 0


def test_a_request_is_observed_once_when_it_ends_not_per_summary(receiver, sock_path, clock):
    agg = make_agg(sock_path, clock)
    req = agg.start_request()
    clock.advance_ms(100)
    req.token()
    clock.advance_ms(8)
    req.token()
    first = flushed_sample(agg, receiver)
    # Still running: measured (the interval mean is there), no request finished yet.
    assert first.tpot_ms == pytest.approx(8.0)
    assert first.tpot_hist == EMPTY_HISTOGRAM and first.ttft_hist == EMPTY_HISTOGRAM
    assert first.request_duration_hist == EMPTY_HISTOGRAM
    for _ in range(3):
        clock.advance_ms(4)
        req.token()
    req.end()
    second = flushed_sample(agg, receiver)
    assert (second.tpot_hist.count, second.ttft_hist.count) == (1, 1)
    assert second.request_duration_hist.count == 1
    # TPOT over the whole request: (8 + 3 x 4) ms over 4 tokens after the first.
    assert second.tpot_hist.sum_s == pytest.approx(0.005)
    assert second.ttft_hist.sum_s == pytest.approx(0.100)
    third = flushed_sample(agg, receiver)
    assert third.tpot_hist.count == third.ttft_hist.count == 0  # not counted again


def test_token_chunks_count_every_token_after_the_first_chunk(receiver, sock_path, clock):
    agg = make_agg(sock_path, clock)
    req = agg.start_request()
    clock.advance_ms(20)
    req.token(4)  # speculative decoding: four tokens in the first step
    clock.advance_ms(12)
    req.token(4)
    req.end()
    s = flushed_sample(agg, receiver)
    assert s.tpot_hist.count == 1 and s.tpot_hist.sum_s == pytest.approx(0.003)


def test_a_request_without_tokens_has_a_duration_but_no_tpot_or_ttft(receiver, sock_path, clock):
    agg = make_agg(sock_path, clock)
    with agg.start_request():
        clock.advance_ms(15)  # cancelled before its first token
    one_token = agg.start_request()
    clock.advance_ms(25)
    one_token.token()
    one_token.end()
    s = flushed_sample(agg, receiver)
    assert s.request_duration_hist.count == 2
    assert s.ttft_hist.count == 1  # only the one with a token
    assert s.tpot_hist.count == 0  # a one-token request has no TPOT


def test_engine_measured_observations_join_the_histograms(receiver, sock_path, clock):
    agg = make_agg(sock_path, clock)
    for tpot_s in (0.004, 0.006, float("nan"), -1.0):  # garbage is skipped, not counted
        agg.observe_tpot_s(tpot_s)
    agg.observe_ttft_s(0.2)
    agg.observe_request_duration_s(1.5)
    s = flushed_sample(agg, receiver)
    assert s.tpot_hist.count == 2 and s.tpot_hist.sum_s == pytest.approx(0.010)
    assert s.ttft_hist.count == 1 and s.request_duration_hist.count == 1


def test_vllm_plugin_counts_each_finished_request_once(receiver, sock_path, clock):
    agg = make_agg(sock_path, clock)
    plugin = RooftopStatLogger(VllmConfig(), 0, aggregator=agg)
    n = 0
    for step in range(10):
        finished = [
            FinishedRequestStatsWithTtft(
                e2e_latency=0.5 + step / 100,
                num_generation_tokens=20,
                mean_time_per_output_token=0.006,
                first_token_latency=0.05,
            )
            for _ in range(step % 3)
        ]
        n += len(finished)
        plugin.record(SchedulerStats(4, 0, 0.5), IterationStats(20, 0, finished))
    assert n > 5
    s = flushed_sample(agg, receiver)
    assert (s.tpot_hist.count, s.ttft_hist.count, s.request_duration_hist.count) == (n, n, n)
    assert only_bucket(s.tpot_hist) == (bucket_of(s.tpot_hist, 0.006), n)
    assert only_bucket(s.ttft_hist) == (bucket_of(s.ttft_hist, 0.05), n)


def test_vllm_plugin_without_first_token_latency_takes_ttft_per_step(receiver, sock_path, clock):
    agg = make_agg(sock_path, clock)
    plugin = RooftopStatLogger(VllmConfig(), 0, aggregator=agg)
    # Older vLLM: TTFT arrives in the step where the first token came, once per request.
    plugin.record(None, IterationStats(time_to_first_tokens_iter=[0.1, 0.1, 0.1]))
    done = [FinishedRequestStats(e2e_latency=0.9, mean_time_per_output_token=0.01)] * 3
    plugin.record(None, IterationStats(finished_requests=list(done)))
    s = flushed_sample(agg, receiver)
    assert (s.tpot_hist.count, s.ttft_hist.count, s.request_duration_hist.count) == (3, 3, 3)


def test_summary_from_an_older_hook_without_histograms_is_accepted(receiver, sock_path, clock):
    agg = make_agg(sock_path, clock)
    run_request(agg, clock, ttft_ms=30.0, tokens=5, tpot_ms=5.0)
    doc = json.loads(encode_summary(agg._collect()))
    for key in ("tpot_hist", "ttft_hist", "request_duration_hist"):
        del doc[key]
    old = decode_summary(json.dumps(doc).encode())
    assert old.tpot_ms is not None
    assert old.tpot_hist is None and old.ttft_hist is None and old.request_duration_hist is None


@pytest.mark.parametrize(
    ("hist", "why"),
    [
        ({"bounds_s": [0.1], "bucket_counts": [1], "sum_s": 0.1, "count": 1}, "bucket counts"),
        ({"bounds_s": [0.2, 0.1], "bucket_counts": [1, 0, 0], "sum_s": 0.1, "count": 1},
         "increasing"),
        ({"bounds_s": [0.1], "bucket_counts": [1, -1], "sum_s": 0.1, "count": 0}, "non-negative"),
        ({"bounds_s": [0.1], "bucket_counts": [1, 1], "sum_s": 0.1, "count": 3}, "sum of"),
        ({"bounds_s": [0.1], "bucket_counts": [1, 0], "sum_s": -0.1, "count": 1}, "negative"),
        ({"bounds_s": "0.1", "bucket_counts": [1, 0], "sum_s": 0.1, "count": 1}, "lists"),
        ([1, 2], "object"),
        # Each element type the decoder's bulk (map over type()) checks must still refuse:
        ({"bounds_s": [True], "bucket_counts": [1, 0], "sum_s": 0.1, "count": 1}, "finite"),
        ({"bounds_s": ["0.1"], "bucket_counts": [1, 0], "sum_s": 0.1, "count": 1}, "finite"),
        ({"bounds_s": [None], "bucket_counts": [1, 0], "sum_s": 0.1, "count": 1}, "finite"),
        ({"bounds_s": [float("nan")], "bucket_counts": [1, 0], "sum_s": 0.1, "count": 1},
         "finite"),
        ({"bounds_s": [0.1, float("inf")], "bucket_counts": [1, 0, 0], "sum_s": 0.1,
          "count": 1}, "finite"),
        ({"bounds_s": [0.1, 0.1], "bucket_counts": [1, 0, 0], "sum_s": 0.1, "count": 1},
         "increasing"),
        ({"bounds_s": [0.1], "bucket_counts": [True, 0], "sum_s": 0.1, "count": 1},
         "non-negative integers"),
        ({"bounds_s": [0.1], "bucket_counts": [1.0, 0], "sum_s": 0.1, "count": 1},
         "non-negative integers"),
        ({"bounds_s": [0.1], "bucket_counts": [1, 0], "sum_s": 0.1, "count": 1.0}, "count"),
        ({"bounds_s": [0.1], "bucket_counts": [1, 0], "sum_s": float("nan"), "count": 1},
         "sum_s"),
    ],
)  # fmt: skip
def test_impossible_histograms_are_malformed(sock_path, clock, hist, why):
    agg = make_agg(sock_path, clock)
    doc = json.loads(encode_summary(agg._collect()))
    doc["ttft_hist"] = hist
    with pytest.raises(ValueError, match=why):
        decode_summary(json.dumps(doc).encode())


def test_integer_bounds_decode_as_float_seconds(sock_path, clock):
    agg = make_agg(sock_path, clock)
    doc = json.loads(encode_summary(agg._collect()))
    doc["ttft_hist"] = {"bounds_s": [1, 2.5], "bucket_counts": [0, 2, 1], "sum_s": 5, "count": 3}
    hist = decode_summary(json.dumps(doc).encode()).ttft_hist
    assert hist is not None
    assert hist.bounds_s == (1.0, 2.5) and all(type(b) is float for b in hist.bounds_s)
    assert (hist.bucket_counts, hist.sum_s, hist.count) == ((0, 2, 1), 5.0, 3)
