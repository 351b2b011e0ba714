"""Candidates built by diffusers' own quantization backends (`diffusers_quantization:` in a policy):
each is the backend's own quantization, checked against the quantizer called directly; they are gated
beside this project's policies in one run, and a backend that cannot run here says why."""

from __future__ import annotations

import copy
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from evals.candidates import build_candidate
from evals.cli import main
from evals.models.precision import load_policy
from evals.models.yamlspec import InputError
from evals.suite_types import Generation
from tests.conftest import TEST_SUITES, write

pytest.importorskip("torchao", reason="torchao is in the test extra: pip install -e '.[test]'")
pytest.importorskip("optimum.quanto", reason="optimum-quanto is in the test extra: pip install -e '.[test]'")
gguf = pytest.importorskip("gguf", reason="gguf is in the test extra: pip install -e '.[test]'")

GEN = Generation(64, 64, 2, 4.5, 2, max_sequence_length=8)
KEPT = ["pos_embed", "time_text_embed", "context_embedder", "norm_out", "proj_out"]


def inputs_for(transformer: Any) -> dict[str, torch.Tensor]:
    config = transformer.config
    return {
        "hidden_states": torch.randn(1, config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0)),
        "encoder_hidden_states": torch.randn(
            1, 8, config.joint_attention_dim, generator=torch.Generator().manual_seed(1)
        ),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=torch.Generator().manual_seed(2)),
        "timestep": torch.tensor([500.0]),
    }


def outputs(*transformers: Any) -> list[torch.Tensor]:
    inputs = inputs_for(transformers[0])
    with torch.no_grad():
        return [t(**inputs).sample for t in transformers]


def policy_file(folder: Path, name: str, body: str) -> Path:
    return write(folder / f"{name}.yaml", f"# test\nname: {name}\ndiffusers_quantization:\n{body}")


def write_gguf(path: Path, tensors: dict[str, torch.Tensor], in_q8: Callable[[str, Any], bool]) -> dict[str, Any]:
    """`tensors` as a GGUF file written with the gguf package alone: those `in_q8(key, array)` picks
    in Q8_0, the rest in float32. Returns the quantized bytes written per tensor."""
    writer = gguf.GGUFWriter(str(path), arch="sd3")
    q8 = gguf.GGMLQuantizationType.Q8_0
    written = {}
    for key, tensor in tensors.items():
        array = tensor.float().numpy()
        if in_q8(key, array):
            data = gguf.quants.quantize(array, q8)
            writer.add_tensor(key, data, raw_shape=data.shape, raw_dtype=q8)
            written[key] = data
        else:
            writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def write_q8_gguf(transformer: Any, path: Path, flip: str = "") -> dict[str, Any]:
    """The transformer as a GGUF file in diffusers' key names: linear weights in Q8_0 but for the
    embeddings and output layers (KEPT), the rest in float32, as published SD3.5 GGUF files keep
    them. `flip` names a tensor written with its sign flipped (a converter's bug). Returns the
    quantized bytes written per tensor."""
    linears = {
        f"{n}.weight"
        for n, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and not any(n.startswith(k) for k in KEPT)
    }
    tensors = {key: -t if key == flip else t for key, t in transformer.state_dict().items()}
    return write_gguf(path, tensors, lambda key, _: key in linears)


