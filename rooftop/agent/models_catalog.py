"""What the roofline runs on: a table of GPUs and of common open models, and their lookup.

GPU figures are the vendor datasheets' (DESIGN §4): decimal units (1 GB = 1e9 bytes,
1 TB/s = 1e12 bytes/s), **dense** tensor-core peaks, never the with-sparsity numbers
that marketing quotes twice as large. Memory is the marketed capacity; an H100 80GB
actually reports 81,559 MiB (85.5e9 bytes) through NVML, so the table errs small, which
is the safe side for "will it fit".

Model presets carry the published architecture of each model (HuggingFace
``config.json``) and its published parameter count; ``params_from_architecture``
recomputes the count from the shape and the tests hold the two equal, so a typo in
either shows up. Any other dense model comes in through ``load_hf_config``.

Lookup is forgiving about spelling (case, ``-``/``_``/space, an ``org/`` prefix, an
``-Instruct`` suffix) and strict about meaning: a name that matches nothing raises
``RooflineError`` listing the names that would.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rooftop.common.errors import RooflineError

__all__ = [
    "GPUS",
    "MODELS",
    "GpuSpec",
    "ModelSpec",
    "detect_gpu",
    "find_gpu",
    "find_model",
    "load_hf_config",
    "params_from_architecture",
]


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One GPU model's datasheet peaks (dense, decimal units)."""

    key: str  # canonical lookup name, e.g. "h100-sxm5"
    name: str  # for people, e.g. "H100 SXM5"
    memory_bytes: int
    memory_kind: str  # "HBM3", "GDDR6X", ...
    bandwidth_bytes_per_s: float
    fp16_flops_per_s: float  # dense FP16/BF16 tensor core, FP32 accumulate
    fp8_flops_per_s: float | None = None  # dense FP8 tensor core; None before Ada/Hopper
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A dense decoder-only transformer's shape, as far as memory traffic is concerned."""

    key: str  # canonical lookup name, e.g. "llama-3-8b"; a config.json's path otherwise
    name: str
    params: int
    layers: int
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v: a few params, kept for exactness
    aliases: tuple[str, ...] = ()


def params_from_architecture(
    *,
    layers: int,
    hidden_size: int,
    intermediate_size: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    vocab_size: int,
    tie_word_embeddings: bool,
    qkv_bias: bool = False,
) -> int:
    """Count the parameters of a Llama-shaped model (GQA attention, gated MLP, RMSNorm).

    Per layer: q and o projections (``hidden × heads × head_dim`` each), k and v
    (``hidden × kv_heads × head_dim`` each), optional q/k/v biases, a gated MLP
    (gate, up, down: ``3 × hidden × intermediate``) and two norms. Plus the embedding
    table, a separate LM head unless tied, and the final norm. This is exact for Llama,
    Mistral and Qwen2 (it reproduces their published counts); a non-gated MLP (GPT-2,
    OPT) or a mixture of experts would need other terms.

    Args:
        layers: ``num_hidden_layers``.
        hidden_size: model width.
        intermediate_size: MLP width.
        heads: query heads.
        kv_heads: key/value heads (GQA); equal to ``heads`` for plain multi-head.
        head_dim: width of one head.
        vocab_size: embedding rows.
        tie_word_embeddings: whether the LM head reuses the embedding table.
        qkv_bias: whether q, k and v projections carry biases.

    Returns:
        The parameter count.
    """
    q_width = heads * head_dim
    kv_width = kv_heads * head_dim
    attention = 2 * hidden_size * q_width + 2 * hidden_size * kv_width
    if qkv_bias:
        attention += q_width + 2 * kv_width
    mlp = 3 * hidden_size * intermediate_size
    norms = 2 * hidden_size
    embeddings = vocab_size * hidden_size * (1 if tie_word_embeddings else 2)
    return layers * (attention + mlp + norms) + embeddings + hidden_size


def _gb(n: float) -> int:
    return int(n * 1e9)


