"""Hostile or broken model, checkpoint and weights files: each is exit 2 with `error: ` naming the
file and what was expected, never a traceback, never code run from the file, and nothing is written.

The files are made here: one valid quantized checkpoint of the tiny model per module (`evals quantize`),
one ComfyUI scaled-FP8 file and one single-file transformer, each then rewritten into broken variants."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from evals.cli import main
from evals.models.fp8 import quantize
from evals.models.tiny import TRANSFORMER_CONFIG
from evals.models.yamlspec import InputError
from tests.conftest import TEST_SUITES, write
from tests.sd3_original_keys import to_original_keys

SMOKE = TEST_SUITES / "smoke.yaml"
LAYER = "transformer_blocks.0.attn.to_q"  # per-channel scales (128, 1), dynamic activations, a bias
QKV = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv"  # a ComfyUI FP8 layer
Tensors = dict[str, torch.Tensor]
Mutation = Callable[[Tensors, dict[str, str]], None]


def run_args(*extra: str, suite: Path = SMOKE) -> list[str]:
    return ["run", str(suite), "--no-progress", "--no-mlflow", *extra]


def assert_refused(workdir: Path, capsys: pytest.CaptureFixture[str], args: list[str], *expected: str) -> str:
    """Exit 2, one `error:` line naming what is expected, no traceback, nothing written but ./in."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    assert "Traceback" not in err, err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    assert sorted(p.name for p in workdir.iterdir()) == ["in"]  # no runs/, mlflow.db, cache
    return err


def check_refused(
    cli: bool,
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    load: Callable[[], Any],
    *expected: str,
) -> None:
    """Through `evals` (`cli`: every kind of problem has cases there) or, for the long tail of one
    kind, the loading function that the command calls, which raises the InputError it prints."""
    if cli:
        assert_refused(workdir, capsys, args, *expected)
        return
    with pytest.raises(InputError) as raised:
        load()
    for text in expected:
        assert text in str(raised.value), f"{text!r} not in {str(raised.value)!r}"
    assert sorted(p.name for p in workdir.iterdir()) == ["in"]


@pytest.fixture
def inputs(workdir: Path) -> Path:
    folder = workdir / "in"
    folder.mkdir()
    return folder


