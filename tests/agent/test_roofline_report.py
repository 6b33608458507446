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
                "arithmetic_intensity", "ridge_point", "gpus_needed", "tensor_parallel_gpus",
                "tensor_parallel_tpot_floor_ms", "tokens_per_s_ceiling"):
        assert key in data
    assert (data["gpus_needed"], data["tensor_parallel_gpus"]) == (3, 4)
    assert data["kv_cache_bytes"] == 21_474_836_480
    assert data["bound"] == "memory"
    assert len(data["other_gpus"]) == len(GPUS) - 1
    assert "h100-sxm5" not in {o["gpu"] for o in data["other_gpus"]}


def test_format_report_shows_the_figures():
    result = analyze(LLAMA3_70B, H100, 8, 8192, "fp16")
    text = format_report(result, rl.compare(LLAMA3_70B, 8, 8192, "fp16"))
    for figure in ("141.11 GB", "21.47 GB", "162.58 GB", "47.90 ms", "295.2",
                   "memory-bound", "H200 SXM5", "B200 SXM"):
        assert figure in text
    assert "* H100 SXM5" in text


def test_a_model_needing_3_gpus_of_memory_is_told_the_tp_degree_that_splits_its_heads():
    """Llama 3 70B (64 heads, 8 KV heads) needs 3 H100s' memory at batch 8 x 8K, but
    tensor parallelism cannot split 64 heads 3 ways: the suggestion is 4, and says why."""
    result = analyze(LLAMA3_70B, H100, 8, 8192, "fp16")
    text = format_report(result, rl.compare(LLAMA3_70B, 8, 8192, "fp16"))
    assert ("of 80.00 GB: DOES NOT FIT, needs 4 x H100 SXM5 (tensor parallel: memory asks "
            "for 3, the degree must divide its 64 attention heads and 8 KV heads)") in text
    assert "needs 3 x" not in text
    on_4 = next(line for line in text.splitlines() if "on 4 GPUs" in line)
    assert f"{result.tpot_floor_ms / 4:.2f} ms" in on_4
    assert "  * H100 SXM5          80 GB   3.35 TB/s   needs 4 " in text


def test_without_a_tp_degree_that_fits_the_report_says_so():
    model = find_model("llama-3.1-405b")
    result = analyze(model, H100, 1, 4096, "bf16")
    text = format_report(result, rl.compare(model, 1, 4096, "bf16"))
    assert ("DOES NOT FIT, needs 11 x H100 SXM5 for memory, but no tensor-parallel degree "
            "from 11 to 128 divides its 128 attention heads and 8 KV heads") in text
    assert "on 11 GPUs" not in text
    assert "  * H100 SXM5          80 GB   3.35 TB/s     no TP " in text
    assert "no TP: memory needs more GPUs than the largest tensor-parallel degree, 8" in text
    assert "  B200 SXM          192 GB   8.00 TB/s   needs 8 " in text
    data = to_dict(result)
    assert data["tensor_parallel_gpus"] is None and data["tensor_parallel_tpot_floor_ms"] is None


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = analyze(LLAMA3_8B, H100, 1, 0, "fp16")
    with pytest.raises(RooflineError, match="pip install matplotlib"):
        plot_roofline(result, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