GPUS: tuple[GpuSpec, ...] = (
    GpuSpec(
        "h100-sxm5", "H100 SXM5", _gb(80), "HBM3", 3.35e12, 989e12, 1979e12,
        ("h100", "h100-sxm", "h100-80gb", "h100-80gb-hbm3", "h100-hbm3"),
    ),
    GpuSpec(
        "h100-pcie", "H100 PCIe", _gb(80), "HBM2e", 2.0e12, 756e12, 1513e12, ("h100-pcie-80gb",)
    ),
    GpuSpec(
        "h200-sxm5", "H200 SXM5", _gb(141), "HBM3e", 4.8e12, 989e12, 1979e12,
        ("h200", "h200-sxm", "h200-141gb"),
    ),
    # DESIGN §4's figures (the 192 GB part); HGX B200 boards ship 180 GB at 7.7 TB/s.
    GpuSpec("b200-sxm", "B200 SXM", _gb(192), "HBM3e", 8.0e12, 2250e12, 4500e12, ("b200",)),
    GpuSpec(
        "a100-sxm4-80gb", "A100 SXM4 80GB", _gb(80), "HBM2e", 2.039e12, 312e12, None,
        ("a100", "a100-80gb", "a100-sxm", "a100-sxm4", "a100-sxm-80gb"),
    ),
    GpuSpec(
        "a100-sxm4-40gb", "A100 SXM4 40GB", _gb(40), "HBM2", 1.555e12, 312e12, None,
        ("a100-40gb", "a100-sxm-40gb"),
    ),
    GpuSpec(
        "a100-pcie-80gb", "A100 PCIe 80GB", _gb(80), "HBM2e", 1.935e12, 312e12, None,
        ("a100-pcie", "a100-80gb-pcie"),
    ),
    GpuSpec(
        "a100-pcie-40gb", "A100 PCIe 40GB", _gb(40), "HBM2", 1.555e12, 312e12, None,
        ("a100-40gb-pcie",),
    ),
    GpuSpec("l40s", "L40S", _gb(48), "GDDR6", 864e9, 362e12, 733e12),
    # DESIGN §4's figures; AWS publishes no separate tensor peak for the A10G.
    GpuSpec("a10g", "A10G", _gb(24), "GDDR6", 600e9, 125e12, None),
    # GeForce runs FP32-accumulate tensor math at half the FP16-accumulate rate, and
    # frameworks accumulate in FP32: 165 (FP16) and 330 (FP8) dense, not 330 and 660.
    GpuSpec(
        "rtx-4090", "RTX 4090", _gb(24), "GDDR6X", 1.008e12, 165e12, 330e12,
        ("4090", "geforce-rtx-4090"),
    ),
)

MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        "llama-3-8b", "Llama 3 8B", 8_030_261_248, 32, 4096, 14336, 32, 8, 128, 128256,
        aliases=("meta-llama-3-8b", "llama-3.1-8b", "meta-llama-3.1-8b"),
    ),
    ModelSpec(
        "llama-3-70b", "Llama 3 70B", 70_553_706_496, 80, 8192, 28672, 64, 8, 128, 128256,
        aliases=("meta-llama-3-70b", "llama-3.1-70b", "meta-llama-3.1-70b", "llama-3.3-70b"),
    ),
    ModelSpec(
        "llama-3.1-405b", "Llama 3.1 405B", 405_853_388_800, 126, 16384, 53248, 128, 8, 128,
        128256, aliases=("meta-llama-3.1-405b",),
    ),
    ModelSpec(
        "llama-3.2-1b", "Llama 3.2 1B", 1_235_814_400, 16, 2048, 8192, 32, 8, 64, 128256,
        tie_word_embeddings=True,
    ),
    ModelSpec(
        "llama-3.2-3b", "Llama 3.2 3B", 3_212_749_824, 28, 3072, 8192, 24, 8, 128, 128256,
        tie_word_embeddings=True,
    ),
    ModelSpec("llama-2-7b", "Llama 2 7B", 6_738_415_616, 32, 4096, 11008, 32, 32, 128, 32000),
    ModelSpec("llama-2-13b", "Llama 2 13B", 13_015_864_320, 40, 5120, 13824, 40, 40, 128, 32000),
    ModelSpec("llama-2-70b", "Llama 2 70B", 68_976_648_192, 80, 8192, 28672, 64, 8, 128, 32000),
    ModelSpec(
        "mistral-7b", "Mistral 7B v0.3", 7_248_023_552, 32, 4096, 14336, 32, 8, 128, 32768,
        aliases=("mistral-7b-v0.3",),
    ),
    ModelSpec(
        "mistral-7b-v0.1", "Mistral 7B v0.1", 7_241_732_096, 32, 4096, 14336, 32, 8, 128, 32000,
    ),
    ModelSpec(
        "qwen2.5-7b", "Qwen2.5 7B", 7_615_616_512, 28, 3584, 18944, 28, 4, 128, 152064,
        qkv_bias=True,
    ),
    ModelSpec(
        "qwen2.5-72b", "Qwen2.5 72B", 72_706_203_648, 80, 8192, 29568, 64, 8, 128, 152064,
        qkv_bias=True,
    ),
)