def test_diffusers_torchao_is_torchaos_quantize_on_the_layers_it_converts(tiny_model) -> None:
    import torchao.quantization as ao

    candidate = build_candidate(tiny_model, load_policy("diffusers-torchao-int8-weight-only"), GEN)
    ours = candidate.pipeline.transformer
    by_hand = copy.deepcopy(tiny_model.pipeline.transformer)
    kept = lambda fqn: any(fqn == k or fqn.startswith(k + ".") for k in KEPT)  # noqa: E731
    ao.quantize_(
        by_hand, ao.Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and not kept(fqn)
    )
    linears = {n: m for n, m in by_hand.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = [n for n, m in linears.items() if type(m.weight) is not torch.nn.Parameter]
    assert len(quantized) == 85
    for name, module in linears.items():
        theirs = ours.get_submodule(name).weight
        assert type(theirs) is type(module.weight), name
        if name in quantized:
            assert torch.equal(theirs.qdata, module.weight.qdata) and torch.equal(theirs.scale, module.weight.scale)
    assert candidate.backends == "Int8Tensor:85,keep:7"
    assert {layer.rule for layer in candidate.plan} == {"diffusers torchao"}
    got, expected, reference = outputs(ours, by_hand, tiny_model.pipeline.transformer)
    assert torch.equal(got, expected) and not torch.equal(got, reference)
    assert type(tiny_model.pipeline.transformer.proj_out.weight) is torch.nn.Parameter  # reference untouched


def test_diffusers_quanto_is_quantos_quantize_with_its_name_matching(tiny_model) -> None:
    """quanto's own quantize() and freeze() with the layers the policy keeps excluded by path: the
    same int8 data and scales, the same output."""
    from optimum.quanto import freeze, qint8, quantize

    candidate = build_candidate(tiny_model, load_policy("diffusers-quanto-int8"), GEN)
    ours = candidate.pipeline.transformer
    by_hand = copy.deepcopy(tiny_model.pipeline.transformer)
    # diffusers converts linear layers only; quanto's quantize() takes the patch embedding's conv too
    kept = ["pos_embed.proj", "context_embedder", "proj_out", "*.linear_1", "*.linear_2"]
    quantize(by_hand, weights=qint8, exclude=kept)
    freeze(by_hand)
    quantized = {n: m for n, m in by_hand.named_modules() if type(m).__name__ == "QLinear"}
    assert len(quantized) == 86  # norm_out.linear too: quanto's names cannot single it out
    for name, module in quantized.items():
        theirs = ours.get_submodule(name)
        assert type(theirs).__name__ == "QLinear", name
        assert torch.equal(theirs.weight._data, module.weight._data), name
        assert torch.equal(theirs.weight._scale, module.weight._scale), name
    assert candidate.backends == "WeightQBytesTensor:86,keep:6"
    got, expected, reference = outputs(ours, by_hand, tiny_model.pipeline.transformer)
    assert torch.equal(got, expected) and not torch.equal(got, reference)


def test_explain_builds_the_policy_and_validate_says_it_is_built(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "explain", "diffusers-quanto-int8", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    backends = [layer["backend"] for layer in shown["layers"]]
    assert backends.count("WeightQBytesTensor") == 86 and backends.count("keep") == 6  # as the build holds
    quantized = [layer for layer in shown["layers"] if layer["backend"] != "keep"]
    assert all(layer["bytes_after"] < layer["bytes_before"] for layer in quantized)  # int8 weights are smaller
    assert main(["validate", "--model", "none", "evals/models/policies/diffusers-quanto-int8.yaml"]) == 0
    assert "built by diffusers' quanto backend" in capsys.readouterr().out


def test_a_gguf_file_is_loaded_as_gguf_wrote_it(tiny_model, tmp_path: Path) -> None:
    """A Q8_0 file written by the gguf package: the candidate holds exactly its bytes, and computes
    what the transformer computes with the weights gguf's own dequantize gives back."""
    reference = tiny_model.pipeline.transformer
    written = write_q8_gguf(reference, tmp_path / "tiny-q8.gguf")
    policy = load_policy(str(policy_file(tmp_path, "gguf-q8", "  backend: gguf\n  file: tiny-q8.gguf\n")))
    candidate = build_candidate(tiny_model, policy, GEN)
    ours = candidate.pipeline.transformer
    by_hand = copy.deepcopy(reference)
    for key, data in written.items():
        module = ours.get_submodule(key.removesuffix(".weight"))
        assert type(module).__name__ == "GGUFLinear" and torch.equal(
            module.weight.view(torch.uint8), torch.from_numpy(data)
        )
        dequantized = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q8_0)
        # diffusers' native GGUF path multiplies the float16 block scale in float16: the weight is
        # gguf's dequantization rounded to float16 (exact in float32, as int8 x float16 fits in it)
        by_hand.get_submodule(key.removesuffix(".weight")).weight.data = torch.from_numpy(dequantized).half().float()
    assert candidate.backends == "GGUFParameter:85,keep:7"
    got, expected, ref = outputs(ours, by_hand, reference)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, ref)
    first = candidate.policy_sha256
    write_q8_gguf(reference, tmp_path / "tiny-q8.gguf")
    assert build_candidate(tiny_model, policy, GEN).policy_sha256 == first  # the same file, the same build
    with (tmp_path / "tiny-q8.gguf").open("ab") as f:
        f.write(b"\0" * 64)  # another file: a resume must not take its images for this build's
    assert build_candidate(tiny_model, policy, GEN).policy_sha256 != first


