"""Committed baselines: per suite and policy, the summary metrics of an accepted run, kept in the
repository and reviewed like code. No torch.

Layout: `<suite's baselines folder>/<policy>.json` (default folder: `baselines/<suite name>/` beside
the suite file; a suite's `baselines:` key names another), one entry per platform, since a CPU run
in float32 and a GPU run in bfloat16 score differently:

    {"version": 1, "suite": "smoke", "policy": "fp8-e4m3-rowwise",
     "platforms": {"cpu-float32": {"metrics": {"psnr_mean": 41.2, ...}, "run": "...", "git_commit": "...",
                                   "torch": "2.14.1", "created": "2026-11-29T08:00:00Z"}}}

`evals baseline update RUN_DIR` writes them from a passing run; a baseline gate compares a
candidate's summary with the entry of its baseline policy for the run's platform.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evals.models.names import check_name
from evals.models.yamlspec import InputError
from evals.rundir import write_atomic

if TYPE_CHECKING:
    from evals.candidates import Candidate
    from evals.suite_types import Suite
    from evals.tracker_protocol import Tracker

log = logging.getLogger(__name__)

BASELINE_VERSION = 1
HEADLINE = ("psnr_mean", "psnr_min", "ssim_mean", "lpips_mean", "clip_score_delta_mean")


def platform_key(device: str, reference_dtype: str) -> str:
    """`cpu-float32`, `cuda-bfloat16`: runs on one platform are compared with each other only."""
    return f"{device.split(':')[0]}-{reference_dtype}"


def baselines_folder(suite_path: str, suite_name: str, configured: str | None) -> Path:
    base = Path(suite_path).resolve().parent
    return base / configured if configured else base / "baselines" / suite_name


@dataclass(frozen=True)
class Baseline:
    policy: str
    """The policy whose accepted run this is."""
    metrics: dict[str, float]
    """Flat summary metrics (`psnr_mean`, `black_frame_count`, ...)."""
    samples: dict[str, dict[str, float]]
    """Metric -> sample id -> value, for `per_sample` gates."""
    source: str
    """Where it came from, for messages: the file and platform, or the MLflow run."""
    jitter: dict[str, float] | None = None
    """How far the figures moved between arithmetic variants (evals.jitter), in the gates' flat form
    (`jitter:psnr_mean`, `jitter:per_sample:psnr`); None when it was not measured."""


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable baseline file ({exc})") from exc
    if (
        not isinstance(data, dict)
        or data.get("version") != BASELINE_VERSION
        or not isinstance(data.get("platforms"), dict)
    ):
        raise InputError(f"{path}: expected a baseline file of version {BASELINE_VERSION} with a 'platforms' mapping")
    return data


def baseline_file(folder: Path, policy: str) -> Path:
    """Where `policy`'s baseline is: its name is checked, since it may come from a run directory."""
    return folder / f"{check_name(policy, 'baseline policy name')}.json"


def load_committed(folder: Path, policy: str, platform: str) -> Baseline | None:
    """The committed baseline of `policy` for `platform`, or None when there is none."""
    path = baseline_file(folder, policy)
    if not path.is_file():
        return None
    entry = _read(path)["platforms"].get(platform)
    if entry is None:
        return None
    metrics = entry.get("metrics")
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
        raise InputError(f"{path}: platforms.{platform}.metrics must map metric names to numbers")
    samples = entry.get("samples", {})
    if not isinstance(samples, dict) or not all(
        isinstance(values, dict) and all(isinstance(v, (int, float)) for v in values.values())
        for values in samples.values()
    ):
        raise InputError(f"{path}: platforms.{platform}.samples must map metric names to {{sample id: number}}")
    return Baseline(
        policy,
        {k: float(v) for k, v in metrics.items()},
        {m: {sid: float(v) for sid, v in values.items()} for m, values in samples.items()},
        f"{path} [{platform}]",
        _jitter(entry.get("jitter"), f"{path}: platforms.{platform}.jitter"),
    )


