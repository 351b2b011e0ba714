"""Checkpoints of every component: `evals quantize` saves the text encoders and the VAE a policy
quantizes, `--candidate-checkpoint` loads them back equal to the policy's build in memory; ComfyUI-
style files that carry CLIP-L, CLIP-G and T5 (all-in-one, or a T5 file of its own) are imported with
their FP8 bytes as they are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from evals.candidates import build_candidate, candidate_from_checkpoint
from evals.cli import main
from evals.generation import generate
from evals.models.checkpoints import COMPONENTS, load_checkpoint, save_policy_build
from evals.models.fp8 import Fp8Linear
from evals.models.precision import apply_policy, load_policy
from evals.models.tiny import TRANSFORMER_CONFIG
from evals.models.yamlspec import InputError
from evals.suite_types import Case, Generation, Sample
from tests.conftest import TEST_SUITES, write
from tests.sd3_original_keys import to_original_keys

GEN = Generation(64, 64, 2, 4.5, 2, max_sequence_length=8)
BATCH = [Sample(Case("red", "a red cube on a wooden table", ()), 0), Sample(Case("lake", "a calm lake", ()), 1)]
CPU = torch.device("cpu")
ALL_COMPONENTS = """name: fp8-everywhere
components:
  transformer:
    default: {format: e4m3fn, weights: per_channel, activations: dynamic_per_token}
    rules:
      - {match: "proj_out", precision: keep}
  text_encoder:
    default: {format: e4m3fn, weights: per_channel, activations: dynamic_per_token, backend: emulated}
  text_encoder_2:
    dtype: bfloat16
    default: {format: e4m3fn, weights: per_tensor, activations: none}
    rules:
      - {match: "text_projection", precision: keep}
  vae:
    default: {format: e5m2, weights: per_block, block_size: 16, activations: none}
"""
T5_POLICY = """name: fp8-t5
components:
  text_encoder_3:
    default: {format: e4m3fn, weights: per_channel, activations: dynamic_per_token, backend: emulated}
    rules:
      - {match: "encoder.block.0.layer.0.*", precision: keep}
"""


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype.itemsize == 1 else torch.equal(a, b)


def assert_same_module(loaded: Any, built: Any, name: str) -> None:
    """Same FP8 layers with the same settings, and every tensor the same bytes and dtype."""
    ours = {n: (m.spec, m.backend, m.compute_dtype) for n, m in loaded.named_modules() if isinstance(m, Fp8Linear)}
    theirs = {n: (m.spec, m.backend, m.compute_dtype) for n, m in built.named_modules() if isinstance(m, Fp8Linear)}
    assert ours == theirs, name
    a, b = loaded.state_dict(), built.state_dict()
    assert set(a) == set(b), name
    assert all(same_tensor(a[k], b[k]) for k in a), [k for k in a if not same_tensor(a[k], b[k])][:3]


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`evals quantize` of a policy that changes every component (a dtype too), and that policy's
    candidate built in memory."""
    folder = tmp_path_factory.mktemp("components")
    policy_file = write(folder / "fp8-everywhere.yaml", ALL_COMPONENTS)
    out = folder / "everything.safetensors"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert main(["quantize", str(policy_file), "--out", str(out)]) == 0
    built = build_candidate(tiny_model, load_policy(str(policy_file)), GEN)
    return {"path": out, "built": built, "policy": policy_file}


def test_quantize_saves_every_quantized_component(saved: dict[str, Any]) -> None:
    meta = metadata_of(saved["path"])
    assert meta["version"] == "2" and meta["policy"] == "fp8-everywhere" and json.loads(meta["dropped"]) == []
    parts = json.loads(meta["components"])
    assert sorted(parts) == sorted(["transformer", "text_encoder", "text_encoder_2", "vae"])
    assert parts["text_encoder_2"]["dtype"] == "bfloat16" and parts["text_encoder"]["dtype"] == "float32"
    assert "text_projection" not in parts["text_encoder_2"]["layers"] and len(parts["vae"]["layers"]) == 8
    with safe_open(str(saved["path"]), framework="pt") as f:
        key = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight_fp8"
        assert f.get_tensor(key).dtype == torch.float8_e4m3fn
        assert f.get_tensor("vae.decoder.mid_block.attentions.0.to_q.weight_fp8").dtype == torch.float8_e5m2


