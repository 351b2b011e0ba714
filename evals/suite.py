"""Suites: YAML -> the frozen dataclasses of evals/suite_types.py, validated completely before any
work; the shipped suites by name. Imports no torch."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from evals import suite_schema as schema
from evals.detectors import detector_params
from evals.metrics import OUTPUTS
from evals.models.yamlspec import Errors, InputError, StrictModel, YamlDoc, did_you_mean, load_yaml, validate
from evals.step_error.steps import recorded_steps
from evals.suite_types import (
    DEFAULT_MIN_VOTES,
    DETECTOR_STATS,
    METRIC_STATS,
    PER_SAMPLE,
    Case,
    GateSpec,
    Generation,
    GuardSpec,
    Suite,
)


def _unique(doc: YamlDoc, values: Sequence[Any], path: tuple[Any, ...], what: str) -> tuple[Any, ...]:
    if len(set(values)) != len(values):
        raise doc.error(path, f"duplicate {what} in {values}")
    return tuple(values)


def _case(doc: YamlDoc, i: int, given: schema.Case, default_seeds: list[int] | None, seen: set[str]) -> Case:
    path = ("cases", i)
    if given.id in seen:
        raise doc.error(path + ("id",), f"duplicate case id {given.id!r}")
    seen.add(given.id)
    if not given.prompt.strip():
        raise doc.error(path + ("prompt",), "prompt is empty")
    seeds = given.seeds if given.seeds is not None else default_seeds
    if seeds is None:
        raise doc.error(path, "missing required key 'seeds' (or set top-level 'seeds')")
    return Case(given.id, given.prompt, _unique(doc, seeds, path + ("seeds",), "seeds"), tuple(given.tags))


def _gate(doc: YamlDoc, i: int, given: schema.Gate, suite: schema.SuiteFile, tags: set[str]) -> GateSpec:
    path = ("gates", i)
    keys = given.model_fields_set
    if sum(k in keys for k in ("metric", "detector", "bench", "guard", "layers", "human")) != 1:
        raise doc.error(path, "a gate names exactly one of 'metric', 'detector', 'bench', 'guard', 'layers' or 'human'")
    if given.min_votes is not None and given.human is None:
        raise doc.error(path + ("min_votes",), "min_votes belongs to a human gate ('human: ...')")
    if given.human is not None:
        for key in ("tags", "baseline"):
            if getattr(given, key):
                raise doc.error(path + (key,), f"a human gate judges every vote of the candidate; no {key!r}")
        stats: tuple[str, ...] = ("value",)
    elif given.layers is not None:
        if "step_error" not in suite.metrics:
            raise doc.error(path + ("layers",), "a layers gate needs step_error in 'metrics' (it profiles its layers)")
        for key in ("tags", "baseline"):
            if getattr(given, key):
                raise doc.error(path + (key,), f"a layers gate judges the layer profile itself; no {key!r}")
        stats = ("value",)
    elif given.guard is not None:
        if suite.guard is None:
            raise doc.error(path + ("guard",), "a guard gate needs the suite's 'guard' section")
        stats = ("value",)
    elif given.bench is not None:
        if suite.bench is None:
            raise doc.error(path + ("bench",), "a bench gate needs the suite's 'bench' section")
        if given.tags:
            raise doc.error(path + ("tags",), "a bench gate measures the transformer, not samples; no 'tags'")
        stats = ("value",)
    elif given.metric is not None:
        if OUTPUTS[given.metric] not in suite.metrics:
            raise doc.error(
                path + ("metric",), f"metric {OUTPUTS[given.metric]!r} is gated but not listed in 'metrics'"
            )
        stats = (*METRIC_STATS, PER_SAMPLE) if given.baseline is not None else METRIC_STATS
    else:
        if given.detector not in suite.detectors:
            raise doc.error(path + ("detector",), f"detector {given.detector!r} is gated but not listed in 'detectors'")
        stats = DETECTOR_STATS
    if given.stat is None and given.bench is None and given.guard is None and given.layers is None and not given.human:
        raise doc.error(path, "missing required key 'stat'")
    stat = given.stat or "value"
    if stat not in stats:
        raise doc.error(path + ("stat",), f"unknown value {stat!r}" + did_you_mean(stat, stats))
    if given.baseline is not None:
        for key in ("op", "value"):
            if key in keys:
                raise doc.error(path + (key,), f"a baseline gate has no {key!r}: its threshold is the drop allowed")
        limits = [(k, v) for k, v in given.baseline if v is not None]
        if len(limits) != 1:
            raise doc.error(path + ("baseline",), "expected exactly one of max_drop or max_rel_drop")
        if given.tags:
            raise doc.error(path + ("tags",), "a baseline gate compares whole runs; it takes no 'tags'")
        baseline: tuple[str, float] | None = limits[0]
        op, value = "<=", limits[0][1]
    else:
        for key in ("op", "value"):
            if getattr(given, key) is None:
                raise doc.error(path, f"missing required key {key!r} (or give 'baseline')")
        baseline, op, value = None, str(given.op), float(given.value or 0.0)
    for j, tag in enumerate(given.tags):
        if tag not in tags:
            raise doc.error(path + ("tags", j), f"no case has tag {tag!r}{did_you_mean(tag, sorted(tags))}")
    return GateSpec(
        stat=stat,
        op=op,
        value=value,
        metric=given.metric,
        detector=given.detector,
        bench=given.bench,
        guard=given.guard,
        layers=given.layers,
        human=given.human,
        min_votes=given.min_votes or DEFAULT_MIN_VOTES,
        optional=given.optional,
        severity=given.severity,
        tags=tuple(given.tags),
        baseline=baseline,
    )


def _noise_floor(doc: YamlDoc, given: bool | str, generation: Generation) -> str | None:
    """`true` (batch composition), `false`, `batch` or `float32`."""
    if given is False:
        return None
    change = "batch" if given is True else str(given)
    if change == "batch" and generation.batch_size < 2:
        raise doc.error(
            ("noise_floor",), "a batch-composition noise floor needs generation.batch_size >= 2; use float32"
        )
    return change


def _guard(doc: YamlDoc, given: schema.Guard | None, detectors: tuple[str, ...]) -> GuardSpec | None:
    """The `guard` section: its detectors must be the suite's (they share its thresholds and records)."""
    if given is None:
        return None
    names = tuple(given.detectors or detectors)
    if not names:
        raise doc.error(("guard",), "a guard needs detectors: list some in 'detectors'")
    for i, name in enumerate(names):
        if name not in detectors:
            raise doc.error(("guard", "detectors", i), f"detector {name!r} is not listed in 'detectors'")
    candidates = None if given.candidates is None else _unique(doc, given.candidates, ("guard", "candidates"), "names")
    return GuardSpec(candidates, names, given.on_failure, given.max_tries)