def _jitter(given: Any, where: str) -> dict[str, float] | None:
    """A baseline's measured jitter ({variants, metrics: {key: x}, per_sample: {metric: x}}) as the
    gates read it, or None when it has none."""
    from evals.gates import JITTER_KEY
    from evals.suite_types import PER_SAMPLE

    if given is None:
        return None
    parts = [given.get(k) if isinstance(given, dict) else None for k in ("metrics", "per_sample")]
    metrics, per_sample = (p if isinstance(p, dict) else {"": None} for p in parts)
    flat: dict[str, float] = {}
    for prefix, values in ((JITTER_KEY, metrics), (f"{JITTER_KEY}{PER_SAMPLE}:", per_sample)):
        for k, v in values.items():
            if not isinstance(v, (int, float)):
                raise InputError(f"{where} must hold 'metrics' and 'per_sample' mapping names to numbers")
            flat[f"{prefix}{k}"] = float(v)
    return flat


def load_profile(folder: Path, policy: str, platform: str) -> dict[str, float] | None:
    """The layer profile (part -> its own step error, evals.step_error) kept with `policy`'s committed
    baseline for `platform`, or None when there is none."""
    path = baseline_file(folder, policy)
    if not path.is_file():
        return None
    layers = _read(path)["platforms"].get(platform, {}).get("layers")
    if layers is None:
        return None
    if not isinstance(layers, dict) or not all(isinstance(v, (int, float)) for v in layers.values()):
        raise InputError(f"{path}: platforms.{platform}.layers must map layer names to numbers")
    return {str(k): float(v) for k, v in layers.items()}


def missing_message(policy: str, folder: Path, platform: str) -> str:
    return (
        f"no baseline of {policy!r} for {platform} in {folder} (nor accepted in MLflow): "
        f"run the suite with that policy, then `evals baseline update RUN_DIR` and commit the file"
    )


@dataclass(frozen=True)
class Change:
    policy: str
    path: Path
    previous: dict[str, float] | None
    """The platform's metrics this replaces, or None for a new entry."""
    current: dict[str, float]


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    """JSON has no NaN or infinity: identical images give PSNR +inf, kept as 1e9 (as MLflow does)."""
    return {k: (1e9 if v == math.inf else v) for k, v in metrics.items() if not math.isnan(v)}


def update(
    folder: Path,
    suite: str,
    platform: str,
    summaries: dict[str, dict[str, float]],
    samples: dict[str, dict[str, dict[str, float]]],
    provenance: dict[str, str],
    policies: Iterable[str],
    extra: dict[str, dict[str, Any]] | None = None,
) -> list[Change]:
    """Write each policy's flat summary metrics and per-sample values (metric -> sample id -> value)
    as its baseline for `platform`, with `extra[policy]` (its layer profile, measured jitter); other
    platforms' entries are kept. Returns what changed."""
    changes = []
    for policy in policies:
        path = baseline_file(folder, policy)
        fresh: dict[str, Any] = {"version": BASELINE_VERSION, "suite": suite, "policy": policy, "platforms": {}}
        data = _read(path) if path.is_file() else fresh
        platforms: dict[str, Any] = data["platforms"]
        old = platforms.get(platform)
        current = _finite(summaries[policy])
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        per_sample = {m: _finite(values) for m, values in samples.get(policy, {}).items()}
        entry = {"metrics": current, "samples": per_sample, **(extra or {}).get(policy, {})}
        platforms[platform] = {**entry, **provenance, "created": stamp}
        write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
        changes.append(Change(policy, path, old["metrics"] if old else None, current))
    return changes


def find_baselines(
    suite: Suite, candidates: list[Candidate], device: str, reference_dtype: str, tracker: Tracker
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, float]]]]:
    """Candidate -> flat metrics of its baseline policy's committed baseline for this platform, else
    of the run MLflow holds as accepted; a candidate with neither is left out (its gates fail, with a
    warning here). Also candidate -> per-sample values (committed baselines only)."""
    folder = baselines_folder(suite.path, suite.name, suite.baselines)
    platform = platform_key(device, reference_dtype)
    found: dict[str, dict[str, float]] = {}
    samples: dict[str, dict[str, dict[str, float]]] = {}
    for c in candidates:
        committed = load_committed(folder, c.baseline_policy, platform)
        if committed is not None:
            found[c.name], samples[c.name] = {**committed.metrics, **(committed.jitter or {})}, committed.samples
    rest = sorted({c.baseline_policy for c in candidates if c.name not in found})
    accepted = (tracker.baselines(suite.name, rest) or {}) if rest else {}
    for c in candidates:
        if c.name not in found and c.baseline_policy in accepted:
            found[c.name] = accepted[c.baseline_policy]
        elif c.name not in found:
            log.warning(f"{c.name}: {missing_message(c.baseline_policy, folder, platform)}")
    return found, samples
