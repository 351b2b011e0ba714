"""SD3.5's feed-forward (Linear, tanh-GELU, Linear) with both linears in FP8: on a CUDA GPU the
first GEMM's bias, the GELU and the second GEMM's per-token input quantization run as one Triton
kernel (`evals/models/fp8_kernels.py`) that reads the wide (4x hidden) activation once. Inductor's fusion
of the same code read it twice and ran the exact tanh, which made it the slowest kernel of an FP8
block after the GEMMs and attention.

The wrapper keeps diffusers' `net` list, so parameter and buffer names (`ff.net.0.proj.weight_fp8`,
...) stay those of a checkpoint. Elsewhere (CPU, emulated layers) it runs diffusers' own code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from evals.models import fp8_kernels
from evals.models.fp8 import FORMATS, Fp8Linear


def _fusable(module: nn.Module) -> bool:
    net: Any = getattr(module, "net", ())
    if type(module).__name__ != "FeedForward" or len(net) != 3:
        return False
    act, _, fc2 = net
    fc1 = getattr(act, "proj", None)
    return (
        type(act).__name__ == "GELU"
        and getattr(act, "approximate", None) == "tanh"
        and all(per_token_gemm(fc) for fc in (fc1, fc2))
    )


def per_token_gemm(module: Any) -> bool:
    """An FP8 linear that runs a real FP8 GEMM on inputs quantized per token (what the fused kernels feed)."""
    return (
        isinstance(module, Fp8Linear)
        and module.backend == "scaled_mm"
        and module.spec.activations == "dynamic_per_token"
        and module.input_scale is None
    )


class Fp8GeluFeedForward(nn.Module):
    """diffusers' FeedForward(activation_fn="gelu-approximate") whose two linears are row-wise FP8 GEMMs."""

    def __init__(self, feed_forward: nn.Module):
        super().__init__()
        self.net = feed_forward.net
        if fp8_kernels.HAS_TRITON:
            fp8_kernels.register()
        self.fused = True
        """False runs diffusers' path (for benchmarks comparing the two)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        net: Any = self.net
        act, dropout, fc2 = net
        fc1 = act.proj
        if not (self.fused and fp8_kernels.available(hidden_states)):
            return fc2(dropout(act(hidden_states)))
        xq, x_scale = fc1.quantize_input(hidden_states.reshape(-1, fc1.in_features))
        return self.from_quantized(xq, x_scale, hidden_states.dtype, hidden_states.shape[:-1])

    def from_quantized(
        self, xq: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype, lead: tuple[int, ...] | torch.Size
    ) -> torch.Tensor:
        """The fused path for an input quantized per token already (xq: (rows, in)); CUDA only."""
        net: Any = self.net
        fc1, fc2 = net[0].proj, net[2]
        wide = fc1.matmul(xq, x_scale, dtype)
        bias = None if fc1.bias is None else fc1.bias.to(dtype)
        q, scale = fp8_kernels.quantize_rows(wide, FORMATS[fc2.spec.format], bias=bias, gelu=True)
        return fc2.from_quantized(q, scale, dtype, lead)


def fuse_feed_forwards(module: nn.Module) -> int:
    """Wrap every fusable feed-forward below `module` in place; returns how many."""
    targets = [name for name, child in module.named_modules() if name and _fusable(child)]
    for name in targets:
        module.set_submodule(name, Fp8GeluFeedForward(module.get_submodule(name)))
    return len(targets)
