"""Scrapers against a real local HTTP server serving engine /metrics text."""

from __future__ import annotations

import time

import pytest

from rooftop.agent.engines.scrape import (
    Scraper,
    detect_engine,
    fetch_metrics,
    histogram_quantile,
    parse_samples,
)

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f'{k}="{v}"' for k, v in labels.items())


def histogram(name: str, observations: list[float], labels: dict[str, str]) -> str:
    """Prometheus text for a cumulative histogram holding ``observations`` (seconds)."""
    lines = [f"# HELP {name} test histogram", f"# TYPE {name} histogram"]
    for le in (*BOUNDS, float("inf")):
        count = sum(1 for o in observations if o <= le)
        le_text = "+Inf" if le == float("inf") else repr(le)
        lines.append(f"{name}_bucket{{{_labels({**labels, 'le': le_text})}}} {float(count)}")
    lines.append(f"{name}_sum{{{_labels(labels)}}} {sum(observations)!r}")
    lines.append(f"{name}_count{{{_labels(labels)}}} {float(len(observations))}")
    return "\n".join(lines)


def gauge(name: str, value: float, labels: dict[str, str], kind: str = "gauge") -> str:
    return f"# HELP {name} test\n# TYPE {name} {kind}\n{name}{{{_labels(labels)}}} {value!r}"


def vllm_text(tpot_obs, ttft_obs, tokens, *, running=3, waiting=1, kv=0.42, old=False) -> str:
    labels = {"model_name": MODEL, "engine": "0"}
    tpot_name = (
        "vllm:time_per_output_token_seconds"
        if old
        else ("vllm:request_time_per_output_token_seconds")
    )
    kv_name = "vllm:gpu_cache_usage_perc" if old else "vllm:kv_cache_usage_perc"
    parts = [
        gauge("vllm:num_requests_running", running, labels),
        gauge("vllm:num_requests_waiting", waiting, labels),
        gauge(kv_name, kv, labels),
        gauge("vllm:generation_tokens_total", float(tokens), labels, kind="counter"),
        histogram(tpot_name, tpot_obs, labels),
        histogram("vllm:time_to_first_token_seconds", ttft_obs, labels),
        histogram("vllm:e2e_request_latency_seconds", [1.0] * len(ttft_obs), labels),
        "# HELP python_gc_objects_collected_total x\n# TYPE python_gc_objects_collected_total "
        'counter\npython_gc_objects_collected_total{generation="0"} 123.0',
    ]
    if not old:  # current vLLM also has per-token inter-token latency: not preferred
        parts.append(histogram("vllm:inter_token_latency_seconds", [0.5] * 10, labels))
    return "\n".join(parts) + "\n"


def sglang_text(itl_obs, ttft_obs, tokens, *, running=2, queued=5) -> str:
    labels = {"model_name": MODEL}
    return (
        "\n".join(
            [
                gauge("sglang:num_running_reqs", running, labels),
                gauge("sglang:num_queue_reqs", queued, labels),
                gauge("sglang:token_usage", 0.28, labels),
                gauge("sglang:generation_tokens_total", float(tokens), labels, kind="counter"),
                histogram("sglang:inter_token_latency_seconds", itl_obs, labels),
                histogram("sglang:time_to_first_token_seconds", ttft_obs, labels),
            ]
        )
        + "\n"
    )


def tgi_text(tpt_obs, generated, *, batch=4, queue=0) -> str:
    return (
        "\n".join(
            [
                gauge("tgi_batch_current_size", batch, {}),
                gauge("tgi_queue_size", queue, {}),
                histogram("tgi_request_mean_time_per_token_duration", tpt_obs, {}),
                histogram("tgi_request_generated_tokens", generated, {}),
                histogram("tgi_request_duration", [1.0] * len(generated), {}),
            ]
        )
        + "\n"
    )


def scraper_for(server, **kw) -> Scraper:
    return Scraper(server.url, clock=lambda: 1_767_225_600.0, timeout_s=2.0, **kw)