# Suffixes that name a fine-tune of the same architecture, not another shape.
_VARIANT_WORDS = frozenset({"instruct", "chat", "hf", "base", "it"})


def _normalize(name: str) -> str:
    """Fold a user-typed name to a lookup key: "meta-llama/Llama-3.1-8B-Instruct" → "llama3.18b".

    Dots stay, because they carry meaning ("qwen2.5-7b" is not "qwen2-57b").
    """
    name = name.strip().lower().rsplit("/", 1)[-1]
    words = [w for w in re.split(r"[\s_\-]+", name) if w and w not in _VARIANT_WORDS]
    return "".join(words)


def _names(spec: GpuSpec | ModelSpec) -> tuple[str, ...]:
    return (spec.key, spec.name, *spec.aliases)


# Aliases are unique across the tables (a test holds them so), so build order does not matter.
_GPU_INDEX: dict[str, GpuSpec] = {_normalize(n): gpu for gpu in GPUS for n in _names(gpu)}
_MODEL_INDEX: dict[str, ModelSpec] = {_normalize(n): m for m in MODELS for n in _names(m)}


def find_gpu(name: str) -> GpuSpec:
    """Look a GPU up by friendly name ("h100", "A100-SXM4-80GB") or NVML device name.

    Args:
        name: a key, alias or display name from ``GPUS`` (case and separators are
            ignored), or a name as NVML reports it ("NVIDIA H100 80GB HBM3").

    Returns:
        The GPU's spec.

    Raises:
        RooflineError: nothing matches; the message lists the known names.
    """
    found = _GPU_INDEX.get(_normalize(name)) or detect_gpu(name)
    if found is None:
        known = ", ".join(gpu.key for gpu in GPUS)
        raise RooflineError(f"unknown GPU {name!r}; known GPUs: {known}")
    return found


def find_model(name: str) -> ModelSpec:
    """Look a model preset up by friendly name ("llama-3-8b", "Llama3-70B", "qwen2.5-72b").

    Args:
        name: a key, alias or display name from ``MODELS``; case, separators, an
            ``org/`` prefix and an ``-Instruct``/``-chat``/``-hf`` suffix are ignored.

    Returns:
        The model's spec.

    Raises:
        RooflineError: nothing matches; the message lists the known names.
    """
    found = _MODEL_INDEX.get(_normalize(name))
    if found is None:
        known = ", ".join(model.key for model in MODELS)
        raise RooflineError(
            f"unknown model {name!r}; known models: {known} (or pass a config.json)"
        )
    return found


@dataclass(frozen=True, slots=True)
class _NvmlRule:
    """Which NVML device names mean one GPU in the table.

    A name matches when it has every ``required`` word, at least one ``any_of`` word (if
    given), and no word outside ``required | any_of | allowed``: a card we do not know
    (H100 NVL, GH200, L40, RTX 4090 D) must not pass for one we do.
    """

    key: str
    required: frozenset[str]
    any_of: frozenset[str] = frozenset()
    allowed: frozenset[str] = frozenset()

    def matches(self, words: frozenset[str]) -> bool:
        return (
            self.required <= words
            and (not self.any_of or bool(words & self.any_of))
            and words <= self.required | self.any_of | self.allowed
        )


def _rule(key: str, required: str, any_of: str = "", allowed: str = "") -> _NvmlRule:
    return _NvmlRule(
        key, frozenset(required.split()), frozenset(any_of.split()), frozenset(allowed.split())
    )


_NVML_RULES: tuple[_NvmlRule, ...] = (
    _rule("h100-sxm5", "h100", any_of="hbm3 sxm sxm5", allowed="80gb"),  # NVIDIA H100 80GB HBM3
    _rule("h100-pcie", "h100 pcie", allowed="80gb"),  # NVIDIA H100 PCIe
    _rule("h200-sxm5", "h200", allowed="141gb sxm sxm5 hbm3e"),  # NVIDIA H200
    _rule("b200-sxm", "b200", allowed="sxm sxm6"),  # NVIDIA B200
    _rule("a100-sxm4-80gb", "a100 80gb", any_of="sxm sxm4"),  # NVIDIA A100-SXM4-80GB
    _rule("a100-sxm4-40gb", "a100 40gb", any_of="sxm sxm4"),  # NVIDIA A100-SXM4-40GB
    _rule("a100-pcie-80gb", "a100 80gb pcie"),  # NVIDIA A100 80GB PCIe
    _rule("a100-pcie-40gb", "a100 40gb pcie"),  # NVIDIA A100-PCIE-40GB
    _rule("l40s", "l40s"),  # NVIDIA L40S
    _rule("a10g", "a10g"),  # NVIDIA A10G
    _rule("rtx-4090", "rtx 4090"),  # NVIDIA GeForce RTX 4090
)

