"""agentctl roofline as a user runs it (CliRunner)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from rooftop import cli
from rooftop.agent.roofline import GPUS, MODELS, Dtype
from rooftop.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

LLAMA3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}


def roofline(*args: str) -> Result:
    result = CliRunner().invoke(main, ["roofline", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def roofline_json(*args: str) -> dict:
    result = roofline("--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_text_report_has_the_figures():
    result = roofline("--model", "llama-3-70b", "--gpu", "h100", "--batch", "8",
                      "--context", "8192", "--dtype", "fp16")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for figure in ("Llama 3 70B", "H100 SXM5", "141.11 GB", "21.47 GB", "162.58 GB",
                   "of 80.00 GB", "DOES NOT FIT, needs 4 x H100 SXM5", "TPOT floor", "47.90 ms",
                   "tokens/s ceiling", "167", "arithmetic intensity", "ridge point", "295.2",
                   "memory-bound"):
        assert figure in out, figure
    # Side by side: every other GPU in the table, the chosen one marked.
    for gpu in GPUS:
        assert gpu.name in out
    assert "* H100 SXM5" in out


def test_json_carries_the_required_keys_and_values():
    data = roofline_json("--model", "llama-3-70b", "--gpu", "h100-sxm", "--batch", "8",
                         "--context", "8192", "--dtype", "fp16")
    assert data["model"] == "llama-3-70b"
    assert data["gpu"] == "h100-sxm5"
    assert data["weights_bytes"] == 70_553_706_496 * 2
    assert data["kv_cache_bytes"] == 21_474_836_480
    assert data["fits"] is False
    assert data["gpus_needed"] == 3  # by memory; tensor parallelism must split 64 heads
    assert data["tensor_parallel_gpus"] == 4
    assert data["tpot_floor_ms"] == pytest.approx(47.9, abs=0.05)
    assert data["ridge_point"] == pytest.approx(295.2, abs=0.1)
    assert 7 < data["arithmetic_intensity"] < 9
    assert data["tokens_per_s_ceiling"] == pytest.approx(8 / data["tpot_floor_ms"] * 1e3)
    assert data["dtype"] == "fp16" and data["kv_dtype"] == "fp16"
    assert {o["gpu"] for o in data["other_gpus"]} == {g.key for g in GPUS} - {"h100-sxm5"}


def test_70b_fp16_on_one_24gb_card_does_not_fit_and_says_how_many():
    data = roofline_json("--model", "llama3-70b", "--gpu", "rtx-4090", "--dtype", "fp16",
                         "--context", "0")
    assert data["fits"] is False
    assert (data["gpus_needed"], data["tensor_parallel_gpus"]) == (6, 8)
    text = roofline("--model", "llama3-70b", "--gpu", "rtx-4090", "--dtype", "fp16",
                    "--context", "0").stdout
    assert "DOES NOT FIT, needs 8 x RTX 4090 (tensor parallel: memory asks for 6" in text
    assert "on 8 GPUs" in text and "on 6 GPUs" not in text


def test_8b_fits_an_h100():
    data = roofline_json("--model", "llama-3-8b", "--gpu", "h100")
    assert data["fits"] is True
    assert data["gpus_needed"] == 1
    assert data["dtype"] == "bf16" and data["kv_dtype"] == "bf16"


def test_kv_dtype_fp8_halves_the_cache():
    base = roofline_json("--model", "llama-3-8b", "--gpu", "h100", "--batch", "4")
    fp8 = roofline_json("--model", "llama-3-8b", "--gpu", "h100", "--batch", "4",
                        "--kv-dtype", "fp8")
    assert fp8["kv_cache_bytes"] * 2 == base["kv_cache_bytes"]


def test_config_json_input(tmp_path):
    path = tmp_path / "Meta-Llama-3-8B" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(LLAMA3_8B_CONFIG), encoding="utf-8")
    data = roofline_json("--config", str(path), "--gpu", "a100")
    assert data["params"] == 8_030_261_248
    assert data["model_name"] == "Meta-Llama-3-8B"
    assert data["gpu"] == "a100-sxm4-80gb"


def test_malformed_config_json_names_the_key_in_one_line(tmp_path):
    config = dict(LLAMA3_8B_CONFIG)
    del config["num_key_value_heads"], config["vocab_size"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    result = roofline("--config", str(path), "--gpu", "h100")
    assert result.exit_code == 1
    assert "vocab_size" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_unknown_model_lists_the_known_ones():
    result = roofline("--model", "gpt-5", "--gpu", "h100")
    assert result.exit_code == 2
    assert "unknown model 'gpt-5'" in result.stderr
    for model in MODELS:
        assert model.key in result.stderr


def test_unknown_gpu_lists_the_known_ones():
    result = roofline("--model", "llama-3-8b", "--gpu", "tpu-v5")
    assert result.exit_code == 2
    assert "unknown GPU 'tpu-v5'" in result.stderr
    for gpu in GPUS:
        assert gpu.key in result.stderr


def test_an_nvml_name_works_as_gpu():
    assert roofline_json("--model", "llama-3-8b", "--gpu", "NVIDIA H100 PCIe")["gpu"] == "h100-pcie"


@pytest.mark.parametrize("args", [
    ["--gpu", "h100"],
    ["--gpu", "h100", "--model", "llama-3-8b", "--config", "."],
    ["--model", "llama-3-8b"],
    ["--model", "llama-3-8b", "--gpu", "h100", "--dtype", "fp4"],
    ["--model", "llama-3-8b", "--gpu", "h100", "--batch", "0"],
])
def test_bad_usage_exits_2(args):
    assert roofline(*args).exit_code == 2


def test_dtype_choices_match_the_roofline_module():
    assert cli._ROOFLINE_DTYPES == tuple(d.value for d in Dtype)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "roofline.png"
    result = roofline("--model", "llama-3-8b", "--gpu", "h100", "--batch", "8", "--json",
                      "--plot", str(out))
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)  # the chart's message goes to stderr, stdout stays JSON
    assert f"wrote roofline chart to {out}" in result.stderr
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert out.stat().st_size > 10_000


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "roofline.png"
    result = roofline("--model", "llama-3-8b", "--gpu", "h100", "--plot", str(out))
    assert result.exit_code == 1
    assert "pip install matplotlib" in result.stderr
    assert not out.exists()


def test_help_lists_the_options():
    result = roofline("--help")
    assert result.exit_code == 0
    for option in ("--model", "--config", "--gpu", "--batch", "--context", "--dtype",
                   "--kv-dtype", "--json", "--plot"):
        assert option in result.stdout


def test_plot_to_an_unwritable_path_is_one_line(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "missing-dir" / "roofline.png"
    result = roofline("--model", "llama-3-8b", "--gpu", "h100", "--plot", str(out))
    assert result.exit_code == 1
    assert "cannot write the chart" in result.stderr


def test_config_path_must_exist(tmp_path: Path):
    result = roofline("--config", str(tmp_path / "nope.json"), "--gpu", "h100")
    assert result.exit_code == 2
