"""Attention precision: the joint attention of SD3's blocks in bf16 (diffusers' own SDPA), INT8 or FP8.

`int8` is SageAttention's recipe (Zhang et al., 2024): K minus its mean over the tokens (softmax is
unchanged by a constant per query row, and K's large per-channel offsets no longer eat the INT8
range), Q in blocks of 128 tokens and K in blocks of 64 each with one scale, Q·Kᵀ in INT8 with 32-bit
sums, softmax in float32, P·V in float16. On a CUDA GPU it runs the `sageattention` package's Triton
kernels (`pip install .[sageattention]`); elsewhere, and as the oracle the GPU kernel is tested
against, `int8_attention_reference` computes the same numbers with torch.

`fp8` quantizes Q and K the same way to e4m3 (no smoothing needed for the range, kept for the
mantissa), V per channel and P with the fixed scale 448 (P is in [0, 1]), as FlashAttention-3's FP8
path does. No FP8 attention kernel beat bf16 SDPA here (docs/performance.md), so it is computed by
`fp8_attention_reference` everywhere: it measures what FP8 attention does to images, not its speed.

`bf16` leaves diffusers' `scaled_dot_product_attention` in the transformer's dtype (float32 in a
float32 reference): the name says what it means on the GPUs that serve SD3.5.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

ATTENTION_PRECISIONS = ("bf16", "fp8", "int8")
Q_BLOCK, K_BLOCK = 128, 64
"""Tokens per Q and per K scale, SageAttention's (their kernel's tile sides)."""
FP8_MAX = 448.0  # e4m3fn
QUERY_CHUNK = 1024  # queries per step of the reference, so that a 4k-token score matrix fits


def _block_scales(x: torch.Tensor, block: int, top: float) -> torch.Tensor:
    """One scale per `block` tokens of [B, H, S, D] (amax / top), repeated to [B, H, S, 1]."""
    tokens = x.shape[2]
    pad = (-tokens) % block
    padded = F.pad(x.abs(), (0, 0, 0, pad)) if pad else x.abs()
    amax = padded.unflatten(2, (-1, block)).amax(dim=(-1, -2))  # [B, H, S/block]
    scale = (amax / top).clamp(min=torch.finfo(torch.float32).tiny)
    return scale.repeat_interleave(block, dim=2)[:, :, :tokens, None]


def _int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).round().clamp(-127, 127)  # round half away from zero differs only on ties


def _fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def _attend_chunks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scores: Callable[[slice], torch.Tensor], p_of: Callable
) -> torch.Tensor:
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=torch.float32, device=q.device)
    for start in range(0, q.shape[2], QUERY_CHUNK):
        rows = slice(start, start + QUERY_CHUNK)
        out[:, :, rows] = p_of(torch.softmax(scores(rows), dim=-1)) @ v
    return out


def int8_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SageAttention's INT8 attention of [B, H, S, D] tensors, computed with torch in float32 (exact:
    INT8 products of a head of up to 1024 channels sum below 2**24)."""
    qf, kf = q.float() * q.shape[-1] ** -0.5, k.float()
    kf = kf - kf.mean(dim=2, keepdim=True)
    q_scale, k_scale = _block_scales(qf, Q_BLOCK, 127.0), _block_scales(kf, K_BLOCK, 127.0)
    q8, k8 = _int8(qf, q_scale), _int8(kf, k_scale)
    v16 = v.to(torch.float16).float()

    def scores(rows: slice) -> torch.Tensor:
        return (q8[:, :, rows] @ k8.transpose(-1, -2)) * q_scale[:, :, rows] * k_scale.transpose(-1, -2)

    return _attend_chunks(q8, k8, v16, scores, lambda p: p.to(torch.float16).float()).to(q.dtype)


