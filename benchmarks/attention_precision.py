"""Attention precision at SD3.5's shapes (1024x1024, batch 2, head_dim 64): the bf16 SDPA the models
run against this project's `int8` attention (SageAttention's recipe, run by the `sageattention`
package's Triton kernels) and its `fp8` attention (emulated): kernel time (CUDA events, median of
30 after warm-up, as `evals bench` times a step) and each one's error against float32 SDPA, on
projections shaped as SD3.5 makes them (q and k RMS-normalized per head, k with a per-channel offset
as trained models' keys have). Also how far the GPU kernel is from the torch reference it is tested
against.

    pip install .[sageattention]
    python benchmarks/attention_precision.py
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from evals.bench import BenchSetup, time_calls
from evals.models.attention import fp8_attention_reference, int8_attention, int8_attention_reference, relative_error

# (name, heads, tokens): 4096 image tokens; joint attention adds 333 text tokens (77 CLIP + 256 T5);
# Medium's second attention in its dual-attention blocks sees the image tokens alone.
SHAPES = [("Medium joint", 24, 4429), ("Medium image-only", 24, 4096), ("Large joint", 38, 4429)]
BATCH, HEAD_DIM = 2, 64


def median_ms(fn) -> float:
    return statistics.median(time_calls(fn, BenchSetup(warmup=5, iters=30), "cuda")[1])


def projections(heads: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator("cuda").manual_seed(0)

    def make(rms_norm: bool, offset: float = 0.0) -> torch.Tensor:
        x = torch.randn(BATCH, tokens, heads, HEAD_DIM, device="cuda", generator=gen)
        if rms_norm:
            x = 2.0 * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        x = x + offset * torch.randn(1, 1, heads, HEAD_DIM, device="cuda", generator=gen)
        return x.to(torch.bfloat16).transpose(1, 2)

    return make(True), make(True, offset=2.0), make(False)


def row(name: str, heads: int, tokens: int) -> str:
    q, k, v = projections(heads, tokens)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    bf16_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    by_backend = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        with sdpa_kernel(backend):
            by_backend.append(median_ms(lambda: F.scaled_dot_product_attention(q, k, v)))
    int8_ms = median_ms(lambda: int8_attention(q, k, v))
    kernel = int8_attention(q, k, v)
    reference = int8_attention_reference(q, k, v)
    errors = [
        relative_error(F.scaled_dot_product_attention(q, k, v), exact),
        relative_error(kernel, exact),
        relative_error(fp8_attention_reference(q, k, v), exact),
    ]
    return (
        f"| {name} | {bf16_ms:.3f} | "
        + " | ".join(f"{ms:.3f}" for ms in by_backend)
        + f" | {int8_ms:.3f} | {bf16_ms / int8_ms:.2f}x | "
        + " | ".join(f"{e:.2%}" for e in errors)
        + f" | {relative_error(kernel, reference):.2%} |"
    )


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(
        "| shape | bf16 SDPA ms (default) | flash | cuDNN | efficient | int8 ms | speed-up | error bf16 | error int8 "
        "| error fp8 (emulated) | int8 kernel vs reference |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, heads, tokens in SHAPES:
        print(row(name, heads, tokens), flush=True)


if __name__ == "__main__":
    main()