def _listed(doc: YamlDoc, key: str, given: StrictModel, listed: tuple[str, ...], where: str) -> list[str]:
    """The names set in a per-metric or per-detector section; each must be listed in `where`."""
    names = [name for name, value in given if value is not None]
    for name in names:
        if name not in listed:
            raise doc.error((key, name), f"{name!r} is not listed in {where!r}")
    return names


def _thresholds(doc: YamlDoc, given: StrictModel, detectors: tuple[str, ...]) -> dict[str, dict[str, float]]:
    out = {}
    for name in _listed(doc, "detector_thresholds", given, detectors, "detectors"):
        defaults = detector_params(name)
        out[name] = {k: type(defaults[k])(v) for k, v in getattr(given, name) if v is not None}
    return out


def _weights(doc: YamlDoc, given: schema.Weights, metrics: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for name in _listed(doc, "weights", given, metrics, "metrics"):
        text = getattr(given, name)
        out[name] = str((doc.path.parent / text).expanduser()) if not Path(text).is_absolute() else text
    return out


def _metric_options(
    doc: YamlDoc, given: schema.MetricOptions, metrics: tuple[str, ...], steps: int
) -> dict[str, dict[str, Any]]:
    names = _listed(doc, "metric_options", given, metrics, "metrics")
    options = {name: {k: v for k, v in getattr(given, name) if v is not None} for name in names}
    if "step_error" in options:
        try:
            recorded_steps(options["step_error"].get("steps"), steps)
        except ValueError as exc:
            raise doc.error(("metric_options", "step_error", "steps"), str(exc)) from None
    return options


def _images(doc: YamlDoc, given: schema.Images | None, samples: int) -> int | None:
    if given is None:
        return None
    if given.sample > samples:
        raise doc.error(("images", "sample"), f"{given.sample}: the suite has {samples} samples; expected at most that")
    return given.sample


SHIPPED_SUITES = Path(__file__).resolve().parent / "suites"
"""The suites installed with the package (`suites/` in the repository links here)."""


def shipped_suites() -> list[str]:
    return sorted(p.stem for p in SHIPPED_SUITES.glob("*.yaml"))


def suite_path(text: str | Path) -> Path:
    """A suite file as given, else a shipped suite by name (`smoke`, or `suites/smoke.yaml` run
    outside the repository); InputError listing the shipped suites when neither exists."""
    path = Path(text)
    if path.exists():
        return path
    by_name = path.suffix in ("", ".yaml", ".yml") and (len(path.parts) == 1 or path.parent.name == "suites")
    shipped = SHIPPED_SUITES / f"{path.stem if path.suffix else path.name}.yaml"
    if by_name and shipped.is_file():
        return shipped
    raise InputError(
        f"suite file not found; a shipped suite can be named instead{did_you_mean(path.stem, shipped_suites())}",
        source=str(path),
    )


def load_suite(path: str | Path) -> Suite:
    """Parse and validate a suite file (or a shipped suite's name); any problem raises InputError
    naming file, line and key (every problem of the file at once)."""
    path = suite_path(path)
    doc = load_yaml(path, "suite")
    given = validate(doc, schema.SuiteFile)
    errors = Errors()
    metrics: tuple[str, ...] = errors.attempt(lambda: _unique(doc, given.metrics, ("metrics",), "names"), ())
    detectors: tuple[str, ...] = errors.attempt(lambda: _unique(doc, given.detectors, ("detectors",), "names"), ())
    seeds = given.seeds
    if seeds is not None and errors.attempt(partial(_unique, doc, seeds, ("seeds",), "seeds"), None) is None:
        seeds = None
    seen: set[str] = set()
    cases = [errors.attempt(partial(_case, doc, i, c, seeds, seen), None) for i, c in enumerate(given.cases)]
    tags = {t for c in given.cases for t in c.tags}
    gates = [errors.attempt(partial(_gate, doc, i, g, given, tags), None) for i, g in enumerate(given.gates)]
    g = given.generation
    generation = Generation(g.height, g.width, g.steps, g.guidance, g.batch_size, g.max_sequence_length)
    noise_floor = errors.attempt(partial(_noise_floor, doc, given.noise_floor, generation), None)
    thresholds = errors.attempt(partial(_thresholds, doc, given.detector_thresholds, detectors), None)
    weights = errors.attempt(partial(_weights, doc, given.weights, metrics), None)
    metric_options = errors.attempt(partial(_metric_options, doc, given.metric_options, metrics, g.steps), None)
    guard = errors.attempt(partial(_guard, doc, given.guard, detectors), None)
    samples = sum(len(c.seeds) for c in cases if c is not None)
    images = errors.attempt(partial(_images, doc, given.images, samples), None)
    errors.raise_any()
    canonical = json.dumps(doc.data, sort_keys=True, default=str).encode()
    return Suite(
        name=given.name,
        path=str(path),
        sha256=hashlib.sha256(canonical).hexdigest(),
        model=given.model,
        reference_dtype=given.reference.dtype,
        generation=generation,
        cases=tuple(c for c in cases if c is not None),
        metrics=metrics,
        detectors=detectors,
        gates=tuple(g for g in gates if g is not None),
        bench=None if given.bench is None else {k: v for k, v in given.bench if v is not None},
        policies=tuple(given.policies),
        detector_thresholds=thresholds or {},
        weights=weights or {},
        metric_options=metric_options or {},
        noise_floor=noise_floor,
        compile=given.compile,
        description=given.description,
        baselines=given.baselines or None,
        tags=tuple(sorted(tags)),
        guard=guard,
        images=images,
    )
