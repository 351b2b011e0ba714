"""SD3.5's joint transformer block with its LayerNorms, modulations and residual updates fused into
the FP8 activation quantization: each LayerNorm that feeds FP8 linears (before the attention
projections and before the feed-forward, for both streams) becomes one pass over the tokens in one
Triton kernel (`models/fp8_kernels.norm_quantize`) that also applies the residual update before it
and writes the FP8 rows the GEMMs read. Inductor's fusion of the same code ran at 0.9-1.5 TB/s with
looped reductions (71 and 91 us per SD3.5-Large block on an H100, the largest kernels after the
GEMMs and attention).

The block keeps its modules, parameter names and diffusers' forward for everything this does not
cover: the class of a fusable block is swapped for a subclass whose `forward` takes the fused path on
a CUDA GPU and calls diffusers' `forward` elsewhere (CPU, feed-forward chunking, attention kwargs).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention import JointTransformerBlock
from torch import nn

from evals.models import fp8_kernels
from evals.models.attention import attend
from evals.models.fp8 import FORMATS
from evals.models.fp8_feedforward import Fp8GeluFeedForward, fuse_feed_forwards, per_token_gemm

QuantizedRows = fp8_kernels.QuantizedRows


class Fp8JointTransformerBlock(JointTransformerBlock):
    """A `JointTransformerBlock` whose linears behind LayerNorms and attention are row-wise FP8 GEMMs."""

    def forward(
        self,
        hidden_states: Any,
        encoder_hidden_states: Any,
        temb: Any,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """(encoder_hidden_states, hidden_states) as diffusers' forward returns them (None for the
        first in the last block)."""
        if (
            joint_attention_kwargs
            or self._chunk_size is not None
            or self.training
            or not fp8_kernels.available(hidden_states)
        ):
            return super().forward(hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)
        attn: Any = self.attn
        fp8 = FORMATS[attn.to_q.spec.format]
        dtype, batch = hidden_states.dtype, hidden_states.shape[0]
        norm1: Any = self.norm1
        emb = norm1.linear(norm1.silu(temb))
        if self.use_dual_attention:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = (
                emb.chunk(9, dim=1)
            )
            modulations = [(shift_msa, scale_msa), (shift_msa2, scale_msa2)]
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
            modulations = [(shift_msa, scale_msa)]
        _, normed = fp8_kernels.norm_quantize(hidden_states, modulations, fp8, norm1.norm.eps)

        norm1_context: Any = self.norm1_context
        context_emb = norm1_context.linear(norm1_context.silu(temb))
        if self.context_pre_only:  # AdaLayerNormContinuous: scale first, no gates
            c_scale, c_shift = context_emb.chunk(2, dim=1)
            context_modulation = (c_shift, c_scale)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = context_emb.chunk(6, dim=1)
            context_modulation = (c_shift_msa, c_scale_msa)
        _, (context_normed,) = fp8_kernels.norm_quantize(
            encoder_hidden_states, [context_modulation], fp8, norm1_context.norm.eps
        )

        attn_output, context_attn_output = joint_attention(attn, normed[0], context_normed, batch, dtype)
        residual, residual_bias = (attn_output, gate_msa), attn.to_out[0].bias
        if self.use_dual_attention:
            if residual_bias is not None:
                attn_output = attn_output + residual_bias
            hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
            attn2: Any = self.attn2
            residual = (joint_attention(attn2, normed[1], None, batch, dtype)[0], gate_msa2)
            residual_bias = attn2.to_out[0].bias
        hidden_states, (ff_input,) = fp8_kernels.norm_quantize(
            hidden_states, [(shift_mlp, scale_mlp)], fp8, self.norm2.eps, residual, residual_bias
        )
        ff: Any = self.ff
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * ff.from_quantized(*ff_input, dtype, (batch, -1))
        if self.context_pre_only:
            return None, hidden_states

        assert context_attn_output is not None and self.norm2_context is not None
        encoder_hidden_states, (context_ff_input,) = fp8_kernels.norm_quantize(
            encoder_hidden_states,
            [(c_shift_mlp, c_scale_mlp)],
            fp8,
            self.norm2_context.eps,
            (context_attn_output, c_gate_msa),
            attn.to_add_out.bias,
        )
        ff_context: Any = self.ff_context
        context_ff = ff_context.from_quantized(*context_ff_input, dtype, (batch, -1))
        return encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff, hidden_states


def joint_attention(
    attn: Any, x: QuantizedRows, context: QuantizedRows | None, batch: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """diffusers' JointAttnProcessor2_0 on inputs quantized per token already (the same projections,
    QK RMSNorms, joint attention and output projections), but that the output projections' biases
    are left out (the block adds them in its residual update): (image, context or None) outputs."""
    heads = attn.heads

    def project(linear: Any, rows: QuantizedRows, norm: Any) -> torch.Tensor:
        out = linear.from_quantized(*rows, dtype, (batch, -1))
        out = out.view(batch, -1, heads, out.shape[-1] // heads).transpose(1, 2)
        return out if norm is None else norm(out)

    query = project(attn.to_q, x, attn.norm_q)
    key = project(attn.to_k, x, attn.norm_k)
    value = project(attn.to_v, x, None)
    tokens = query.shape[2]
    if context is not None:
        query = torch.cat([query, project(attn.add_q_proj, context, attn.norm_added_q)], dim=2)
        key = torch.cat([key, project(attn.add_k_proj, context, attn.norm_added_k)], dim=2)
        value = torch.cat([value, project(attn.add_v_proj, context, None)], dim=2)
    out = attend(attn, query, key, value)

    def output(linear: Any, heads_out: torch.Tensor) -> torch.Tensor:
        rows = fp8_kernels.quantize_heads(heads_out, FORMATS[linear.spec.format])
        return linear.matmul(*rows, dtype).reshape(batch, -1, linear.out_features)

    image = output(attn.to_out[0], out[:, :, :tokens])
    if context is None or attn.context_pre_only:
        return image, None
    return image, output(attn.to_add_out, out[:, :, tokens:])


def _plain_layer_norm(norm: Any) -> bool:
    return isinstance(norm, nn.LayerNorm) and not norm.elementwise_affine


def _first_linear(feed_forward: Any) -> Any:
    net = getattr(feed_forward, "net", None)
    return getattr(net[0], "proj", None) if net else None


def fusable(block: Any) -> bool:
    """Whether `block` is diffusers' SD3 joint block with every linear behind a LayerNorm a row-wise
    FP8 GEMM of one format, its feed-forwards fused, and the stock attention processor."""
    if type(block) is not JointTransformerBlock:
        return False
    attentions = [block.attn] + ([block.attn2] if block.use_dual_attention else [])
    linears: list[Any] = [getattr(a, n, None) for a in attentions for n in ("to_q", "to_k", "to_v")]
    linears += [a.to_out[0] for a in attentions]
    linears += [getattr(block.attn, n, None) for n in ("add_q_proj", "add_k_proj", "add_v_proj")]
    if not block.context_pre_only:
        linears.append(getattr(block.attn, "to_add_out", None))
    norms = [block.norm1.norm, block.norm1_context.norm, block.norm2]
    feed_forwards = [block.ff]
    if not block.context_pre_only:
        norms.append(block.norm2_context)
        feed_forwards.append(block.ff_context)
    linears += [_first_linear(ff) for ff in feed_forwards]  # their input is quantized in the block's format
    context_norm = "AdaLayerNormContinuous" if block.context_pre_only else "AdaLayerNormZero"
    return (
        all(per_token_gemm(linear) for linear in linears)
        and len({linear.spec.format for linear in linears}) == 1
        and all(_plain_layer_norm(norm) for norm in norms)
        and all(isinstance(ff, Fp8GeluFeedForward) for ff in feed_forwards)
        and all(type(a.processor).__name__ == "JointAttnProcessor2_0" for a in attentions)
        and type(block.norm1).__name__ in ("AdaLayerNormZero", "SD35AdaLayerNormZeroX")
        and getattr(block.norm1, "emb", None) is None
        and type(block.norm1_context).__name__ == context_norm
        and getattr(block.norm1_context, "emb", None) is None
    )


def fuse_blocks(transformer: Any) -> int:
    """Give every fusable block of `transformer` the fused forward (in place); returns how many."""
    blocks = [b for b in getattr(transformer, "transformer_blocks", ()) if fusable(b)]
    for block in blocks:
        block.__class__ = Fp8JointTransformerBlock
    if blocks and fp8_kernels.HAS_TRITON:
        fp8_kernels.register()  # outside compiled code, once
    return len(blocks)


def fuse_fp8_modules(transformer: Any) -> None:
    """Every fused FP8 path of `transformer`, in place: feed-forwards first (a block fuses only with
    its feed-forwards fused), then the blocks."""
    fuse_feed_forwards(transformer)
    fuse_blocks(transformer)


def unfuse_blocks(transformer: Any) -> int:
    """Give fused blocks diffusers' forward back (in place; for comparisons); returns how many."""
    blocks: list[Any] = [
        b for b in getattr(transformer, "transformer_blocks", ()) if type(b) is Fp8JointTransformerBlock
    ]
    for block in blocks:
        block.__class__ = JointTransformerBlock
    return len(blocks)