def test_the_loaded_checkpoint_is_the_policy_build(saved: dict[str, Any], tiny_model) -> None:
    built = saved["built"]
    loaded = candidate_from_checkpoint(tiny_model, saved["path"])
    assert loaded.name == built.name == "fp8-everywhere" and loaded.baseline_policy == "fp8-everywhere"
    for name in COMPONENTS:
        ours, theirs = loaded.pipeline.components.get(name), built.pipeline.components.get(name)
        if theirs is None:
            assert ours is None, name
            continue
        assert_same_module(ours, theirs, name)
    assert loaded.pipeline.text_encoder_2.dtype == torch.bfloat16
    # The FP8 layers of the plan, component by component, are the policy's.
    fp8 = lambda plan: {(p.component, p.name, p.spec, p.backend) for p in plan if p.spec}  # noqa: E731
    assert fp8(loaded.plan) == fp8(built.plan) and {p.component for p in loaded.plan} == set(COMPONENTS) - {
        "text_encoder_3"
    }
    images = generate(loaded.pipeline, BATCH, GEN)
    assert torch.equal(images, generate(built.pipeline, BATCH, GEN))
    assert not torch.equal(images, generate(tiny_model.pipeline, BATCH, GEN))


def test_a_transformer_only_policy_is_still_written_as_version_1(tiny_model, tmp_path: Path) -> None:
    policy = load_policy("fp8-e4m3-rowwise")
    built = build_candidate(tiny_model, policy, GEN)
    path = tmp_path / "rowwise.safetensors"
    assert save_policy_build(policy, built.pipeline.components, tiny_model.pipeline.components, path) == ["transformer"]
    meta = metadata_of(path)
    assert meta["version"] == "1" and "components" not in meta and "layers" in meta
    with safe_open(str(path), framework="pt") as f:
        assert "transformer_blocks.0.attn.to_q.weight_fp8" in f.keys()  # the old names, unprefixed


# --- T5, on a tiny T5 encoder of its own (the tiny pipeline has none) ------------------------------


@pytest.fixture(scope="module")
def t5() -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"
    )
    model = T5EncoderModel(config).eval()
    with torch.no_grad():  # norms away from 1, so that an FP8 cast of them shows
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


IDS = torch.tensor([[5, 9, 33, 2, 17, 1]])


