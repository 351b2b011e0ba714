"""The FP8 engine beyond the basics: per-block scales, static calibration, explain, checkpoints,
ComfyUI scaled-FP8 import, and the other model sources."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evals.candidates import build_candidate, calibrate, candidate_from_checkpoint
from evals.cli import main
from evals.generation import generate
from evals.models.checkpoints import import_comfy_scaled_fp8, load_quantized_transformer, save_quantized_transformer
from evals.models.fp8 import Fp8Linear, Fp8Spec, dequantize, quantize, quantize_blocks
from evals.models.precision import POLICY_DIR, apply_policy, load_policy, shipped_policies
from evals.models.sources import load_source
from evals.models.tiny import TRANSFORMER_CONFIG
from evals.models.yamlspec import InputError
from evals.suite_types import Case, Generation, Sample
from tests.conftest import REPO, TEST_SUITES, write
from tests.sd3_original_keys import to_original_keys

GEN = Generation(height=64, width=64, steps=2, guidance=4.5, batch_size=2)
LAYERS = TRANSFORMER_CONFIG["num_layers"]
BATCH = [Sample(Case("a", "a red cube on a table", (0,)), 0), Sample(Case("b", "a dark forest", (3,)), 3)]
LARGE = str(REPO / "models" / "configs" / "sd35-large")
MEDIUM = str(REPO / "models" / "configs" / "sd35-medium")


def test_per_block_scales_are_per_tile() -> None:
    torch.manual_seed(0)
    w = torch.randn(300, 200)
    w[:128, :128] *= 1e5  # one tile of outliers
    q, scale = quantize_blocks(w, "e4m3fn", 128)
    assert scale.shape == (3, 2)
    back = dequantize(q, scale, block=128)
    error = lambda a: ((a - w)[200:, 150:].norm() / w[200:, 150:].norm()).item()  # noqa: E731 - far from the outliers
    q_t, s_t = quantize(w, "e4m3fn", per_row=False)
    assert error(back) < 0.03 and error(dequantize(q_t, s_t)) > 10 * error(back)
    assert ((back - w).abs() <= w.abs() * 2**-4 * 1.0001 + 1e-30 + scale.max() * 2**-9).all()


def test_static_layer_uses_its_calibrated_scale() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    spec = Fp8Spec(weights="per_tensor", activations="static")
    layer = Fp8Linear.from_linear(linear, spec, "emulated", input_amax=4.0)
    assert layer.input_scale is not None and layer.input_scale.item() == pytest.approx(4.0 / 448)
    x = torch.randn(5, 64).clamp(-4, 4)
    torch.testing.assert_close(layer(x), linear(x), rtol=0.1, atol=0.05)
    # Inputs beyond the calibrated range saturate instead of overflowing.
    assert torch.isfinite(layer(x * 1000)).all()
    torch.testing.assert_close(
        Fp8Linear.from_linear(linear, spec, "scaled_mm", input_amax=4.0)(x), layer(x), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(ValueError, match="calibrated"):
        Fp8Linear.from_linear(linear, spec, "emulated")
    on_meta = Fp8Linear.from_linear(torch.nn.Linear(64, 32, device="meta"), spec, "emulated", input_amax=4.0)
    assert on_meta.input_scale is not None and on_meta.input_scale.device.type == "meta"  # follows the weight


def test_calibration_is_stable(tiny_model, tmp_path: Path) -> None:
    policy = load_policy("fp8-e4m3-tensor-static")
    first, second = calibrate(tiny_model, policy, GEN), calibrate(tiny_model, policy, GEN)
    assert first == second  # deterministic
    assert len(first) == 85 and all(v > 0 for v in first.values())
    text = Path(policy.path).read_text().replace("calibration: {prompts: 8", "calibration: {prompts: 4")
    fewer = calibrate(tiny_model, load_policy(str(write(tmp_path / "static4.yaml", text))), GEN)
    # Half the prompts: every layer's range is at most as large, and of the same order.
    assert all(0.5 * first[k] <= fewer[k] <= first[k] for k in first)


def test_static_policy_runs_end_to_end_and_stores_its_scales(workdir: Path) -> None:
    assert main(
        ["run", str(TEST_SUITES / "smoke.yaml"), "--policy", "fp8-e4m3-tensor-static", "--no-mlflow", "--no-progress"]
    ) in (0, 1)
    (run_dir,) = (workdir / "runs").iterdir()
    scales = json.loads((run_dir / "calibration" / "fp8-e4m3-tensor-static.json").read_text())
    assert len(scales) == 85 and all(key.startswith("transformer.") for key in scales)
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    assert all(15 < r["metrics"]["psnr"] < 100 for r in records)


def test_t5_can_be_dropped() -> None:
    from transformers import T5Config, T5EncoderModel

    policy_text = "name: no-t5\ncomponents:\n  text_encoder_3: {drop: true}\n"
    t5 = T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    components = {"text_encoder_3": t5, "tokenizer_3": object(), "transformer": None}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        policy = load_policy(str(write(Path(tmp) / "p.yaml", policy_text)))
        out, plan = apply_policy(policy, components)
        assert out["text_encoder_3"] is None and out["tokenizer_3"] is None and plan == []
        with pytest.raises(InputError, match="takes no other settings"):
            load_policy(
                str(write(Path(tmp) / "q.yaml", policy_text.replace("drop: true", "drop: true, dtype: float16")))
            )


def test_all_shipped_policies_load_and_apply(tiny_model) -> None:
    assert {
        "bf16",
        "fp8-e4m3-rowwise",
        "fp8-e4m3-tensor-static",
        "fp8-e4m3-weight-only",
        "fp8-e5m2-rowwise",
        "fp8-all-linears",
    } <= set(shipped_policies())
    for name in shipped_policies():
        policy = load_policy(name)
        assert Path(policy.path).read_text().startswith("#"), f"{name}: say what it mirrors in a comment"
        try:
            candidate = build_candidate(tiny_model, policy, GEN)
        except InputError as exc:  # only torchao's float8 dynamic recipes may refuse a CPU, and say why
            assert "torchao's float8 dynamic recipes need a CUDA GPU" in str(exc) and not torch.cuda.is_available()
            continue
        images = generate(candidate.pipeline, BATCH, GEN)
        assert torch.isfinite(images).all(), name


def test_explain_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "explain", "fp8-e4m3-rowwise"]) == 0
    out = capsys.readouterr().out
    assert "transformer_blocks.0.attn.to_q" in out and "proj_out" in out
    assert "85/92 linear layers in FP8" in out
    assert main(["policy", "explain", "fp8-e4m3-rowwise", "--model", LARGE, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    totals = data["totals"]
    # SD3.5-Large: 8.1 B parameters, 15 GiB in bf16; FP8 linears halve it.
    assert 14.5 < totals["bytes_before"] / 2**30 < 15.5 and 7.2 < totals["bytes_after"] / 2**30 < 8.3
    assert totals["fp8_param_share"] > 0.99 and len(data["layers"]) == totals["linear_layers"] == 536
    assert {layer["backend"] for layer in data["layers"]} == {"scaled_mm", "keep"}
    assert main(["policy", "explain", "fp8-e4m3-rowwise", "--model", MEDIUM]) == 0
    assert "attn2.to_q" in capsys.readouterr().out  # SD3.5-Medium's dual-attention blocks


def test_quantized_checkpoint_round_trip_is_bit_exact(workdir: Path, tiny_model) -> None:
    policy = load_policy("fp8-e4m3-rowwise")
    candidate = build_candidate(tiny_model, policy, GEN)
    path = workdir / "fp8.safetensors"
    save_quantized_transformer(
        candidate.pipeline.transformer, path, policy_name=policy.name, policy_sha256=policy.sha256
    )
    stored = load_file(str(path))
    assert stored["transformer_blocks.0.attn.to_q.weight_fp8"].dtype == torch.float8_e4m3fn
    loaded, meta = load_quantized_transformer(path, tiny_model.pipeline.transformer, torch.device("cpu"))
    assert meta["policy_sha256"] == policy.sha256
    original = candidate.pipeline.transformer.state_dict()
    assert set(loaded.state_dict()) == set(original)
    for key, value in loaded.state_dict().items():
        assert value.dtype == original[key].dtype and torch.equal(
            value.view(torch.uint8) if value.dtype.itemsize == 1 else value,
            original[key].view(torch.uint8) if value.dtype.itemsize == 1 else original[key],
        ), key
    from_file = candidate_from_checkpoint(tiny_model, path)
    assert from_file.name == policy.name and from_file.backends == candidate.backends == "keep:7,scaled_mm:85"
    assert torch.equal(generate(from_file.pipeline, BATCH, GEN), generate(candidate.pipeline, BATCH, GEN))


def test_quantize_then_run_the_checkpoint_as_a_candidate(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = workdir / "ckpt" / "tiny-rowwise.safetensors"
    assert main(["quantize", "fp8-e4m3-rowwise", "--out", str(out)]) == 0
    args = ["run", str(TEST_SUITES / "smoke.yaml"), "--no-mlflow", "--no-progress", "--policy", "fp8-e4m3-rowwise"]
    # The file names the policy it was made from: beside that policy, it needs a name of its own.
    assert main([*args, "--candidate-checkpoint", str(out)]) == 2
    assert "two candidates are named fp8-e4m3-rowwise: name checkpoints with --candidate-checkpoint NAME=FILE" in (
        capsys.readouterr().err
    )
    assert not (workdir / "runs").exists()
    assert main([*args, "--candidate-checkpoint", f"mine={out}"]) == 0
    (run_dir,) = (workdir / "runs").iterdir()
    records = [json.loads(x) for x in (run_dir / "records.jsonl").read_text().splitlines()]
    by_candidate = {
        name: [r["metrics"] for r in records if r["policy"] == name] for name in ("mine", "fp8-e4m3-rowwise")
    }
    assert len(by_candidate["mine"]) == 16
    assert by_candidate["mine"] == by_candidate["fp8-e4m3-rowwise"]  # the checkpoint is the policy, bit for bit
    run = json.loads((run_dir / "run.json").read_text())
    assert {p["name"]: p["checkpoint"] for p in run["policies"]}["mine"] == str(out)


def comfy_file(transformer: torch.nn.Module, path: Path, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A ComfyUI-style scaled-FP8 file: original SD3 keys, per-tensor FP8 weights, scale_weight, marker."""
    original = to_original_keys(
        {k: v.detach() for k, v in transformer.state_dict().items()}, num_layers=TRANSFORMER_CONFIG["num_layers"]
    )
    out: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, value in original.items():
        if key.endswith(".weight") and value.ndim == 2 and not key.startswith(skip):
            q, scale = quantize(value, "e4m3fn", per_row=False)
            out[f"model.diffusion_model.{key}"] = q
            out[f"model.diffusion_model.{key.removesuffix('.weight')}.scale_weight"] = scale.reshape(())
        else:
            out[f"model.diffusion_model.{key}"] = value.to(torch.bfloat16).float()
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return out


