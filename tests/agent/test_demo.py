"""agentctl demo: real collector + agent subprocesses replaying the H100 recordings."""

from __future__ import annotations

import re
import urllib.request

import pytest

from rooftop.common.model import GpuSample
from rooftop.demo import DEMO_NODES, DemoNode, build_playlist, run_demo

pytestmark = pytest.mark.slow


def test_playlist_puts_recordings_back_to_back_in_time_order():
    records = build_playlist(("idle", "gemm_8192"))
    times = [r.time_s for r in records]
    assert times == sorted(times)
    busy = [r.busy_pct for r in records if isinstance(r, GpuSample)]
    assert busy[0] == 0.0 and busy[-1] > 90  # idle first, then the GEMM
    assert times[-1] - times[0] >= 16  # each recording holds its verdict ≥ 8 s


def test_demo_shows_a_labelled_replay_whose_verdicts_change():
    views: list[str] = []
    scraped: list[str] = []

    def echo(text: str) -> None:
        views.append(text)
        if len(views) == 12 and not scraped:
            port = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", text)
            assert port, text
            with urllib.request.urlopen(f"http://127.0.0.1:{port[1]}/metrics", timeout=5) as r:
                scraped.append(r.read().decode())

    nodes = (DemoNode("demo-x", ("idle", "gemv_b16")), DemoNode("demo-y", ("hf_8b_b1",)))
    shown = run_demo(seconds=22, prometheus_listen="127.0.0.1:0", nodes=nodes, echo=echo,
                     clear_screen=False)
    assert shown == len(views) >= 15
    assert all("REPLAY of real H100 recordings" in v for v in views)
    verdicts = [v for v in ("idle", "memory-bound") if any(f" {v} " in x for x in views)]
    assert verdicts == ["idle", "memory-bound"], views[-1]
    assert 'rooftop_gpu_bound{' in scraped[0]
    # The replayed HF recording carries the engine's TPOT (96.4 ms) through the fleet.
    assert any(re.search(r"demo-y .* 96\.\d ms", v) for v in views), views[-1]


def test_default_demo_nodes_replay_recordings_that_exist():
    for node in DEMO_NODES:
        assert build_playlist(node.recordings)
