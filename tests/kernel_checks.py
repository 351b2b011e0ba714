"""Checks of the Triton kernels (evals/models/fp8_kernels.py) against the torch code, shared by the GPU
tests and by the CPU tests that run the same kernels in Triton's interpreter (`TRITON_INTERPRET=1`).

The interpreter converts floats its own way (Triton 3.8): float32 -> FP8 is not round-to-nearest
(a value that should round up to the next power of two comes out a whole binade low: 124.3 -> 64,
not 128), and float32 -> bf16 sometimes lands one unit lower than torch's rounding. So with
`exact=False` the reference bytes are the torch code's values converted by the interpreter itself
(`_to_fp8`); up to 15% of them may differ (the bf16 unit moves an FP8 rounding now and then: 3.6%
measured, 7.5% after a residual update, rounded twice), scales agree to 2% (two bf16 units),
updated streams to a bf16 unit, and the error bound in FP8 steps, which the conversion breaks, is left to the GPU. A
missing bias, shift or residual term, or a wrong stride or mask, fails those checks by far.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evals.models import fp8_kernels
from evals.models.fp8 import quantize

HALF_STEP = 2**-4  # of a row's amax: half e4m3's spacing just below its largest values
INTERPRETED_BYTES = 0.15  # share of bytes that may differ in the interpreter (see above)


def _max_error(q: torch.Tensor, scale: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest error of the dequantized rows, as a share of each row's amax."""
    got = q.float() * scale
    return ((got - exact.float()).abs() / exact.float().abs().amax(1, keepdim=True)).max().item()


def _byte_share(q: torch.Tensor, want: torch.Tensor) -> float:
    return (q.view(torch.uint8) != want.view(torch.uint8)).float().mean().item()


def _to_fp8(values: torch.Tensor, exact: bool) -> torch.Tensor:
    """float32 -> e4m3fn as the kernels' conversion does it: torch's (the GPU's round-to-nearest-even)
    or, in the interpreter, the interpreter's own."""
    if exact:
        return values.to(torch.float8_e4m3fn)
    import triton
    import triton.language as tl

    @triton.jit
    def convert(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n).to(y_ptr.dtype.element_ty), mask=i < n)

    flat = values.float().contiguous().flatten()
    out = torch.empty(flat.shape, dtype=torch.float8_e4m3fn, device=values.device)
    convert[(triton.cdiv(flat.numel(), 1024),)](flat, out, flat.numel(), BLOCK=1024)
    return out.view(values.shape)


def _reference_q(exact_values: torch.Tensor, scale: torch.Tensor, exact: bool) -> torch.Tensor:
    """evals.models.fp8.quantize's FP8 values for rows with these scales, converted as the kernels convert."""
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    return _to_fp8((exact_values.float() / scale).clamp(-fp8_max, fp8_max), exact)


def check_quantize_rows(device: str, exact: bool, rows: int = 300, cols: int = 2432, gelu: bool = True) -> None:
    torch.manual_seed(0)
    x = torch.randn(rows, cols, device=device, dtype=torch.bfloat16) * 4
    bias = torch.randn(cols, device=device, dtype=torch.bfloat16)
    for with_bias, with_gelu in ((False, False), (True, False), (True, True))[: 3 if gelu else 2]:
        want_in = x + bias if with_bias else x
        want_in = F.gelu(want_in, approximate="tanh") if with_gelu else want_in
        want_q, want_scale = quantize(want_in, "e4m3fn", per_row=True)
        want_q = _reference_q(want_in, want_scale, exact)
        q, scale = fp8_kernels.quantize_rows(x, torch.float8_e4m3fn, bias if with_bias else None, with_gelu)
        assert q.shape == want_q.shape and scale.shape == want_scale.shape == (rows, 1)
        error = _max_error(q, scale, want_in)
        assert not exact or error <= HALF_STEP + 1e-3, (with_bias, with_gelu, error)
        if with_gelu:  # the approximate tanh moves some values across a bf16 rounding boundary (and some amax)
            assert _byte_share(q, want_q) < 2e-2
            assert torch.allclose(scale, want_scale, rtol=1e-2)
            got_values, want_values = q.float() * scale, want_q.float() * want_scale
            assert torch.allclose(got_values, want_values, rtol=0.13, atol=float(want_scale.max()) * 2)
        else:
            assert torch.equal(scale, want_scale) if exact else torch.allclose(scale, want_scale, rtol=1e-2)
            assert _byte_share(q, want_q) < (1e-4 if exact else INTERPRETED_BYTES)


