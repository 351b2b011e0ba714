"""The fused FP8 joint block (evals/models/fp8_block.py) and its LayerNorm-modulate-quantize kernel
(models/fp8_kernels.norm_quantize): which blocks get it, that names and CPU results survive it, and
on a GPU that it computes what diffusers' block computes, eager and compiled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.models.attention import JointTransformerBlock

from evals.models.fp8_block import Fp8JointTransformerBlock, fusable, fuse_blocks, unfuse_blocks
from evals.models.precision import apply_policy, load_policy
from tests.conftest import write
from tests.kernel_checks import check_norm_quantize, check_quantize_heads


def sd3_transformer(device: str, dtype: torch.dtype, dual: tuple[int, ...] = (0,)) -> torch.nn.Module:
    """Three blocks (a dual-attention one, a plain one, the last `context_pre_only` one), GEMM-sized sides."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        num_layers=3,
        attention_head_dim=64,
        num_attention_heads=2,
        joint_attention_dim=64,
        caption_projection_dim=128,
        pooled_projection_dim=32,
        out_channels=16,
        qk_norm="rms_norm",
        dual_attention_layers=dual,
    )
    return model.to(device, dtype).eval()


def inputs(device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator(device).manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)  # noqa: E731
    return {
        "hidden_states": rand(2, 16, 16, 16),
        "encoder_hidden_states": rand(2, 24, 64),
        "pooled_projections": rand(2, 32),
        "timestep": torch.full((2,), 500.0, device=device, dtype=dtype),
    }


def rowwise(transformer: torch.nn.Module) -> torch.nn.Module:
    return apply_policy(load_policy("fp8-e4m3-rowwise"), {"transformer": transformer})[0]["transformer"]


def fp8_gemm_on_cpu() -> bool:
    from evals.models.fp8 import scaled_mm_runs

    return scaled_mm_runs("cpu", None, "e4m3fn", torch.float32)


needs_cpu_fp8_gemm = pytest.mark.skipif(not fp8_gemm_on_cpu(), reason="torch._scaled_mm does not run on this CPU")


def unfused(transformer: torch.nn.Module) -> torch.nn.Module:
    unfuse_blocks(transformer)
    return transformer


@needs_cpu_fp8_gemm
def test_every_row_wise_block_is_fused_and_keeps_its_names_and_cpu_result() -> None:
    reference = sd3_transformer("cpu", torch.float32)
    candidate = rowwise(reference)
    assert all(type(b) is Fp8JointTransformerBlock for b in candidate.transformer_blocks)
    assert fuse_blocks(candidate) == 0  # fused once
    plain = rowwise(reference)
    assert unfuse_blocks(plain) == 3 and unfuse_blocks(plain) == 0
    assert all(type(b) is JointTransformerBlock for b in plain.transformer_blocks)
    assert list(candidate.state_dict()) == list(plain.state_dict())
    with torch.inference_mode():  # on the CPU the block runs diffusers' code
        assert torch.equal(candidate(**inputs("cpu", torch.float32))[0], plain(**inputs("cpu", torch.float32))[0])


def policy(tmp_path: Path, activations: str, keep: str = "", rule: str = "precision: keep") -> Path:
    rules = f'    rules: [{{match: "{keep}", {rule}}}]\n' if keep else ""
    return write(
        tmp_path / f"{activations}-{len(keep)}-{len(rule)}.yaml",
        "name: test\ncomponents:\n  transformer:\n"
        f"    default: {{format: e4m3fn, weights: per_channel, activations: {activations}}}\n{rules}",
    )


@needs_cpu_fp8_gemm
def test_blocks_with_other_linears_are_left_alone(tmp_path: Path) -> None:
    reference = sd3_transformer("cpu", torch.float32)
    assert fuse_blocks(reference) == 0  # float linears
    one_kept = load_policy(str(policy(tmp_path, "dynamic_per_token", keep="transformer_blocks.1.attn.to_k")))
    candidate = apply_policy(one_kept, {"transformer": reference})[0]["transformer"]
    assert [type(b) is Fp8JointTransformerBlock for b in candidate.transformer_blocks] == [True, False, True]
    other_format = load_policy(str(policy(tmp_path, "dynamic_per_token", "transformer_blocks.1.ff.*", "format: e5m2")))
    candidate = apply_policy(other_format, {"transformer": reference})[0]["transformer"]
    if candidate.transformer_blocks[1].ff.net[2].backend == "scaled_mm":  # e5m2 GEMMs run here: only the format differs
        assert [type(b) is Fp8JointTransformerBlock for b in candidate.transformer_blocks] == [True, False, True]
    per_tensor = load_policy(str(policy(tmp_path, "dynamic_per_tensor")))
    candidate = apply_policy(per_tensor, {"transformer": reference})[0]["transformer"]
    assert not any(type(b) is Fp8JointTransformerBlock or fusable(b) for b in candidate.transformer_blocks)


@pytest.mark.gpu
def test_norm_quantize_kernel_matches_the_torch_code() -> None:
    check_norm_quantize("cuda", exact=True)


@pytest.mark.gpu
def test_head_quantization_reads_a_slice_of_the_attention_output() -> None:
    check_quantize_heads("cuda", exact=True)


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_fused_blocks_match_diffusers_blocks(compiled: bool) -> None:
    reference = sd3_transformer("cuda", torch.bfloat16)
    fused = rowwise(reference)
    if type(fused.transformer_blocks[0]) is not Fp8JointTransformerBlock:
        pytest.skip(f"no FP8 GEMM on {torch.cuda.get_device_name()}")
    plain = unfused(rowwise(reference))
    if compiled:
        from evals.compiling import compile_blocks

        compile_blocks(fused)
        compile_blocks(plain)
    with torch.inference_mode():
        want = reference(**inputs("cuda", torch.bfloat16))[0].float()
        got = fused(**inputs("cuda", torch.bfloat16))[0].float()
        baseline = plain(**inputs("cuda", torch.bfloat16))[0].float()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    # The fused blocks are as far from bf16 as diffusers' blocks on the same FP8 layers, and near them.
    assert rel(got, baseline) < 2e-2
    assert rel(got, want) < 1.5 * rel(baseline, want) + 1e-3
