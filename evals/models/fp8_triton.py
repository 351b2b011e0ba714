"""The Triton kernels behind `evals.models.fp8_kernels`' ops. Imported only by `fp8_kernels._ops()`, on
first use (importing Triton is slow and CPU runs never need it); module-level, so that Triton's
interpreter (`TRITON_INTERPRET=1`, the CPU tests) resolves the helper they share, as the GPU
compiler does.
"""

import triton
import triton.language as tl


@triton.jit
def store_fp8_row(y, col, inside, q_ptr, s_ptr, row, cols, FP8_MAX: tl.constexpr):
    """Scale one row (float32 values at `col`, masked by `inside`) to FP8 by its amax; store the FP8
    values at row `row` of q (rows of `cols`) and the scale at s[row]."""
    step = tl.maximum(tl.max(tl.where(inside, tl.abs(y), 0.0), axis=0), 1e-12) / FP8_MAX  # 1e-12: MIN_SCALE
    q = tl.clamp(y / step, -FP8_MAX, FP8_MAX).to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + row * cols + col, q, mask=inside)
    tl.store(s_ptr + row, step)


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
    scale = tl.maximum(amax, 1e-12) / FP8_MAX  # 1e-12: evals.models.fp8.MIN_SCALE
    q = tl.clamp(value / scale[:, None], -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + row * cols + col, q.to(q_ptr.dtype.element_ty), mask=inside)
    tl.store(scale_ptr + row, scale[:, None], mask=row < rows)


@triton.jit
def norm_quantize_kernel(
    x_ptr,
    delta_ptr,
    delta_bias_ptr,
    gate_ptr,
    x_out_ptr,
    shift_ptr,
    scale_ptr,
    shift2_ptr,
    scale2_ptr,
    q_ptr,
    s_ptr,
    q2_ptr,
    s2_ptr,
    tokens,
    cols,
    delta_stride_b,
    delta_stride_t,
    gate_stride,
    shift_stride,
    scale_stride,
    shift2_stride,
    scale2_stride,
    FP8_MAX: tl.constexpr,
    EPS: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_DELTA_BIAS: tl.constexpr,
    TWO: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // tokens
    col = tl.arange(0, BLOCK_COLS)
    inside = col < cols
    x = tl.load(x_ptr + row * cols + col, mask=inside, other=0.0)
    if HAS_DELTA:  # the residual update of the stream: x + gate * (delta + bias), stored as the new x
        delta = tl.load(
            delta_ptr + b * delta_stride_b + (row - b * tokens) * delta_stride_t + col, mask=inside, other=0.0
        )
        if HAS_DELTA_BIAS:  # the bias of the GEMM that made delta, rounded as the eager code rounds it
            bias = tl.load(delta_bias_ptr + col, mask=inside, other=0.0)
            delta = (delta.to(tl.float32) + bias.to(tl.float32)).to(x_ptr.dtype.element_ty)
        gate = tl.load(gate_ptr + b * gate_stride + col, mask=inside, other=0.0)
        x = (x.to(tl.float32) + gate.to(tl.float32) * delta.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(x_out_ptr + row * cols + col, x, mask=inside)
    value = x.to(tl.float32)
    mean = tl.sum(value, axis=0) / cols
    centred = tl.where(inside, value - mean, 0.0)
    normed = centred * tl.rsqrt(tl.sum(centred * centred, axis=0) / cols + EPS)
    # Modulation as the eager code rounds it (to the activation dtype), then one scale per row.
    shift = tl.load(shift_ptr + b * shift_stride + col, mask=inside, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * scale_stride + col, mask=inside, other=0.0).to(tl.float32)
    y = (normed * (1.0 + scale) + shift).to(x_ptr.dtype.element_ty).to(tl.float32)
    store_fp8_row(y, col, inside, q_ptr, s_ptr, row, cols, FP8_MAX)
    if TWO:  # SD3.5-Medium's dual-attention blocks modulate the same normalized row twice
        shift = tl.load(shift2_ptr + b * shift2_stride + col, mask=inside, other=0.0).to(tl.float32)
        scale = tl.load(scale2_ptr + b * scale2_stride + col, mask=inside, other=0.0).to(tl.float32)
        y = (normed * (1.0 + scale) + shift).to(x_ptr.dtype.element_ty).to(tl.float32)
        store_fp8_row(y, col, inside, q2_ptr, s2_ptr, row, cols, FP8_MAX)


@triton.jit
def quantize_heads_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    tokens,
    cols,
    stride_b,
    stride_h,
    stride_t,
    FP8_MAX: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // tokens
    col = tl.arange(0, BLOCK_COLS)
    inside = col < cols
    offset = b * stride_b + (row - b * tokens) * stride_t + (col // HEAD_DIM) * stride_h + col % HEAD_DIM
    value = tl.load(x_ptr + offset, mask=inside, other=0.0).to(tl.float32)
    store_fp8_row(value, col, inside, q_ptr, s_ptr, row, cols, FP8_MAX)