def test_vllm_current_names(metrics_server):
    sc = scraper_for(metrics_server)
    metrics_server.body = vllm_text([0.006] * 4, [0.2, 0.2], tokens=1000)
    first = sc.scrape_once()
    assert first.kind == "vllm"
    s = first.sample
    assert s is not None
    assert (s.requests_running, s.requests_waiting) == (3, 1)
    assert s.tpot_ms is None and s.ttft_ms is None and s.output_tokens is None  # baseline
    assert first.kv_cache_usage_ratio == pytest.approx(0.42)
    assert s.model == MODEL
    assert s.engine_id == metrics_server.url

    # In the interval: 4 requests at 8 ms TPOT, 2 with TTFT 40 ms, 360 tokens.
    metrics_server.body = vllm_text(
        [0.006] * 4 + [0.008] * 4, [0.2, 0.2, 0.04, 0.04], tokens=1360, running=5, waiting=0
    )
    second = sc.scrape_once().sample
    assert second is not None
    assert second.tpot_ms == pytest.approx(8.0)  # not the per-token ITL histogram's 500 ms
    assert second.ttft_ms == pytest.approx(40.0)
    assert second.output_tokens == 360
    assert (second.requests_running, second.requests_waiting) == (5, 0)
    # All 4 in the (5, 10] ms bucket: p50 interpolates to its middle, p99 near its top.
    assert second.tpot_p50_ms == pytest.approx(7.5)
    assert 9.5 < second.tpot_p99_ms <= 10.0
    assert second.time_s == 1_767_225_600.0
    assert sc.drain() == [s, second]
    assert sc.stats().ok == 2


def test_vllm_older_names(metrics_server):
    sc = scraper_for(metrics_server)
    metrics_server.body = vllm_text([], [], tokens=0, old=True, kv=0.9)
    assert sc.scrape_once().kv_cache_usage_ratio == pytest.approx(0.9)
    metrics_server.body = vllm_text([0.02] * 10, [0.3], tokens=10, old=True)
    result = sc.scrape_once()
    assert result.sample.tpot_ms == pytest.approx(20.0)
    assert result.sample.ttft_ms == pytest.approx(300.0)
    assert result.sample.output_tokens == 10


def test_sglang(metrics_server):
    sc = scraper_for(metrics_server)
    metrics_server.body = sglang_text([0.01] * 5, [0.1], tokens=50)
    first = sc.scrape_once()
    assert first.kind == "sglang"
    assert (first.sample.requests_running, first.sample.requests_waiting) == (2, 5)
    metrics_server.body = sglang_text([0.01] * 5 + [0.004] * 10, [0.1, 0.06], tokens=60)
    s = sc.scrape_once().sample
    assert s.tpot_ms == pytest.approx(4.0)
    assert s.ttft_ms == pytest.approx(60.0)
    assert s.output_tokens == 10
    assert s.model == MODEL


def test_tgi_has_no_ttft_and_says_so(metrics_server):
    sc = scraper_for(metrics_server)
    metrics_server.body = tgi_text([0.03], [100])
    first = sc.scrape_once()
    assert first.kind == "tgi"
    assert any("no time-to-first-token" in n for n in first.notes)
    metrics_server.body = tgi_text([0.03, 0.05, 0.05], [100, 20, 30], batch=2, queue=7)
    result = sc.scrape_once()
    s = result.sample
    assert s.ttft_ms is None and s.ttft_p50_ms is None
    assert s.tpot_ms == pytest.approx(50.0)
    assert s.output_tokens == 50
    assert (s.requests_running, s.requests_waiting) == (2, 7)
    assert any("includes prefill" in n for n in result.notes)
    assert s.model is None


def test_counter_reset_between_scrapes(metrics_server):
    sc = scraper_for(metrics_server)
    metrics_server.body = vllm_text([0.006] * 100, [0.2] * 50, tokens=9000)
    sc.scrape_once()
    metrics_server.body = vllm_text([0.006] * 100 + [0.007] * 10, [0.2] * 55, tokens=9500)
    assert sc.scrape_once().sample.tpot_ms == pytest.approx(7.0)

    # The engine restarted: every cumulative figure starts over, lower than before.
    metrics_server.body = vllm_text([0.009] * 3, [0.5], tokens=40)
    after_reset = sc.scrape_once()
    s = after_reset.sample
    assert s is not None  # gauges still reported
    assert s.tpot_ms is None and s.ttft_ms is None and s.output_tokens is None  # no bogus delta
    assert sc.stats().resets == 1  # one restart, however many metrics showed it
    assert any("restarted" in n for n in after_reset.notes)

    metrics_server.body = vllm_text([0.009] * 3 + [0.012] * 2, [0.5, 0.1], tokens=70)
    s = sc.scrape_once().sample
    assert s.tpot_ms == pytest.approx(12.0)  # measured from the new baseline
    assert s.ttft_ms == pytest.approx(100.0)
    assert s.output_tokens == 30


