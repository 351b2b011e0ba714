"""`evals sensitivity` and `evals policy search`: sweep groups of layers, then keep the most sensitive
ones in high precision, greedily, until the suite's gates pass."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from evals.api import Prepared, RunRequest, execute, prepare
from evals.background_tracker import mlflow_tracker
from evals.metrics import OUTPUTS, higher_is_better
from evals.models.attention_policy import AttentionPolicy
from evals.models.fp8 import Fp8Spec
from evals.models.precision import PrecisionPolicy, load_policy
from evals.models.yamlspec import InputError
from evals.rundir import new_run_dir, write_atomic
from evals.sensitivity import (
    PRODUCT,
    Group,
    GroupSensitivity,
    SwitchableCandidate,
    linear_groups,
    plot_sensitivity,
    rank,
    variant_name,
)
from evals.sensitivity import write_json as write_sensitivity_json

logger = logging.getLogger(__name__)


@dataclass
class Sweep:
    run_dir: Path
    groups: list[Group]
    ranking: list[GroupSensitivity]
    whole_policy: float
    switch: SwitchableCandidate


def sweep(
    prepared: Prepared, policy: PrecisionPolicy, by: str, metric: str, request: RunRequest, runs_dir: Path | None = None
) -> Sweep:
    if metric not in OUTPUTS or OUTPUTS[metric] not in prepared.suite.metrics:
        raise InputError(
            f"--metric {metric!r}: not computed by suite {prepared.suite.name!r} ({prepared.suite.metrics})"
        )
    switch = SwitchableCandidate(prepared.model, policy)
    groups = linear_groups(switch.shapes, by)
    every = set(switch.shapes)
    candidates = [switch.variant("whole-policy", every)]
    for g in groups:
        candidates.append(switch.variant(variant_name("only", g.name), set(g.modules)))
        candidates.append(switch.variant(variant_name("keep", g.name), every - set(g.modules)))
    logger.info(
        f"sensitivity: {len(candidates)} candidates (the whole policy, and each of {len(groups)} groups alone in FP8 "
        f"and alone kept) on {len(prepared.suite.samples())} samples"
    )
    outcome, tracker = execute(prepared, candidates, request, runs_dir)
    ranking = rank(groups, outcome.summaries, metric, higher_is_better(metric))
    whole = outcome.summaries["whole-policy"].metrics[metric]["mean"]
    write_sensitivity_json(outcome.run_dir / "sensitivity.json", ranking, metric, whole)
    plot_sensitivity(ranking, metric, whole, outcome.run_dir / "sensitivity.png")
    logged = mlflow_tracker(tracker)
    if logged is not None and logged.parent_id:
        for name in ("sensitivity.json", "sensitivity.png"):
            logged.client.log_artifact(logged.parent_id, str(outcome.run_dir / name))
    return Sweep(outcome.run_dir, groups, ranking, whole, switch)


def sensitivity_table(result: Sweep, metric: str) -> str:
    from evals.reports.render import text_table

    rows = [
        [str(i + 1), r.group, f"{r.params:,}", f"{r.only_quantized:.3f}", f"{r.only_kept:.3f}"]
        for i, r in enumerate(result.ranking)
    ]
    header = ["rank", "group", "params", f"{metric}: only this in FP8", f"{metric}: all but this in FP8"]
    return f"{text_table(rows, header)}\n\nwhole policy in FP8: {metric} {result.whole_policy:.3f}  ({result.run_dir})"


def run_sensitivity(request: RunRequest, start: str, by: str, metric: str) -> int:
    policy = load_policy(start)
    prepared = prepare(request)
    result = sweep(prepared, policy, by, metric, request)
    print(sensitivity_table(result, metric))
    print(f"plot: {result.run_dir / 'sensitivity.png'}")
    return 0


def _spec_yaml(spec: Fp8Spec | None) -> str:
    if spec is None:
        return "{precision: keep}"
    block = f", block_size: {spec.block_size}" if spec.weights == "per_block" else ""
    return (
        f"{{format: {spec.format}, weights: {spec.weights}, activations: {spec.activations}, "
        f"backend: {spec.backend}{block}}}"
    )


def _patterns(group: Group, by: str) -> list[str]:
    """Keep-rules for the group's linear layers (its attention products are kept by attention rules)."""
    linear = [m for m in group.modules if not m.endswith(PRODUCT)]
    if by == "block" and group.name.startswith("transformer_blocks.") and linear:
        return [f"{group.name}.*"]
    return linear


def _attention_yaml(attention: AttentionPolicy | None, kept: list[str]) -> list[str]:
    """The start policy's attention section with the kept attention products in bf16 first."""
    if attention is None:
        return []
    lines = ["    attention:", f"      default: {attention.default}", "      rules:"]
    lines += [f'        - {{match: "{name}", precision: bf16}}  # kept' for name in kept]
    lines += [f'        - {{match: "{rule.match}", precision: {rule.precision}}}' for rule in attention.rules]
    return lines if len(lines) > 3 else lines[:2]


