"""Where the time of one transformer step goes: CUDA kernel time by kind (GEMM, attention, FP8
quantization, the rest) for the reference and a candidate, each with its blocks compiled.

    python benchmarks/profile_step.py --model models/configs/sd35-large --policy fp8-e4m3-rowwise

Optionally under another SDPA backend (--attention cudnn|flash|efficient) to compare attention kernels;
`--layers 6` profiles a 6-block model (quick); `--unfused` adds each candidate without the fused
blocks and feed-forwards of evals/models/fp8_block.py and evals/models/fp8_feedforward.py.
"""

from __future__ import annotations

import argparse
import contextlib
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from evals.models.fp8_block import unfuse_blocks
from evals.models.fp8_feedforward import Fp8GeluFeedForward


def kind(kernel: str) -> str:
    k = kernel.lower()
    if k.startswith("triton"):  # inductor's kernels; their names list the ops fused, GEMMs included
        return "fused elementwise/reduction (triton)"
    if "quantize" in k:  # quantize_rows_kernel, norm_quantize_kernel, quantize_heads_kernel
        return "fp8 quantization (evals/models/fp8_kernels.py)"
    if any(s in k for s in ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")):
        return "attention"
    if any(s in k for s in ("gemm", "cutlass", "sm90_xmma", "nvjet", "matmul", "scaled_mm", "cublas")):
        return "gemm"
    return "other"


def profile_step(transformer, inputs, steps: int = 3) -> dict[str, float]:
    with torch.inference_mode():
        for _ in range(4):
            transformer(**inputs, return_dict=False)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                transformer(**inputs, return_dict=False)
            torch.cuda.synchronize()
    by_kind: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            ms = event.device_time_total / 1000 / steps
            by_kind[kind(event.key)] += ms
            by_kernel[event.key[:90]] += ms
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:12]
    for name, ms in top:
        print(f"    {ms:7.2f} ms  {name}")
    return dict(by_kind)


def main() -> None:
    from pathlib import Path

    from evals.bench import BenchSetup, random_transformer, step_inputs
    from evals.compiling import compile_blocks
    from evals.models.precision import apply_policy, load_policy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/configs/sd35-large")
    parser.add_argument("--policy", action="append", default=[])
    parser.add_argument("--attention", default="default", choices=("default", "cudnn", "flash", "efficient"))
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--layers", type=int, help="keep only this many blocks (faster to build)")
    parser.add_argument("--unfused", action="store_true", help="also each candidate with diffusers' blocks")
    args = parser.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    backends["efficient"] = SDPBackend.EFFICIENT_ATTENTION
    context = sdpa_kernel(backends[args.attention]) if args.attention != "default" else contextlib.nullcontext()
    reference = random_transformer(Path(args.model), torch.bfloat16, "cuda", num_layers=args.layers)
    inputs = step_inputs(reference, BenchSetup(args.resolution, args.batch), "cuda")
    variants = [("reference", reference)]
    for name in args.policy:
        candidate = apply_policy(load_policy(name), {"transformer": reference})[0]["transformer"]
        variants.append((name, candidate))
        if args.unfused:
            unfused = apply_policy(load_policy(name), {"transformer": reference})[0]["transformer"]
            for module in unfused.modules():
                if isinstance(module, Fp8GeluFeedForward):
                    module.fused = False
            unfuse_blocks(unfused)  # diffusers' forward
            variants.append((f"{name} (diffusers' blocks and feed-forwards)", unfused))
    with context:
        for name, transformer in variants:
            compile_blocks(transformer)
            print(f"{name} (attention {args.attention}):")
            by_kind = profile_step(transformer, inputs)
            total = sum(by_kind.values())
            print(f"  kernel time {total:.1f} ms: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(by_kind.items())))


if __name__ == "__main__":
    main()