def fp8_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FP8 (e4m3) attention of [B, H, S, D] tensors: Q and K per token block, V per channel, P with
    the fixed scale 448; products summed in float32."""
    qf, kf, vf = q.float() * q.shape[-1] ** -0.5, k.float(), v.float()
    kf = kf - kf.mean(dim=2, keepdim=True)
    q_scale, k_scale = _block_scales(qf, Q_BLOCK, FP8_MAX), _block_scales(kf, K_BLOCK, FP8_MAX)
    v_scale = (vf.abs().amax(dim=2, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q8, k8, v8 = _fp8(qf, q_scale), _fp8(kf, k_scale), _fp8(vf, v_scale)

    def scores(rows: slice) -> torch.Tensor:
        return (q8[:, :, rows] @ k8.transpose(-1, -2)) * q_scale[:, :, rows] * k_scale.transpose(-1, -2)

    def p_fp8(p: torch.Tensor) -> torch.Tensor:
        return (p * FP8_MAX).to(torch.float8_e4m3fn).float() / FP8_MAX

    return (_attend_chunks(q8, k8, v8, scores, p_fp8) * v_scale).to(q.dtype)


SAGEATTENTION = importlib.util.find_spec("sageattention") is not None
"""Whether the package is installed (decided once: compiled blocks read it as a constant)."""


def _sage_runs(q: torch.Tensor) -> bool:
    return SAGEATTENTION and q.is_cuda and q.shape[-1] in (64, 96, 128)


@torch.library.custom_op("evals::int8_attention", mutates_args=())
def _sage_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The sageattention package's INT8 kernels, as one opaque op (compiled blocks and CUDA graphs
    call it as it is instead of tracing into its Python)."""
    from sageattention import sageattn

    # sageattn smooths K in place: hand it a copy, never the caller's tensor
    return sageattn(q.contiguous(), k.clone(memory_format=torch.contiguous_format), v.contiguous(), "HND")


@_sage_int8.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _sage_int8(q, k, v) if _sage_runs(q) else int8_attention_reference(q, k, v)


def attend(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Joint attention of [B, H, S, D] tensors in the precision the policy gave `attn`."""
    precision = getattr(attn, "attention_precision", "bf16")
    if precision == "int8":
        return int8_attention(query, key, value)
    if precision == "fp8":
        return fp8_attention_reference(query, key, value)
    return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)


class QuantizedJointAttnProcessor(JointAttnProcessor2_0):
    """diffusers' `JointAttnProcessor2_0` (same projections, QK norms and splits) whose attention
    product runs in the precision set on its module (`attend`)."""

    def __call__(  # type: ignore[override]
        self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None, **_: Any
    ) -> Any:
        batch, tokens = hidden_states.shape[0], hidden_states.shape[1]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        def normed(x: torch.Tensor, norm: Any) -> torch.Tensor:
            return x if norm is None else norm(x)

        query = normed(heads(attn.to_q(hidden_states)), attn.norm_q)
        key = normed(heads(attn.to_k(hidden_states)), attn.norm_k)
        value = heads(attn.to_v(hidden_states))
        if encoder_hidden_states is not None:
            context = encoder_hidden_states
            query = torch.cat([query, normed(heads(attn.add_q_proj(context)), attn.norm_added_q)], dim=2)
            key = torch.cat([key, normed(heads(attn.add_k_proj(context)), attn.norm_added_k)], dim=2)
            value = torch.cat([value, heads(attn.add_v_proj(context))], dim=2)
        out = attend(attn, query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1]).to(query.dtype)
        image = attn.to_out[1](attn.to_out[0](out[:, :tokens]))
        if encoder_hidden_states is None:
            return image
        context_out = out[:, tokens:]
        if not attn.context_pre_only:
            context_out = attn.to_add_out(context_out)
        return image, context_out


def attention_modules(transformer: Any) -> list[tuple[str, Any]]:
    """The transformer's attention modules by qualified name (`transformer_blocks.N.attn`, `.attn2`)."""
    return [(name, m) for name, m in transformer.named_modules() if isinstance(m, Attention)]


def set_attention_precision(transformer: Any, precisions: dict[str, str]) -> None:
    """Give each named attention module its precision (`bf16` leaves diffusers' processor alone)."""
    modules = dict(attention_modules(transformer))
    for name, precision in precisions.items():
        if precision == "bf16":
            continue
        module = modules[name]
        module.attention_precision = precision
        module.set_processor(QuantizedJointAttnProcessor())


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    """‖out - exact‖ / ‖exact‖, the figure the docs and benchmark quote."""
    diff = (out.float() - exact.float()).norm()
    return float(diff / exact.float().norm().clamp(min=math.ulp(0.0)))
