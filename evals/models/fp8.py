"""FP8 formats, scales and the linear module that runs a quantized layer.

Backends:
- `scaled_mm`: real FP8 GEMM through `torch._scaled_mm` on Hopper/Ada GPUs; on the CPU the same GEMM
  computed exactly in float32 (see `exact_fp8_gemm`), since oneDNN's FP8 kernel rounds differently
  on every instruction set;
- `emulated`: quantize-dequantize in float32, the same numbers without FP8 units;
- `weight_only`: FP8 storage, weights dequantized to the compute dtype, activations untouched.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from evals.models.fp8_spec import ACTIVATIONS, BACKENDS, FORMAT_NAMES, TORCHAO, WEIGHT_SCALES, Fp8Spec
from evals.models.yamlspec import InputError

FORMATS: dict[str, torch.dtype] = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
assert tuple(FORMATS) == FORMAT_NAMES
__all__ = ["ACTIVATIONS", "BACKENDS", "FORMATS", "WEIGHT_SCALES", "Fp8Spec"]
MIN_SCALE = 1e-12  # an all-zero row would otherwise divide by zero


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


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """Cast with a given scale (static activations): values past the range saturate."""
    limit = fp8_max(fmt)
    return (x.float() / scale).clamp(-limit, limit).to(FORMATS[fmt])


def quantize_blocks(w: torch.Tensor, fmt: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per `block` x `block` tile (the last tiles may be partial): scales (ceil(N/b), ceil(K/b))."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = torch.zeros(nb * block, kb * block, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    amax = padded.reshape(nb, block, kb, block).abs().amax(dim=(1, 3))
    scale = amax.clamp(min=MIN_SCALE) / fp8_max(fmt)
    q = quantize_with_scale(w, expand_block_scale(scale, block, n, k), fmt)
    return q, scale


def expand_block_scale(scale: torch.Tensor, block: int, rows: int, cols: int) -> torch.Tensor:
    return scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, block: int | None = None
) -> torch.Tensor:
    """q * scale; `block` is the tile side when the scales are per block."""
    if block is not None:
        scale = expand_block_scale(scale, block, *q.shape)
    return (q.float() * scale).to(dtype)


def quantize_weight(w: torch.Tensor, spec: Fp8Spec) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.weights == "per_block":
        return quantize_blocks(w, spec.format, spec.block_size)
    return quantize(w, spec.format, per_row=spec.weights == "per_channel")


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
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        # e.g. CUDA's "Multiplication of two Float8_e5m2 matrices is not supported" (a ValueError)
        return False


def resolve_backend(spec: Fp8Spec, shape: tuple[int, int], device: torch.device, compute_dtype: torch.dtype) -> str:
    """The backend that will actually run a layer of this (out, in) shape (recorded in the plan)."""
    if spec.backend == TORCHAO:
        from evals.models.torchao_backend import torchao_problem

        problem = torchao_problem(spec, device)
        if problem:
            raise InputError(problem)
        return TORCHAO
    if spec.activations == "none":
        return "weight_only"
    if spec.backend in ("emulated", "weight_only"):
        return spec.backend
    out_features, in_features = shape
    why_not = ""
    if spec.weights == "per_block":
        why_not = "per_block weight scales have no FP8 GEMM kernel here"
    elif in_features % 16 or out_features % 16:
        why_not = f"the GEMM kernels need sides that are multiples of 16, got {shape}"
    elif device.type == "meta":  # a plan from configs alone: what was asked for
        return "scaled_mm" if spec.backend == "scaled_mm" else "emulated"
    elif not scaled_mm_runs(device.type, device.index, spec.format, _out_dtype(compute_dtype)):
        why_not = (
            f"torch._scaled_mm does not run {spec.format} on {device} (needs compute capability 8.9+ or the CPU kernel)"
        )
    if spec.backend == "scaled_mm" and why_not:
        raise InputError(f"backend scaled_mm cannot run this layer: {why_not}; use backend: auto or emulated")
    return "emulated" if why_not else "scaled_mm"


def exact_fp8_gemm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor) -> torch.Tensor:
    """(a * scale_a) @ (b * scale_b)^T for FP8 `a` (rows, k) and `b` (n, k), as an FP8 GEMM computes
    it: every product of two FP8 values is exact in float32, the sum accumulates in float32, and the
    scales (rows, 1) and (1, n) apply to the sum. On the CPU this goes through the float32 GEMM, whose
    results do not change with the instruction set, where oneDNN's FP8 kernel moves the outputs
    of a whole transformer by several dB between machines (docs/gate-evidence.md)."""
    return (a.float() @ b.float().t()) * scale_a * scale_b


def _out_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    # FP8 GEMMs write bf16/fp16/fp32; anything else comes out in bf16 and is cast back.
    return compute_dtype if compute_dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16


class Fp8Linear(nn.Module):
    """A linear layer whose weight is stored in FP8 with float32 scales.

    Buffers: `weight_fp8` (out, in), `weight_scale` ((1, 1), (out, 1) or per-block tiles) and, for
    static activations, `input_scale` (1, 1). These are what a checkpoint stores.
    """

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None

    def __init__(
        self,
        weight_fp8: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        spec: Fp8Spec,
        backend: str,
        compute_dtype: torch.dtype,
        input_scale: torch.Tensor | None = None,
    ):
        super().__init__()
        if backend not in ("scaled_mm", "emulated", "weight_only"):
            raise ValueError(f"unresolved backend {backend!r}")
        if spec.activations == "static" and input_scale is None:
            raise ValueError("static activations need a calibrated input scale")
        self.spec = spec
        self.backend = backend
        self.out_features, self.in_features = weight_fp8.shape
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(1, 1))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: Fp8Spec, backend: str, input_amax: float | None = None) -> Fp8Linear:
        q, scale = quantize_weight(linear.weight.detach(), spec)
        input_scale = None
        if spec.activations == "static":
            if input_amax is None:
                raise ValueError("static activations need a calibrated input amax")
            step = max(input_amax, MIN_SCALE) / fp8_max(spec.format)
            input_scale = torch.tensor([[step]], device=linear.weight.device)
        return cls(q, scale, linear.bias, spec, backend, linear.weight.dtype, input_scale)

    def extra_repr(self) -> str:
        s = self.spec
        return f"{self.in_features}->{self.out_features}, {s.format}, w={s.weights}, a={s.activations}, {self.backend}"

    @property
    def weight(self) -> torch.Tensor:
        """The weight as the layer computes with it, in its compute dtype: models that read a
        layer's `.weight` (transformers' T5 casts its FFN input to `wo.weight.dtype`) keep working."""
        return self.dequantized_weight(self.compute_dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        block = self.spec.block_size if self.spec.weights == "per_block" else None
        return dequantize(self.weight_fp8, self.weight_scale, dtype, block)

    def quantize_input(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.input_scale is not None:
            return quantize_with_scale(x2d, self.input_scale, self.spec.format), self.input_scale
        return quantize(x2d, self.spec.format, per_row=self.spec.activations == "dynamic_per_token")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "weight_only":
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantized_weight(x.dtype), bias)
        return self.from_quantized(*self.quantize_input(x.reshape(-1, self.in_features)), x.dtype, x.shape[:-1])

    def from_quantized(
        self, xq: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype, lead: tuple[int, ...] | torch.Size
    ) -> torch.Tensor:
        """The layer's output for an input quantized already (xq: (rows, in)), shaped (*lead, out)."""
        out = self.matmul(xq, x_scale, dtype)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out.reshape(*lead, self.out_features)

    def matmul(self, xq: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(xq * x_scale) @ W^T in `dtype`, without the bias: xq (rows, in) quantized activations."""
        if self.backend == "scaled_mm" and xq.device.type == "cpu":
            out = exact_fp8_gemm(xq, self.weight_fp8, x_scale, self.weight_scale.reshape(1, -1))
        elif self.backend == "scaled_mm":
            # Row-wise kernels want both scales row-wise: broadcast a per-tensor one to rows.
            out = torch._scaled_mm(
                xq,
                self.weight_fp8.t(),
                scale_a=x_scale.expand(xq.shape[0], 1).contiguous(),
                scale_b=self.weight_scale.expand(self.out_features, 1).reshape(1, -1).contiguous(),
                out_dtype=_out_dtype(dtype),
                use_fast_accum=self.spec.fast_accum,
            )
        else:
            out = F.linear(dequantize(xq, x_scale), self.dequantized_weight())
        return out.to(dtype)