def test_diffusers_builds_are_gated_beside_a_policy_and_a_bad_one_fails(
    workdir: Path, capsys: pytest.CaptureFixture[str], tiny_model
) -> None:
    (workdir / "p").mkdir()
    write_q8_gguf(tiny_model.pipeline.transformer, workdir / "p" / "tiny-q8.gguf")
    gguf_policy = policy_file(workdir / "p", "diffusers-gguf-q8", "  backend: gguf\n  file: tiny-q8.gguf\n")
    write_q8_gguf(tiny_model.pipeline.transformer, workdir / "p" / "sign-bug.gguf", flip="proj_out.weight")
    bad = policy_file(workdir / "p", "diffusers-gguf-sign-bug", "  backend: gguf\n  file: sign-bug.gguf\n")
    policies = ["fp8-e4m3-weight-only", "diffusers-torchao-int8-weight-only", str(gguf_policy), str(bad)]
    # the smoke suite's gates on a quarter of its samples: four cases, one seed
    smoke = (TEST_SUITES / "smoke.yaml").read_text().replace("seeds: [0, 1]", "seeds: [0]")
    dropped = ("night-street", "knit-texture", "gothic-arch", "cat-window")
    lines = [line for line in smoke.splitlines() if not any(f"id: {case}," in line for case in dropped)]
    suite = write(workdir / "p" / "suite.yaml", "\n".join(lines) + "\n")
    args = ["run", str(suite), "--no-progress", "--no-mlflow"]
    assert main(args + [a for p in policies for a in ("--policy", p)]) == 1
    out = capsys.readouterr().out
    (run_dir,) = (workdir / "runs").iterdir()
    verdict = json.loads((run_dir / "verdict.json").read_text())
    assert {g["policy"] for g in verdict["results"] if g["status"] == "fail"} == {"diffusers-gguf-sign-bug"}, out
    names = [
        "fp8-e4m3-weight-only",
        "diffusers-torchao-int8-weight-only",
        "diffusers-gguf-q8",
        "diffusers-gguf-sign-bug",
    ]
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    assert sorted({r["policy"] for r in records}) == sorted(names) and len(records) == 16
    run = json.loads((run_dir / "run.json").read_text())
    backends = {p["name"]: p["backends"] for p in run["policies"]}
    assert backends["diffusers-torchao-int8-weight-only"] == "Int8Tensor:85,keep:7"
    assert backends["diffusers-gguf-q8"] == "GGUFParameter:85,keep:7"
    for name in names:
        assert f">{name}<" in (run_dir / "report.html").read_text()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "  backend: quanto\n  config: {weight_dtype: int8}\n",
            "QuantoConfig takes no 'weight_dtype' (did you mean 'weights_dtype'?)",
        ),
        ("  backend: torchao\n  config: {modules_to_not_convert: [proj_out]}\n", "torchao needs quant_type"),
        ("  backend: gguf\n", "backend gguf needs `file`"),
        ("  backend: gguf\n  file: absent.gguf\n", "no .gguf file at"),
        ("  backend: quanto\n  file: x.gguf\n", "only backend gguf reads a file"),
        ("  backend: gguf\n  file: x.gguf\n  config: {compute_dtype: fp16}\n", "expected a dtype name"),
        ("  backend: onnx\n", "backend"),
    ],
)
def test_a_bad_diffusers_quantization_is_refused_when_the_policy_loads(tmp_path: Path, body: str, message: str) -> None:
    write(tmp_path / "x.gguf", "")
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")) as info:
        load_policy(str(policy_file(tmp_path, "bad", body)))
    assert str(tmp_path / "bad.yaml") in str(info.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("  backend: quanto\n  config: {weights_dtype: int3}\n", "QuantoConfig: Only support weights in"),
        ("  backend: torchao\n  config: {quant_type: Int8WeightOnlyConfg}\n", "did you mean 'Int8WeightOnlyConfig'"),
        ("  backend: gguf\n  file: broken.gguf\n", "broken.gguf cannot be loaded"),
    ],
)
def test_a_build_diffusers_refuses_is_an_input_error_naming_the_policy(
    tmp_path: Path, tiny_model, body: str, message: str
) -> None:
    write(tmp_path / "broken.gguf", "not a gguf file")
    policy = policy_file(tmp_path, "bad", body)
    with pytest.raises(InputError) as info:
        build_candidate(tiny_model, load_policy(str(policy)), GEN)
    assert str(policy) in str(info.value) and message in str(info.value), info.value


