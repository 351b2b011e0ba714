"""Naming the broken layer: a failed candidate's layer profile (evals.step_error.profile) against its
baseline's. No torch: it reads profiles from the run directory and the committed baseline.

Profiles live in the run directory (`layers/<candidate>.json`: each part's own relative error at one
recorded step); `evals baseline update` keeps a policy's profile in its baseline. A failed candidate's
part with the largest ratio to the same part in its baseline's profile is named, block first, then the
layer inside it: "step error jumps at transformer_blocks.0.attn.to_v (x4.1 against the baseline)".
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evals.rundir import write_json

if TYPE_CHECKING:
    from evals.candidates import Candidate
    from evals.gates import Verdict
    from evals.suite_types import Suite

log = logging.getLogger(__name__)

BLOCKS = "transformer_blocks"
LAYERS_FOLDER = "layers"
"""Where a run keeps each candidate's layer profile."""
LOCATE_FILE = "locate.json"
"""Failed candidate -> the part named (Departure.to_dict())."""
FLOOR = 1e-3
"""A part that is exact in the baseline (a layer kept in the reference precision: error 0) is
compared as though its baseline error were this: above it, a kept layer has changed."""


@dataclass(frozen=True)
class Departure:
    """Where a candidate departs most from its baseline's profile."""

    part: str
    """The layer (or top-level part) named."""
    error: float
    """Its own relative error in the candidate."""
    baseline: float | None
    """The same part's error in the baseline's profile (None: no baseline profile)."""
    ratio: float
    """error / max(baseline, FLOOR); NaN without a baseline."""
    block: str | None
    """The block it sits in, when it is inside one."""

    def describe(self) -> str:
        if self.baseline is None:
            return f"largest own error at {self.part} ({self.error:.3g}; no baseline profile to compare with)"
        return (
            f"step error jumps at {self.part} (x{self.ratio:.1f} against the baseline: "
            f"{self.error:.3g} vs {self.baseline:.3g})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "part": self.part,
            "error": self.error,
            "baseline": self.baseline,
            "ratio": self.ratio if math.isfinite(self.ratio) else None,
            "block": self.block,
            "text": self.describe(),
        }


def _ratio(error: float, base: float) -> float:
    return math.inf if math.isnan(error) else error / max(base, FLOOR)


def max_ratio(errors: dict[str, float], baseline: dict[str, float]) -> float:
    """The largest ratio of any part's own error to the same part's in the baseline profile (a part
    that gives NaN: infinity); NaN when the two share no part."""
    ratios = [_ratio(e, baseline[n]) for n, e in errors.items() if n in baseline]
    return max(ratios) if ratios else math.nan


def _profiles(
    run_dir: Path, suite: Suite, device: str, reference_dtype: str, baseline_of: dict[str, str]
) -> dict[str, tuple[dict[str, float], dict[str, float] | None]]:
    """Candidate -> (its layer profile in the run, its baseline policy's committed profile for this
    platform or None), for the candidates of `baseline_of` (name -> baseline policy) that have one."""
    from evals.baselines import baselines_folder, load_profile, platform_key

    folder = baselines_folder(suite.path, suite.name, suite.baselines)
    platform = platform_key(device, reference_dtype)
    found = {}
    for name, policy in baseline_of.items():
        errors = read_profile(run_dir, name)
        if errors is not None:
            found[name] = (errors, load_profile(folder, policy, platform))
    return found


def max_error(errors: dict[str, float]) -> float:
    """The largest own error of any part of a profile (a part that gives NaN: infinity): a broken
    layer's own error is large whatever the baseline, and as free of the sampler's chaos."""
    return max((math.inf if math.isnan(e) else e for e in errors.values()), default=math.nan)


def layer_figures(
    run_dir: Path, suite: Suite, candidates: list[Candidate], device: str, reference_dtype: str
) -> dict[str, dict[str, float]]:
    """Candidate -> {max_error} of its layer profile, and {max_ratio} against its baseline policy's
    committed profile for this platform when there is one; candidates without a profile are left out
    (a layers gate then fails, saying why)."""
    pairs = _profiles(run_dir, suite, device, reference_dtype, {c.name: c.baseline_policy for c in candidates})
    figures = {}
    for name, (errors, base) in pairs.items():
        figures[name] = {"max_error": max_error(errors)}
        if base is not None:
            figures[name]["max_ratio"] = max_ratio(errors, base)
    return figures


def departures(
    run_dir: Path, suite: Suite, device: str, reference_dtype: str, baseline_of: dict[str, str]
) -> dict[str, Departure]:
    """Candidate (of `baseline_of`: name -> baseline policy) -> where its layer profile departs most
    from its baseline's; candidates with no profile, or none to compare, are left out."""
    pairs = _profiles(run_dir, suite, device, reference_dtype, baseline_of)
    named = {name: departure(errors, base) for name, (errors, base) in pairs.items()}
    return {name: d for name, d in named.items() if d is not None}


def departure(errors: dict[str, float], baseline: dict[str, float] | None) -> Departure | None:
    """The part that departs most beyond its baseline: first the block (or top-level part) with the
    largest ratio, then the layer inside that block with the largest. Without a baseline profile,
    the part with the largest own error. None when nothing was profiled."""
    if not errors:
        return None
    top = {n: e for n, e in errors.items() if n.count(".") <= 1 or not n.startswith(f"{BLOCKS}.")}
    if baseline is None:
        worst = max(errors, key=lambda n: math.inf if math.isnan(errors[n]) else errors[n])
        block = ".".join(worst.split(".")[:2]) if worst.startswith(f"{BLOCKS}.") else None
        return Departure(worst, errors[worst], None, math.nan, block)
    known = {n: e for n, e in top.items() if n in baseline}
    if not known:
        return None
    unit = max(known, key=lambda n: _ratio(known[n], baseline[n]))
    inside = {n: e for n, e in errors.items() if n.startswith(f"{unit}.") and n in baseline}
    part = max(inside, key=lambda n: _ratio(inside[n], baseline[n])) if inside else unit
    block = unit if unit.startswith(f"{BLOCKS}.") else None
    return Departure(part, errors[part], baseline[part], _ratio(errors[part], baseline[part]), block)


def read_profile(run_dir: Path, name: str) -> dict[str, float] | None:
    """A candidate's layer profile from a run directory; None when it has none or an unreadable one."""
    try:
        data = json.loads((run_dir / LAYERS_FOLDER / f"{name}.json").read_text())
        errors = data["errors"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(errors, dict) or not all(isinstance(v, (int, float)) for v in errors.values()):
        return None
    return {str(k): float(v) for k, v in errors.items()}


def locate_failures(
    run_dir: Path, suite: Suite, candidates: list[Candidate], verdict: Verdict, device: str, reference_dtype: str
) -> dict[str, dict[str, Any]]:
    """Name the broken part of every failed candidate that has a layer profile, against its baseline
    policy's committed profile for this platform; written to locate.json (removed when none failed)."""
    failed = {r.policy for r in verdict.failed}
    chosen = {c.name: c.baseline_policy for c in candidates if c.name in failed}
    found: dict[str, dict[str, Any]] = {}
    for name, named in departures(run_dir, suite, device, reference_dtype, chosen).items():
        found[name] = named.to_dict()
        log.info(f"{name}: {named.describe()}")
    path = run_dir / LOCATE_FILE
    if found:
        write_json(path, found)
    elif path.is_file():
        path.unlink()
    return found