# Brand words NVML puts in front of the model that say nothing about which one it is.
_BRAND_WORDS = frozenset({"nvidia", "geforce", "tesla"})


def detect_gpu(nvml_name: str) -> GpuSpec | None:
    """Map the name NVML reports (``nvmlDeviceGetName``) to a GPU in the table.

    Args:
        nvml_name: e.g. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA H200".

    Returns:
        The GPU's spec, or ``None`` for a GPU not in the table (never a near guess:
        "NVIDIA H100 NVL" and "NVIDIA GH200 480GB" are different parts).
    """
    words = frozenset(re.split(r"[\s_\-]+", nvml_name.strip().lower())) - _BRAND_WORDS - {""}
    by_key = {gpu.key: gpu for gpu in GPUS}
    for rule in _NVML_RULES:
        if rule.matches(words):
            return by_key[rule.key]
    return None


# Keys that, present and above 1, mean a mixture of experts: the dense count would be wrong.
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def _int_key(config: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = config.get(key)
    if value is None:
        if default is not None:
            return default
        raise RooflineError(f"{where}: missing key {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RooflineError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    return value


def load_hf_config(path: Path) -> ModelSpec:
    """Read a HuggingFace ``config.json`` (or a directory holding one) into a ``ModelSpec``.

    Reads ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads`` (default: the attention heads),
    ``head_dim`` (default: hidden / heads), ``vocab_size``, ``tie_word_embeddings``
    (default false, as for Llama, Mistral and Qwen2) and ``attention_bias`` (Qwen2 has
    q/k/v biases without saying so). A multimodal config's ``text_config`` is used when
    the top level has no ``hidden_size``.

    Args:
        path: the ``config.json`` file, or the model directory containing it.

    Returns:
        The model's spec, with ``params`` computed by ``params_from_architecture``.

    Raises:
        RooflineError: unreadable, not JSON, a key missing or not a positive integer
            (the message names it), or a mixture-of-experts model.
    """
    if path.is_dir():
        path = path / "config.json"
    where = str(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RooflineError(f"{where}: cannot read: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RooflineError(f"{where}: not a JSON config: {exc}") from exc
    if not isinstance(raw, dict):
        raise RooflineError(f"{where}: not a model config (expected a JSON object)")
    config: dict[str, Any] = raw
    text_config = config.get("text_config")
    if "hidden_size" not in config and isinstance(text_config, dict):
        config = {**text_config, "model_type": text_config.get("model_type", "")}
    for key in _MOE_KEYS:
        experts = config.get(key)
        if isinstance(experts, int) and experts > 1:
            raise RooflineError(
                f"{where}: mixture-of-experts models ({key}={experts}) are not supported: "
                "the dense formulas would misstate the weights read per token"
            )
    hidden = _int_key(config, "hidden_size", where)
    intermediate = _int_key(config, "intermediate_size", where)
    layers = _int_key(config, "num_hidden_layers", where)
    heads = _int_key(config, "num_attention_heads", where)
    kv_heads = _int_key(config, "num_key_value_heads", where, default=heads)
    head_dim = _int_key(config, "head_dim", where, default=hidden // heads)
    vocab = _int_key(config, "vocab_size", where)
    tie = bool(config.get("tie_word_embeddings", False))
    qkv_bias = bool(config.get("attention_bias", False)) or config.get("model_type") == "qwen2"
    name = path.parent.name if path.name == "config.json" and path.parent.name else path.stem
    params = params_from_architecture(
        layers=layers,
        hidden_size=hidden,
        intermediate_size=intermediate,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        tie_word_embeddings=tie,
        qkv_bias=qkv_bias,
    )
    return ModelSpec(
        key=where,
        name=name,
        params=params,
        layers=layers,
        hidden_size=hidden,
        intermediate_size=intermediate,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        tie_word_embeddings=tie,
        qkv_bias=qkv_bias,
    )
