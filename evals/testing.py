"""Assertion helpers for quantization regression tests (used through the pytest plugin or directly).

from evals.testing import assert_gates, assert_images_close, assert_matches_baseline
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.gates import Verdict
from evals.records import PolicySummary, SampleRecord

BASELINE_VERSION = 1


@dataclass
class EvalsResult:
    """What one suite run produced."""

    run_dir: Path
    """The run directory (records, images, summary, verdict)."""
    records: list[SampleRecord]
    """Every scored sample."""
    summaries: dict[str, PolicySummary]
    """Aggregates per candidate policy."""
    verdict: Verdict
    """Gate results."""
    suite_name: str
    """The suite that ran."""


def worst_samples(records: list[SampleRecord], metric: str = "psnr", count: int = 3) -> list[SampleRecord]:
    """The `count` worst samples by `metric` (NaN counts as worst)."""
    from evals.metrics import higher_is_better

    higher = higher_is_better(metric)

    def badness(record: SampleRecord) -> float:
        value = record.metrics[metric]
        return math.inf if math.isnan(value) else (-value if higher else value)

    return sorted((r for r in records if metric in r.metrics), key=badness, reverse=True)[:count]


def _sample_line(record: SampleRecord, run_dir: Path) -> str:
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(record.metrics.items()))
    flagged = [d for d, f in record.detectors.items() if f["flagged"]]
    return (
        f"    {record.policy} {record.sample_id} ({metrics}{'; flagged ' + ', '.join(flagged) if flagged else ''})"
        f" {run_dir / record.image}"
    )


def assert_gates(result: EvalsResult) -> None:
    """Fail with the failing gates, the worst samples and the run directory when any gate failed."""
    if result.verdict.passed:
        return
    lines = [f"{len(result.verdict.failed)} gate(s) failed in suite {result.suite_name!r}:"]
    lines += [f"  {r.policy}: {r.gate.describe()}: {r.reason}" for r in result.verdict.failed]
    lines.append("worst samples by PSNR:")
    lines += [_sample_line(r, result.run_dir) for r in worst_samples(result.records)]
    lines.append(f"run directory: {result.run_dir}")
    raise AssertionError("\n".join(lines))


def assert_images_close(
    reference: Any,
    candidate: Any,
    *,
    psnr_min: float | None = None,
    ssim_min: float | None = None,
    lpips_max: float | None = None,
    lpips_weights: dict[str, str] | None = None,
) -> dict[str, list[float]]:
    """Compare image batches (float NCHW in [0, 1], or HWC uint8 arrays); fail naming each image that
    misses a bound. Returns the scores. `lpips_max` needs the LPIPS weights (see `evals doctor`)."""
    import numpy as np
    import torch

    from evals.metrics import load_metric

    def as_batch(images: Any) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if images.dtype == torch.uint8:
            images = images.float() / 255
        if images.ndim == 3:
            images = images[None]
        return images.permute(0, 3, 1, 2) if images.shape[-1] == 3 and images.shape[1] != 3 else images

    ref, cand = as_batch(reference), as_batch(candidate)
    if ref.shape != cand.shape:
        raise AssertionError(f"shapes differ: reference {tuple(ref.shape)}, candidate {tuple(cand.shape)}")
    bounds = {"psnr": (psnr_min, ">="), "ssim": (ssim_min, ">="), "lpips": (lpips_max, "<=")}
    scores: dict[str, list[float]] = {}
    failures = []
    for name, (bound, op) in bounds.items():
        if bound is None:
            continue
        metric = load_metric(name, weights=lpips_weights if name == "lpips" else None)
        values = metric(cand.float(), ref.float(), [""] * len(ref))[name].tolist()
        scores[name] = values
        for i, value in enumerate(values):
            ok = value >= bound if op == ">=" else value <= bound
            if not ok or math.isnan(value):
                failures.append(f"  image {i}: {name} {value:.4g}, needs {op} {bound:g}")
    if failures:
        raise AssertionError("images are not close enough:\n" + "\n".join(failures))
    return scores


def _baseline_values(result: EvalsResult) -> dict[str, dict[str, float]]:
    """Per policy: every metric's mean and detector count, the numbers a baseline pins."""
    out = {}
    for policy, summary in sorted(result.summaries.items()):
        flat = summary.flat()
        out[policy] = {
            k: v for k, v in sorted(flat.items()) if k.endswith(("_mean", "_count")) and "reference" not in k
        }
    return out


MACHINE_JITTER: dict[str, tuple[float, float]] = {
    "psnr_mean": (2.0, 0.0),
    "ssim_mean": (0.015, 0.0),
    "step_error_mean": (0.0, 0.01),
    "step_cosine_mean": (0.001, 0.0),
}
"""(abs, rel) tolerance of a golden figure: twice the largest move measured between arithmetic variants
and platforms on the smoke suite (docs/gate-evidence.md: PSNR mean 0.9 dB, SSIM mean 0.007, step error
mean 0.3%, step cosine 0.0001), so that a golden baseline holds on machines other than the one that
wrote it. Figures not listed here (LPIPS, CLIP score, detector counts) keep the call's tolerance."""


def _differences(expected: dict[str, Any], obtained: dict[str, Any], rel: float, abs_: float) -> list[str]:
    diffs = []
    for policy in sorted(set(expected) | set(obtained)):
        want, got = expected.get(policy, {}), obtained.get(policy, {})
        for key in sorted(set(want) | set(got)):
            a, b = want.get(key), got.get(key)
            jitter_abs, jitter_rel = MACHINE_JITTER.get(key, (0.0, 0.0))
            limit = max(abs_, jitter_abs, max(rel, jitter_rel) * abs(a)) if a is not None else 0.0
            if a is None or b is None:
                diffs.append(f"  {policy}.{key}: baseline {a}, obtained {b}")
            elif not (a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= limit)):
                diffs.append(f"  {policy}.{key}: baseline {a:.6g}, obtained {b:.6g} (tolerance {limit:.3g})")
    return diffs


def assert_matches_baseline(
    result: EvalsResult, baseline: Path, *, regen: bool = False, rel: float = 1e-3, abs_: float = 1e-4
) -> None:
    """Golden metric baseline that never passes silently: a missing file is written and the test fails;
    a mismatch beyond tolerance writes `<name>.obtained.json` beside it and fails; `regen` rewrites it.
    A figure that moves between machines is compared no tighter than MACHINE_JITTER allows."""
    obtained: dict[str, Any] = {
        "version": BASELINE_VERSION,
        "suite": result.suite_name,
        "policies": _baseline_values(result),
    }
    text = json.dumps(obtained, indent=2, sort_keys=True) + "\n"
    if regen or not baseline.is_file():
        baseline.parent.mkdir(parents=True, exist_ok=True)
        baseline.write_text(text)
        if regen:
            return
        raise AssertionError(f"no baseline yet: wrote {baseline}; check it, commit it and run again")
    expected = json.loads(baseline.read_text())
    diffs = _differences(expected.get("policies", {}), obtained["policies"], rel, abs_)
    if diffs:
        obtained_path = baseline.with_suffix(".obtained.json")
        obtained_path.write_text(text)
        raise AssertionError(
            f"metrics moved from the baseline {baseline} (tolerance rel {rel:g}, abs {abs_:g}):\n"
            + "\n".join(diffs)
            + f"\nobtained values written to {obtained_path}; rerun with --evals-regen to accept them"
            + f"\nrun directory: {result.run_dir}"
        )
