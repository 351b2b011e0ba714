from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evals.models.fp8 import Fp8Linear
from evals.models.precision import apply_policy, backend_summary, load_policy, resolve_plan
from evals.models.yamlspec import InputError
from tests.conftest import write

POLICY = """\
name: test-policy
components:
  transformer:
    default: {format: e4m3fn, weights: per_channel, activations: dynamic_per_token}
    rules:
      - {match: "transformer_blocks.1.*", precision: keep}
      - {match: "transformer_blocks.*.attn.to_q", format: e5m2, weights: per_tensor}
      - {match: "proj_out", precision: keep}
  vae: {dtype: bfloat16}
"""


def test_shipped_policy_loads() -> None:
    policy = load_policy("fp8-e4m3-rowwise")
    spec = policy.components["transformer"].default
    assert spec is not None and (spec.format, spec.weights, spec.activations) == (
        "e4m3fn",
        "per_channel",
        "dynamic_per_token",
    )
    assert [r.match for r in policy.components["transformer"].rules] == [
        "pos_embed*",
        "time_text_embed*",
        "context_embedder",
        "norm_out*",
        "proj_out",
    ]
    assert all(r.spec is None for r in policy.components["transformer"].rules)


def test_first_match_wins_and_rules_inherit_the_default(tmp_path: Path, tiny_model) -> None:
    policy = load_policy(str(write(tmp_path / "p.yaml", POLICY)))
    plan = {p.name: p for p in resolve_plan(policy, tiny_model.pipeline.components)}
    # Block 1's to_q matches rule 0 first: kept, although rule 1 also matches it.
    assert plan["transformer_blocks.1.attn.to_q"].spec is None
    q0 = plan["transformer_blocks.0.attn.to_q"]
    assert q0.rule.startswith("rule 1") and q0.spec is not None
    assert (q0.spec.format, q0.spec.weights, q0.spec.activations) == ("e5m2", "per_tensor", "dynamic_per_token")
    k0 = plan["transformer_blocks.0.attn.to_k"]
    assert k0.rule == "default" and k0.spec is not None and k0.spec.format == "e4m3fn" and k0.backend == "scaled_mm"
    assert plan["proj_out"].backend == "keep"


def test_apply_quantizes_a_copy_and_shares_the_rest(tmp_path: Path, tiny_model) -> None:
    reference = tiny_model.pipeline.components
    policy = load_policy(str(write(tmp_path / "p.yaml", POLICY)))
    candidate, plan = apply_policy(policy, reference)
    assert candidate["transformer"] is not reference["transformer"]
    assert isinstance(candidate["transformer"].get_submodule("transformer_blocks.0.attn.to_k"), Fp8Linear)
    assert isinstance(candidate["transformer"].get_submodule("transformer_blocks.1.attn.to_k"), torch.nn.Linear)
    # The reference is untouched.
    assert not any(isinstance(m, Fp8Linear) for m in reference["transformer"].modules())
    # The VAE changes dtype in a copy; unchanged text encoders are the very same objects.
    assert candidate["vae"].dtype == torch.bfloat16 and reference["vae"].dtype == torch.float32
    assert candidate["text_encoder"] is reference["text_encoder"]
    n_fp8 = sum(isinstance(m, Fp8Linear) for m in candidate["transformer"].modules())
    assert backend_summary(plan) == f"keep:{len(plan) - n_fp8},scaled_mm:{n_fp8}"


def test_rule_matching_nothing_is_an_error_with_its_line(tmp_path: Path, tiny_model) -> None:
    path = write(tmp_path / "p.yaml", POLICY.replace('"proj_out"', '"proj_outt"'))
    policy = load_policy(str(path))
    with pytest.raises(InputError, match=r"p.yaml:8: components.transformer.rules\[2\]: pattern 'proj_outt'"):
        resolve_plan(policy, tiny_model.pipeline.components)


BAD = [
    ("default: {format", "defualt: {format", "unknown key (did you mean 'default'?)", 4),
    ("format: e4m3fn", "format: e4m3", "unknown value 'e4m3' (did you mean 'e4m3fn'?)", 4),
    ("weights: per_channel", "weights: per_row", "unknown value 'per_row'", 4),
    ('precision: keep}\n      - {match: "trans', 'precision: kept}\n      - {match: "trans', "unknown value 'kept'", 6),
    (
        '"proj_out", precision: keep',
        '"proj_out", precision: keep, format: e5m2',
        "makes no sense with precision: keep",
        8,
    ),
    ("activations: dynamic_per_token}", "activations: none, backend: scaled_mm}", "scaled_mm needs quantized", 4),
    ("vae: {dtype: bfloat16}", "vae: {dtype: bf16}", "unknown value 'bf16' (did you mean 'bfloat16'?)", 9),
    ("vae: {dtype: bfloat16}", "vae: {dtype: bfloat16, drop: true}", "unknown key", 9),
    ("vae: {dtype: bfloat16}", "unet: {dtype: bfloat16}", "unknown key", 9),
    ("name: test-policy", "name: ../evil", "must match ^[a-z0-9][a-z0-9_.-]{0,63}$ (lower-case letters", 1),
    ('- {match: "proj_out"', "- {match: 3", "match: expected a string, got int 3 (fnmatch pattern", 8),
]


@pytest.mark.parametrize(("old", "new", "message", "line"), BAD, ids=[b[2][:40] for b in BAD])
def test_bad_policies(tmp_path: Path, old: str, new: str, message: str, line: int) -> None:
    assert old in POLICY
    path = write(tmp_path / "bad.yaml", POLICY.replace(old, new, 1))
    with pytest.raises(InputError) as info:
        load_policy(str(path))
    assert message in str(info.value)
    assert f"{path}:{line}:" in str(info.value)


def test_unknown_policy_name_lists_shipped_ones() -> None:
    with pytest.raises(InputError, match=r"did you mean 'fp8-e4m3-rowwise'.*expected one of: .*fp8-e4m3-tensor-static"):
        load_policy("fp8-e4m3-roww1se")
