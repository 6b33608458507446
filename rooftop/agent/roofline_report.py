"""The roofline for people and machines: ``agentctl roofline``'s table, JSON and plot.

Rendering only; every figure comes from ``rooftop.agent.roofline``. ``plot_roofline``
is the one function that touches the outside world (matplotlib, a file).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rooftop.agent.roofline import (
    BITS,
    Dtype,
    RooflineResult,
)
from rooftop.common.errors import RooflineError

__all__ = ["format_report", "plot_roofline", "to_dict"]


def _result_dict(result: RooflineResult) -> dict[str, Any]:
    return {
        "gpu": result.gpu.key,
        "gpu_name": result.gpu.name,
        "gpu_memory_bytes": result.gpu.memory_bytes,
        "bandwidth_bytes_per_s": result.gpu.bandwidth_bytes_per_s,
        "compute_flops_per_s": result.compute_flops_per_s,
        "weights_bytes": result.weights_bytes,
        "kv_cache_bytes": result.kv_cache_bytes,
        "total_bytes": result.total_bytes,
        "fits": result.fits,
        "gpus_needed": result.gpus_needed,
        "tensor_parallel_gpus": result.tensor_parallel_gpus,
        "bytes_per_step": result.bytes_per_step,
        "flops_per_step": result.flops_per_step,
        "memory_time_ms": result.memory_time_ms,
        "compute_time_ms": result.compute_time_ms,
        "tpot_floor_ms": result.tpot_floor_ms,
        "tensor_parallel_tpot_floor_ms": result.tensor_parallel_tpot_floor_ms,
        "tokens_per_s_ceiling": result.tokens_per_s_ceiling,
        "arithmetic_intensity": result.arithmetic_intensity_flop_per_byte,
        "ridge_point": result.ridge_point_flop_per_byte,
        "bound": "memory" if result.memory_bound else "compute",
    }


def to_dict(result: RooflineResult, others: tuple[RooflineResult, ...] = ()) -> dict[str, Any]:
    """A JSON-ready view of a result (and of the same workload on other GPUs).

    ``arithmetic_intensity`` and ``ridge_point`` are in FLOP/byte; every other figure
    carries its unit in its key.

    Args:
        result: the workload on the chosen GPU.
        others: the same workload on other GPUs, listed under ``other_gpus``.

    Returns:
        Plain dicts, lists, strings and numbers.
    """
    model = result.model
    return {
        "model": model.key,
        "model_name": model.name,
        "params": model.params,
        "batch": result.batch,
        "context_tokens": result.context_tokens,
        "dtype": result.dtype.value,
        "kv_dtype": result.kv_dtype.value,
        **_result_dict(result),
        "other_gpus": [_result_dict(other) for other in others if other.gpu != result.gpu],
    }


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:,.2f} GB"


def _bytes_per_elem(dtype: Dtype) -> str:
    return f"{BITS[dtype] / 8:g} B"


# The fits column's word for "no tensor-parallel degree splits the heads that far".
_NO_TP = "no TP"


def _fit_cell(result: RooflineResult) -> str:
    if result.fits:
        return "fits"
    if result.tensor_parallel_gpus is None:
        return _NO_TP
    return f"needs {result.tensor_parallel_gpus}"


def _fit_verdict(result: RooflineResult) -> str:
    """Whether it fits, else how many GPUs a tensor-parallel split needs, and why."""
    model, gpu, needed = result.model, result.gpu, result.gpus_needed
    heads = f"{model.heads} attention heads and {model.kv_heads} KV heads"
    if result.fits:
        return "fits"
    if result.tensor_parallel_gpus is None:
        return (f"DOES NOT FIT, needs {needed} x {gpu.name} for memory, but no tensor-parallel "
                f"degree from {needed} to {model.heads} divides its {heads}: add pipeline "
                "parallelism or use a larger GPU")
    if result.tensor_parallel_gpus == needed:
        return f"DOES NOT FIT, needs {needed} x {gpu.name} (tensor parallel)"
    return (f"DOES NOT FIT, needs {result.tensor_parallel_gpus} x {gpu.name} (tensor parallel: "
            f"memory asks for {needed}, the degree must divide its {heads})")


def _row(label: str, value: str, note: str) -> str:
    return f"  {label:<21}{value:>12}   {note}"


def format_report(result: RooflineResult, others: tuple[RooflineResult, ...] = ()) -> str:
    """The human report: memory against VRAM, TPOT floor, roofline position, other GPUs.

    Args:
        result: the workload on the chosen GPU.
        others: the same workload on the GPUs to list side by side (the chosen one,
            if among them, is marked ``*``).

    Returns:
        Lines of text, no trailing newline.
    """
    model, gpu = result.model, result.gpu
    fit = _fit_verdict(result)
    intensity = result.arithmetic_intensity_flop_per_byte
    ridge = result.ridge_point_flop_per_byte
    lines = [
        f"{model.name} ({model.params / 1e9:.2f} B params) on {gpu.name}: batch {result.batch}, "
        f"context {result.context_tokens:,} tokens, weights {result.dtype}, "
        f"KV cache {result.kv_dtype}",
        "",
        "Memory (weights + KV cache only; activations and CUDA context come on top)",
        _row(
            "weights",
            _gb(result.weights_bytes),
            f"{model.params:,} params x {_bytes_per_elem(result.dtype)}",
        ),
        _row(
            "KV cache",
            _gb(result.kv_cache_bytes),
            f"2 x {model.layers} layers x {model.kv_heads} KV heads x {model.head_dim} "
            f"x {result.context_tokens:,} tokens x batch {result.batch} "
            f"x {_bytes_per_elem(result.kv_dtype)}",
        ),
        _row("total", _gb(result.total_bytes), f"of {_gb(gpu.memory_bytes)}: {fit}"),
        "",
        "Decode step",
        _row(
            "bytes read",
            _gb(result.bytes_per_step),
            f"streamed weights {_gb(result.streamed_weights_bytes)} "
            f"+ KV cache {_gb(result.kv_cache_bytes)}",
        ),
        _row(
            "TPOT floor",
            f"{result.tpot_floor_ms:.2f} ms",
            f"memory {result.memory_time_ms:.2f} ms at "
            f"{gpu.bandwidth_bytes_per_s / 1e12:.2f} TB/s, compute "
            f"{result.compute_time_ms:.2f} ms at {result.compute_flops_per_s / 1e12:,.0f} TFLOP/s",
        ),
    ]
    tp_floor_ms = result.tensor_parallel_tpot_floor_ms
    if not result.fits and result.tensor_parallel_gpus is not None and tp_floor_ms is not None:
        lines.append(
            _row(
                f"  on {result.tensor_parallel_gpus} GPUs",
                f"{tp_floor_ms:.2f} ms",
                "ideal tensor-parallel split, no all-reduce cost",
            )
        )
    if result.memory_bound:
        position = f"memory-bound, {ridge / intensity:,.0f}x below the ridge"
        levers = ["more bandwidth"]
        if result.dtype is not Dtype.INT4:
            levers.append("INT4 weights" if result.dtype is Dtype.FP8 else "FP8/INT4 weights")
        if BITS[result.kv_dtype] > 8:
            levers.append("an FP8 KV cache")
        levers.append("a larger batch")
        advice = (
            "more FLOPS will not lower TPOT here; "
            f"{', '.join(levers[:-1])} or {levers[-1]} will"
        )
    else:
        position = f"compute-bound, {intensity / ridge:,.1f}x past the ridge"
        advice = "past the ridge, more FLOPS (FP8, more GPUs) lower TPOT; bandwidth will not"
    lines += [
        _row(
            "tokens/s ceiling",
            f"{result.tokens_per_s_ceiling:,.0f}",
            f"batch {result.batch} / TPOT floor",
        ),
        _row("arithmetic intensity", f"{intensity:,.1f}", "FLOP/byte per decode step"),
        _row("ridge point", f"{ridge:,.1f}", f"FLOP/byte: {position}"),
        f"  -> {advice}.",
    ]
    if others:
        lines += [
            "",
            "Same workload on other GPUs",
            f"    {'GPU':<16}{'memory':>8}{'bandwidth':>12}{'fits':>10}"
            f"{'TPOT floor':>13}{'tok/s ceiling':>15}{'ridge':>8}",
        ]
        for other in others:
            mark = "*" if other.gpu == gpu else " "
            lines.append(
                f"  {mark} {other.gpu.name:<16}{other.gpu.memory_bytes / 1e9:>5.0f} GB"
                f"{other.gpu.bandwidth_bytes_per_s / 1e12:>7.2f} TB/s"
                f"{_fit_cell(other):>10}{other.tpot_floor_ms:>10.2f} ms"
                f"{other.tokens_per_s_ceiling:>15,.0f}{other.ridge_point_flop_per_byte:>8.0f}"
            )
        if any(_fit_cell(other) == _NO_TP for other in others):
            lines.append(
                f"  {_NO_TP}: memory needs more GPUs than the largest tensor-parallel degree, "
                f"{math.gcd(model.heads, model.kv_heads)} (it must divide the {model.heads} "
                f"attention and {model.kv_heads} KV heads)"
            )
    return "\n".join(lines)


def plot_roofline(result: RooflineResult, path: Path) -> None:
    """Draw the GPU's roofline (log axes) with the workload's point, to a PNG.

    The two ceilings are the bandwidth slope (attainable FLOP/s = bandwidth × intensity)
    and the compute roof (dense peak), meeting at the ridge point. The workload sits on
    the slope at its arithmetic intensity.

    Args:
        result: the workload on the chosen GPU.
        path: where to write the PNG.

    Raises:
        RooflineError: matplotlib is not installed, or the file cannot be written.
    """
    try:
        # Lazy: matplotlib is an optional extra and slow to import; only --plot needs it.
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RooflineError(
            "plotting needs matplotlib: pip install matplotlib (or scripts/setup.sh, "
            "which installs Rooftop with its plot extra)"
        ) from exc

    gpu = result.gpu
    bandwidth = gpu.bandwidth_bytes_per_s
    peak = result.compute_flops_per_s
    ridge = result.ridge_point_flop_per_byte
    intensity = result.arithmetic_intensity_flop_per_byte
    attained = min(bandwidth * intensity, peak)
    # Axes span two decades either side of whatever is on the chart.
    x_lo = min(intensity, ridge) / 100
    x_hi = max(intensity, ridge) * 100
    xs = [x_lo, ridge, x_hi]
    ys = [bandwidth * x_lo, peak, peak]

    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.plot(xs, ys, color="tab:blue", linewidth=2, label=f"{gpu.name} roofline")
    ax.annotate(
        f"bandwidth {bandwidth / 1e12:.2f} TB/s",
        xy=(x_lo * 1.3, bandwidth * x_lo * 40),  # above the slope, clear of it
        fontsize=8,
        color="tab:blue",
        va="bottom",
    )
    uses_fp8 = result.dtype is Dtype.FP8 and gpu.fp8_flops_per_s is not None
    ax.annotate(
        f"dense {'FP8' if uses_fp8 else 'FP16'} peak {peak / 1e12:,.0f} TFLOP/s",
        xy=(ridge * 1.5, peak * 1.15),
        fontsize=8,
        color="tab:blue",
    )
    ax.axvline(ridge, color="grey", linestyle=":", linewidth=1)
    ax.annotate(
        f" ridge {ridge:,.0f} FLOP/B", xy=(ridge, bandwidth * x_lo * 2), fontsize=8, color="grey"
    )
    ax.plot(
        [intensity],
        [attained],
        marker="o",
        markersize=9,
        color="tab:red",
        linestyle="none",
        label=(
            f"{result.model.name}, batch {result.batch}: {intensity:,.1f} FLOP/B, "
            f"TPOT floor {result.tpot_floor_ms:.2f} ms"
        ),
    )
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(bandwidth * x_lo, peak * 4)
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("attainable performance (FLOP/s)")
    ax.set_title(
        f"{result.model.name} on {gpu.name}: weights {result.dtype}, KV {result.kv_dtype}, "
        f"context {result.context_tokens:,}"
    )
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(loc="upper left", fontsize=8)  # above the slope: the one empty corner
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise RooflineError(f"{path}: cannot write the chart: {exc.strerror or exc}") from exc
