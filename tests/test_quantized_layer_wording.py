"""`evals validate` and `evals policy explain` name what a layer is quantized to: an int8 layer is not
an FP8 one. The expected counts come from the tiny transformer's linear layers and the policies' own
patterns, matched here with fnmatch (the first matching rule wins)."""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import torch

from evals.cli import main
from tests.conftest import REPO, write

pytest.importorskip("torchao", reason="torchao is in the test extra: pip install -e '.[test]'")

INT8_KEEP = (  # models/policies/torchao-int8-dynamic.yaml's keep-rules
    "pos_embed*",
    "time_text_embed*",
    "context_embedder",
    "norm_out*",
    "proj_out",
    "*.norm1.linear",
    "*.norm1_context.linear",
)

MIXED = """name: fp8-with-int8-block-0
description: FP8 row-wise, block 0 in torchao's INT8 weight-only
components:
  transformer:
    default: {format: e4m3fn, weights: per_channel, activations: dynamic_per_token}
    rules:
      - {match: "transformer_blocks.0.*", format: int8, weights: per_channel, activations: none, backend: torchao}
      - {match: "proj_out", precision: keep}
"""


def linear_names(tiny_model) -> list[str]:
    transformer = tiny_model.pipeline.transformer
    return [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]


def test_int8_layers_are_called_int8(tiny_model, capsys: pytest.CaptureFixture[str]) -> None:
    names = linear_names(tiny_model)
    int8 = [n for n in names if not any(fnmatchcase(n, p) for p in INT8_KEEP)]
    assert 0 < len(int8) < len(names)
    assert (REPO / "models/policies/torchao-int8-dynamic.yaml").read_text().count("precision: keep") == len(INT8_KEEP)

    assert main(["validate", "torchao-int8-dynamic", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert f"ok: {len(int8)} INT8 layers on tiny" in out and "FP8" not in out

    assert main(["policy", "explain", "torchao-int8-dynamic", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert f"{len(int8)}/{len(names)} linear layers in INT8" in out and "FP8" not in out
    rows = [line.split() for line in out.splitlines()]
    precision = {row[0]: row[2] for row in rows if row and row[0] in names}
    assert precision == {n: "int8" if n in int8 else "keep" for n in names}


def test_fp8_and_int8_layers_are_counted_apart(tiny_model, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = linear_names(tiny_model)
    int8 = [n for n in names if fnmatchcase(n, "transformer_blocks.0.*")]
    fp8 = [n for n in names if n not in int8 and n != "proj_out"]
    policy = str(write(tmp_path / "mixed.yaml", MIXED))
    assert main(["validate", policy, "--model", "tiny"]) == 0
    expected = f"{len(fp8) + len(int8)} quantized layers ({len(fp8)} FP8, {len(int8)} INT8)"
    assert f"ok: {expected} on tiny" in capsys.readouterr().out
    assert main(["policy", "explain", policy, "--model", "tiny"]) == 0
    summary = capsys.readouterr().out.splitlines()[-1]
    assert f"{len(fp8) + len(int8)}/{len(names)} linear layers quantized ({len(fp8)} FP8, {len(int8)} INT8)" in summary
    # An FP8-only policy reads as before.
    assert main(["validate", "fp8-e4m3-rowwise", "--model", "tiny"]) == 0
    assert "ok: 85 FP8 layers on tiny" in capsys.readouterr().out