@pytest.mark.parametrize(
    "body",
    [
        "<html><body>Not Found</body></html>",
        'vllm:num_requests_running{model_name="x} 3\n',
        "vllm:num_requests_running abc\n",
        "\x00\x01\x02",
    ],
)
def test_malformed_text_is_counted_and_retried(metrics_server, body):
    sc = scraper_for(metrics_server)
    metrics_server.body = body
    result = sc.scrape_once()
    assert result.sample is None
    assert "malformed" in (result.error or "")
    assert sc.stats().malformed == 1
    metrics_server.body = vllm_text([], [], tokens=0)
    assert sc.scrape_once().sample is not None  # retried next time, fine


def test_unrecognized_text(metrics_server):
    sc = scraper_for(metrics_server)
    metrics_server.body = "# TYPE up gauge\nup 1\n"
    result = sc.scrape_once()
    assert result.sample is None
    assert sc.stats().unrecognized == 1


def test_forced_kind_with_missing_metrics(metrics_server):
    sc = scraper_for(metrics_server, kind="sglang")
    metrics_server.body = vllm_text([], [], tokens=0)
    result = sc.scrape_once()
    assert result.kind == "sglang"
    assert result.sample.requests_running is None
    assert any("no TPOT histogram" in n for n in result.notes)
    with pytest.raises(ValueError):
        Scraper("http://x", kind="triton")


def test_nan_and_negative_gauges(metrics_server):
    sc = scraper_for(metrics_server)
    metrics_server.body = (
        vllm_text([], [], tokens=0)
        .replace(
            'vllm:num_requests_running{model_name="' + MODEL + '",engine="0"} 3',
            'vllm:num_requests_running{model_name="' + MODEL + '",engine="0"} NaN',
        )
        .replace(
            'vllm:num_requests_waiting{model_name="' + MODEL + '",engine="0"} 1',
            'vllm:num_requests_waiting{model_name="' + MODEL + '",engine="0"} -4',
        )
    )
    s = sc.scrape_once().sample
    assert s.requests_running is None and s.requests_waiting is None


def test_server_down(closed_port_url):
    sc = Scraper(closed_port_url + "/metrics", timeout_s=1.0)
    result = sc.scrape_once()
    assert result.sample is None
    assert sc.stats().unreachable == 1
    assert sc.stats().last_error
    sc.scrape_once()
    assert sc.stats().unreachable == 2  # retried, counted, never raised


def test_http_error_status(metrics_server):
    metrics_server.status = 500
    metrics_server.body = "oops"
    sc = scraper_for(metrics_server)
    assert sc.scrape_once().sample is None
    assert sc.stats().unreachable == 1


def test_polling_thread_and_drain(metrics_server):
    metrics_server.body = sglang_text([], [], tokens=0)
    sc = Scraper(metrics_server.url, interval_s=0.02)
    sc.start()
    sc.start()
    try:
        deadline = time.monotonic() + 5
        while sc.stats().ok < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sc.shutdown()
        sc.shutdown()
    assert len(sc.drain()) >= 3
    sc.flush()  # scrape now
    assert len(sc.drain()) == 1


def test_fetch_rejects_non_http():
    with pytest.raises(ValueError):
        fetch_metrics("file:///etc/passwd", 1.0)


def test_parse_and_detect():
    samples = parse_samples(tgi_text([0.1], [5]))
    assert detect_engine(samples).kind == "tgi"
    assert detect_engine(parse_samples("up 1\n")) is None
    with pytest.raises(ValueError):
        parse_samples("{{{")


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, [(0.01, 0.0), (0.02, 10.0), (float("inf"), 10.0)], 0.015),
        (0.5, [(0.01, 10.0), (float("inf"), 10.0)], 0.005),  # first bucket starts at 0
        (0.99, [(0.01, 0.0), (float("inf"), 5.0)], 0.01),  # in +Inf: highest finite bound
        (0.5, [(0.01, 0.0), (float("inf"), 0.0)], None),  # no observations
        (0.5, [], None),
        (0.5, [(float("inf"), 3.0)], None),  # no finite bucket
    ],
)
def test_histogram_quantile(q, buckets, expected):
    got = histogram_quantile(q, buckets)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)
