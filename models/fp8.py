"""FP8 formats, scales and the linear module that runs a quantized layer.

Backends:
- `scaled_mm`: real FP8 GEMM through `torch._scaled_mm` (Hopper/Ada GPUs, and PyTorch's CPU kernel);
- `emulated`: quantize-dequantize in float32, the same numbers without FP8 units;
- `weight_only`: FP8 storage, weights dequantized to the compute dtype, activations untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

FORMATS: dict[str, torch.dtype] = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
WEIGHT_SCALES = ("per_tensor", "per_channel")
ACTIVATIONS = ("none", "dynamic_per_tensor", "dynamic_per_token")
BACKENDS = ("auto", "scaled_mm", "emulated", "weight_only")
MIN_SCALE = 1e-12  # an all-zero row would otherwise divide by zero


@dataclass(frozen=True)
class Fp8Spec:
    format: str = "e4m3fn"
    """FP8 format: e4m3fn (max 448, more mantissa) or e5m2 (max 57344, more range)."""
    weights: str = "per_channel"
    """Weight scale granularity: per_tensor or per_channel (one scale per output row)."""
    activations: str = "dynamic_per_token"
    """Activation quantization: none (weight-only), dynamic_per_tensor, dynamic_per_token."""
    backend: str = "auto"
    """auto, scaled_mm, emulated or weight_only; auto picks the fastest that runs here."""


def fp8_max(fmt: str) -> float:
    return float(torch.finfo(FORMATS[fmt]).max)


def quantize(x: torch.Tensor, fmt: str, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale so the largest magnitude (per row, or overall) lands on the format's max, then cast.

    Returns the FP8 tensor and float32 scales with x ~= q * scale: shape (rows, 1) or (1, 1).
    Clamping before the cast matters for e5m2, which overflows to inf instead of saturating.
    """
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True) if per_row else x32.abs().amax().reshape(1, 1)
    scale = amax.clamp(min=MIN_SCALE) / fp8_max(fmt)
    limit = fp8_max(fmt)
    q = (x32 / scale).clamp(-limit, limit).to(FORMATS[fmt])
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


@cache
def scaled_mm_runs(device_type: str, device_index: int | None, fmt: str, out_dtype: torch.dtype) -> bool:
    """Whether torch._scaled_mm runs here with row-wise scales and this output dtype (a probe call,
    cached): capability tables go stale, a real call does not."""
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    try:
        a = torch.ones(16, 16, device=device).to(FORMATS[fmt])
        b = torch.ones(16, 16, device=device).to(FORMATS[fmt])
        out = torch._scaled_mm(
            a,
            b.t(),
            scale_a=torch.ones(16, 1, device=device),
            scale_b=torch.ones(1, 16, device=device),
            out_dtype=out_dtype,
        )
        return bool(out[0, 0].item() == 16.0)
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def resolve_backend(spec: Fp8Spec, weight: torch.Tensor) -> str:
    """The backend that will actually run this layer (recorded per layer in the resolved plan)."""
    if spec.activations == "none":
        return "weight_only"
    if spec.backend in ("emulated", "weight_only"):
        return spec.backend
    out_features, in_features = weight.shape
    shape_ok = in_features % 16 == 0 and out_features % 16 == 0  # the GEMM kernels need this
    available = shape_ok and scaled_mm_runs(
        weight.device.type, weight.device.index, spec.format, _out_dtype(weight.dtype)
    )
    if spec.backend == "scaled_mm" and not available:
        raise RuntimeError(
            f"backend scaled_mm cannot run a {spec.format} GEMM of shape {tuple(weight.shape)} on {weight.device} "
            "(needs compute capability 8.9+ or the CPU kernel, and dimensions that are multiples of 16); "
            "use backend: auto or emulated"
        )
    return "scaled_mm" if available else "emulated"


def _out_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    # FP8 GEMMs write bf16/fp16/fp32; anything else comes out in bf16 and is cast back.
    return compute_dtype if compute_dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16


class Fp8Linear(nn.Module):
    """A linear layer whose weight is stored in FP8 with float32 scales."""

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, linear: nn.Linear, spec: Fp8Spec, backend: str):
        super().__init__()
        if backend not in ("scaled_mm", "emulated", "weight_only"):
            raise ValueError(f"unresolved backend {backend!r}")
        self.spec = spec
        self.backend = backend
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.compute_dtype = linear.weight.dtype
        q, scale = quantize(linear.weight.detach(), spec.format, per_row=spec.weights == "per_channel")
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def extra_repr(self) -> str:
        s = self.spec
        return f"{self.in_features}->{self.out_features}, {s.format}, w={s.weights}, a={s.activations}, {self.backend}"

    def _quantize_input(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize(x2d, self.spec.format, per_row=self.spec.activations == "dynamic_per_token")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "weight_only":
            w = dequantize(self.weight_fp8, self.weight_scale, x.dtype)
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        xq, x_scale = self._quantize_input(x2d)
        if self.backend == "scaled_mm":
            # Row-wise kernels want both scales row-wise: broadcast a per-tensor one to rows.
            out = torch._scaled_mm(
                xq,
                self.weight_fp8.t(),
                scale_a=x_scale.expand(xq.shape[0], 1).contiguous(),
                scale_b=self.weight_scale.expand(self.out_features, 1).reshape(1, -1).contiguous(),
                out_dtype=_out_dtype(x.dtype),
            )
        else:
            out = F.linear(dequantize(xq, x_scale), dequantize(self.weight_fp8, self.weight_scale))
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*lead, self.out_features)
