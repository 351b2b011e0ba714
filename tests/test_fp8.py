from __future__ import annotations

import pytest
import torch

from evals.models.fp8 import FORMATS, Fp8Linear, Fp8Spec, dequantize, fp8_max, quantize, resolve_backend
from evals.models.yamlspec import InputError

# Relative rounding error bound: half a unit in the last place, 2^-(mantissa bits + 1).
HALF_ULP = {"e4m3fn": 2.0**-4, "e5m2": 2.0**-3}


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("per_row", [True, False])
def test_quantize_error_within_format_bound(fmt: str, per_row: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 128, dtype=torch.float64) * torch.logspace(-2, 2, 64, dtype=torch.float64)[:, None]
    q, scale = quantize(x, fmt, per_row)
    assert q.dtype == FORMATS[fmt] and scale.shape == ((64, 1) if per_row else (1, 1))
    back = dequantize(q, scale, torch.float64)
    # Values in the normal range round to within half an ulp; below it the absolute subnormal step rules.
    tiny = torch.finfo(FORMATS[fmt]).smallest_normal * scale
    bound = torch.maximum(x.abs() * HALF_ULP[fmt], tiny.to(torch.float64) * 0.5 * 2.0**-2) * 1.0001
    assert ((back - x).abs() <= bound).all()


def test_e4m3_saturates_at_448_and_e5m2_stays_finite() -> None:
    assert fp8_max("e4m3fn") == 448.0
    x = torch.tensor([[1.0, 1000.0, -5000.0]])
    # With a fixed scale of 1, values past the max clamp to +-max instead of turning into NaN/inf.
    limit = fp8_max("e4m3fn")
    assert (x.clamp(-limit, limit).to(torch.float8_e4m3fn).float() == torch.tensor([[1.0, 448.0, -448.0]])).all()
    q, scale = quantize(torch.tensor([[1e30, -3.0]]), "e5m2", per_row=True)
    assert torch.isfinite(dequantize(q, scale)).all()


def outlier_errors(factor: float) -> dict[bool, float]:
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    w[:4] *= factor
    errors = {}
    for per_row in (True, False):
        q, scale = quantize(w, "e4m3fn", per_row)
        errors[per_row] = ((dequantize(q, scale) - w)[4:].norm() / w[4:].norm()).item()
    return errors


def test_per_channel_beats_per_tensor_on_outlier_rows() -> None:
    # E4M3's exponent range absorbs 100x outlier rows with a shared scale (measured: 2.5% vs 2.6%);
    # from ~1e4x the ordinary rows fall into subnormals and per-tensor scaling breaks down.
    moderate, extreme = outlier_errors(200), outlier_errors(1e5)
    assert moderate[True] < moderate[False] < moderate[True] * 1.2
    assert extreme[True] < 0.03 and extreme[False] > 10 * extreme[True]


@pytest.mark.parametrize("activations", ["dynamic_per_token", "dynamic_per_tensor"])
@pytest.mark.parametrize("weights", ["per_channel", "per_tensor"])
def test_scaled_mm_matches_emulated_on_cpu(activations: str, weights: str) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(2, 7, 64)
    spec = Fp8Spec(weights=weights, activations=activations)
    real, emulated = Fp8Linear.from_linear(linear, spec, "scaled_mm"), Fp8Linear.from_linear(linear, spec, "emulated")
    out_real, out_emulated = real(x), emulated(x)
    assert out_real.shape == (2, 7, 48)
    torch.testing.assert_close(out_real, out_emulated, rtol=1e-4, atol=1e-4)
    exact = linear(x)
    rel = ((out_real - exact).norm() / exact.norm()).item()
    assert 1e-4 < rel < 0.06  # really quantized, and still close


def test_weight_only_leaves_activations_alone() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16, bias=False)
    layer = Fp8Linear.from_linear(linear, Fp8Spec(activations="none"), "weight_only")
    x = torch.randn(3, 32)
    expected = x @ dequantize(layer.weight_fp8, layer.weight_scale).t()
    torch.testing.assert_close(layer(x), expected)


def test_backend_resolution() -> None:
    cpu, f32 = torch.device("cpu"), torch.float32
    assert resolve_backend(Fp8Spec(backend="auto"), (64, 64), cpu, f32) == "scaled_mm"  # the CPU kernel counts
    assert resolve_backend(Fp8Spec(activations="none"), (64, 64), cpu, f32) == "weight_only"
    assert resolve_backend(Fp8Spec(backend="emulated"), (64, 64), cpu, f32) == "emulated"
    assert resolve_backend(Fp8Spec(backend="auto"), (10, 20), cpu, f32) == "emulated"
    assert resolve_backend(Fp8Spec(weights="per_block"), (64, 64), cpu, f32) == "emulated"
    assert resolve_backend(Fp8Spec(), (64, 64), torch.device("meta"), f32) == "emulated"
    with pytest.raises(InputError, match="scaled_mm cannot run this layer: the GEMM kernels need sides"):
        resolve_backend(Fp8Spec(backend="scaled_mm"), (10, 20), cpu, f32)


@pytest.mark.gpu
def test_scaled_mm_matches_emulated_on_gpu() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 512).cuda().to(torch.bfloat16)
    x = torch.randn(4, 77, 1024, device="cuda", dtype=torch.bfloat16)
    spec = Fp8Spec()
    backend = resolve_backend(spec, (512, 1024), linear.weight.device, torch.bfloat16)
    if backend != "scaled_mm":
        pytest.skip(f"no FP8 GEMM on {torch.cuda.get_device_name()}")
    real = Fp8Linear.from_linear(linear, spec, "scaled_mm")(x)
    emulated = Fp8Linear.from_linear(linear, spec, "emulated")(x)
    rel = ((real.float() - emulated.float()).norm() / emulated.float().norm()).item()
    print(f"scaled_mm vs emulated relative error on {torch.cuda.get_device_name()}: {rel:.2e}")
    assert rel < 1e-2
