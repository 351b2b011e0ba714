"""FP8 rules for every component, not only the transformer: the text encoders (CLIP-L, CLIP-G,
T5) and the VAE's linear layers take the same default and keep-rules."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from evals.candidates import build_candidate
from evals.cli import main
from evals.generation import generate
from evals.models.fp8 import Fp8Linear
from evals.models.fp8_spec import Fp8Spec
from evals.models.precision import load_policy
from evals.suite_types import Case, Generation, Sample
from tests.conftest import TEST_SUITES, write

GEN = Generation(64, 64, 2, 4.5, 2, max_sequence_length=8)
BATCH = [Sample(Case("red", "a red cube on a wooden table", ()), 0), Sample(Case("lake", "a calm lake", ()), 1)]
TEXT_POLICY = """name: fp8-text-encoders
description: FP8 in both CLIP text encoders; the transformer untouched
components:
  text_encoder:
    default: {format: e4m3fn, weights: per_channel, activations: dynamic_per_token, backend: emulated}
  text_encoder_2:
    default: {format: e4m3fn, weights: per_channel, activations: none}
    rules:
      - {match: "text_projection", precision: keep}
      - {match: "text_model.encoder.layers.0.*", precision: keep}
"""


@pytest.fixture
def text_policy(tmp_path: Path) -> Path:
    return write(tmp_path / "fp8-text-encoders.yaml", TEXT_POLICY)


def test_text_encoder_rules_quantize_exactly_the_layers_they_name(tiny_model, text_policy: Path) -> None:
    candidate = build_candidate(tiny_model, load_policy(str(text_policy)), GEN)
    pipe, ref = candidate.pipeline, tiny_model.pipeline
    assert pipe.transformer is ref.transformer and pipe.vae is ref.vae  # untouched components are shared
    assert pipe.text_encoder is not ref.text_encoder
    assert not any(isinstance(m, Fp8Linear) for m in ref.text_encoder.modules())  # the reference is unchanged
    l_linear = [n for n, m in ref.text_encoder.named_modules() if isinstance(m, torch.nn.Linear)]
    assert all(isinstance(pipe.text_encoder.get_submodule(n), Fp8Linear) for n in l_linear)
    g_fp8 = {n for n, m in pipe.text_encoder_2.named_modules() if isinstance(m, Fp8Linear)}
    g_linear = {n for n, m in ref.text_encoder_2.named_modules() if isinstance(m, torch.nn.Linear)}
    kept = {"text_projection"} | {n for n in g_linear if n.startswith("text_model.encoder.layers.0.")}
    assert g_fp8 == g_linear - kept and len(kept) > 1
    assert {layer.component for layer in candidate.plan} == {"text_encoder", "text_encoder_2"}

    # Independently: the same FP8 layers swapped into a copy by hand give the same embeddings.
    by_hand = copy.deepcopy(ref.text_encoder)
    spec = Fp8Spec(format="e4m3fn", weights="per_channel", activations="dynamic_per_token", backend="emulated")
    for name in l_linear:
        by_hand.set_submodule(name, Fp8Linear.from_linear(by_hand.get_submodule(name), spec, "emulated"))
    tokens = ref.tokenizer(["a red cube"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = pipe.text_encoder(tokens).text_embeds, by_hand(tokens).text_embeds
        exact = ref.text_encoder(tokens).text_embeds
    assert torch.equal(ours, theirs) and not torch.equal(ours, exact)

    images = generate(pipe, BATCH, GEN)
    reference = generate(ref, BATCH, GEN)
    assert torch.isfinite(images).all() and not torch.equal(images, reference)


def test_explain_shows_the_text_encoders_and_quantize_saves_them(
    text_policy: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["policy", "explain", str(text_policy)]) == 0
    out = capsys.readouterr().out
    assert "text_encoder:text_model.encoder.layers.0.self_attn.q_proj" in out
    assert "text_encoder_2:text_projection" in out and "text_encoder + text_encoder_2 + transformer" in out
    # what is saved and loaded back: tests/test_component_checkpoints.py
    assert main(["quantize", str(text_policy), "--out", str(workdir / "x.safetensors")]) == 0
    assert "; text_encoder + text_encoder_2; " in capsys.readouterr().out


def test_t5_rules_on_a_model_without_t5_are_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = write(
        tmp_path / "t5.yaml",
        "name: fp8-t5\ncomponents:\n  text_encoder_3:\n    default: {format: e4m3fn, activations: none}\n",
    )
    assert main(["run", str(TEST_SUITES / "smoke.yaml"), "--policy", str(policy), "--no-mlflow"]) == 2
    assert "quantizes 'text_encoder_3', which this model does not have" in capsys.readouterr().err
    dropped = write(tmp_path / "t5b.yaml", "name: t5b\ncomponents:\n  text_encoder_3: {drop: true, rules: []}\n")
    with pytest.raises(Exception, match="a dropped component takes no other settings"):
        load_policy(str(dropped))
