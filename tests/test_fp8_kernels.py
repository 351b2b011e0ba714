"""The fused FP8 feed-forward (models/fp8_feedforward.py) and its Triton kernel (models/fp8_kernels.py):
where it applies, that checkpoint names survive it, and on a GPU that it computes what the unfused
code computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.fp8 import Fp8Linear, Fp8Spec, quantize
from models.fp8_feedforward import Fp8GeluFeedForward, fuse_feed_forwards
from models.precision import apply_policy, load_policy


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
    from models import fp8_kernels

    torch.manual_seed(0)
    x = torch.randn(300, 2432, device="cuda", dtype=torch.bfloat16) * 4
    bias = torch.randn(2432, device="cuda", dtype=torch.bfloat16)
    for with_bias, gelu in ((False, False), (True, True)):
        want_in = x + bias if with_bias else x
        want_in = F.gelu(want_in, approximate="tanh") if gelu else want_in
        want_q, want_scale = quantize(want_in, "e4m3fn", per_row=True)
        q, scale = fp8_kernels.quantize_rows(x, torch.float8_e4m3fn, bias if with_bias else None, gelu)
        assert q.shape == want_q.shape and scale.shape == want_scale.shape == (300, 1)
        differ = (q.view(torch.uint8) != want_q.view(torch.uint8)).float().mean().item()
        got_values, want_values = q.float() * scale, want_q.float() * want_scale
        # Within half an FP8 step (2^-4 of the row's amax) of the exact input: a missing bias or GELU is far off.
        error = ((got_values - want_in.float()).abs() / want_in.float().abs().amax(1, keepdim=True)).max().item()
        assert error <= 2**-4 + 1e-3, (with_bias, gelu, error)
        if gelu:  # the approximate tanh moves some values across a bf16 rounding boundary (and some amax)
            assert differ < 2e-2, differ
            assert torch.allclose(scale, want_scale, rtol=1e-2)
            assert torch.allclose(got_values, want_values, rtol=0.13, atol=float(want_scale.max()) * 2)
        else:
            assert differ < 1e-4 and torch.equal(scale, want_scale), differ


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