def encode(module: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return module(IDS).last_hidden_state


def test_t5_rules_and_a_dropped_t5_are_saved_and_loaded(t5: torch.nn.Module, tiny_model, tmp_path: Path) -> None:
    reference = {"transformer": tiny_model.pipeline.transformer, "text_encoder_3": t5, "tokenizer_3": "t5-tokenizer"}
    policy = load_policy(str(write(tmp_path / "t5.yaml", T5_POLICY)))
    built, plan = apply_policy(policy, reference)
    assert {p.name for p in plan if p.spec is None} == {f"encoder.block.0.layer.0.SelfAttention.{n}" for n in "qkvo"}
    assert not torch.equal(encode(built["text_encoder_3"]), encode(t5))  # runs, FFN output layers (wo) in FP8 too
    path = tmp_path / "t5.safetensors"
    assert save_policy_build(policy, built, reference, path) == ["text_encoder_3"]
    loaded = load_checkpoint(path, reference, CPU)
    assert loaded.read == ("text_encoder_3",) and set(loaded.components) == {"text_encoder_3"}
    assert_same_module(loaded.components["text_encoder_3"], built["text_encoder_3"], "text_encoder_3")
    assert torch.equal(encode(loaded.components["text_encoder_3"]), encode(built["text_encoder_3"]))

    dropping = load_policy(
        str(
            write(
                tmp_path / "drop.yaml", ALL_COMPONENTS.split("  text_encoder:")[0] + "  text_encoder_3: {drop: true}\n"
            )
        )
    )
    built, _ = apply_policy(dropping, reference)
    assert save_policy_build(dropping, built, reference, path) == ["transformer"]
    assert json.loads(metadata_of(path)["dropped"]) == ["text_encoder_3"]
    loaded = load_checkpoint(path, reference, CPU)
    assert loaded.components["text_encoder_3"] is None and loaded.components["tokenizer_3"] is None
    assert_same_module(loaded.components["transformer"], built["transformer"], "transformer")


# --- ComfyUI-style files with text encoders ---------------------------------------------------------


def fp8_per_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled FP8 as ComfyUI's files hold it, computed here by hand: amax / 448, one scale a tensor."""
    scale = weight.detach().abs().max().float() / 448
    return (weight.detach().float() / scale).to(torch.float8_e4m3fn), scale


def scaled_encoder(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """An encoder's state dict under `prefix`, its linear weights scaled FP8, with the marker."""
    linears = {n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    out = {f"{prefix}scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, value in module.state_dict().items():
        if key.removesuffix(".weight") in linears and key.endswith(".weight"):
            q, scale = fp8_per_tensor(value)
            out[prefix + key], out[f"{prefix}{key.removesuffix('.weight')}.scale_weight"] = q, scale
        else:
            out[prefix + key] = value.detach().clone()
    return out


def comfy_all_in_one(pipeline: Any) -> dict[str, torch.Tensor]:
    """An all-in-one file as ComfyUI ships SD3.5 in FP8: the transformer scaled FP8 under original
    SD3 names, CLIP-L scaled FP8, CLIP-G in float16 with its logit_scale and position ids, a VAE."""
    state = {k: v.detach() for k, v in pipeline.transformer.state_dict().items()}
    out: dict[str, torch.Tensor] = {"model.diffusion_model.scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, value in to_original_keys(state, num_layers=TRANSFORMER_CONFIG["num_layers"]).items():
        if key.endswith(".weight") and value.ndim == 2:
            q, scale = fp8_per_tensor(value)
            out[f"model.diffusion_model.{key}"] = q
            out[f"model.diffusion_model.{key.removesuffix('.weight')}.scale_weight"] = scale
        else:
            out[f"model.diffusion_model.{key}"] = value.clone()
    out.update(scaled_encoder(pipeline.text_encoder, "text_encoders.clip_l.transformer."))
    g = "text_encoders.clip_g.transformer."
    out.update({g + k: v.detach().half() for k, v in pipeline.text_encoder_2.state_dict().items()})
    out[g + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    out["text_encoders.clip_g.logit_scale"] = torch.tensor(4.6)
    out.update({f"first_stage_model.{k}": v.detach().half() for k, v in pipeline.vae.state_dict().items()})
    return {k: v.contiguous() for k, v in out.items()}


def test_a_comfy_all_in_one_file_brings_its_text_encoders(tiny_model, tmp_path: Path) -> None:
    pipe = tiny_model.pipeline
    written = comfy_all_in_one(pipe)
    path = tmp_path / "sd3.5_tiny_fp8_scaled.safetensors"
    save_file(written, str(path))
    candidate = candidate_from_checkpoint(tiny_model, path)
    assert candidate.name == "sd3.5_tiny_fp8_scaled"
    assert {p.component for p in candidate.plan} == {"transformer", "text_encoder", "text_encoder_2"}
    clip_l = candidate.pipeline.text_encoder
    layers = {n: m for n, m in clip_l.named_modules() if isinstance(m, Fp8Linear)}
    assert len(layers) == 25 and all(
        m.backend == "weight_only" and m.spec.weights == "per_tensor" for m in layers.values()
    )
    q = "text_model.encoder.layers.0.self_attn.q_proj"
    stored = written[f"text_encoders.clip_l.transformer.{q}.weight"]
    assert same_tensor(layers[q].weight_fp8, stored)  # the file's bytes, unchanged
    assert layers[q].weight_scale.item() == written[f"text_encoders.clip_l.transformer.{q}.scale_weight"].item()
    # CLIP-G: the file's float16 values, in the model's float32; the VAE stays the reference's.
    clip_g = candidate.pipeline.text_encoder_2
    assert not any(isinstance(m, Fp8Linear) for m in clip_g.modules()) and clip_g.dtype == torch.float32
    weight = "text_model.encoder.layers.1.mlp.fc1.weight"
    assert torch.equal(clip_g.state_dict()[weight], pipe.text_encoder_2.state_dict()[weight].half().float())
    assert candidate.pipeline.vae is pipe.vae

    # Independently: CLIP-L with the dequantized FP8 weights in plain linear layers embeds the same.
    by_hand = type(pipe.text_encoder)(pipe.text_encoder.config).eval()
    by_hand.load_state_dict(pipe.text_encoder.state_dict())
    with torch.no_grad():
        for name in layers:
            key = f"text_encoders.clip_l.transformer.{name}"
            by_hand.get_submodule(name).weight.copy_(written[f"{key}.weight"].float() * written[f"{key}.scale_weight"])
    tokens = pipe.tokenizer(["a red cube"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(clip_l(tokens).text_embeds, by_hand(tokens).text_embeds)
    images, reference = generate(candidate.pipeline, BATCH, GEN), generate(pipe, BATCH, GEN)
    assert 0 < ((images - reference) ** 2).mean().item() < 1e-3


@pytest.mark.parametrize("layout", ["plain", "scaled", "all-in-one"])
def test_a_comfy_t5_file_imports_with_its_bytes(t5: torch.nn.Module, tiny_model, tmp_path: Path, layout: str) -> None:
    """`t5xxl_fp8_e4m3fn.safetensors` (every tensor cast to FP8, no scales, `shared` stored once),
    its `_scaled` sibling (scale_weight per linear, the marker), and T5 inside an all-in-one file."""
    linears = {n for n, m in t5.named_modules() if isinstance(m, torch.nn.Linear)}
    if layout == "plain":
        tensors = {k: v.detach().to(torch.float8_e4m3fn) for k, v in t5.state_dict().items() if "embed_tokens" not in k}
    else:
        prefix = "" if layout == "scaled" else "text_encoders.t5xxl.transformer."
        tensors = scaled_encoder(t5, prefix)
        if prefix:
            tensors["model.diffusion_model.scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
            state = {k: v.detach() for k, v in tiny_model.pipeline.transformer.state_dict().items()}
            for key, value in to_original_keys(state, num_layers=TRANSFORMER_CONFIG["num_layers"]).items():
                tensors[f"model.diffusion_model.{key}"] = value.clone()
    path = tmp_path / "t5xxl_fp8_e4m3fn.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    reference = {"transformer": tiny_model.pipeline.transformer, "text_encoder_3": t5}
    loaded = load_checkpoint(path, reference, CPU)
    assert loaded.read == (("transformer",) if layout == "all-in-one" else ()) + ("text_encoder_3",)
    encoder = loaded.components["text_encoder_3"]
    fp8 = {n: m for n, m in encoder.named_modules() if isinstance(m, Fp8Linear)}
    assert set(fp8) == linears and all(m.backend == "weight_only" for m in fp8.values())

    # Independently: T5 with the file's values in plain float32 layers encodes the same.
    by_hand = type(t5)(t5.config).eval()
    prefix = "text_encoders.t5xxl.transformer." if layout == "all-in-one" else ""
    values = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    state = {}
    for key in t5.state_dict():
        value = values.get(key, values["shared.weight"])  # embed_tokens is shared
        scale = values.get(f"{key.removesuffix('.weight')}.scale_weight", torch.tensor(1.0))
        state[key] = value.float() * (scale if key.removesuffix(".weight") in linears else 1)
    by_hand.load_state_dict(state)
    assert torch.equal(encode(encoder), encode(by_hand))
    assert not torch.equal(encode(encoder), encode(t5))
    if layout == "plain":  # the norms were FP8 in the file: widened exactly
        norm = "encoder.final_layer_norm.weight"
        assert torch.equal(encoder.state_dict()[norm], tensors[norm].float())


def test_a_comfy_t5_on_a_model_without_t5_is_exit_2(
    t5: torch.nn.Module, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = workdir / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_file({k: v.contiguous() for k, v in scaled_encoder(t5, "").items()}, str(path))
    args = ["run", str(TEST_SUITES / "smoke.yaml"), "--no-mlflow", "--no-progress", "--candidate-checkpoint", str(path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: carries T5-XXL (text_encoder_3), which this model does not have" in err
    assert not (workdir / "runs").exists()


# --- our version-2 files, broken -------------------------------------------------------------------


def components_entry(meta: dict[str, str], name: str, **change: Any) -> None:
    parts = json.loads(meta["components"])
    parts[name].update(change)
    meta["components"] = json.dumps(parts)


Q = "text_model.encoder.layers.0.self_attn.q_proj"
V2_CASES: list[tuple[str, Any, str]] = [
    ("components not JSON", lambda t, m: m.update(components="{x"), "metadata 'components' is not JSON"),
    ("components missing", lambda t, m: m.pop("components"), "no 'components' metadata"),
    ("components a list", lambda t, m: m.update(components="[]"), "metadata 'components' must map component names"),
    (
        "unknown component",
        lambda t, m: m.update(components=json.dumps({"unet": {"dtype": "float32", "layers": {}}})),
        "metadata 'components' entry 'unet': expected one of transformer",
    ),
    ("dtype torch.load", lambda t, m: components_entry(m, "vae", dtype="load"), "dtype 'load', expected one of"),
    ("entry extra key", lambda t, m: components_entry(m, "vae", x=1), "expected {'dtype': ..., 'layers': {...}}"),
    (
        "bad layer entry",
        lambda t, m: components_entry(m, "text_encoder", layers={Q: "e4m3fn"}),
        f"metadata 'components.text_encoder.layers' entry '{Q}': expected",
    ),
    ("dropped the VAE", lambda t, m: m.update(dropped='["vae"]'), "metadata 'dropped' ['vae'], expected a list of"),
    ("stray tensor", lambda t, m: t.update({"unet.x": torch.zeros(1)}), "tensor unet.x belongs to no component"),
    (
        "weight missing",
        lambda t, m: t.pop(f"text_encoder.{Q}.weight_fp8"),
        f"but tensor text_encoder.{Q}.weight_fp8 is missing",
    ),
    (
        "other weight misshapen",
        lambda t, m: t.update({"text_encoder_2.text_model.final_layer_norm.weight": torch.zeros(3)}),
        "text_encoder_2.text_model.final_layer_norm.weight has shape (3,), expected (64,)",
    ),
    (
        "other weight missing",
        lambda t, m: t.pop("vae.decoder.conv_out.bias"),
        "does not fit this model's vae (missing ['vae.decoder.conv_out.bias']",
    ),
    ("version 3", lambda t, m: m.update(version="3"), "checkpoint version '3', this tool reads 1 and 2"),
]


@pytest.mark.parametrize(("case", "mutate", "message"), V2_CASES, ids=[c[0] for c in V2_CASES])
def test_a_broken_version_2_checkpoint_is_refused(
    saved: dict[str, Any], tiny_model, tmp_path: Path, case: str, mutate: Any, message: str
) -> None:
    from safetensors.torch import load_file

    tensors, meta = load_file(str(saved["path"])), dict(metadata_of(saved["path"]))
    mutate(tensors, meta)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(InputError) as raised:
        candidate_from_checkpoint(tiny_model, bad)
    assert str(raised.value).startswith(f"{bad}: ") and message in str(raised.value), str(raised.value)


def test_a_version_2_file_for_t5_on_a_model_without_t5_is_refused(
    t5: torch.nn.Module, tiny_model, tmp_path: Path
) -> None:
    reference = {"transformer": tiny_model.pipeline.transformer, "text_encoder_3": t5}
    policy = load_policy(str(write(tmp_path / "t5.yaml", T5_POLICY)))
    path = tmp_path / "t5.safetensors"
    save_policy_build(policy, apply_policy(policy, reference)[0], reference, path)
    with pytest.raises(InputError, match="holds text_encoder_3, which this model does not have"):
        candidate_from_checkpoint(tiny_model, path)


ATTENTION = "name: int8-attention\ncomponents:\n  transformer:\n    attention: {default: int8}\n"


@pytest.mark.parametrize("kind", ["factory", "diffusers", "torchao", "attention"])
def test_quantize_refuses_what_it_cannot_save(workdir: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    policy = {
        "factory": str(write(workdir / "inhouse.yaml", "name: inhouse\nfactory: my_builds:build_fp8\n")),
        "diffusers": "diffusers-torchao-int8-weight-only",
        "torchao": "torchao-fp8-rowwise",
        "attention": str(write(workdir / "attention.yaml", ATTENTION)),
    }[kind]
    out = workdir / "x.safetensors"
    assert main(["quantize", policy, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not save" in err and "evaluate the policy itself" in err, err
    assert not out.exists()
