"""Time one FP8 transformer step under variants of the activation quantization and of inductor's
tuning, to choose the fast path (each variant recompiles the blocks). Earlier finding (H100): the
reciprocal rewrite and coordinate-descent tuning changed nothing (110-111 ms). With the fused
feed-forward (H100, 2026-11-25): current 103.7 ms, multi_kernel 103.8, reciprocal + multi_kernel
103.4, aggressive_fusion 104.5, split_reductions off 104.1, both 103.9, max_autotune_pointwise 103.9
(and 27.7 s of compilation against 17.8 s): none of inductor's knobs is the missing 4-6 ms.

    python benchmarks/quant_variants.py --model models/configs/sd35-large
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import evals.models.fp8 as fp8
from evals.bench import BenchSetup, time_calls


def quantize_reciprocal(x: torch.Tensor, fmt: str, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # amax in the input dtype (exact), one reciprocal per row, multiply instead of divide
    amax = x.abs().amax(dim=-1, keepdim=True) if per_row else x.abs().amax().reshape(1, 1)
    scale = amax.float().clamp(min=fp8.MIN_SCALE) / fp8.fp8_max(fmt)
    limit = fp8.fp8_max(fmt)
    q = (x.float() * scale.reciprocal()).clamp(-limit, limit).to(fp8.FORMATS[fmt])
    return q, scale


@torch.inference_mode()
def timed(transformer, inputs) -> tuple[float, float]:
    """(median step ms, first call s) with the bench's warm-up and timed steps."""
    first, times = time_calls(lambda: transformer(**inputs, return_dict=False), BenchSetup(), "cuda")
    return statistics.median(times), first


def main() -> None:
    from evals.bench import random_transformer, step_inputs
    from evals.compiling import compile_blocks
    from evals.models.precision import apply_policy, load_policy

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="models/configs/sd35-large")
    parser.add_argument("--policy", default="fp8-e4m3-rowwise")
    args = parser.parse_args()
    reference = random_transformer(Path(args.model), torch.bfloat16, "cuda")
    inputs = step_inputs(reference, BenchSetup(), "cuda")
    candidate = apply_policy(load_policy(args.policy), {"transformer": reference})[0]["transformer"]
    del reference
    original = fp8.quantize
    import torch._inductor.config as inductor

    variants = [
        ("current", original, {}),
        ("multi_kernel (persistent reductions considered up to 16k)", original, {"triton.multi_kernel": 1}),
        ("reciprocal + multi_kernel", quantize_reciprocal, {"triton.multi_kernel": 1}),
        ("aggressive_fusion", original, {"aggressive_fusion": True}),
        ("split_reductions off", original, {"split_reductions": False}),
        ("aggressive_fusion + split_reductions off", original, {"aggressive_fusion": True, "split_reductions": False}),
        ("max_autotune_pointwise", original, {"max_autotune_pointwise": True}),
    ]
    for name, quantize, config in variants:
        torch._dynamo.reset()
        for block in candidate.transformer_blocks:
            block._compiled_call_impl = None
        fp8.quantize = quantize
        with inductor.patch(config):
            compile_blocks(candidate)
            median, first = timed(candidate, inputs)
        print(f"{name}: {median:.1f} ms/step, first call {first:.1f} s", flush=True)
    fp8.quantize = original


if __name__ == "__main__":
    main()