def test_a_build_that_cannot_run_in_inference_mode_is_refused_before_the_run() -> None:
    """optimum-quanto 0.2's packed int4 and int2 layers load but fail under torch.inference_mode, in
    which the harness generates. Building one here would JIT-compile quanto's C++ extension (25-30 s on
    two cores), so a layer with a packed weight that fails there the same way stands in for it."""
    from evals.models.diffusers_quantization import check_runs_in_inference_mode

    class Packed(torch.nn.Parameter):
        """A weight of another tool's tensor type, as quantized builds hold."""

    class InferenceShy(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_inference_mode_enabled():
                raise RuntimeError("Cannot set version_counter for inference tensor")
            return super().forward(x)

    class Transformer(torch.nn.Module):
        dtype = torch.float32

        def __init__(self, layer: torch.nn.Linear) -> None:
            super().__init__()
            self.plain, self.packed = torch.nn.Linear(4, 4), layer

    shy = InferenceShy(4, 2)
    shy.weight = Packed(shy.weight.detach())
    with pytest.raises(InputError, match=r"packed cannot run under torch\.inference_mode") as info:
        check_runs_in_inference_mode(Transformer(shy), "quanto", "q.yaml")
    assert "q.yaml" in str(info.value) and "version_counter" in str(info.value)
    fine = torch.nn.Linear(4, 2)
    fine.weight = Packed(fine.weight.detach())
    check_runs_in_inference_mode(Transformer(fine), "quanto", "q.yaml")  # runs: no error


def test_a_missing_package_or_gpu_is_exit_2_saying_what_to_install(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tiny_model
) -> None:
    import evals.models.diffusers_quantization as backends

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "optimum.quanto" else real(name, *a)
    )
    assert main(["run", str(TEST_SUITES / "smoke.yaml"), "--policy", "diffusers-quanto-int8", "--no-mlflow"]) == 2
    assert "needs optimum-quanto, not installed: pip install 'sd35-fp8-gate[quanto]'" in capsys.readouterr().err
    assert list(workdir.iterdir()) == []  # nothing written
    if torch.cuda.is_available():
        return
    bnb = load_policy(str(policy_file(workdir, "bnb", "  backend: bitsandbytes\n  config: {load_in_8bit: true}\n")))
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(InputError, match=r"needs bitsandbytes.*pip install 'sd35-fp8-gate\[bitsandbytes\]'"):
            build_candidate(tiny_model, bnb, GEN)
    monkeypatch.setattr(backends, "_installed", lambda module: True)
    with pytest.raises(InputError, match="bitsandbytes backend quantizes on a CUDA GPU only, not on cpu"):
        build_candidate(tiny_model, bnb, GEN)


def test_the_policy_hash_covers_the_config(tmp_path: Path) -> None:
    int8 = load_policy(str(policy_file(tmp_path, "q", "  backend: quanto\n  config: {weights_dtype: int8}\n")))
    int4 = load_policy(str(policy_file(tmp_path, "q", "  backend: quanto\n  config: {weights_dtype: int4}\n")))
    assert int8.sha256 != int4.sha256


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["{load_in_8bit: true}", "{load_in_4bit: true, bnb_4bit_quant_type: nf4}"])
def test_bitsandbytes_builds_are_gated_on_a_gpu(workdir: Path, config: str) -> None:
    pytest.importorskip("bitsandbytes", reason="pip install -e '.[bitsandbytes]'")
    policy = policy_file(workdir, "bnb", f"  backend: bitsandbytes\n  config: {config}\n")
    args = ["run", str(TEST_SUITES / "smoke.yaml"), "--policy", str(policy), "--no-mlflow", "--device", "cuda"]
    assert main(args) in (0, 1)
    (run_dir,) = (workdir / "runs").iterdir()
    backend = json.loads((run_dir / "run.json").read_text())["policies"][0]["backends"]
    assert ("Int8Params" in backend) or ("Params4bit" in backend), backend


def test_a_gguf_file_in_original_sd3_key_names_is_the_same_build(tiny_model, tmp_path: Path) -> None:
    """Published SD3.5 GGUF files use the original (MMDiT) key names: diffusers converts them on load,
    fused q/k/v rows and all, to the same candidate as the file in diffusers' names."""
    from tests.sd3_original_keys import to_original_keys

    reference = tiny_model.pipeline.transformer
    write_q8_gguf(reference, tmp_path / "diffusers-keys.gguf")
    original = to_original_keys(reference.state_dict(), reference.config.num_layers)
    kept = ("x_embedder", "t_embedder", "y_embedder", "context_embedder", "final_layer", "pos_embed")
    write_gguf(
        tmp_path / "original-keys.gguf",
        original,
        lambda key, array: array.ndim == 2 and key.endswith(".weight") and not key.startswith(kept),
    )
    built = []
    for name in ("diffusers-keys", "original-keys"):
        policy = policy_file(tmp_path, name, f"  backend: gguf\n  file: {name}.gguf\n")
        built.append(build_candidate(tiny_model, load_policy(str(policy)), GEN))
    assert built[1].backends == built[0].backends == "GGUFParameter:85,keep:7"
    got, expected = outputs(built[1].pipeline.transformer, built[0].pipeline.transformer)
    assert torch.equal(got, expected)
