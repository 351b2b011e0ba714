"""Triton kernels for the activation side of W8A8 on the GPU: one pass over each row computes the
row's amax and writes its FP8 values and scale, optionally after the bias and tanh-GELU that sit
between the two GEMMs of a feed-forward. Inductor's own fusion of the same code reads each row
twice with looped reductions (rows of 2432 and 9728 values in SD3.5-Large); a row here stays in
registers. Numbers match `evals.models.fp8.quantize` of the eager code (the bias sum and the GELU are rounded to
the activation dtype first, as eager does), but for the GELU's tanh, which is the GPU's
approximate one (see the kernel).

Two more for the fused joint block (`evals/models/fp8_block.py`): `norm_quantize` (optional residual
update, LayerNorm, one or two modulations, per-token quantization: one pass per token) and
`quantize_heads` (per-token quantization of an attention output read in SDPA's layout).

Each is a `torch.library.triton_op`, so compiled blocks call it as a kernel inside their graph; the
Triton kernels themselves are in `evals/models/fp8_triton.py`, imported on first use.
`available(x)` says whether they run for a tensor (CUDA and Triton present).
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
def _ops() -> None:
    """Define the ops on first use (importing Triton is slow and CPU runs never need it)."""
    import triton

    from evals.models.fp8_triton import norm_quantize_kernel, quantize_heads_kernel, quantize_rows_kernel

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

    @torch.library.triton_op("evals_fp8::norm_quantize", mutates_args=())
    def norm_quantize(
        x: torch.Tensor,
        delta: torch.Tensor | None,
        delta_bias: torch.Tensor | None,
        gate: torch.Tensor | None,
        shift: torch.Tensor,
        scale: torch.Tensor,
        shift2: torch.Tensor | None,
        scale2: torch.Tensor | None,
        eps: float,
        fp8_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, tokens, cols = x.shape
        rows = batch * tokens
        two = shift2 is not None and scale2 is not None
        empty = lambda dtype: torch.empty(0, dtype=dtype, device=x.device)  # noqa: E731
        x_out = torch.empty_like(x) if delta is not None else empty(x.dtype)
        q = torch.empty((rows, cols), dtype=fp8_dtype, device=x.device)
        s = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
        q2 = torch.empty((rows, cols), dtype=fp8_dtype, device=x.device) if two else empty(fp8_dtype)
        s2 = torch.empty((rows, 1), dtype=torch.float32, device=x.device) if two else empty(torch.float32)
        block_cols = triton.next_power_of_2(cols)
        torch.library.wrap_triton(norm_quantize_kernel)[(rows,)](
            x,
            x if delta is None else delta,
            x if delta_bias is None else delta_bias,
            x if gate is None else gate,
            x_out,
            shift,
            scale,
            shift if shift2 is None else shift2,
            scale if scale2 is None else scale2,
            q,
            s,
            q2,
            s2,
            tokens,
            cols,
            0 if delta is None else delta.stride(0),
            0 if delta is None else delta.stride(1),
            0 if gate is None else gate.stride(0),
            shift.stride(0),
            scale.stride(0),
            0 if shift2 is None else shift2.stride(0),
            0 if scale2 is None else scale2.stride(0),
            FP8_MAX=float(torch.finfo(fp8_dtype).max),
            EPS=eps,
            HAS_DELTA=delta is not None,
            HAS_DELTA_BIAS=delta_bias is not None,
            TWO=two,
            BLOCK_COLS=block_cols,
            num_warps=4 if block_cols <= 4096 else 8,
        )
        return x_out, q, s, q2, s2

    @torch.library.triton_op("evals_fp8::quantize_heads", mutates_args=())
    def quantize_heads(x: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, tokens, head_dim = x.shape
        rows, cols = batch * tokens, heads * head_dim
        q = torch.empty((rows, cols), dtype=fp8_dtype, device=x.device)
        s = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
        block_cols = triton.next_power_of_2(cols)
        torch.library.wrap_triton(quantize_heads_kernel)[(rows,)](
            x,
            q,
            s,
            tokens,
            cols,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            FP8_MAX=float(torch.finfo(fp8_dtype).max),
            HEAD_DIM=head_dim,
            BLOCK_COLS=block_cols,
            num_warps=4 if block_cols <= 4096 else 8,
        )
        return q, s


def quantize_rows(
    x: torch.Tensor, fp8_dtype: torch.dtype, bias: torch.Tensor | None = None, gelu: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 quantization of a 2-D CUDA tensor, optionally of tanh-GELU(x + bias): (q, scale)
    with x ~= q * scale, scale float32 of shape (rows, 1). In compiled code `register()` must have run."""
    if not torch.compiler.is_compiling():
        register()
    return torch.ops.evals_fp8.quantize_rows(_unit_stride(x), bias, gelu, fp8_dtype)


QuantizedRows = tuple[torch.Tensor, torch.Tensor]
"""(FP8 rows, float32 scales of shape (rows, 1)): an activation quantized per token."""


def norm_quantize(
    x: torch.Tensor,
    modulations: list[tuple[torch.Tensor, torch.Tensor]],
    fp8_dtype: torch.dtype,
    eps: float,
    residual: tuple[torch.Tensor, torch.Tensor] | None = None,
    residual_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[QuantizedRows]]:
    """LayerNorm (no affine) of each token of `x` (batch, tokens, channels), modulated by each
    `(shift, scale)` pair (batch, channels) as `norm(x) * (1 + scale) + shift`, then quantized per
    token: one pass over x in one kernel. With `residual=(delta, gate)`, x is first updated to
    `x + gate * (delta + residual_bias)` and the updated x is returned (else x itself). One or two
    modulations."""
    if not torch.compiler.is_compiling():
        register()
    if not 1 <= len(modulations) <= 2:
        raise ValueError(f"one or two modulations, got {len(modulations)}")
    x = x.contiguous()
    delta, gate = (None, None) if residual is None else (_unit_stride(residual[0]), _unit_stride(residual[1]))
    (shift, scale), *second = [(_unit_stride(a), _unit_stride(b)) for a, b in modulations]
    shift2, scale2 = second[0] if second else (None, None)
    x_out, q, s, q2, s2 = torch.ops.evals_fp8.norm_quantize(
        x, delta, residual_bias, gate, shift, scale, shift2, scale2, eps, fp8_dtype
    )
    quantized = [(q, s), (q2, s2)][: len(modulations)]
    return (x if residual is None else x_out), quantized


def quantize_heads(x: torch.Tensor, fp8_dtype: torch.dtype) -> QuantizedRows:
    """Per-token FP8 quantization of an attention output (batch, heads, tokens, head_dim), any strides
    with a unit last one (a slice of SDPA's output): rows (batch * tokens, heads * head_dim), read
    in place instead of after a transposing copy."""
    if not torch.compiler.is_compiling():
        register()
    return torch.ops.evals_fp8.quantize_heads(_unit_stride(x), fp8_dtype)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its last dimension is contiguous (the kernels take the other strides as
    arguments), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()
