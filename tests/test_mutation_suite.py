"""Mutation suite: broken FP8 builds of the tiny model (benchmarks/mutants.py) must fail the smoke
gate and the shipped sound policies must pass it, all in ONE `evals run` (benchmarks/catch_table.py).
A miss fails its test: the gate, not the mutant, is what needs fixing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from benchmarks import catch_table
from benchmarks.mutants import ALL_LAYERS, CHECKPOINT_MUTANTS, POLICY_MUTANTS, Mutant, make_mutants

pytestmark = pytest.mark.slow

SMOKE = Path(__file__).resolve().parents[1] / "suites" / "smoke.yaml"
PLANNED = [(n, layer, k, pos, fail) for n, layer, k, pos, fail in CHECKPOINT_MUTANTS] + [
    (n, layer, k, pos, True) for n, layer, k, pos, _ in POLICY_MUTANTS
]
MUST_FAIL = [name for name, *_, fail in PLANNED if fail]
CHECKPOINTS = [name for name, *_ in CHECKPOINT_MUTANTS]


@dataclass(frozen=True)
class Built:
    source: Path
    mutants: dict[str, Mutant]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The tiny model quantized by `evals quantize fp8-e4m3-rowwise`, and its mutants."""
    out = tmp_path_factory.mktemp("mutation")
    source = catch_table.quantize_source(out)
    return Built(source, {m.name: m for m in make_mutants(source, out / "mutants")})


@pytest.fixture(scope="module")
def rows(built: Built) -> dict[str, catch_table.Row]:
    """ONE smoke run of every sound policy and every must-fail mutant, read into catch-table rows.
    Fail-fast: a mutant stops once a gate of it has failed for good, which gives the verdict of the
    whole run (tests/test_fail_fast.py) in about a third of the time. The coarser correct builds are
    only reported (`benchmarks/catch_table.py`), so they stay out of this run."""
    mutants = [m for m in built.mutants.values() if m.must_fail]
    run_dir = catch_table.run_suite(SMOKE, mutants, built.source.parent, fail_fast=True)
    return {row.name: row for row in catch_table.read_rows(run_dir, mutants, catch_table.sound_policies(SMOKE))}


def _describe(row: catch_table.Row) -> str:
    return (
        f"step error {row.step_error:.4f}, PSNR mean {row.psnr_mean:.2f}, min {row.psnr_min:.2f}; "
        f"blocking failed gates: {list(row.failed)}"
    )


@pytest.mark.parametrize("name", MUST_FAIL)
def test_must_fail_mutant_is_caught(rows: dict[str, catch_table.Row], name: str) -> None:
    row = rows[name]
    assert row.caught, f"the gate missed mutant {name}: {_describe(row)}"


@pytest.mark.parametrize("policy", catch_table.sound_policies(SMOKE))
def test_sound_policy_passes(rows: dict[str, catch_table.Row], policy: str) -> None:
    row = rows[policy]
    assert not row.failed, f"sound policy {policy} failed the gate: {_describe(row)}"


SINGLE_LAYER = [name for name, layer, _, _, fail in CHECKPOINT_MUTANTS if fail and "," not in layer]
CAUGHT_ONLY_BY_BASELINES_BEFORE = ("b0-to-v-16-rows-zeroed", "mut-proj-out-e5m2", "fp8-all-linears")
"""Broken builds that image baselines alone used to catch (a held-out check on another CPU): step
error must catch them now, since image baselines no longer carry tight tolerances."""


def test_single_layer_mutants_are_named_at_their_layer(rows: dict[str, catch_table.Row], built: Built) -> None:
    """A failed single-layer mutant's step error is traced to the layer that was broken, in at least
    90% of them (docs/gate-evidence.md: every one of today's)."""
    wrong = {n: rows[n].named for n in SINGLE_LAYER if rows[n].named != built.mutants[n].layer}
    assert len(wrong) <= 0.1 * len(SINGLE_LAYER), f"named elsewhere: {wrong}"


@pytest.mark.parametrize("name", CAUGHT_ONLY_BY_BASELINES_BEFORE)
def test_step_error_catches_what_only_image_baselines_caught(rows: dict[str, catch_table.Row], name: str) -> None:
    assert rows[name].by_step_error, f"{name}: step error gates did not fail it: {_describe(rows[name])}"


