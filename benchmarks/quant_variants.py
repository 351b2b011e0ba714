"""Time one FP8 transformer step under variants of the activation quantization and of inductor's
tuning, to choose the fast path (each variant recompiles the blocks). Earlier finding (H100): the
reciprocal rewrite and coordinate-descent tuning changed nothing (110-111 ms).

    python benchmarks/quant_variants.py --model models/configs/sd35-large
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import models.fp8 as fp8


def quantize_reciprocal(x: torch.Tensor, fmt: str, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # amax in the input dtype (exact), one reciprocal per row, multiply instead of divide
    amax = x.abs().amax(dim=-1, keepdim=True) if per_row else x.abs().amax().reshape(1, 1)
    scale = amax.float().clamp(min=fp8.MIN_SCALE) / fp8.fp8_max(fmt)
    limit = fp8.fp8_max(fmt)
    q = (x.float() * scale.reciprocal()).clamp(-limit, limit).to(fp8.FORMATS[fmt])
    return q, scale


def timed(transformer, inputs, iters: int = 10) -> tuple[float, float]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        transformer(**inputs, return_dict=False)
        torch.cuda.synchronize()
        first = time.perf_counter() - t
        for _ in range(3):
            transformer(**inputs, return_dict=False)
        times = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            transformer(**inputs, return_dict=False)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    return statistics.median(times), first


def main() -> None:
    from evals.bench import BenchSetup, random_transformer, step_inputs
    from evals.compiling import compile_blocks
    from models.precision import apply_policy, load_policy

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