# --- our quantized checkpoints ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A valid checkpoint of the tiny model, written by `evals quantize` over a planted link at the
    temporary name the writer used to use (it must neither follow nor need it)."""
    folder = tmp_path_factory.mktemp("checkpoint")
    out = folder / "tiny-rowwise.safetensors"
    victim = folder / "victim.txt"
    victim.write_text("untouched")
    (folder / f".{out.name}.tmp").symlink_to(victim)
    assert main(["quantize", "fp8-e4m3-rowwise", "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    return {"path": out, "tensors": load_file(str(out)), "metadata": metadata, "victim": victim}


def test_the_checkpoint_writer_uses_a_unique_temporary_name(checkpoint: dict[str, Any]) -> None:
    folder = checkpoint["path"].parent
    assert checkpoint["victim"].read_text() == "untouched"
    assert sorted(p.name for p in folder.iterdir()) == [
        ".tiny-rowwise.safetensors.tmp",
        "tiny-rowwise.safetensors",
        "victim.txt",
    ]
    umask = os.umask(0o022)
    os.umask(umask)
    assert checkpoint["path"].stat().st_mode & 0o777 == 0o666 & ~umask  # not a temporary file's private mode


def test_a_failed_checkpoint_write_leaves_nothing(
    tmp_path: Path, checkpoint: dict[str, Any], tiny_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    from evals.models.checkpoints import load_quantized_transformer, save_quantized_transformer

    transformer, _ = load_quantized_transformer(
        checkpoint["path"], tiny_model.pipeline.transformer, torch.device("cpu")
    )

    def half_written(state: Tensors, filename: str, metadata: dict[str, str]) -> None:
        Path(filename).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(OSError, match="No space left"):
        save_quantized_transformer(transformer, tmp_path / "x.safetensors", policy_name="p", policy_sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def layer_spec(metadata: dict[str, str], **changes: Any) -> None:
    layers = json.loads(metadata["layers"])
    layers[LAYER]["spec"].update(changes)
    metadata["layers"] = json.dumps(layers)


def layers_with(metadata: dict[str, str], entry: Any) -> None:
    layers = json.loads(metadata["layers"])
    layers[LAYER] = entry
    metadata["layers"] = json.dumps(layers)


def compute_dtype(metadata: dict[str, str], value: Any) -> None:
    layers = json.loads(metadata["layers"])
    layers[LAYER]["compute_dtype"] = value
    metadata["layers"] = json.dumps(layers)


def rename(tensors: Tensors, metadata: dict[str, str], name: str, tensors_too: bool = False) -> None:
    """The metadata (and with `tensors_too` the tensors) of LAYER given to a layer `name` instead."""
    layers = json.loads(metadata["layers"])
    layers[name] = layers.pop(LAYER)
    metadata["layers"] = json.dumps(layers)
    for key in [k for k in tensors if k.startswith(f"{LAYER}.")] if tensors_too else []:
        tensors[name + key.removeprefix(LAYER)] = tensors.pop(key)


W, S, B = f"{LAYER}.weight_fp8", f"{LAYER}.weight_scale", f"{LAYER}.bias"
CHECKPOINT_CASES: list[tuple[str, Mutation, str]] = [
    ("layers not JSON", lambda t, m: m.update(layers="{layer: e4m3"), "metadata 'layers' is not JSON"),
    ("layers a list", lambda t, m: m.update(layers="[1, 2]"), "metadata 'layers' must map layer names"),
    ("layers missing", lambda t, m: m.pop("layers"), "no 'layers' metadata"),
    ("layer entry a string", lambda t, m: layers_with(m, "e4m3fn"), "expected {'spec': {...}, 'compute_dtype'"),
    ("layer entry extra key", lambda t, m: layers_with(m, {"spec": {}, "compute_dtype": "float32", "x": 1}), "'x': 1"),
    ("unknown spec key", lambda t, m: layer_spec(m, colour="red"), "spec must have exactly the keys"),
    ("unknown format", lambda t, m: layer_spec(m, format="e3m4"), "spec format 'e3m4', expected one of e4m3fn, e5m2"),
    ("unknown activations", lambda t, m: layer_spec(m, activations=["x"]), "spec activations ['x'], expected one"),
    ("block size a string", lambda t, m: layer_spec(m, block_size="128"), "spec block_size '128', expected a power"),
    ("fast_accum a number", lambda t, m: layer_spec(m, fast_accum=1), "spec fast_accum 1, expected true or false"),
    (
        "compute dtype torch.load",
        lambda t, m: compute_dtype(m, "load"),
        "compute_dtype 'load', expected one of float32",
    ),
    ("compute dtype int8", lambda t, m: compute_dtype(m, "int8"), "compute_dtype 'int8'"),
    ("compute dtype a list", lambda t, m: compute_dtype(m, ["float32"]), "compute_dtype ['float32']"),
    ("weight missing", lambda t, m: t.pop(W), f"lists layer '{LAYER}', but tensor {W} is missing"),
    ("scale missing", lambda t, m: t.pop(S), f"but tensor {S} is missing"),
    ("weight float32", lambda t, m: t.update({W: t[W].float()}), f"{W} is stored as float32, expected float8_e4m3fn"),
    (
        "weight int8",
        lambda t, m: t.update({W: t[W].view(torch.int8)}),
        f"{W} is stored as int8, expected float8_e4m3fn",
    ),
    (
        "weight e5m2, spec e4m3fn",
        lambda t, m: t.update({W: t[W].view(torch.float8_e5m2)}),
        f"{W} is stored as float8_e5m2, expected float8_e4m3fn",
    ),
    ("weight 1-D", lambda t, m: t.update({W: t[W].flatten()}), "expected a 2-D (out, in) matrix"),
    ("scales misshapen", lambda t, m: t.update({S: t[S][:5]}), f"{S} has shape (5, 1), expected (128, 1)"),
    ("scales per tensor", lambda t, m: t.update({S: t[S][:1]}), f"{S} has shape (1, 1), expected (128, 1)"),
    ("scales bfloat16", lambda t, m: t.update({S: t[S].bfloat16()}), f"{S} is stored as bfloat16, expected float32"),
    (
        "input scale on a dynamic layer",
        lambda t, m: t.update({f"{LAYER}.input_scale": torch.ones(1, 1)}),
        "input_scale given, but the layer's activations are dynamic_per_token",
    ),
    ("static without input scale", lambda t, m: layer_spec(m, activations="static"), f"{LAYER}.input_scale is missing"),
    ("bias misshapen", lambda t, m: t.update({B: t[B][:3]}), f"{B} is float32 of shape (3,), expected a float vector"),
    ("bias FP8", lambda t, m: t.update({B: t[B].to(torch.float8_e4m3fn)}), f"{B} is float8_e4m3fn"),
    ("bias missing", lambda t, m: t.pop(B), f"layer '{LAYER}' lacks a bias, the model's differs"),
    (
        "other weight int8",
        lambda t, m: t.update({"proj_out.weight": t["proj_out.weight"].to(torch.int8)}),
        "proj_out.weight is stored as int8, expected float32",
    ),
    (
        "other weight FP8",
        lambda t, m: t.update({"proj_out.weight": t["proj_out.weight"].to(torch.float8_e4m3fn)}),
        "proj_out.weight is stored as float8_e4m3fn, expected float32",
    ),
    (
        "other weight misshapen",
        lambda t, m: t.update({"proj_out.bias": torch.zeros(3)}),
        "proj_out.bias has shape (3,), expected (64,)",
    ),
    ("layer without tensors", lambda t, m: rename(t, m, "nope"), "layer 'nope', but tensor nope.weight_fp8 is missing"),
    ("layer not in the model", lambda t, m: rename(t, m, "nope", tensors_too=True), "layer 'nope' does not exist"),
]


CHECKPOINT_CLI = {
    "layers not JSON",
    "layers a list",
    "layer entry a string",
    "unknown spec key",
    "unknown format",
    "compute dtype torch.load",
    "weight missing",
    "scale missing",
    "weight float32",
    "weight int8",
    "weight e5m2, spec e4m3fn",
    "scales misshapen",
    "bias misshapen",
    "other weight int8",
    "layer not in the model",
}


@pytest.mark.parametrize(("case", "mutate", "message"), CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_a_broken_candidate_checkpoint_is_refused(
    inputs: Path,
    capsys: pytest.CaptureFixture[str],
    checkpoint: dict[str, Any],
    tiny_model,
    case: str,
    mutate: Mutation,
    message: str,
) -> None:
    from evals.candidates import candidate_from_checkpoint

    tensors = {k: v.clone() for k, v in checkpoint["tensors"].items()}
    metadata = dict(checkpoint["metadata"])
    mutate(tensors, metadata)
    bad = inputs / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    args = run_args("--candidate-checkpoint", str(bad))
    load = lambda: candidate_from_checkpoint(tiny_model, bad)  # noqa: E731
    check_refused(case in CHECKPOINT_CLI, inputs.parent, capsys, args, load, f"{bad}: ", message)


def test_the_valid_checkpoint_still_loads(checkpoint: dict[str, Any], tiny_model) -> None:
    from evals.candidates import candidate_from_checkpoint

    candidate = candidate_from_checkpoint(tiny_model, checkpoint["path"])
    assert candidate.name == "fp8-e4m3-rowwise" and candidate.backends == "keep:7,scaled_mm:85"


@pytest.mark.parametrize("value", [float("nan"), -1.0, 0.0], ids=["NaN", "negative", "zero"])
def test_a_well_formed_checkpoint_with_broken_scales_loads_for_the_gate_to_judge(
    inputs: Path, checkpoint: dict[str, Any], tiny_model, value: float
) -> None:
    """A scale's value is the build's business, not the file format's: a NaN or negative scale is a
    broken build, which the gate must fail (the mutation suite's `nan-scale` and `sign` mutants are
    such files), not an unreadable file refused with exit 2."""
    from evals.candidates import candidate_from_checkpoint

    tensors = {k: v.clone() for k, v in checkpoint["tensors"].items()}
    tensors[S][0] = value
    broken = inputs / "broken.safetensors"
    save_file(tensors, str(broken), metadata=checkpoint["metadata"])
    layer = candidate_from_checkpoint(tiny_model, broken).pipeline.transformer.get_submodule(LAYER)
    assert layer.weight_scale[0].item() == value or (value != value and layer.weight_scale[0].isnan())


# --- ComfyUI scaled-FP8 files ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def comfy(tiny_model) -> Tensors:
    """A ComfyUI-style scaled-FP8 file's tensors: original SD3 keys, per-tensor FP8 weights with a
    scalar `scale_weight`, the `scaled_fp8` marker."""
    state = {k: v.detach() for k, v in tiny_model.pipeline.transformer.state_dict().items()}
    out: Tensors = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, value in to_original_keys(state, num_layers=TRANSFORMER_CONFIG["num_layers"]).items():
        if key.endswith(".weight") and value.ndim == 2:
            q, scale = quantize(value, "e4m3fn", per_row=False)
            out[f"model.diffusion_model.{key}"] = q
            out[f"model.diffusion_model.{key.removesuffix('.weight')}.scale_weight"] = scale.reshape(())
        else:
            out[f"model.diffusion_model.{key}"] = value.contiguous()
    return out


COMFY_CASES: list[tuple[str, Callable[[Tensors], None], str]] = [
    ("scale misshapen", lambda t: t.update({f"{QKV}.scale_weight": torch.ones(3)}), "has shape (3,), expected one"),
    ("scale FP8", lambda t: t.update({f"{QKV}.scale_weight": torch.ones(()).to(torch.float8_e4m3fn)}), "float8_e4m3fn"),
    ("scale missing", lambda t: t.pop(f"{QKV}.scale_weight"), f"{QKV}.weight is FP8 but {QKV}.scale_weight is missing"),
    (
        "weight float32 with a scale",
        lambda t: t.update({f"{QKV}.weight": t[f"{QKV}.weight"].float()}),
        f"{QKV} has FP8 scales but its weight is stored as float32, expected float8_e4m3fn or float8_e5m2",
    ),
    (
        "weight int8 with a scale",
        lambda t: t.update({f"{QKV}.weight": t[f"{QKV}.weight"].view(torch.int8)}),
        "its weight is stored as int8",
    ),
    ("input scale misshapen", lambda t: t.update({f"{QKV}.scale_input": torch.ones(2, 2)}), "scale_input has shape"),
    (
        "bias FP8",
        lambda t: t.update({f"{QKV}.bias": t[f"{QKV}.bias"].to(torch.float8_e4m3fn)}),
        "transformer_blocks.0.attn.to_q.bias is float8_e4m3fn",
    ),
    (
        "norm weight int8",
        lambda t: t.update({k: t[k].to(torch.int8) for k in t if k.endswith("x_block.attn.ln_q.weight")}),
        "norm_q.weight is stored as int8, expected float32",
    ),
    ("not SD3", lambda t: [t.pop(k) for k in list(t) if k != "scaled_fp8"], "not an SD3 transformer checkpoint"),
]


COMFY_CLI = {"scale misshapen", "scale missing", "weight float32 with a scale", "norm weight int8", "not SD3"}


@pytest.mark.parametrize(("case", "mutate", "message"), COMFY_CASES, ids=[c[0] for c in COMFY_CASES])
def test_a_broken_comfy_file_is_refused(
    inputs: Path,
    capsys: pytest.CaptureFixture[str],
    comfy: Tensors,
    tiny_model,
    case: str,
    mutate: Callable[[Tensors], None],
    message: str,
) -> None:
    from evals.candidates import candidate_from_checkpoint

    tensors = dict(comfy)
    mutate(tensors)
    bad = inputs / "sd3_fp8_scaled.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(bad))
    args = run_args("--candidate-checkpoint", str(bad))
    load = lambda: candidate_from_checkpoint(tiny_model, bad)  # noqa: E731
    check_refused(case in COMFY_CLI, inputs.parent, capsys, args, load, f"{bad}: ", message)


def test_the_valid_comfy_file_still_imports(tmp_path: Path, comfy: Tensors, tiny_model) -> None:
    from evals.candidates import candidate_from_checkpoint

    path = tmp_path / "sd3_fp8_scaled.safetensors"
    save_file(comfy, str(path))
    assert len(candidate_from_checkpoint(tiny_model, path).plan) == 92


# --- ComfyUI all-in-one files with text encoders ---------------------------------------------------

CLIP_L = "text_encoders.clip_l.transformer."
CLIP_G = "text_encoders.clip_g.transformer."
Q_PROJ = f"{CLIP_L}text_model.encoder.layers.0.self_attn.q_proj"  # a scaled FP8 layer of CLIP-L


@pytest.fixture(scope="module")
def comfy_clips(comfy: Tensors, tiny_model) -> Tensors:
    """The ComfyUI file above with CLIP-L in scaled FP8 (its marker, `scale_weight` per linear) and
    CLIP-G in float16 beside the transformer, as ComfyUI's all-in-one files carry them."""
    out = dict(comfy)
    out[f"{CLIP_L}scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    clip_l = tiny_model.pipeline.text_encoder
    linears = {n for n, m in clip_l.named_modules() if isinstance(m, torch.nn.Linear)}
    for key, value in clip_l.state_dict().items():
        if key.endswith(".weight") and key.removesuffix(".weight") in linears:
            q, scale = quantize(value.detach(), "e4m3fn", per_row=False)
            out[CLIP_L + key], out[f"{CLIP_L}{key.removesuffix('.weight')}.scale_weight"] = q, scale.reshape(())
        else:
            out[CLIP_L + key] = value.detach().clone()
    out.update({CLIP_G + k: v.detach().half() for k, v in tiny_model.pipeline.text_encoder_2.state_dict().items()})
    return {k: v.contiguous() for k, v in out.items()}


COMFY_CLIP_CASES: list[tuple[str, Callable[[Tensors], None], str]] = [
    (
        "clip scale misshapen",
        lambda t: t.update({f"{Q_PROJ}.scale_weight": torch.ones(3)}),
        f"{Q_PROJ}.scale_weight has shape (3,), expected one per-tensor scale",
    ),
    (
        "clip scale missing",
        lambda t: t.pop(f"{Q_PROJ}.scale_weight"),
        f"{Q_PROJ}.weight is FP8 but {Q_PROJ}.scale_weight is missing",
    ),
    (
        "clip scale on a float16 weight",
        lambda t: t.update({f"{CLIP_G}text_model.encoder.layers.0.mlp.fc1.scale_weight": torch.tensor(1.0)}),
        f"{CLIP_G}text_model.encoder.layers.0.mlp.fc1 has FP8 scales but its weight is stored as float16",
    ),
    (
        "clip norm int8",
        lambda t: t.update({f"{CLIP_G}text_model.final_layer_norm.weight": torch.zeros(64, dtype=torch.int8)}),
        f"{CLIP_G}text_model.final_layer_norm.weight is stored as int8, expected float32",
    ),
    (
        "clip weight misshapen",
        lambda t: t.update({f"{CLIP_G}text_model.encoder.layers.0.mlp.fc1.bias": torch.zeros(3)}),
        f"{CLIP_G}text_model.encoder.layers.0.mlp.fc1.bias has shape (3,), expected",
    ),
    (
        "clip tensor missing",
        lambda t: t.pop(f"{CLIP_G}text_model.final_layer_norm.bias"),
        f"does not fit this model's text_encoder_2 (missing ['{CLIP_G}text_model.final_layer_norm.bias']",
    ),
    (
        "clip tensor unexpected",
        lambda t: t.update({f"{CLIP_L}text_model.extra.weight": torch.zeros(2)}),
        f"unexpected ['{CLIP_L}text_model.extra.weight']",
    ),
    (
        "unknown text encoder",
        lambda t: t.update({"text_encoders.llama.transformer.x": torch.zeros(1)}),
        "text_encoders.llama.transformer.x is not a key of ComfyUI's SD3 text encoders",
    ),
    (
        "T5 on a model without T5",
        lambda t: t.update({"text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight": torch.ones(8)}),
        "carries T5-XXL (text_encoder_3), which this model does not have (it was loaded with --no-t5?)",
    ),
]
COMFY_CLIP_CLI = {"clip scale missing", "clip tensor missing", "T5 on a model without T5"}


@pytest.mark.parametrize(("case", "mutate", "message"), COMFY_CLIP_CASES, ids=[c[0] for c in COMFY_CLIP_CASES])
def test_a_broken_comfy_file_with_text_encoders_is_refused(
    inputs: Path,
    capsys: pytest.CaptureFixture[str],
    comfy_clips: Tensors,
    tiny_model,
    case: str,
    mutate: Callable[[Tensors], None],
    message: str,
) -> None:
    from evals.candidates import candidate_from_checkpoint

    tensors = dict(comfy_clips)
    mutate(tensors)
    bad = inputs / "sd3.5_fp8_scaled.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(bad))
    args = run_args("--candidate-checkpoint", str(bad))
    load = lambda: candidate_from_checkpoint(tiny_model, bad)  # noqa: E731
    check_refused(case in COMFY_CLIP_CLI, inputs.parent, capsys, args, load, f"{bad}: ", message)


def test_the_valid_comfy_file_with_text_encoders_imports(tmp_path: Path, comfy_clips: Tensors, tiny_model) -> None:
    from evals.candidates import candidate_from_checkpoint

    path = tmp_path / "sd3.5_fp8_scaled.safetensors"
    save_file(comfy_clips, str(path))
    plan = candidate_from_checkpoint(tiny_model, path).plan
    assert {c: sum(p.component == c for p in plan) for c in ("transformer", "text_encoder", "text_encoder_2")} == {
        "transformer": 92,
        "text_encoder": 25,
        "text_encoder_2": 25,
    }


# --- a single-file model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_config(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> dict[str, Path]:
    """A diffusers folder of the tiny model (for --model-config) and its transformer as one file."""
    folder = tmp_path_factory.mktemp("sd3")
    tiny_model.pipeline.save_pretrained(folder / "config", safe_serialization=True)
    single = folder / "transformer.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.pipeline.transformer.state_dict().items()}, str(single))
    return {"config": folder / "config", "file": single}


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def other_tensors(data: bytes) -> bytes:
    from safetensors.torch import save

    return save({"x": torch.zeros(3)})


def misshapen(data: bytes) -> bytes:
    from safetensors.torch import load, save

    tensors = load(data)
    tensors["context_embedder.bias"] = torch.zeros(5, 5)
    return save(tensors)


SINGLE_FILE_CASES: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("random bytes", lambda data: os.urandom(4096), "not a readable safetensors file"),
    ("header only", lambda data: data[:100], "not a readable safetensors file"),
    ("truncated", truncated, "not a readable safetensors file"),
    ("no tensors", lambda data: b"\x02\x00\x00\x00\x00\x00\x00\x00{}", "holds no tensors"),
    ("other tensors", other_tensors, "not an SD3 transformer checkpoint that fits"),
    ("misshapen tensor", misshapen, "context_embedder.bias"),  # worded by diffusers, with or without accelerate
]


