"""Scraped engine histograms become per-interval bucket increases; failed scrapes are visible."""

from __future__ import annotations

from click.testing import CliRunner

from rooftop.agent.engines.scrape import Scraper
from rooftop.agent.engines.sources import EngineEndpoint, EngineSources
from rooftop.cli import main
from rooftop.common.model import EMPTY_HISTOGRAM
from tests.agent.engines.test_engine_scrape import BOUNDS, sglang_text, vllm_text


def scraper_for(server) -> Scraper:
    return Scraper(server.url, clock=lambda: 1_767_225_600.0, timeout_s=2.0)


def per_bucket(observations: list[float]) -> tuple[int, ...]:
    """What a HistogramDelta over the test's BOUNDS holds for these observations."""
    counts = [0] * (len(BOUNDS) + 1)
    for o in observations:
        counts[next((i for i, b in enumerate(BOUNDS) if o <= b), len(BOUNDS))] += 1
    return tuple(counts)


def test_vllm_histogram_increases_between_scrapes(metrics_server):
    sc = scraper_for(metrics_server)
    tpot, ttft = [0.006] * 4, [0.2, 0.2]
    metrics_server.body = vllm_text(tpot, ttft, tokens=100)
    baseline = sc.scrape_once().sample
    assert baseline.tpot_hist is None and baseline.ttft_hist is None  # only a baseline

    new_tpot, new_ttft = [0.008, 0.03, 3.0], [0.04, 0.3, 0.3]
    metrics_server.body = vllm_text(tpot + new_tpot, ttft + new_ttft, tokens=400)
    s = sc.scrape_once().sample
    assert s.tpot_hist.bounds_s == BOUNDS  # the engine's own bounds travel along
    assert s.tpot_hist.bucket_counts == per_bucket(new_tpot)  # 3.0 s: above every bound
    assert s.tpot_hist.count == 3 and abs(s.tpot_hist.sum_s - sum(new_tpot)) < 1e-9
    assert s.ttft_hist.bucket_counts == per_bucket(new_ttft) and s.ttft_hist.count == 3
    # vllm_text has one e2e observation (1 s) per TTFT observation.
    assert s.request_duration_hist.bucket_counts == per_bucket([1.0] * 3)

    # Nothing finished: measured, empty — not "not measured".
    s = sc.scrape_once().sample
    assert s.tpot_hist == s.ttft_hist == s.request_duration_hist == EMPTY_HISTOGRAM


def test_engine_restart_takes_the_new_histogram_as_the_increase(metrics_server):
    sc = scraper_for(metrics_server)
    metrics_server.body = vllm_text([0.006] * 100, [0.2] * 50, tokens=9000)
    sc.scrape_once()
    metrics_server.body = vllm_text([0.006] * 100 + [0.007] * 10, [0.2] * 55, tokens=9500)
    assert sc.scrape_once().sample.tpot_hist.count == 10

    # Restarted: lower than before, so everything now there arrived since the restart.
    metrics_server.body = vllm_text([0.009] * 3, [0.5], tokens=40)
    s = sc.scrape_once().sample
    assert s.tpot_hist.bucket_counts == per_bucket([0.009] * 3)
    assert s.ttft_hist.bucket_counts == per_bucket([0.5])
    assert sc.stats().resets == 1

    metrics_server.body = vllm_text([0.009] * 3 + [0.012] * 2, [0.5, 0.1], tokens=70)
    s = sc.scrape_once().sample
    assert s.tpot_hist.bucket_counts == per_bucket([0.012] * 2)  # from the new baseline
    assert s.ttft_hist.count == 1


def test_per_token_histograms_are_not_taken_as_per_request(metrics_server):
    # vLLM before per-request TPOT (time_per_output_token_seconds is per token) and
    # SGLang's inter-token latency: each counts tokens, so no TPOT histogram increase.
    for text in (
        lambda n: vllm_text([0.006] * n, [0.2] * n, tokens=n, old=True),
        lambda n: sglang_text([0.006] * n, [0.2] * n, tokens=n),
    ):
        sc = scraper_for(metrics_server)
        metrics_server.body = text(2)
        sc.scrape_once()
        metrics_server.body = text(5)
        s = sc.scrape_once().sample
        assert s.tpot_ms is not None and s.tpot_hist is None  # the mean still comes
        assert s.ttft_hist is not None and s.ttft_hist.count == 3


def test_dead_and_wrong_engine_urls_are_counted_and_named(metrics_server, closed_port_url):
    metrics_server.body = "<html><body>Grafana</body></html>"
    dead = closed_port_url + "/metrics"
    sources = EngineSources(None, [EngineEndpoint.parse(dead), EngineEndpoint.parse(
        metrics_server.url)])
    for scraper, _ in sources._scrapers:
        scraper.scrape_once()
        scraper.scrape_once()
    assert sources.scrape_errors() == 4
    warnings = sources.scrape_warnings()
    assert len(warnings) == 2
    assert warnings[0].startswith(f"engine {dead}: 2 of 2 scrapes failed (last: ")
    assert "refused" in warnings[0].lower()
    assert warnings[1].startswith(f"engine {metrics_server.url}: 2 of 2 scrapes failed")
    assert "malformed metrics text" in warnings[1]


def test_a_healthy_engine_url_gives_no_warning(metrics_server):
    metrics_server.body = vllm_text([0.006], [0.2], tokens=1)
    sources = EngineSources(None, [EngineEndpoint.parse(metrics_server.url)])
    sources._scrapers[0][0].scrape_once()
    assert sources.scrape_errors() == 0 and sources.scrape_warnings() == []


def test_diagnose_warns_about_a_dead_engine_url(closed_port_url):
    url = closed_port_url + "/metrics"
    result = CliRunner().invoke(
        main,
        ["diagnose", "--fake", "h100", "--seconds", "0.3", "--no-hooks", "--engine-url", url],
    )
    assert result.exit_code == 0, result.output
    (line,) = [x for x in result.stderr.splitlines() if url in x]
    assert line.startswith(f"agentctl: warning: engine {url}: ")
    assert "scrapes failed" in line and "Traceback" not in result.output