def test_mutants_cover_positions_layers_and_kinds() -> None:
    must_fail = [(layer, kind, pos) for _, layer, kind, pos, fail in PLANNED if fail]
    assert len(must_fail) >= 20
    assert {"early", "middle", "late", "output"} <= {pos for *_, pos in must_fail}
    layers = " ".join(layer for layer, *_ in must_fail)
    for part in ("to_q", "add_q_proj", "to_k", "add_k_proj", "to_v", "add_v_proj", "attn2", "to_out.0"):
        assert part in layers, part
    for part in ("to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context", "norm1.linear", "norm1_context"):
        assert part in layers, part
    assert "norm_out.linear" in layers and "proj_out" in layers
    assert "transformer_blocks.5." in layers  # the context_pre_only block
    kinds = {kind for _, kind, _ in must_fail}
    expected = {
        "scale-x2",
        "scale-half",
        "scales-swapped",
        "scales-permuted",
        "rows-zeroed",
        "sign-flip",
        "sign-flip-half-rows",
        "bytes-permuted-in-rows",
        "columns-shuffled",
        "nan-scale",
        "periodic-gain-2",
        "periodic-gain-4",
        "darken",
        "e5m2-read-as-e4m3",
    }
    assert expected <= kinds, expected - kinds
    assert len(POLICY_MUTANTS) >= 2
    coarse = [name for name, *_, fail in PLANNED if not fail]
    assert len(coarse) >= 2 and all(kind == "per-tensor-scale" for _, _, kind, _, f in PLANNED if not f)
    assert all(name.replace("-", "").isalnum() and name == name.lower() for name, *_ in PLANNED)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (NaN-safe: compares the bytes)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# Which tensors of the mutated layer each kind is meant to change, in an FP8 layer / a kept float one.
TOUCHES = {
    "scale-x2": ("weight_scale", "weight"),
    "scale-half": ("weight_scale", "weight"),
    "periodic-gain-2": ("weight_scale", "weight"),
    "periodic-gain-4": ("weight_scale", "weight"),
    "scales-swapped": ("weight_scale",),
    "scales-permuted": ("weight_scale",),
    "nan-scale": ("weight_scale",),
    "sign-flip": ("weight_fp8",),
    "sign-flip-half-rows": ("weight_fp8", "weight"),
    "rows-zeroed": ("weight_fp8",),
    "16-rows-zeroed": ("weight_fp8",),
    "bytes-permuted-in-rows": ("weight_fp8",),
    "columns-shuffled": ("weight_fp8",),
    "e5m2-read-as-e4m3": ("weight_fp8", "weight_scale"),
    "per-tensor-scale": ("weight_fp8", "weight_scale"),
    "darken": ("bias",),
}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_mutant_differs_from_source_only_where_intended(built: Built, name: str) -> None:
    mutant = built.mutants[name]
    assert mutant.checkpoint is not None and mutant.checkpoint.parent.name == "mutants"
    source, source_meta = _read(built.source)
    tensors, meta = _read(mutant.checkpoint)
    assert set(tensors) == set(source)
    changed = {key for key in source if not _same(source[key], tensors[key])}
    layers = json.loads(source_meta["layers"])
    targets = sorted(layers) if mutant.layer == ALL_LAYERS else [mutant.layer]
    intended = {f"{t}.{suffix}" for t in targets for suffix in TOUCHES[mutant.kind]} & set(source)
    if mutant.layer == ALL_LAYERS:  # some layer's bytes may survive requantization; every scale changes
        assert {f"{t}.weight_scale" for t in targets} <= changed <= intended
    else:
        assert changed == intended, f"changed {sorted(changed)}, intended {sorted(intended)}"
    # the metadata is the source's: same policy (so the same baseline), hash and format
    for key in ("format", "version", "policy", "policy_sha256"):
        assert meta[key] == source_meta[key], key
    settings = json.loads(meta["layers"])
    if mutant.kind == "per-tensor-scale":  # the only setting that changes says what the file holds now
        for t in targets:
            assert settings[t]["spec"].pop("weights") == "per_tensor"
            assert layers[t]["spec"].pop("weights") == "per_channel"
            assert tensors[f"{t}.weight_scale"].shape == (1, 1)
    assert settings == layers


def test_mutants_are_deterministic(built: Built, tmp_path: Path) -> None:
    """The same tensors and metadata each time (not the same bytes: safetensors writes its metadata
    map in no fixed order)."""
    again = {m.name: m for m in make_mutants(built.source, tmp_path)}
    assert again.keys() == built.mutants.keys()
    for name, mutant in built.mutants.items():
        other = again[name]
        if mutant.policy is not None and other.policy is not None:
            assert mutant.policy.read_text() == other.policy.read_text(), name
            continue
        assert mutant.checkpoint is not None and other.checkpoint is not None, name
        (first, first_meta), (second, second_meta) = _read(mutant.checkpoint), _read(other.checkpoint)
        assert first_meta == second_meta, name
        assert first.keys() == second.keys() and all(_same(first[k], second[k]) for k in first), name


@pytest.mark.parametrize("name", [name for name, *_ in POLICY_MUTANTS])
def test_policy_mutants_are_valid_policies(built: Built, name: str) -> None:
    from evals.models.precision import load_policy

    mutant = built.mutants[name]
    assert mutant.policy is not None and mutant.checkpoint is None
    assert load_policy(str(mutant.policy)).name == name
