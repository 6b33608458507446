"""Roofline and TPOT floor: will a model fit, and how fast can decode possibly go (DESIGN §4).

Pure functions over the frozen specs in ``rooftop.agent.models_catalog``; the text,
JSON and plot of a result are ``rooftop.agent.roofline_report``'s. The seed framing
to keep in the user's face: decode at small batch sits far below the ridge point, so
more FLOPS do not move TPOT; more bandwidth does.

The exact definitions, since every "≈" hides a choice (bytes are decimal: 1 GB = 1e9):

- ``weights_bytes`` = params × bytes/param (FP16/BF16 2, FP8 1, INT4 0.5): what must
  sit in GPU memory. INT4 is idealized: real checkpoints add group scales (~3 %) and
  often keep embeddings in 16 bit.
- ``kv_cache_bytes`` = 2 (K and V) × layers × kv_heads × head_dim × context × batch ×
  bytes/element, with every request holding ``context`` tokens: the end-of-context
  worst case.
- ``bytes_per_step`` = streamed weights + the whole KV cache. Streamed weights leave
  out an untied input-embedding table: a decode step gathers ``batch`` rows of it and
  does not stream it (Llama 3 8B: 0.53 of 8.03 B params). A tied table is read whole,
  as the LM head.
- ``flops_per_step`` = batch × (2 × streamed params + 4 × layers × heads × head_dim ×
  context): one multiply-add per weight per token, plus attention's QKᵀ and PV over
  the context.
- ``arithmetic_intensity`` = flops_per_step / bytes_per_step, in FLOP/byte. For FP16
  weights and a negligible KV cache this is exactly ``batch``.
- ``ridge_point`` = peak FLOP/s / bandwidth, in FLOP/byte. The peak is dense (no
  sparsity), FP8 when the weights are FP8 and the GPU has FP8 tensor cores, else FP16:
  INT4 weights, and FP8 on an A100, are dequantized and multiplied in 16 bit.
- ``tpot_floor`` = max(bytes_per_step / bandwidth, flops_per_step / peak): the slower
  roof. Below the ridge, which is all ordinary decode, that is the bandwidth term.
- ``tokens_per_s_ceiling`` = batch / tpot_floor.
- ``fits`` = weights + KV cache ≤ the GPU's memory; activations, the CUDA context and
  an engine's reserve are not counted, so "fits" is necessary, not sufficient.
  ``gpus_needed`` = ⌈(weights + KV cache) / memory⌉, what memory alone asks for.
- ``tensor_parallel_gpus`` = the smallest tensor-parallel degree ≥ ``gpus_needed`` that
  divides both the attention heads and the KV heads (each GPU holds whole heads:
  64 heads and 8 KV heads allow 1, 2, 4 or 8, so 3 GPUs' worth of memory means 4);
  ``None`` when no degree up to the head count does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from rooftop.agent.models_catalog import (
    GPUS,
    MODELS,
    GpuSpec,
    ModelSpec,
    detect_gpu,
    find_gpu,
    find_model,
    load_hf_config,
)
from rooftop.common.errors import RooflineError

__all__ = [
    "BITS",
    "GPUS",
    "MODELS",
    "Dtype",
    "GpuSpec",
    "ModelSpec",
    "RooflineResult",
    "analyze",
    "application_mbu",
    "compare",
    "compute_flops_per_s",
    "default_kv_dtype",
    "detect_gpu",
    "find_gpu",
    "find_model",
    "kv_cache_bytes",
    "load_hf_config",
    "parse_dtype",
    "ridge_point",
    "streamed_params",
    "tensor_parallel_degree",
    "tpot_floor_ms",
    "weights_bytes",
]


class Dtype(StrEnum):
    """Storage type of weights or of the KV cache."""

    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"
    INT4 = "int4"


# Bits, not bytes, so INT4 stays in integer arithmetic.
BITS: dict[Dtype, int] = {Dtype.FP16: 16, Dtype.BF16: 16, Dtype.FP8: 8, Dtype.INT4: 4}


def parse_dtype(value: str | Dtype) -> Dtype:
    """Turn "fp16" / "BF16" / ``Dtype.FP8`` into a ``Dtype``.

    Raises:
        RooflineError: not one of fp16, bf16, fp8, int4.
    """
    try:
        return Dtype(str(value).lower())
    except ValueError:
        known = ", ".join(d.value for d in Dtype)
        raise RooflineError(f"unknown dtype {value!r}; known: {known}") from None


def default_kv_dtype(dtype: Dtype) -> Dtype:
    """The KV cache dtype an engine picks unless told (vLLM's "auto").

    The KV cache holds activations, which stay 16-bit when only the weights are
    quantized: FP16 weights keep an FP16 cache, anything else gets BF16.
    """
    return Dtype.FP16 if dtype is Dtype.FP16 else Dtype.BF16


def _scaled_bytes(elements: int, dtype: Dtype) -> int:
    return (elements * BITS[dtype] + 7) // 8


def weights_bytes(model: ModelSpec, dtype: Dtype) -> int:
    """Bytes the weights occupy in GPU memory: params × bytes/param."""
    return _scaled_bytes(model.params, dtype)


def streamed_params(model: ModelSpec) -> int:
    """Parameters a decode step reads whole: all but an untied input-embedding table.

    The embedding lookup gathers one row per token; only a tied table, doubling as the
    LM head, is streamed every step.
    """
    if model.tie_word_embeddings:
        return model.params
    return model.params - model.vocab_size * model.hidden_size


def tensor_parallel_degree(model: ModelSpec, at_least: int = 1) -> int | None:
    """The smallest tensor-parallel degree ≥ ``at_least`` that splits ``model`` evenly.

    Tensor parallelism gives each GPU whole attention heads and whole KV heads, so the
    degree must divide both counts (Llama 3 70B, 64 and 8: 1, 2, 4 or 8).

    Returns:
        The degree, or None when none from ``at_least`` up to the head count divides both.
    """
    for degree in range(max(1, at_least), model.heads + 1):
        if model.heads % degree == 0 and model.kv_heads % degree == 0:
            return degree
    return None


def _check_shape(batch: int, context: int) -> None:
    if batch < 1:
        raise RooflineError(f"batch must be at least 1, got {batch}")
    if context < 0:
        raise RooflineError(f"context must be at least 0 tokens, got {context}")


def kv_cache_bytes(model: ModelSpec, batch: int, context: int, kv_dtype: Dtype) -> int:
    """KV cache size: 2 × layers × kv_heads × head_dim × context × batch × bytes/element.

    Args:
        model: the model.
        batch: requests in flight.
        context: tokens held per request (prompt plus generated so far).
        kv_dtype: the cache's storage type.

    Returns:
        Bytes, for every request at ``context`` tokens.
    """
    _check_shape(batch, context)
    elements = 2 * model.layers * model.kv_heads * model.head_dim * context * batch
    return _scaled_bytes(elements, kv_dtype)


def compute_flops_per_s(gpu: GpuSpec, dtype: Dtype) -> float:
    """Dense tensor-core peak for weights of ``dtype``: FP8 where both sides have it, else FP16."""
    if dtype is Dtype.FP8 and gpu.fp8_flops_per_s is not None:
        return gpu.fp8_flops_per_s
    return gpu.fp16_flops_per_s


def ridge_point(gpu: GpuSpec, dtype: Dtype = Dtype.FP16) -> float:
    """The roofline's ridge: peak FLOP/s ÷ bandwidth, in FLOP/byte.

    H100 SXM5, dense FP16: 989e12 / 3.35e12 ≈ 295 FLOP/byte.
    """
    return compute_flops_per_s(gpu, dtype) / gpu.bandwidth_bytes_per_s


@dataclass(frozen=True, slots=True)
class RooflineResult:
    """One model on one GPU at one batch and context: memory, TPOT floor, roofline position."""

    model: ModelSpec
    gpu: GpuSpec
    batch: int
    context_tokens: int
    dtype: Dtype
    kv_dtype: Dtype
    weights_bytes: int
    kv_cache_bytes: int
    total_bytes: int  # weights + KV cache
    fits: bool
    gpus_needed: int  # by memory alone: ⌈total / GPU memory⌉
    tensor_parallel_gpus: int | None  # ≥ gpus_needed, divides heads and KV heads; None: none
    streamed_weights_bytes: int
    bytes_per_step: int  # streamed weights + KV cache
    flops_per_step: float
    memory_time_ms: float  # bytes_per_step at peak bandwidth
    compute_time_ms: float  # flops_per_step at dense peak
    tpot_floor_ms: float  # the slower of the two
    tokens_per_s_ceiling: float
    arithmetic_intensity_flop_per_byte: float
    ridge_point_flop_per_byte: float
    compute_flops_per_s: float

    @property
    def memory_bound(self) -> bool:
        """Whether the workload sits left of the ridge, where bandwidth sets TPOT."""
        return self.arithmetic_intensity_flop_per_byte < self.ridge_point_flop_per_byte

    @property
    def tensor_parallel_tpot_floor_ms(self) -> float | None:
        """The floor split ideally over ``tensor_parallel_gpus`` (no all-reduce cost)."""
        if self.tensor_parallel_gpus is None:
            return None
        return self.tpot_floor_ms / self.tensor_parallel_gpus


def analyze(
    model: ModelSpec,
    gpu: GpuSpec,
    batch: int = 1,
    context: int = 0,
    dtype: Dtype | str = Dtype.BF16,
    kv_dtype: Dtype | str | None = None,
) -> RooflineResult:
    """Everything the roofline says about one model on one GPU (definitions: module doc).

    Args:
        model: the model.
        gpu: the GPU.
        batch: requests decoding together.
        context: tokens in the KV cache per request.
        dtype: weights' storage type.
        kv_dtype: KV cache's storage type; ``None`` means ``default_kv_dtype(dtype)``.

    Returns:
        The result.

    Raises:
        RooflineError: batch < 1, context < 0, or an unknown dtype.
    """
    weights_dtype = parse_dtype(dtype)
    cache_dtype = default_kv_dtype(weights_dtype) if kv_dtype is None else parse_dtype(kv_dtype)
    kv = kv_cache_bytes(model, batch, context, cache_dtype)
    weights = weights_bytes(model, weights_dtype)
    total = weights + kv
    streamed = _scaled_bytes(streamed_params(model), weights_dtype)
    step_bytes = streamed + kv
    attention_flops = 4 * model.layers * model.heads * model.head_dim * context
    step_flops = float(batch * (2 * streamed_params(model) + attention_flops))
    peak_flops = compute_flops_per_s(gpu, weights_dtype)
    memory_time_ms = step_bytes / gpu.bandwidth_bytes_per_s * 1e3
    compute_time_ms = step_flops / peak_flops * 1e3
    floor_ms = max(memory_time_ms, compute_time_ms)
    gpus_needed = max(1, math.ceil(total / gpu.memory_bytes))
    return RooflineResult(
        model=model,
        gpu=gpu,
        batch=batch,
        context_tokens=context,
        dtype=weights_dtype,
        kv_dtype=cache_dtype,
        weights_bytes=weights,
        kv_cache_bytes=kv,
        total_bytes=total,
        fits=total <= gpu.memory_bytes,
        gpus_needed=gpus_needed,
        tensor_parallel_gpus=tensor_parallel_degree(model, gpus_needed),
        streamed_weights_bytes=streamed,
        bytes_per_step=step_bytes,
        flops_per_step=step_flops,
        memory_time_ms=memory_time_ms,
        compute_time_ms=compute_time_ms,
        tpot_floor_ms=floor_ms,
        tokens_per_s_ceiling=batch / (floor_ms / 1e3),
        arithmetic_intensity_flop_per_byte=step_flops / step_bytes,
        ridge_point_flop_per_byte=peak_flops / gpu.bandwidth_bytes_per_s,
        compute_flops_per_s=peak_flops,
    )


def tpot_floor_ms(
    model: ModelSpec,
    gpu: GpuSpec,
    batch: int = 1,
    context: int = 0,
    dtype: Dtype | str = Dtype.BF16,
    kv_dtype: Dtype | str | None = None,
) -> float:
    """The fastest a decode step can be, in ms: the slower of bandwidth and compute roofs.

    Llama 3 70B, FP16, batch 1, on an H100 SXM5: ≈ 139 GB / 3.35 TB/s ≈ 41.5 ms, whatever
    the FLOPS. Arguments as for ``analyze``.

    Returns:
        The floor in milliseconds.
    """
    return analyze(model, gpu, batch, context, dtype, kv_dtype).tpot_floor_ms


def application_mbu(floor_ms: float, measured_tpot_ms: float) -> float:
    """Application-side memory-bandwidth utilization: TPOT floor ÷ measured TPOT.

    DESIGN §4: an 8B decode at 5.84 ms against a 4.40 ms floor is 0.75, which GPM's
    DRAM_BW_UTIL (74 %) confirms; HF eager decode of the same model, 96 ms, is 0.05:
    host-bound. Not clamped: a value above 1 means the floor's inputs are wrong
    (wrong GPU, dtype or batch), and hiding that would hide the mistake.

    Args:
        floor_ms: the TPOT floor (``tpot_floor_ms``).
        measured_tpot_ms: the TPOT observed.

    Returns:
        A fraction, 1.0 being the bandwidth ceiling.

    Raises:
        RooflineError: either argument is not a positive finite number.
    """
    for label, value in (("floor_ms", floor_ms), ("measured_tpot_ms", measured_tpot_ms)):
        if not math.isfinite(value) or value <= 0:
            raise RooflineError(f"{label} must be a positive number of ms, got {value!r}")
    return floor_ms / measured_tpot_ms


def compare(
    model: ModelSpec,
    batch: int = 1,
    context: int = 0,
    dtype: Dtype | str = Dtype.BF16,
    kv_dtype: Dtype | str | None = None,
    gpus: tuple[GpuSpec, ...] = GPUS,
) -> tuple[RooflineResult, ...]:
    """``analyze`` the same workload on each GPU, in table order."""
    return tuple(analyze(model, gpu, batch, context, dtype, kv_dtype) for gpu in gpus)