@pytest.mark.parametrize(
    ("corrupt", "message"), [c[1:] for c in SINGLE_FILE_CASES], ids=[c[0] for c in SINGLE_FILE_CASES]
)
def test_a_broken_single_file_model_is_refused(
    inputs: Path,
    capsys: pytest.CaptureFixture[str],
    model_config: dict[str, Path],
    corrupt: Callable[[bytes], bytes],
    message: str,
) -> None:
    bad = inputs / "sd3.5_medium.safetensors"
    bad.write_bytes(corrupt(model_config["file"].read_bytes()))
    args = run_args("--model", str(bad), "--model-config", str(model_config["config"]))
    assert_refused(inputs.parent, capsys, args, f"error: {bad}: ", message)


def test_a_broken_weights_file_in_the_model_folder_is_refused(
    tmp_path: Path, inputs: Path, capsys: pytest.CaptureFixture[str], model_config: dict[str, Path]
) -> None:
    import shutil

    folder = inputs / "sd3"
    shutil.copytree(model_config["config"], folder)
    (weights,) = (folder / "vae").glob("*.safetensors")
    weights.write_bytes(truncated(weights.read_bytes()))
    assert main(run_args("--model", str(folder))) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # after diffusers' own progress bar
    assert last.startswith(f"error: {folder}: cannot load the diffusers SD3 pipeline (OSError: "), err
    assert "vae/diffusion_pytorch_model.safetensors" in last and "Traceback" not in err
    assert sorted(p.name for p in inputs.parent.iterdir()) == ["in"]


