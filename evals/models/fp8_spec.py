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
