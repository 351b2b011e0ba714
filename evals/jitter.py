"""Jitter between machines, measured on one: the same run again under another machine's arithmetic.

bf16 and FP8 kernels are chosen by the instruction set (CPU) or by the GPU's libraries, and the sampler
turns their ulps into decibels. A baseline gate's tolerance must hold on machines nobody here has, so
`evals baseline update` runs the accepted run's suite and candidates again under each variant of the
platform's arithmetic and keeps, with the baseline, how far every figure moved: its jitter. Gates
never apply a tolerance inside it (evals.gates.JITTER_MARGIN).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.models.yamlspec import InputError


@dataclass(frozen=True)
class Variant:
    name: str
    """Names the variant in baselines and messages."""
    env: dict[str, str]
    """Environment variables that change the arithmetic."""
    args: tuple[str, ...] = ()
    """Extra `evals run` arguments (an eager candidate instead of a compiled one)."""
    doc: str = ""


VARIANTS: dict[str, tuple[Variant, ...]] = {
    "cpu": (
        Variant("aten-default", {"ATEN_CPU_CAPABILITY": "default"}, doc="ATen's kernels without AVX2/AVX-512"),
        Variant("onednn-sse41", {"ONEDNN_MAX_CPU_ISA": "SSE41"}, doc="oneDNN's bf16/FP8 matmuls without AVX"),
    ),
    "cuda": (
        Variant("tf32", {"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"}, doc="float32 matmuls in TF32"),
        Variant("eager", {}, ("--compile", "none"), doc="candidates run eagerly, not compiled"),
    ),
}


def variants_for(device: str) -> tuple[Variant, ...]:
    return VARIANTS["cuda" if device.startswith("cuda") else "cpu"]


def rerun_arguments(run: dict[str, Any], run_dir: Path, runs_dir: Path, cache_dir: Path) -> list[str]:
    """`evals run` arguments that repeat a finished run's suite, model and candidates."""
    args = [
        "run",
        str(run["suite"]["path"]),
        "--model",
        str(run["model"]["source"]),
        "--device",
        str(run["environment"]["device"]),
        "--reference-dtype",
        str(run["reference_dtype"]),
        "--no-mlflow",
        "--no-progress",
        "--runs-dir",
        str(runs_dir),
        "--cache-dir",
        str(cache_dir),
    ]
    for p in run["policies"]:
        if p.get("noise_floor"):
            continue
        if p.get("checkpoint"):
            args += ["--candidate-checkpoint", f"{p['name']}={p['checkpoint']}"]
        elif p.get("policy_path"):
            args += ["--policy", str(p["policy_path"])]
        else:
            raise InputError(f"{run_dir}/run.json: candidate {p['name']!r} names no policy file or checkpoint")
    return args


def run_variant(run: dict[str, Any], run_dir: Path, variant: Variant, out_dir: Path) -> Path:
    """The run repeated under `variant` (its own runs folder and reference cache); its run directory."""
    runs_dir = out_dir / variant.name / "runs"
    cache_dir = out_dir / variant.name / "cache"
    log = out_dir / f"{variant.name}.log"
    argv = [sys.executable, "-m", "evals", *rerun_arguments(run, run_dir, runs_dir, cache_dir), *variant.args]
    env = dict(os.environ, **variant.env)
    with log.open("w") as out:
        code = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    made = sorted(runs_dir.glob("*")) if runs_dir.is_dir() else []
    if code not in (0, 1) or len(made) != 1 or not (made[0] / "summary.json").is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"the run under {variant.name} exited {code} without a summary ({log}):\n{tail}")
    return made[0]


def _figures(run_dir: Path) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, float]]]]:
    """(policy -> metric summary stats flattened, policy -> metric -> sample id -> value) of a run."""
    from evals.records import sample_values

    summary = json.loads((run_dir / "summary.json").read_text())["policies"]
    flat = {
        policy: {f"{m}_{stat}": v for m, stats in s["metrics"].items() for stat, v in stats.items()}
        for policy, s in summary.items()
    }
    samples: dict[str, dict[str, dict[str, float]]] = {}
    for policy, metric, sample_id, value in sample_values(run_dir):
        samples.setdefault(policy, {}).setdefault(metric, {})[sample_id] = value
    return flat, samples


def _moved(a: float, b: float) -> float:
    if math.isinf(a) and math.isinf(b) and a == b:
        return 0.0  # identical images on both: PSNR +inf
    return abs(a - b)


def _layers_moved(base_dir: Path, variant_dir: Path, policy: str) -> float | None:
    """How far the policy's layer profile moved: the largest ratio of a part's error under the variant
    to the same part's in the accepted run, less 1 (None: a run has no profile)."""
    from evals.step_error.locate import max_ratio, read_profile

    base, other = read_profile(base_dir, policy), read_profile(variant_dir, policy)
    if base is None or other is None:
        return None
    return max(max_ratio(other, base), max_ratio(base, other)) - 1.0


def measure(base_dir: Path, variant_dirs: dict[str, Path], policies: list[str]) -> dict[str, dict[str, Any]]:
    """Per policy: the variants, and for each summary figure and each metric's samples, the largest
    move from the accepted run under any variant (NaN where one of them is not finite); with layer
    profiles, `layers_max_ratio`: how far any layer's own step error moved, as a ratio less 1."""
    base_flat, base_samples = _figures(base_dir)
    out: dict[str, dict[str, Any]] = {}
    moved = {name: _figures(path) for name, path in variant_dirs.items()}
    for policy in policies:
        metrics: dict[str, float] = {}
        per_sample: dict[str, float] = {}
        for flat, samples in moved.values():
            for key, value in base_flat.get(policy, {}).items():
                other = flat.get(policy, {}).get(key, math.nan)
                metrics[key] = max(metrics.get(key, 0.0), _moved(value, other))
            for metric, values in base_samples.get(policy, {}).items():
                theirs = samples.get(policy, {}).get(metric, {})
                worst = max((_moved(v, theirs.get(sid, math.nan)) for sid, v in values.items()), default=0.0)
                per_sample[metric] = max(per_sample.get(metric, 0.0), worst)
        layers = [_layers_moved(base_dir, path, policy) for path in variant_dirs.values()]
        if layers and all(m is not None for m in layers):
            metrics["layers_max_ratio"] = max(m for m in layers if m is not None)
        finite = lambda d: {k: v for k, v in d.items() if math.isfinite(v)}  # noqa: E731
        out[policy] = {"variants": sorted(variant_dirs), "metrics": finite(metrics), "per_sample": finite(per_sample)}
    return out
