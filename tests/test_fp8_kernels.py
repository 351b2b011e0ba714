"""The fused FP8 feed-forward (evals/models/fp8_feedforward.py) and its Triton kernel (evals/models/fp8_kernels.py):
where it applies, that checkpoint names survive it, and on a GPU that it computes what the unfused
code computes."""

from __future__ import annotations

import pytest
import torch

from evals.models.fp8 import Fp8Linear, Fp8Spec
from evals.models.fp8_feedforward import Fp8GeluFeedForward, fuse_feed_forwards
from evals.models.precision import apply_policy, load_policy
from tests.kernel_checks import check_quantize_rows


def feed_forward(dim: int = 64, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    return FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate").to(device, dtype).eval()


def quantized(ff: torch.nn.Module, backend: str, spec: Fp8Spec | None = None) -> torch.nn.ModuleDict:
    """{"ff": ff} with its linears in FP8 (a parent, for the wrapper to replace `ff` in)."""
    spec = spec or Fp8Spec()
    ff.net[0].proj = Fp8Linear.from_linear(ff.net[0].proj, spec, backend)
    ff.net[2] = Fp8Linear.from_linear(ff.net[2], spec, backend)
    return torch.nn.ModuleDict({"ff": ff})


def test_only_row_wise_fp8_gemm_feed_forwards_are_fused() -> None:
    assert fuse_feed_forwards(quantized(feed_forward(), "scaled_mm")) == 1
    assert fuse_feed_forwards(quantized(feed_forward(), "emulated")) == 0
    static = Fp8Spec(activations="dynamic_per_tensor")
    assert fuse_feed_forwards(quantized(feed_forward(), "scaled_mm", static)) == 0
    assert fuse_feed_forwards(torch.nn.ModuleDict({"ff": feed_forward()})) == 0  # plain linears


def test_fusing_keeps_names_and_the_cpu_result(tiny_model) -> None:
    transformer = tiny_model.pipeline.components["transformer"]
    policy = load_policy("fp8-e4m3-rowwise")
    fused = apply_policy(policy, {"transformer": transformer})[0]["transformer"]
    wrapped = [m for m in fused.modules() if isinstance(m, Fp8GeluFeedForward)]
    assert len(wrapped) == 2 * len(fused.transformer_blocks) - 1  # the last block has no context feed-forward
    unfused = apply_policy(policy, {"transformer": transformer})[0]["transformer"]
    for module in unfused.modules():
        if isinstance(module, Fp8GeluFeedForward):
            module.fused = False
    assert list(fused.state_dict()) == list(unfused.state_dict())
    assert "transformer_blocks.0.ff.net.0.proj.weight_fp8" in fused.state_dict()
    x = torch.randn(2, 10, transformer.config.num_attention_heads * transformer.config.attention_head_dim)
    block = fused.transformer_blocks[0]
    # On the CPU the wrapper runs diffusers' code: the same numbers as before wrapping.
    assert torch.equal(block.ff(x), unfused.transformer_blocks[0].ff(x))


@pytest.mark.gpu
def test_row_quantization_kernel_matches_the_torch_code() -> None:
    check_quantize_rows("cuda", exact=True)


@pytest.mark.gpu
def test_fused_feed_forward_matches_the_unfused_one_eager_and_compiled() -> None:
    parent = quantized(feed_forward(256, "cuda", torch.bfloat16), "scaled_mm")
    if parent["ff"].net[2].backend != "scaled_mm":
        pytest.skip(f"no FP8 GEMM on {torch.cuda.get_device_name()}")
    assert fuse_feed_forwards(parent) == 1
    wrapper = parent["ff"]
    assert isinstance(wrapper, Fp8GeluFeedForward)
    x = torch.randn(2, 333, 256, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        fused = wrapper(x)
        compiled = torch.compile(wrapper, fullgraph=True)(x)  # fullgraph: a graph break is an error
        wrapper.fused = False
        unfused = wrapper(x)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    assert rel(fused, unfused) < 1e-2
    assert rel(compiled, fused) < 1e-3