def policy_yaml(
    start: PrecisionPolicy,
    name: str,
    kept: list[GroupSensitivity],
    groups: dict[str, Group],
    by: str,
    metric: str,
    sweep_result: Sweep,
    final_metric: float,
    fp8_share: float,
) -> str:
    transformer = start.components["transformer"]
    lines = [
        f"# Found by `evals policy search` from {start.name} (groups by {by}), kept in high precision",
        f"# greedily by sensitivity until the suite's gates passed. Evidence ({metric} mean against the",
        f"# reference; whole {start.name}: {sweep_result.whole_policy:.3f}; this policy: {final_metric:.3f}):",
    ]
    for row in sweep_result.ranking:
        status = "KEPT" if row.group in {k.group for k in kept} else "fp8 "
        lines.append(
            f"#   {status} {row.group}: only it in FP8 -> {row.only_quantized:.3f}, "
            f"all but it -> {row.only_kept:.3f} ({row.params:,} params)"
        )
    lines += [
        f"# {fp8_share:.1%} of the swept linear parameters stay in FP8. Sweep: {sweep_result.run_dir}",
        f"name: {name}",
        f"description: {start.name} with {len(kept)} sensitive group(s) kept in high precision",
        "components:",
        "  transformer:",
        f"    default: {_spec_yaml(transformer.default)}",
    ]
    rules = [
        f'      - {{match: "{pattern}", precision: keep}}  # {row.group}'
        for row in kept
        for pattern in _patterns(groups[row.group], by)
    ]
    rules += [f'      - {{match: "{rule.match}", ' + _spec_yaml(rule.spec)[1:] for rule in transformer.rules]
    lines += ["    rules:", *rules] if rules else []
    if transformer.dtype:
        lines.append(f"    dtype: {transformer.dtype}")
    kept_products = [m for row in kept for m in groups[row.group].modules if m.endswith(PRODUCT)]
    lines += _attention_yaml(transformer.attention, [m.removesuffix(PRODUCT) for m in kept_products])
    for comp, cp in start.components.items():
        if comp == "transformer":
            continue
        lines.append(f"  {comp}: {{drop: true}}" if cp.drop else f"  {comp}: {{dtype: {cp.dtype}}}")
    return "\n".join(lines) + "\n"


def run_search(request: RunRequest, start: str, by: str, metric: str, out: Path) -> int:
    if out.suffix not in (".yaml", ".yml"):
        raise InputError(f"--out {out}: expected a .yaml file name")
    policy = load_policy(start)
    prepared = prepare(request)
    search_dir = new_run_dir(request.runs_dir, f"{prepared.suite.name}-search")
    result = sweep(prepared, policy, by, metric, request, search_dir)
    print(sensitivity_table(result, metric))
    groups = {g.name: g for g in result.groups}
    every = set(result.switch.shapes)
    quiet = RunRequest(**{**asdict(request), "mlflow": False, "progress": False})
    log: list[dict[str, Any]] = []

    def evaluate(kept: list[GroupSensitivity]) -> tuple[bool, float]:
        kept_modules = {m for k in kept for m in groups[k.group].modules}
        name = f"search-step-{len(log)}"
        outcome, _ = execute(prepared, [result.switch.variant(name, every - kept_modules)], quiet, search_dir)
        passed = outcome.verdict.passed
        value = outcome.summaries[name].metrics[metric]["mean"]
        log.append(
            {
                "step": len(log),
                "kept": [k.group for k in kept],
                "passed": passed,
                metric: value,
                "failed_gates": [r.gate.describe() for r in outcome.verdict.failed],
                "run_dir": str(outcome.run_dir),
            }
        )
        logger.info(
            f"step {len(log) - 1}: keep {[k.group for k in kept] or 'nothing'} -> {metric} {value:.3f}, "
            f"{'passes' if passed else 'fails'}"
        )
        return passed, value

    kept: list[GroupSensitivity] = []
    passed, value = evaluate(kept)
    for row in result.ranking:
        if passed:
            break
        kept.append(row)
        passed, value = evaluate(kept)
    write_atomic(search_dir / "search.json", json.dumps(log, indent=2) + "\n")
    if not passed:
        print(f"no policy passes the gates even with every group kept; log: {search_dir / 'search.json'}")
        return 1
    # Prefer the most parameters in FP8: put back any kept group the gates do not need, largest first.
    for row in sorted(kept, key=lambda r: -r.params):
        trial = [k for k in kept if k is not row]
        trial_passed, trial_value = evaluate(trial)
        if trial_passed:
            kept, value = trial, trial_value
    write_atomic(search_dir / "search.json", json.dumps(log, indent=2) + "\n")
    kept_params = sum(k.params for k in kept)
    total = sum(g.params for g in result.groups)
    text = policy_yaml(policy, out.stem, kept, groups, by, metric, result, value, 1 - kept_params / total)
    write_atomic(out, text)
    load_policy(str(out))  # what we write must load
    print(
        f"wrote {out}: kept {[k.group for k in kept]}; {1 - kept_params / total:.1%} of swept parameters in FP8; "
        f"search log {search_dir / 'search.json'}"
    )
    return 0