def test_broken_tiny_weights_name_the_file(tmp_path: Path) -> None:
    from evals.models.tiny import WEIGHTS_FILE, load_trained_components

    data = WEIGHTS_FILE.read_bytes()
    broken = tmp_path / "tiny-sd3.safetensors"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"{broken}: not a readable safetensors file .*Git LFS pointer"):
        load_trained_components(broken)
    with pytest.raises(InputError, match="the tiny model's weights are missing"):
        load_trained_components(tmp_path / "absent.safetensors")
    tensors = load_file(str(WEIGHTS_FILE))
    with safe_open(str(WEIGHTS_FILE), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(broken), metadata={k: v for k, v in metadata.items() if k != "vae_scaling_factor"})
    with pytest.raises(InputError, match="vae_scaling_factor missing or not numbers"):
        load_trained_components(broken)
    tensors["vae.encoder.conv_in.bias"] = torch.zeros(3, dtype=torch.float16)
    save_file(tensors, str(broken), metadata=metadata)
    with pytest.raises(InputError, match=r"does not fit the tiny model's vae .*conv_in\.bias"):
        load_trained_components(broken)


# --- metric weights --------------------------------------------------------------------------------


class RunsCode:
    """Unpickling this calls os.mkdir(path): the file runs code if it is ever loaded unsafely."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


JUNK = bytes(range(256)) * 8
"""Not a safetensors file, not a pickle: what a damaged download looks like."""


def lpips_file(folder: Path, case: str) -> tuple[Path, str]:
    """A bad LPIPS trunk, and what the message says about it."""
    expected = "expected torchvision's ImageNet AlexNet weights (alexnet-owt-7be5be79.pth) for lpips net 'alex'"
    if case == "pickle":
        path = folder / "alexnet-owt-7be5be79.pth"
        torch.save({"features.0.weight": RunsCode(folder.parent / "PWNED")}, path)
        return path, "not a torch state dict that loads without running code (Trying to load unsupported GLOBAL"
    if case == "junk":
        path = folder / "alexnet-owt-7be5be79.pth"
        path.write_bytes(JUNK)
        return path, f"not a torch state dict that loads without running code (Unsupported operand 0); {expected}"
    if case == "junk safetensors":
        path = folder / "alexnet.safetensors"
        path.write_bytes(JUNK)
        return (
            path,
            f"not a readable safetensors file (SafetensorError: Error while deserializing header: header too large"
            f"); {expected}",
        )
    if case == "truncated zip":
        path = folder / "alexnet.pth"
        torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11)}, path)
        path.write_bytes(path.read_bytes()[:1000])
        return (
            path,
            "not a readable torch state dict file (RuntimeError: PytorchStreamReader failed reading zip archive",
        )
    if case == "a list":
        path = folder / "alexnet.pth"
        torch.save([torch.zeros(3)], path)
        return path, f"holds list, {expected} (a state dict of tensors)"
    if case == "not tensors":
        path = folder / "alexnet.pth"
        torch.save({"features.0.weight": 3}, path)
        return path, f"entry 'features.0.weight' is int, {expected}"
    if case == "wrong tensors":
        path = folder / "alexnet.pth"
        torch.save({"features.0.weight": torch.zeros(3), "features.0.bias": torch.zeros(64)}, path)
        return path, "features.0.weight is float32 of shape (3,), expected float of shape (64, 3, 11, 11)"
    if case == "int tensors":
        path = folder / "alexnet.pth"
        torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11, dtype=torch.int8)}, path)
        return path, "features.0.weight is int8 of shape (64, 3, 11, 11), expected float"
    path = folder / "other.safetensors"
    save_file({"classifier.weight": torch.zeros(2, 2)}, str(path))
    return path, f"no features.0.weight; {expected}"


LPIPS_CASES = [
    "pickle",
    "junk",
    "junk safetensors",
    "truncated zip",
    "a list",
    "not tensors",
    "wrong tensors",
    "int tensors",
    "other tensors",
]
LPIPS_CLI = {"pickle", "junk", "junk safetensors", "wrong tensors"}


@pytest.mark.parametrize("case", LPIPS_CASES)
def test_bad_lpips_weights_are_refused(inputs: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    from evals.metrics.lpips import LPIPS

    path, message = lpips_file(inputs, case)
    suite = write(
        inputs / "suite.yaml", SMOKE.read_text().replace("metrics: [psnr, ssim]", "metrics: [psnr, ssim, lpips]")
    )
    args = run_args("--weights", f"lpips={path}", suite=suite)
    load = lambda: LPIPS(weights={"lpips": str(path)})  # noqa: E731
    # the pickle case also checks that no code ran: it would have made the folder ./PWNED
    check_refused(case in LPIPS_CLI, inputs.parent, capsys, args, load, str(path), message)


@pytest.fixture
def tiny_clip_model(monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """clip_score's model swapped for a tiny open_clip config (ViT-L/14 takes seconds to build); its
    state dict, to make files from."""
    import open_clip

    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "hostile-test-clip", config)
    monkeypatch.setattr("evals.metrics.clip_score.CLIP_MODEL", "hostile-test-clip")
    return open_clip.create_model("hostile-test-clip").state_dict()


def test_the_tiny_clip_loads_from_a_good_file(tmp_path: Path, tiny_clip_model: dict[str, torch.Tensor]) -> None:
    from evals.metrics.clip_score import CLIPScore

    good = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip_model.items()}, str(good))
    metric = CLIPScore(weights={"clip_score": str(good)})
    assert all(torch.equal(v, tiny_clip_model[k]) for k, v in metric.model.state_dict().items())


def clip_file(folder: Path, case: str, state: dict[str, torch.Tensor]) -> tuple[Path, str]:
    expected = "expected open_clip hostile-test-clip weights (as open_clip_model.safetensors of"
    if case == "pickle":
        path = folder / "open_clip_pytorch_model.bin"
        torch.save({"visual.proj": RunsCode(folder.parent / "PWNED")}, path)
        return path, "not a torch state dict that loads without running code (Trying to load unsupported GLOBAL"
    if case == "junk":
        path = folder / "open_clip_model.safetensors"
        path.write_bytes(JUNK)
        return path, f"not a readable safetensors file (Error while deserializing header: header too large); {expected}"
    if case == "numpy":
        path = folder / "open_clip_model.npz"  # open_clip itself would read it as big_vision weights
        path.write_bytes(JUNK)
        return path, f"not a torch state dict that loads without running code (Unsupported operand 0); {expected}"
    if case == "int tensors":
        path = folder / "open_clip_model.safetensors"
        save_file({k: v.to(torch.int8).contiguous() for k, v in state.items()}, str(path))
        return path, f"is I8, {expected}"
    if case == "wrong tensors":
        path = folder / "open_clip_pytorch_model.bin"
        torch.save({"visual.proj": torch.zeros(3)}, path)
        return path, "clip_score weights {path}: do not fit hostile-test-clip (Error(s) in loading state_dict"
    path = folder / "open_clip_model.safetensors"
    save_file({k: torch.zeros(1) for k in state}, str(path))
    return path, "clip_score weights {path}: do not fit hostile-test-clip"


CLIP_CASES = ["pickle", "junk", "numpy", "int tensors", "wrong tensors", "wrong shapes"]
CLIP_CLI = {"pickle", "junk", "wrong tensors"}


@pytest.mark.parametrize("case", CLIP_CASES)
def test_bad_clip_weights_are_refused(
    inputs: Path, capsys: pytest.CaptureFixture[str], tiny_clip_model: dict[str, torch.Tensor], case: str
) -> None:
    from evals.metrics.clip_score import CLIPScore

    path, message = clip_file(inputs, case, tiny_clip_model)
    message = message.replace("{path}", str(path))
    suite = write(
        inputs / "suite.yaml", SMOKE.read_text().replace("metrics: [psnr, ssim]", "metrics: [psnr, ssim, clip_score]")
    )
    args = run_args("--weights", f"clip_score={path}", suite=suite)
    load = lambda: CLIPScore(weights={"clip_score": str(path)})  # noqa: E731
    check_refused(case in CLIP_CLI, inputs.parent, capsys, args, load, str(path), message)


# --- evals quantize --out --------------------------------------------------------------------------


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model fails the test: --out is checked before any work."""

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr("evals.models.sources.load_source", fail)