def test_comfy_scaled_fp8_file_imports_as_it_is(tmp_path: Path, tiny_model) -> None:
    reference = tiny_model.pipeline.transformer
    path = tmp_path / "sd3_tiny_fp8_scaled.safetensors"
    written = comfy_file(reference, path, skip=("final_layer", "x_embedder"))
    transformer, meta = import_comfy_scaled_fp8(path, reference, torch.device("cpu"))
    assert meta["format"] == "comfyui-scaled-fp8"
    layers = {n: m for n, m in transformer.named_modules() if isinstance(m, Fp8Linear)}
    # final_layer (proj_out and norm_out.linear) was left in high precision.
    assert len(layers) == 90 and "proj_out" not in layers and "norm_out.linear" not in layers
    # Fused qkv rows land in to_q/to_k/to_v with the fused tensor's scale, bytes unchanged.
    qkv = written["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]
    to_k = layers["transformer_blocks.0.attn.to_k"]
    assert torch.equal(to_k.weight_fp8.view(torch.uint8), qkv[128:256].view(torch.uint8))
    assert (
        to_k.weight_scale.item() == written["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.scale_weight"].item()
    )
    assert all(m.backend == "weight_only" and m.spec.weights == "per_tensor" for m in layers.values())
    # It matches the same model quantized per tensor by this tool (weights within an FP8 step).
    for name, layer in layers.items():
        w = reference.get_submodule(name).weight.detach()
        assert (layer.dequantized_weight() - w).abs().max() <= w.abs().max() * 2**-4, name
    candidate = candidate_from_checkpoint(tiny_model, path)
    images, ref = generate(candidate.pipeline, BATCH, GEN), generate(tiny_model.pipeline, BATCH, GEN)
    mse = ((images - ref) ** 2).mean().item()
    assert 0 < mse < 1e-4


def test_comfy_file_with_static_input_scales(tmp_path: Path, tiny_model) -> None:
    path = tmp_path / "scaled.safetensors"
    written = comfy_file(tiny_model.pipeline.transformer, path)
    for key in [k for k in written if k.endswith(".scale_weight")]:
        written[key.replace(".scale_weight", ".scale_input")] = torch.tensor(0.05)
    save_file({k: v.contiguous() for k, v in written.items()}, str(path))
    transformer, _ = import_comfy_scaled_fp8(path, tiny_model.pipeline.transformer, torch.device("cpu"))
    layers = [m for m in transformer.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 92 and all(
        m.spec.activations == "static" and m.input_scale.item() == pytest.approx(0.05) for m in layers
    )


def test_bad_checkpoints_are_input_errors(tmp_path: Path, tiny_model) -> None:
    reference = tiny_model.pipeline.transformer
    pickle_file = tmp_path / "model.ckpt"
    torch.save({"a": torch.zeros(1)}, pickle_file)
    with pytest.raises(InputError, match=r"only \.safetensors"):
        load_quantized_transformer(pickle_file, reference, torch.device("cpu"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_quantized_transformer(junk, reference, torch.device("cpu"))
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(InputError, match="not a quantized transformer written by this tool"):
        load_quantized_transformer(plain, reference, torch.device("cpu"))
    other = tmp_path / "other.safetensors"
    cand = build_candidate(tiny_model, load_policy("fp8-e4m3-rowwise"), GEN).pipeline.transformer
    cand_small = copy.deepcopy(cand)
    cand_small.transformer_blocks = cand_small.transformer_blocks[:1]  # another architecture
    save_quantized_transformer(cand_small, other, policy_name="x", policy_sha256="y")
    with pytest.raises(InputError, match="does not fit this model's transformer"):
        load_quantized_transformer(other, reference, torch.device("cpu"))


def test_single_file_transformer_with_a_config_folder(tmp_path: Path, tiny_model) -> None:
    folder = tmp_path / "sd3"
    tiny_model.pipeline.save_pretrained(folder, safe_serialization=True)
    transformer_file = tmp_path / "transformer-only.safetensors"
    sd = {k: v.contiguous() for k, v in tiny_model.pipeline.transformer.state_dict().items()}
    for name, original_keys in (("diffusers keys", sd), ("original SD3 keys", None)):
        tensors = original_keys or {
            f"model.diffusion_model.{k}": v.contiguous() for k, v in to_original_keys(sd, num_layers=LAYERS).items()
        }
        save_file(tensors, str(transformer_file))
        loaded = load_source(str(transformer_file), "float32", "cpu", config=str(folder))
        assert torch.equal(generate(loaded.pipeline, BATCH, GEN), generate(tiny_model.pipeline, BATCH, GEN)), name
        assert loaded.fingerprint.startswith("file:transformer-only.safetensors")
    with pytest.raises(InputError, match="needs --model-config"):
        load_source(str(transformer_file))
    with pytest.raises(InputError, match=r"missing .*model_index.json"):
        load_source(str(transformer_file), config=str(tmp_path))


def test_hf_cache_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model) -> None:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--stabilityai--tiny-sd3" / "snapshots" / "0123abcd"
    tiny_model.pipeline.save_pretrained(snapshot, safe_serialization=True)
    (cache / "models--stabilityai--tiny-sd3" / "refs").mkdir()
    (cache / "models--stabilityai--tiny-sd3" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    loaded = load_source("stabilityai/tiny-sd3", "float32", "cpu")
    assert torch.equal(generate(loaded.pipeline, BATCH, GEN), generate(tiny_model.pipeline, BATCH, GEN))
    with pytest.raises(
        InputError, match=r"nor in the Hugging Face cache \(.*hub\); .*`huggingface-cli download stabilityai/absent`"
    ):
        load_source("stabilityai/absent")


def test_shipped_policy_files_are_valid_via_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", *map(str, sorted(POLICY_DIR.glob("*.yaml")))]) == 0
    assert capsys.readouterr().out.count("ok") == len(shipped_policies())
