"""What an FP8 layer can be: the choices a precision policy names, without torch (policies are
parsed and validated by `evals validate` and `evals --help`'s neighbours without loading it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Format = Literal["e4m3fn", "e5m2"]
WeightScale = Literal["per_tensor", "per_channel", "per_block"]
Activations = Literal["none", "dynamic_per_tensor", "dynamic_per_token", "static"]
Backend = Literal["auto", "scaled_mm", "emulated", "weight_only"]
FORMAT_NAMES: tuple[str, ...] = get_args(Format)
WEIGHT_SCALES: tuple[str, ...] = get_args(WeightScale)
ACTIVATIONS: tuple[str, ...] = get_args(Activations)
BACKENDS: tuple[str, ...] = get_args(Backend)
"""This project's FP8 engine (`Fp8Linear`): what its layers and checkpoints may say."""

# A policy may also hand layers to another tool's kernels (`backend: torchao`), which adds INT8.
PolicyFormat = Literal["e4m3fn", "e5m2", "int8"]
PolicyBackend = Literal["auto", "scaled_mm", "emulated", "weight_only", "torchao"]
TORCHAO = "torchao"
TORCHAO_RECIPES: dict[tuple[str, str, str], tuple[str, str | None]] = {
    ("e4m3fn", "per_channel", "dynamic_per_token"): ("Float8DynamicActivationFloat8WeightConfig", "PerRow"),
    ("e4m3fn", "per_tensor", "dynamic_per_tensor"): ("Float8DynamicActivationFloat8WeightConfig", "PerTensor"),
    ("e4m3fn", "per_channel", "none"): ("Float8WeightOnlyConfig", None),
    ("int8", "per_channel", "dynamic_per_token"): ("Int8DynamicActivationInt8WeightConfig", None),
    ("int8", "per_channel", "none"): ("Int8WeightOnlyConfig", None),
}
"""(format, weights, activations) -> the torchao config class (in `torchao.quantization`) that runs it,
and its granularity, for `backend: torchao`."""


def torchao_recipe_problem(fmt: str, weights: str, activations: str) -> str | None:
    """Why (format, weights, activations) has no torchao config (None when it has one)."""
    if (fmt, weights, activations) in TORCHAO_RECIPES:
        return None
    known = "; ".join(f"{f}/{w}/{a}" for f, w, a in TORCHAO_RECIPES)
    return f"torchao runs format/weights/activations {known}, not {fmt}/{weights}/{activations}"


@dataclass(frozen=True)
class Fp8Spec:
    format: str = "e4m3fn"
    """FP8 format: e4m3fn (max 448, more mantissa) or e5m2 (max 57344, more range)."""
    weights: str = "per_channel"
    """Weight scale granularity: per_tensor, per_channel (one scale per output row) or per_block."""
    activations: str = "dynamic_per_token"
    """Activation quantization: none (weight-only), dynamic_per_tensor, dynamic_per_token, or static
    (one per-tensor scale per layer, calibrated ahead of time)."""
    backend: str = "auto"
    """auto, scaled_mm, emulated or weight_only; auto picks the fastest that runs here."""
    block_size: int = 128
    """Side of the square weight tiles that share a scale, for weights: per_block."""
    fast_accum: bool = False
    """Let the FP8 GEMM accumulate in its faster, less precise mode (Hopper's `use_fast_accum`);
    scaled_mm backend only, no effect elsewhere."""
