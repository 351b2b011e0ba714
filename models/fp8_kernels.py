"""Triton kernels for the activation side of W8A8 on the GPU: one pass over each row computes the
row's amax and writes its FP8 values and scale, optionally after the bias and tanh-GELU that sit
between the two GEMMs of a feed-forward. Inductor's own fusion of the same code reads each row
twice with looped reductions (rows of 2432 and 9728 values in SD3.5-Large); a row here stays in
registers. Numbers match `models.fp8.quantize` of the eager code (the bias sum and the GELU are rounded to
the activation dtype first, as eager does), but for the GELU's tanh, which is the GPU's
approximate one (see the kernel).

Registered as a `torch.library.triton_op`, so compiled blocks call it as a kernel inside their
graph. `available(x)` says whether it runs for a tensor (CUDA and Triton present).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def available(x: torch.Tensor) -> bool:
    """Whether the kernels run for `x` (call `register()` first, outside compiled code)."""
    return HAS_TRITON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


def register() -> None:
    """Define the Triton kernel and the `evals_fp8::quantize_rows` op (once). Outside compiled code:
    dynamo cannot trace Triton's import and would break the graph there."""
    _ops()


@functools.cache
def _ops() -> tuple[object, object]:
    """Define the kernel and the op on first use (importing Triton is slow and CPU runs never need it)."""
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_rows_kernel(
        x_ptr,
        bias_ptr,
        q_ptr,
        scale_ptr,
        rows,
        cols,
        x_stride,
        FP8_MAX: tl.constexpr,  # a constant: inductor passes float arguments as fp64
        HAS_BIAS: tl.constexpr,
        GELU: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_COLS: tl.constexpr,
    ):
        row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
        col = tl.arange(0, BLOCK_COLS)[None, :]
        inside = (row < rows) & (col < cols)
        x = tl.load(x_ptr + row * x_stride + col, mask=inside, other=0.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + col, mask=col < cols, other=0.0)
            x = (x.to(tl.float32) + bias.to(tl.float32)).to(x_ptr.dtype.element_ty)
        value = x.to(tl.float32)
        if GELU:
            inner = 0.7978845608028654 * (value + 0.044715 * value * value * value)
            # The SFU's tanh (relative error below 2^-10, under the bf16 rounding that follows):
            # libdevice's exact tanh made this kernel compute-bound, 3x slower (H100).
            tanh = tl.inline_asm_elementwise(
                "tanh.approx.f32 $0, $1;", "=r,r", [inner], dtype=tl.float32, is_pure=True, pack=1
            )
            value = (0.5 * value * (1.0 + tanh)).to(x_ptr.dtype.element_ty).to(tl.float32)
        amax = tl.max(tl.where(inside, tl.abs(value), 0.0), axis=1)
        scale = tl.maximum(amax, 1e-12) / FP8_MAX  # 1e-12: models.fp8.MIN_SCALE
        q = tl.clamp(value / scale[:, None], -FP8_MAX, FP8_MAX)
        tl.store(q_ptr + row * cols + col, q.to(q_ptr.dtype.element_ty), mask=inside)
        tl.store(scale_ptr + row, scale[:, None], mask=row < rows)

    @torch.library.triton_op("evals_fp8::quantize_rows", mutates_args=())
    def quantize_rows(
        x: torch.Tensor, bias: torch.Tensor | None, gelu: bool, fp8_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = x.shape
        q = torch.empty((rows, cols), dtype=fp8_dtype, device=x.device)
        scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
        block_cols = triton.next_power_of_2(cols)
        # One row per program, whole in registers: the fastest launch of benchmarks/quant_kernels.py
        # (H100, two runs: 1.9-2.7 TB/s for rows of 2432, 2.8 TB/s for 9728; two or four rows per program were slower).
        block_rows = 1
        warps = 4 if block_cols <= 4096 else 8
        grid = (rows,)
        torch.library.wrap_triton(quantize_rows_kernel)[grid](
            x,
            x if bias is None else bias,
            q,
            scale,
            rows,
            cols,
            x.stride(0),
            FP8_MAX=float(torch.finfo(fp8_dtype).max),
            HAS_BIAS=bias is not None,
            GELU=gelu,
            BLOCK_ROWS=block_rows,
            BLOCK_COLS=block_cols,
            num_warps=warps,
        )
        return q, scale

    return quantize_rows, quantize_rows_kernel


def quantize_rows(
    x: torch.Tensor, fp8_dtype: torch.dtype, bias: torch.Tensor | None = None, gelu: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 quantization of a 2-D CUDA tensor, optionally of tanh-GELU(x + bias): (q, scale)
    with x ~= q * scale, scale float32 of shape (rows, 1). In compiled code `register()` must have run."""
    if not torch.compiler.is_compiling():
        register()
    if x.stride(-1) != 1:
        x = x.contiguous()
    return torch.ops.evals_fp8.quantize_rows(x, bias, gelu, fp8_dtype)
