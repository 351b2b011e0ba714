"""Would FP8 attention make SD3.5's step faster? cuDNN's FP8 SDPA (E4M3 Q, K, V and probabilities,
per-tensor scales, FP8 output as Hopper requires) against the bf16 SDPA the models run, at SD3.5's
attention shapes (1024x1024, batch 2, head_dim 64): kernel time (CUDA events, median), the time
to quantize Q, K and V for it, and each one's error against float32 SDPA.

    pip install nvidia-cudnn-frontend   # cuDNN's Python frontend; the project itself does not need it
    python benchmarks/fp8_attention.py
"""

from __future__ import annotations

import math
import statistics
import sys

import torch
import torch.nn.functional as F

from evals.bench import BenchSetup, time_calls

# (name, heads, tokens): 4096 image tokens; joint attention adds 333 text tokens (77 CLIP + 256 T5);
# Medium's second attention in its dual-attention blocks sees the image tokens alone.
SHAPES = [("Medium joint", 24, 4429), ("Medium image-only", 24, 4096), ("Large joint", 38, 4429)]
BATCH, HEAD_DIM = 2, 64


def median_ms(fn) -> float:
    """Median of 30 CUDA-event timings after a warm-up, as `evals bench` times a step."""
    return statistics.median(time_calls(fn, BenchSetup(warmup=5, iters=30), "cuda")[1])


def projections(heads: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v laid out as the model makes them, (b, t, h, d) viewed as (b, h, t, d); q and k
    RMS-normalized per head (with a norm weight of 2) as SD3.5's QK norms leave them."""
    gen = torch.Generator("cuda").manual_seed(0)

    def make(rms_norm: bool) -> torch.Tensor:
        x = torch.randn(BATCH, tokens, heads, HEAD_DIM, device="cuda", generator=gen)
        if rms_norm:
            x = 2.0 * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x.to(torch.bfloat16).transpose(1, 2)

    return make(True), make(True), make(False)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor E4M3: (FP8 values, float32 descale of shape (1, 1, 1, 1))."""
    descale = x.float().abs().amax().clamp(min=1e-12) / 448.0
    return (x.float() / descale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), descale.reshape(1, 1, 1, 1)


def cudnn_fp8_attention(cudnn, handle, q8: torch.Tensor) -> tuple:
    """A cuDNN graph for FP8 SDPA on tensors shaped and strided like q8; (graph, tensors, output, workspace)."""
    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
    q, k, v = (graph.tensor(name=n, dim=list(q8.shape), stride=list(q8.stride()), data_type=e4m3) for n in "qkv")
    scalar = {"dim": [1, 1, 1, 1], "stride": [1, 1, 1, 1], "data_type": fp32}
    names = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")
    scales = {n: graph.tensor(name=n, **scalar) for n in names}
    o, _, amax_s, amax_o = graph.sdpa_fp8(
        q=q, k=k, v=v, **scales, is_inference=True, attn_scale=1 / math.sqrt(HEAD_DIM), use_causal_mask=False
    )
    out = torch.empty_like(q8)
    o.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride())).set_data_type(e4m3)
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device="cuda")
    amaxes = {amax_s: torch.empty(1, 1, 1, 1, device="cuda"), amax_o: torch.empty(1, 1, 1, 1, device="cuda")}
    return graph, (q, k, v, scales, o, amaxes), out, workspace


def main() -> None:
    try:
        import cudnn
    except ImportError:
        sys.exit("needs cuDNN's Python frontend: pip install nvidia-cudnn-frontend")
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {cudnn.backend_version()}")
    print("| shape | bf16 SDPA ms | cuDNN FP8 ms | speed-up | + quantizing Q, K, V ms | error bf16 | error FP8 |")
    print("|---|---|---|---|---|---|---|")
    quantize_all = torch.compile(lambda q, k, v: (quantize(q), quantize(k), quantize(v)), dynamic=False)
    for name, heads, tokens in SHAPES:
        print(measure(cudnn, handle, quantize_all, name, heads, tokens))


def measure(cudnn, handle, quantize_all, name: str, heads: int, tokens: int) -> str:
    """One table row: both attentions at one shape."""
    q, k, v = projections(heads, tokens)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    (q8, dq), (k8, dk), (v8, dv) = quantize_all(q, k, v)
    graph, (tq, tk, tv, scales, to, amaxes), out, workspace = cudnn_fp8_attention(cudnn, handle, q8)
    # The output is FP8 on the scale of V: a convex combination of V's rows cannot exceed V's amax.
    one = torch.ones(1, 1, 1, 1, device="cuda")
    values = {"descale_q": dq, "descale_k": dk, "descale_v": dv, "descale_s": one, "scale_s": one, "scale_o": 1 / dv}
    pack = {tq: q8, tk: k8, tv: v8, to: out, **amaxes, **{scales[n]: t for n, t in values.items()}}
    fp8_ms = median_ms(lambda: graph.execute(pack, workspace, handle=handle))
    fp8_error = ((out.float() * dv - exact).norm() / exact.norm()).item()
    bf16_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    bf16_error = ((F.scaled_dot_product_attention(q, k, v).float() - exact).norm() / exact.norm()).item()
    quant_ms = median_ms(lambda: quantize_all(q, k, v))
    return (
        f"| {name} | {bf16_ms:.3f} | {fp8_ms:.3f} | {bf16_ms / fp8_ms:.2f}x | {quant_ms:.3f} "
        f"| {bf16_error:.1e} | {fp8_error:.1e} |"
    )


if __name__ == "__main__":
    main()
