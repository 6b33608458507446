"""The roofline report: the table, the JSON and the plot of ``agentctl roofline``."""

from __future__ import annotations

import json
import sys

import pytest

from rooftop.agent import roofline as rl
from rooftop.agent.roofline import GPUS, analyze, find_gpu, find_model
from rooftop.agent.roofline_report import format_report, plot_roofline, to_dict
from rooftop.common.errors import RooflineError

H100 = find_gpu("h100-sxm5")
LLAMA3_8B = find_model("llama-3-8b")
LLAMA3_70B = find_model("llama-3-70b")


def test_to_dict_is_json_ready_with_the_required_keys():
    result = analyze(LLAMA3_70B, H100, 8, 8192, "fp16")
    data = to_dict(result, rl.compare(LLAMA3_70B, 8, 8192, "fp16"))
    assert json.loads(json.dumps(data)) == data
    for key in ("weights_bytes", "kv_cache_bytes", "tpot_floor_ms", "fits",
                "arithmetic_intensity", "ridge_point", "gpus_needed", "tokens_per_s_ceiling"):
        assert key in data
    assert data["kv_cache_bytes"] == 21_474_836_480
    assert data["bound"] == "memory"
    assert len(data["other_gpus"]) == len(GPUS) - 1
    assert "h100-sxm5" not in {o["gpu"] for o in data["other_gpus"]}


def test_format_report_shows_the_figures():
    result = analyze(LLAMA3_70B, H100, 8, 8192, "fp16")
    text = format_report(result, rl.compare(LLAMA3_70B, 8, 8192, "fp16"))
    for figure in ("141.11 GB", "21.47 GB", "162.58 GB", "47.90 ms", "295.2",
                   "DOES NOT FIT, needs 3 x H100 SXM5", "memory-bound", "H200 SXM5", "B200 SXM"):
        assert figure in text
    assert "* H100 SXM5" in text


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = analyze(LLAMA3_8B, H100, 1, 0, "fp16")
    with pytest.raises(RooflineError, match=r"pip install 'rooftop\[plot\]'"):
        plot_roofline(result, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