def check_norm_quantize(device: str, exact: bool, batch: int = 2, tokens: int = 300, channels: int = 2432) -> None:
    b, t, c = batch, tokens, channels
    torch.manual_seed(0)
    x = torch.randn(b, t, c, device=device, dtype=torch.bfloat16) * 3
    wide = torch.randn(b, t + 33, c, device=device, dtype=torch.bfloat16)
    delta = wide[:, :t]  # a slice, as the attention output is split between the streams
    emb = torch.randn(b, 9 * c, device=device, dtype=torch.bfloat16)
    gate, shift, scale, shift2, scale2 = emb[:, :c], *emb[:, c:].chunk(8, dim=1)[:4]
    bias = torch.randn(c, device=device, dtype=torch.bfloat16)
    for residual, residual_bias, modulations in (
        (None, None, [(shift, scale)]),
        ((delta, gate), None, [(shift, scale)]),
        ((delta, gate), bias, [(shift, scale)]),
        (None, None, [(shift, scale), (shift2, scale2)]),
    ):
        exact_x, term = x.float(), torch.zeros(())
        if residual is not None:  # delta + bias is rounded to bf16 first, as the eager code rounds it
            update = residual[0] if residual_bias is None else residual[0] + residual_bias
            term = residual[1][:, None].float() * update.float()
            exact_x = x.float() + term
        normed = F.layer_norm(exact_x.to(torch.bfloat16).float(), (c,), eps=1e-6)
        got_x, rows = fp8_kernels.norm_quantize(x, modulations, torch.float8_e4m3fn, 1e-6, residual, residual_bias)
        assert len(rows) == len(modulations)
        if residual is None:
            assert got_x is x
        elif exact:  # the exact update rounded once to bf16 (half a unit in the last place)
            assert ((got_x.float() - exact_x).abs() <= exact_x.abs() * 2**-8 + 1e-6).all()
        else:  # a unit, of the sum and of the update's own bf16 rounding
            assert ((got_x.float() - exact_x).abs() <= (exact_x.abs() + term.abs()) * 2**-7 + 1e-6).all()
        for (q, s), (sh, sc) in zip(rows, modulations, strict=True):
            want = (normed * (1 + sc.float()[:, None]) + sh.float()[:, None]).to(torch.bfloat16).reshape(-1, c)
            want_s = quantize(want, "e4m3fn", per_row=True)[1]
            assert q.shape == (b * t, c) and s.shape == (b * t, 1)
            assert torch.allclose(s, want_s, rtol=1e-2 if exact else 2e-2)
            assert not exact or _max_error(q, s, want) <= HALF_STEP + 1e-2
            assert _byte_share(q, _reference_q(want, want_s, exact)) < (2e-2 if exact else INTERPRETED_BYTES)


def check_quantize_heads(device: str, exact: bool, tokens: int = 300) -> None:
    torch.manual_seed(0)
    out = torch.randn(2, 4, tokens, 64, device=device, dtype=torch.bfloat16) * 5  # (batch, heads, tokens, head_dim)
    split = tokens * 5 // 6
    for part in (out[:, :, :split], out[:, :, split:]):
        rows = part.transpose(1, 2).reshape(-1, 4 * 64)
        want_s = quantize(rows, "e4m3fn", per_row=True)[1]
        q, s = fp8_kernels.quantize_heads(part, torch.float8_e4m3fn)
        assert torch.equal(s, want_s)
        assert not exact or _max_error(q, s, rows) <= HALF_STEP + 1e-3
        assert _byte_share(q, _reference_q(rows, want_s, exact)) < (1e-4 if exact else INTERPRETED_BYTES)
