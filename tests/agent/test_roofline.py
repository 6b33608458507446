"""Roofline formulas against DESIGN §4's figures, GPU detection, presets and config.json."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from rooftop.agent import roofline as rl
from rooftop.agent.models_catalog import _normalize, params_from_architecture
from rooftop.agent.roofline import (
    GPUS,
    MODELS,
    Dtype,
    analyze,
    application_mbu,
    detect_gpu,
    find_gpu,
    find_model,
    kv_cache_bytes,
    load_hf_config,
    ridge_point,
    tpot_floor_ms,
)
from rooftop.common.errors import RooflineError

H100 = find_gpu("h100-sxm5")
LLAMA3_8B = find_model("llama-3-8b")
LLAMA3_70B = find_model("llama-3-70b")

# meta-llama/Meta-Llama-3-8B config.json, as published.
LLAMA3_8B_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}

# Qwen/Qwen2.5-7B config.json: no head_dim, no attention_bias, yet q/k/v carry biases.
QWEN25_7B_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}


def write_config(tmp_path: Path, config: dict[str, Any], name: str = "Meta-Llama-3-8B") -> Path:
    directory = tmp_path / name
    directory.mkdir()
    path = directory / "config.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


# --- DESIGN §4 figures ---------------------------------------------------------------------


def test_kv_cache_llama3_70b_fp16_8k_context_8_requests_is_21_5_gb():
    kv = kv_cache_bytes(LLAMA3_70B, batch=8, context=8192, kv_dtype=Dtype.FP16)
    assert kv == 2 * 80 * 8 * 128 * 8192 * 8 * 2 == 21_474_836_480
    assert kv / 1e9 == pytest.approx(21.5, abs=0.05)


def test_tpot_floor_70b_fp16_on_h100_sxm_is_about_42_ms_whatever_the_flops():
    floor = tpot_floor_ms(LLAMA3_70B, H100, batch=1, context=0, dtype="fp16")
    # DESIGN: 140 GB / 3.35 TB/s ≈ 42 ms; the streamed weights are 139.0 GB.
    assert floor == pytest.approx(42.0, abs=0.6)
    assert floor == pytest.approx(139.01e9 / 3.35e12 * 1e3, rel=1e-3)
    doubled_flops = replace(H100, fp16_flops_per_s=2 * H100.fp16_flops_per_s)
    assert tpot_floor_ms(LLAMA3_70B, doubled_flops, 1, 0, "fp16") == floor
    more_bandwidth = find_gpu("h200")
    assert tpot_floor_ms(LLAMA3_70B, more_bandwidth, 1, 0, "fp16") == pytest.approx(
        floor * 3.35 / 4.8
    )


def test_tpot_floor_adds_the_kv_cache_read_every_step():
    result = analyze(LLAMA3_70B, H100, batch=8, context=8192, dtype="fp16")
    assert result.bytes_per_step == result.streamed_weights_bytes + 21_474_836_480
    assert result.tpot_floor_ms == pytest.approx(result.bytes_per_step / 3.35e12 * 1e3)
    assert result.tpot_floor_ms == pytest.approx(47.9, abs=0.05)


def test_ridge_point_h100_sxm_dense_fp16_is_about_295():
    assert ridge_point(H100) == pytest.approx(989e12 / 3.35e12)
    assert ridge_point(H100) == pytest.approx(295.2, abs=0.1)


def test_ridge_point_uses_fp8_peak_only_where_the_gpu_has_fp8():
    assert ridge_point(H100, Dtype.FP8) == pytest.approx(2 * ridge_point(H100), rel=0.01)
    a100 = find_gpu("a100")
    assert ridge_point(a100, Dtype.FP8) == ridge_point(a100, Dtype.FP16)
    # INT4 weights are dequantized and multiplied in 16 bit.
    assert ridge_point(H100, Dtype.INT4) == ridge_point(H100, Dtype.FP16)


def test_application_mbu_matches_design_measurements():
    assert application_mbu(4.40, 5.84) == pytest.approx(0.753, abs=0.001)
    assert round(application_mbu(4.40, 5.84) * 100) == 75
    assert round(application_mbu(4.40, 96.0) * 100) == 5


@pytest.mark.parametrize(("floor", "measured"), [(4.4, 0.0), (0.0, 5.0), (4.4, -1.0),
                                                 (4.4, math.nan), (math.inf, 5.0)])
def test_application_mbu_rejects_non_positive_or_non_finite(floor, measured):
    with pytest.raises(RooflineError):
        application_mbu(floor, measured)


def test_application_mbu_of_the_computed_floor_for_llama3_8b_is_plausible():
    floor = tpot_floor_ms(LLAMA3_8B, H100, batch=1, context=1024, dtype="bf16")
    # 15.0 GB streamed: 4.48 ms plus a little KV; DESIGN's measured 5.84 ms sits at ~78 %.
    assert 4.4 < floor < 4.7
    assert 0.7 < application_mbu(floor, 5.84) < 0.85


# --- formulas ------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "bytes_per_param"),
                         [("fp16", 2), ("bf16", 2), ("fp8", 1), ("int4", 0.5)])
def test_weights_bytes_per_dtype(dtype, bytes_per_param):
    result = analyze(LLAMA3_8B, H100, 1, 0, dtype)
    assert result.weights_bytes == LLAMA3_8B.params * bytes_per_param
    assert isinstance(result.weights_bytes, int)


def test_int4_weights_of_an_odd_param_count_round_up_to_whole_bytes():
    odd = replace(LLAMA3_8B, params=LLAMA3_8B.params + 1)
    assert rl.weights_bytes(odd, Dtype.INT4) == LLAMA3_8B.params // 2 + 1


def test_kv_dtype_defaults_to_16_bit_and_fp8_halves_the_cache():
    fp16 = analyze(LLAMA3_70B, H100, 8, 8192, "fp16")
    fp8_weights = analyze(LLAMA3_70B, H100, 8, 8192, "fp8")
    fp8_kv = analyze(LLAMA3_70B, H100, 8, 8192, "fp16", "fp8")
    assert fp16.kv_dtype is Dtype.FP16
    assert fp8_weights.kv_dtype is Dtype.BF16
    assert fp8_weights.kv_cache_bytes == fp16.kv_cache_bytes
    assert fp8_kv.kv_cache_bytes * 2 == fp16.kv_cache_bytes


def test_decode_arithmetic_intensity_is_batch_for_fp16_without_kv():
    for batch in (1, 8, 64):
        result = analyze(LLAMA3_8B, H100, batch, 0, "fp16")
        assert result.arithmetic_intensity_flop_per_byte == pytest.approx(batch)
        assert result.memory_bound


def test_arithmetic_intensity_counts_attention_flops_and_kv_bytes():
    result = analyze(LLAMA3_8B, H100, 4, 4096, "fp16")
    streamed = rl.streamed_params(LLAMA3_8B)
    attention = 4 * 32 * 32 * 128 * 4096
    assert result.flops_per_step == 4 * (2 * streamed + attention)
    assert result.arithmetic_intensity_flop_per_byte == pytest.approx(
        result.flops_per_step / (2 * streamed + result.kv_cache_bytes)
    )


def test_untied_input_embeddings_are_not_streamed_but_a_tied_table_is():
    assert rl.streamed_params(LLAMA3_8B) == LLAMA3_8B.params - 128256 * 4096
    tied = find_model("llama-3.2-1b")
    assert tied.tie_word_embeddings
    assert rl.streamed_params(tied) == tied.params


def test_past_the_ridge_the_compute_roof_sets_the_floor():
    result = analyze(LLAMA3_8B, H100, batch=4096, context=0, dtype="fp16")
    assert not result.memory_bound
    assert result.compute_time_ms > result.memory_time_ms
    assert result.tpot_floor_ms == result.compute_time_ms


def test_tokens_per_s_ceiling_is_batch_over_floor():
    result = analyze(LLAMA3_70B, H100, 8, 8192, "fp16")
    assert result.tokens_per_s_ceiling == pytest.approx(8 / (result.tpot_floor_ms / 1e3))


def test_70b_fp16_does_not_fit_one_24gb_card_and_needs_a_tp_degree_dividing_its_heads():
    result = analyze(LLAMA3_70B, find_gpu("rtx-4090"), 1, 0, "fp16")
    assert not result.fits
    assert result.gpus_needed == math.ceil(LLAMA3_70B.params * 2 / 24e9) == 6
    # 64 attention heads, 8 KV heads: TP 6 would split no head evenly; 8 does.
    assert (LLAMA3_70B.heads, LLAMA3_70B.kv_heads) == (64, 8)
    assert result.tensor_parallel_gpus == 8
    assert result.tensor_parallel_tpot_floor_ms == pytest.approx(result.tpot_floor_ms / 8)


def test_70b_needing_3_h100s_of_memory_gets_tensor_parallel_4():
    result = analyze(LLAMA3_70B, H100, 8, 8192, "fp16")
    assert (result.gpus_needed, result.tensor_parallel_gpus) == (3, 4)


@pytest.mark.parametrize(("heads", "kv_heads", "at_least", "degree"), [
    (64, 8, 1, 1),
    (64, 8, 3, 4),
    (64, 8, 5, 8),
    (64, 8, 9, None),  # 16 divides the heads but not the 8 KV heads
    (32, 32, 3, 4),  # plain multi-head: only the heads count
    (40, 8, 3, 4),
    (40, 40, 6, 8),
    (28, 4, 3, 4),
    (24, 8, 5, 8),  # 6 divides 24 but not 8
    (7, 7, 2, 7),
    (7, 7, 8, None),  # more GPUs than heads
])
def test_tensor_parallel_degree_is_the_smallest_at_least_n_dividing_both_head_counts(
    heads, kv_heads, at_least, degree
):
    model = replace(LLAMA3_70B, heads=heads, kv_heads=kv_heads)
    assert rl.tensor_parallel_degree(model, at_least) == degree


def test_no_tensor_parallel_degree_leaves_the_split_floor_unknown():
    result = analyze(find_model("llama-3.1-405b"), H100, 1, 4096, "bf16")
    assert result.gpus_needed == 11 and not result.fits
    assert result.tensor_parallel_gpus is None  # 128 heads, 8 KV heads: at most TP 8
    assert result.tensor_parallel_tpot_floor_ms is None


def test_8b_fits_an_h100_and_needs_one_gpu():
    result = analyze(LLAMA3_8B, H100, 1, 8192, "bf16")
    assert result.fits
    assert result.gpus_needed == result.tensor_parallel_gpus == 1
    assert result.total_bytes == result.weights_bytes + result.kv_cache_bytes


@pytest.mark.parametrize(("batch", "context"), [(0, 10), (-1, 10), (1, -1)])
def test_impossible_shapes_raise(batch, context):
    with pytest.raises(RooflineError):
        analyze(LLAMA3_8B, H100, batch, context, "fp16")


def test_unknown_dtype_raises_listing_known():
    with pytest.raises(RooflineError, match="fp16, bf16, fp8, int4"):
        analyze(LLAMA3_8B, H100, 1, 0, "fp4")
    assert rl.parse_dtype("BF16") is Dtype.BF16


def test_compare_covers_every_gpu_in_table_order():
    results = rl.compare(LLAMA3_70B, 8, 8192, "fp16")
    assert [r.gpu for r in results] == list(GPUS)


# --- presets and lookup --------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.key)
def test_preset_params_match_their_architecture(model):
    assert model.params == params_from_architecture(
        layers=model.layers,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        heads=model.heads,
        kv_heads=model.kv_heads,
        head_dim=model.head_dim,
        vocab_size=model.vocab_size,
        tie_word_embeddings=model.tie_word_embeddings,
        qkv_bias=model.qkv_bias,
    )


def test_required_presets_have_the_published_shapes():
    shapes = {
        "llama-3-8b": (8_030_261_248, 32, 4096, 32, 8, 128, 128256),
        "llama-3-70b": (70_553_706_496, 80, 8192, 64, 8, 128, 128256),
        "llama-2-7b": (6_738_415_616, 32, 4096, 32, 32, 128, 32000),
        "llama-2-13b": (13_015_864_320, 40, 5120, 40, 40, 128, 32000),
        "mistral-7b": (7_248_023_552, 32, 4096, 32, 8, 128, 32768),
        "qwen2.5-7b": (7_615_616_512, 28, 3584, 28, 4, 128, 152064),
        "qwen2.5-72b": (72_706_203_648, 80, 8192, 64, 8, 128, 152064),
    }
    for name, shape in shapes.items():
        m = find_model(name)
        assert (m.params, m.layers, m.hidden_size, m.heads, m.kv_heads, m.head_dim,
                m.vocab_size) == shape, name


def test_every_alias_resolves_to_its_own_entry():
    for gpu in GPUS:
        for name in (gpu.key, gpu.name, *gpu.aliases):
            assert find_gpu(name) is gpu, name
    for model in MODELS:
        for name in (model.key, model.name, *model.aliases):
            assert find_model(name) is model, name
    # No spelling is claimed by two entries (the index would silently keep one of them).
    for table in (GPUS, MODELS):
        per_entry = [{_normalize(n) for n in (e.key, e.name, *e.aliases)} for e in table]
        flat = [n for names in per_entry for n in names]
        assert len(set(flat)) == len(flat)


@pytest.mark.parametrize(("name", "key"), [
    ("llama-3-8b", "llama-3-8b"),
    ("Llama3-70B", "llama-3-70b"),
    ("llama3_70b", "llama-3-70b"),
    ("meta-llama/Meta-Llama-3-8B-Instruct", "llama-3-8b"),
    ("meta-llama/Llama-3.1-70B-Instruct", "llama-3-70b"),
    ("Llama-2-7b-chat-hf", "llama-2-7b"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b"),
    ("Qwen/Qwen2.5-72B-Instruct", "qwen2.5-72b"),
    ("qwen2.5-7b", "qwen2.5-7b"),
])
def test_find_model_accepts_friendly_names(name, key):
    assert find_model(name).key == key


@pytest.mark.parametrize("name", ["qwen2-57b", "llama-3-13b", "gpt-4", ""])
def test_find_model_unknown_lists_known(name):
    with pytest.raises(RooflineError) as err:
        find_model(name)
    message = str(err.value)
    assert "llama-3-8b" in message and "qwen2.5-72b" in message


@pytest.mark.parametrize(("name", "key"), [
    ("h100", "h100-sxm5"),
    ("H100-SXM", "h100-sxm5"),
    ("h100 sxm5", "h100-sxm5"),
    ("h100-pcie", "h100-pcie"),
    ("H200", "h200-sxm5"),
    ("b200", "b200-sxm"),
    ("a100", "a100-sxm4-80gb"),
    ("A100-40GB", "a100-sxm4-40gb"),
    ("l40s", "l40s"),
    ("A10G", "a10g"),
    ("rtx4090", "rtx-4090"),
    ("NVIDIA H100 80GB HBM3", "h100-sxm5"),
])
def test_find_gpu_accepts_friendly_and_nvml_names(name, key):
    assert find_gpu(name).key == key


def test_find_gpu_unknown_lists_known():
    with pytest.raises(RooflineError, match="unknown GPU 'v100'.*h100-sxm5.*rtx-4090"):
        find_gpu("v100")


@pytest.mark.parametrize(("nvml_name", "key"), [
    ("NVIDIA H100 80GB HBM3", "h100-sxm5"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H200", "h200-sxm5"),
    ("NVIDIA B200", "b200-sxm"),
    ("NVIDIA A100-SXM4-80GB", "a100-sxm4-80gb"),
    ("NVIDIA A100-SXM4-40GB", "a100-sxm4-40gb"),
    ("NVIDIA A100 80GB PCIe", "a100-pcie-80gb"),
    ("NVIDIA A100-PCIE-40GB", "a100-pcie-40gb"),
    ("NVIDIA L40S", "l40s"),
    ("NVIDIA A10G", "a10g"),
    ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("  nvidia h100 80gb hbm3 ", "h100-sxm5"),
])
def test_detect_gpu_from_nvml_names(nvml_name, key):
    gpu = detect_gpu(nvml_name)
    assert gpu is not None
    assert gpu.key == key


@pytest.mark.parametrize("nvml_name", [
    "NVIDIA H100 NVL",  # 94 GB, 3.9 TB/s: not an SXM5
    "NVIDIA H200 NVL",
    "NVIDIA GH200 480GB",  # contains "H200" as a substring, a different part
    "NVIDIA GB200",
    "NVIDIA L40",
    "NVIDIA A10",
    "NVIDIA GeForce RTX 4090 D",
    "Tesla V100-SXM2-32GB",
    "NVIDIA H100",  # no form factor: do not guess
    "",
])
def test_detect_gpu_unknown_is_none(nvml_name):
    assert detect_gpu(nvml_name) is None


def test_gpu_table_has_the_design_rows():
    rows = {g.name: g for g in GPUS}
    for name, memory_gb, bandwidth_tb_s, fp16_tflops in [
        ("H100 SXM5", 80, 3.35, 989), ("H100 PCIe", 80, 2.0, 756), ("H200 SXM5", 141, 4.8, 989),
        ("B200 SXM", 192, 8.0, 2250), ("A100 SXM4 80GB", 80, 2.0, 312), ("L40S", 48, 0.864, 362),
        ("A10G", 24, 0.6, 125), ("RTX 4090", 24, 1.0, 165),
    ]:
        gpu = rows[name]
        assert gpu.memory_bytes == memory_gb * 10**9
        assert gpu.bandwidth_bytes_per_s / 1e12 == pytest.approx(bandwidth_tb_s, rel=0.025)
        assert gpu.fp16_flops_per_s == fp16_tflops * 1e12


# --- config.json ---------------------------------------------------------------------------


def test_load_llama3_8b_config_matches_the_preset(tmp_path):
    spec = load_hf_config(write_config(tmp_path, LLAMA3_8B_CONFIG))
    assert spec.params == 8_030_261_248
    assert spec.name == "Meta-Llama-3-8B"
    fields = ("params", "layers", "hidden_size", "intermediate_size", "heads", "kv_heads",
              "head_dim", "vocab_size", "tie_word_embeddings", "qkv_bias")
    assert {f: getattr(spec, f) for f in fields} == {f: getattr(LLAMA3_8B, f) for f in fields}


def test_load_config_from_the_model_directory(tmp_path):
    path = write_config(tmp_path, LLAMA3_8B_CONFIG)
    assert load_hf_config(path.parent).params == 8_030_261_248


def test_load_qwen2_config_counts_its_implicit_qkv_bias(tmp_path):
    spec = load_hf_config(write_config(tmp_path, QWEN25_7B_CONFIG, "Qwen2.5-7B"))
    assert spec.qkv_bias
    assert spec.head_dim == 128  # 3584 / 28, absent from the file
    assert spec.params == find_model("qwen2.5-7b").params == 7_615_616_512


def test_load_config_defaults_kv_heads_and_head_dim(tmp_path):
    # Llama 2 7B's config.json predates GQA keys: no num_key_value_heads, no head_dim.
    config = {**LLAMA3_8B_CONFIG, "intermediate_size": 11008, "vocab_size": 32000}
    del config["num_key_value_heads"]
    spec = load_hf_config(write_config(tmp_path, config, "Llama-2-7b-hf"))
    assert spec.kv_heads == 32
    assert spec.head_dim == 128
    assert spec.params == find_model("llama-2-7b").params


def test_load_config_with_tied_embeddings_and_explicit_head_dim(tmp_path):
    config = {**LLAMA3_8B_CONFIG, "hidden_size": 2048, "intermediate_size": 8192,
              "num_hidden_layers": 16, "head_dim": 64, "tie_word_embeddings": True}
    spec = load_hf_config(write_config(tmp_path, config, "Llama-3.2-1B"))
    assert spec.head_dim == 64
    assert spec.params == find_model("llama-3.2-1b").params == 1_235_814_400


def test_load_multimodal_config_reads_its_text_config(tmp_path):
    config = {"model_type": "llava", "text_config": copy.deepcopy(LLAMA3_8B_CONFIG)}
    assert load_hf_config(write_config(tmp_path, config)).params == 8_030_261_248


@pytest.mark.parametrize("key", ["hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "vocab_size"])
def test_missing_key_is_named(tmp_path, key):
    config = dict(LLAMA3_8B_CONFIG)
    del config[key]
    with pytest.raises(RooflineError, match=f"missing key '{key}'"):
        load_hf_config(write_config(tmp_path, config))


def test_non_integer_value_is_named(tmp_path):
    config = {**LLAMA3_8B_CONFIG, "num_hidden_layers": "32"}
    with pytest.raises(RooflineError, match="'num_hidden_layers' must be a positive integer"):
        load_hf_config(write_config(tmp_path, config))


def test_mixture_of_experts_config_is_refused(tmp_path):
    config = {**LLAMA3_8B_CONFIG, "num_local_experts": 8, "num_experts_per_tok": 2}
    with pytest.raises(RooflineError, match="mixture-of-experts"):
        load_hf_config(write_config(tmp_path, config))


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_malformed_config_file_raises_naming_the_file(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RooflineError, match="config.json"):
        load_hf_config(path)


def test_missing_config_file_raises(tmp_path):
    with pytest.raises(RooflineError, match="cannot read"):
        load_hf_config(tmp_path / "nope.json")