def test_quantize_out_under_a_file_is_refused(inputs: Path, capsys: pytest.CaptureFixture[str], no_model) -> None:
    (inputs / "file.txt").write_text("x")
    out = inputs / "file.txt" / "sub" / "x.safetensors"
    err = assert_refused(inputs.parent, capsys, ["quantize", "fp8-e4m3-rowwise", "--out", str(out)], f"--out {out}")
    assert f"{inputs / 'file.txt'} is not a directory" in err
    assert sorted(p.name for p in inputs.iterdir()) == ["file.txt"]


def test_quantize_out_a_directory_is_refused(inputs: Path, capsys: pytest.CaptureFixture[str], no_model) -> None:
    out = inputs / "x.safetensors"
    out.mkdir()
    assert_refused(inputs.parent, capsys, ["quantize", "fp8-e4m3-rowwise", "--out", str(out)], "is a directory")


def test_quantize_out_in_a_read_only_directory_is_refused(
    inputs: Path, capsys: pytest.CaptureFixture[str], no_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = inputs / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root may write anywhere: this process is told it may not
        real = os.access

        def access(path: Any, mode: int, **kwargs: Any) -> bool:
            return False if isinstance(path, str | Path) and Path(path) == locked else real(path, mode, **kwargs)

        monkeypatch.setattr(os, "access", access)
    out = locked / "new" / "x.safetensors"
    try:
        args = ["quantize", "fp8-e4m3-rowwise", "--out", str(out)]
        assert_refused(inputs.parent, capsys, args, f"--out {out}: {locked} is not writable")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)
