"""Row-wise FP8 activation quantization on the GPU: inductor's fusion of the eager code against the
Triton kernels of `evals/models/fp8_kernels.py`, on SD3.5-Large's shapes (1024x1024, batch 2: 8858 tokens;
rows of 2432 before attention and the MLP, 9728 between the MLP's GEMMs with bias and tanh-GELU).
Prints milliseconds, effective bandwidth and whether the FP8 bytes and scales equal the eager code's;
then the LayerNorm + modulation + quantization kernel of `evals/models/fp8_block.py` against inductor's.

    python benchmarks/quant_kernels.py [--tokens 8858]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from evals.bench import BenchSetup, capture_step, time_calls
from evals.models import fp8, fp8_kernels


def eager(x: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if bias is not None:
        x = x + bias
    if gelu:
        x = F.gelu(x, approximate="tanh")
    return fp8.quantize(x, "e4m3fn", per_row=True)


def triton_path(x: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return fp8_kernels.quantize_rows(x, torch.float8_e4m3fn, bias, gelu)


def milliseconds(fn, *args, iters: int = 50) -> float:
    _, times = time_calls(lambda: fn(*args), BenchSetup(warmup=5, iters=iters), "cuda")
    return statistics.median(times)


def sweep(x: torch.Tensor, bias: torch.Tensor | None, gelu: bool, moved: float) -> None:
    """The raw kernel under several launch configurations, 20 launches per timing (no Python
    dispatch in the figure)."""
    import triton

    from evals.models.fp8_triton import quantize_rows_kernel as kernel

    rows, cols = x.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, 1, device=x.device)
    block_cols = triton.next_power_of_2(cols)
    for block_rows in (1, 2, 4):
        for warps in (4, 8, 16):

            def launch(block_rows=block_rows, warps=warps):
                for _ in range(20):
                    kernel[(triton.cdiv(rows, block_rows),)](  # type: ignore[index]
                        x,
                        x if bias is None else bias,
                        q,
                        scale,
                        rows,
                        cols,
                        x.stride(0),
                        FP8_MAX=448.0,
                        HAS_BIAS=bias is not None,
                        GELU=gelu,
                        BLOCK_ROWS=block_rows,
                        BLOCK_COLS=block_cols,
                        num_warps=warps,
                    )

            ms = milliseconds(launch, iters=10) / 20
            print(f"    rows/program {block_rows} warps {warps:2}: {ms:.4f} ms {moved / ms:5.2f} TB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8858)
    args = parser.parse_args()
    torch.manual_seed(0)
    for cols, with_bias, gelu in ((2432, False, False), (9728, True, True), (9728, False, False)):
        x = torch.randn(args.tokens, cols, device="cuda", dtype=torch.bfloat16) * 3
        bias = torch.randn(cols, device="cuda", dtype=torch.bfloat16) if with_bias else None
        moved = x.numel() * (x.element_size() + 1) / 1e9  # read bf16, write fp8
        want = eager(x, bias, gelu)
        label = f"{args.tokens}x{cols}{' +bias' if with_bias else ''}{' gelu' if gelu else ''}"
        for name, fn in (
            ("eager", eager),
            ("inductor", torch.compile(eager, dynamic=False)),
            ("triton", triton_path),
            ("triton in a compiled graph", torch.compile(triton_path, dynamic=False)),
        ):
            got = fn(x, bias, gelu)
            same_q = torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
            mismatched = (got[0].view(torch.uint8) != want[0].view(torch.uint8)).float().mean().item()
            same_scale = torch.equal(got[1], want[1])
            ms = milliseconds(fn, x, bias, gelu)
            print(
                f"{label:28s} {name:27s} {ms:7.3f} ms {moved / ms:6.2f} TB/s  "
                f"fp8 bytes equal: {same_q} ({mismatched:.2e} differ)  scales equal: {same_scale}"
            )
        sweep(x, bias, gelu, moved)
    norm_kernels()


def norm_kernels(batch: int = 2, tokens: int = 4096, cols: int = 2432) -> None:
    """LayerNorm + modulation (+ the residual update before it) + row quantization of one Large image
    stream: inductor's fusion of the eager code against `fp8_kernels.norm_quantize`, 20 calls replayed
    from a CUDA graph per timing (GPU time, no Python dispatch: in a step both run inside a graph)."""
    x = torch.randn(batch, tokens, cols, device="cuda", dtype=torch.bfloat16)
    delta = torch.randn(batch, tokens + 333, cols, device="cuda", dtype=torch.bfloat16)[:, :tokens]
    emb = torch.randn(batch, 6 * cols, device="cuda", dtype=torch.bfloat16)
    shift, scale, gate = emb[:, :cols], emb[:, cols : 2 * cols], emb[:, 2 * cols : 3 * cols]
    for residual in (False, True):
        moved = x.numel() * (2 + 1 + (4 if residual else 0)) / 1e9  # read x (+delta), write fp8 (+x)

        def eager_code(residual: bool = residual) -> tuple[torch.Tensor, ...]:
            h = x + gate[:, None] * delta if residual else x  # the updated stream is an output too
            y = F.layer_norm(h, (cols,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
            return h, *fp8.quantize(y.reshape(-1, cols), "e4m3fn", per_row=True)

        def kernel(residual: bool = residual) -> object:
            return fp8_kernels.norm_quantize(
                x, [(shift, scale)], torch.float8_e4m3fn, 1e-6, (delta, gate) if residual else None
            )

        label = f"norm+quantize {batch}x{tokens}x{cols}{' +residual' if residual else ''}"
        for name, fn in (("inductor", torch.compile(eager_code, dynamic=False)), ("triton", kernel)):
            fn()
            replay = capture_step(lambda fn=fn: [fn() for _ in range(20)])
            ms = milliseconds(replay, iters=10) / 20
            print(f"{label:40s} {name:9s} {ms * 1000:7.1f} us {moved / ms:6.2f} TB/s")


if __name__ == "__main__":
    main()
