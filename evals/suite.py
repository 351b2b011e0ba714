"""Suites: YAML -> the frozen dataclasses of evals/suite_types.py, validated completely before any
work; the shipped suites by name. Imports no torch."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from evals.detectors import DETECTORS, detector_params
from evals.metrics import METRICS, OUTPUTS
from evals.models.yamlspec import (
    Errors,
    InputError,
    YamlDoc,
    check_mapping,
    did_you_mean,
    expect,
    expect_choice,
    load_yaml,
)
from evals.suite_types import (
    BENCH_FIGURES,
    BENCH_KEYS,
    CASE_ID,
    COMPILE_CHOICES,
    DETECTOR_STATS,
    METRIC_STATS,
    OPS,
    PER_SAMPLE,
    REFERENCE_DTYPES,
    SIDE_MULTIPLE,
    Case,
    GateSpec,
    Generation,
    Suite,
)


def _int(doc: YamlDoc, value: Any, path: tuple[Any, ...], minimum: int) -> int:
    expect(doc, value, path, int, "an integer")
    if value < minimum:
        raise doc.error(path, f"expected an integer >= {minimum}, got {value}")
    return int(value)


def _str_list(doc: YamlDoc, value: Any, path: tuple[Any, ...], what: str) -> tuple[str, ...]:
    expect(doc, value, path, list, f"a list of {what}")
    for i, item in enumerate(value):
        expect(doc, item, path + (i,), str, f"a {what[:-1]} name")
    return tuple(value)


def _parse_generation(doc: YamlDoc, raw: Any) -> Generation:
    path = ("generation",)
    g = check_mapping(
        doc,
        raw,
        path,
        required=("height", "width", "steps", "guidance", "batch_size"),
        optional=("max_sequence_length",),
    )
    for side in ("height", "width"):
        value = _int(doc, g[side], path + (side,), SIDE_MULTIPLE)
        if value % SIDE_MULTIPLE:
            raise doc.error(path + (side,), f"expected a multiple of {SIDE_MULTIPLE}, got {value}")
    guidance = expect(doc, g["guidance"], path + ("guidance",), (int, float), "a number")
    if guidance < 0:
        raise doc.error(path + ("guidance",), f"expected a number >= 0, got {guidance}")
    return Generation(
        height=g["height"],
        width=g["width"],
        steps=_int(doc, g["steps"], path + ("steps",), 1),
        guidance=float(guidance),
        batch_size=_int(doc, g["batch_size"], path + ("batch_size",), 1),
        max_sequence_length=_int(doc, g.get("max_sequence_length", 256), path + ("max_sequence_length",), 1),
    )


def _parse_seeds(doc: YamlDoc, value: Any, path: tuple[Any, ...]) -> tuple[int, ...]:
    expect(doc, value, path, list, "a list of integer seeds")
    if not value:
        raise doc.error(path, "expected at least one seed")
    seeds = tuple(_int(doc, s, path + (i,), 0) for i, s in enumerate(value))
    if len(set(seeds)) != len(seeds):
        raise doc.error(path, f"duplicate seeds in {list(seeds)}")
    return seeds


def _parse_name(doc: YamlDoc, raw: Any) -> str:
    name = expect(doc, raw, ("name",), str, "a string")
    if not CASE_ID.match(name):
        raise doc.error(("name",), f"name {name!r} must match {CASE_ID.pattern} (it names run folders)")
    return name


def _parse_reference(doc: YamlDoc, raw: Any) -> str:
    reference = check_mapping(doc, raw, ("reference",), optional=("dtype",))
    return expect_choice(doc, reference.get("dtype", "auto"), ("reference", "dtype"), REFERENCE_DTYPES)


def _parse_cases(
    doc: YamlDoc, raw: Any, default_seeds: tuple[int, ...] | None, errors: Errors
) -> tuple[Case, ...] | None:
    """Every case, each checked on its own (all their errors go to `errors`); None if any is bad."""
    if errors.attempt(lambda: expect(doc, raw, ("cases",), list, "a list of cases"), None) is None:
        return None
    if not raw:
        errors.found.append(doc.error(("cases",), "expected at least one case"))
        return None
    seen: set[str] = set()
    cases: list[Case | None] = []
    for i, item in enumerate(raw):

        def case(i: int = i, item: Any = item) -> Case | None:
            return _parse_case(doc, i, item, default_seeds, seen)

        cases.append(errors.attempt(case, None))
    return None if any(c is None for c in cases) else tuple(c for c in cases if c is not None)


def _parse_case(doc: YamlDoc, i: int, item: Any, default_seeds: tuple[int, ...] | None, seen: set[str]) -> Case:
    path = ("cases", i)
    c = check_mapping(doc, item, path, required=("id", "prompt"), optional=("seeds", "tags"))
    case_id = expect(doc, c["id"], path + ("id",), str, "a string id")
    if not CASE_ID.match(case_id):
        raise doc.error(path + ("id",), f"id {case_id!r} must match {CASE_ID.pattern} (it becomes a file name)")
    if case_id in seen:
        raise doc.error(path + ("id",), f"duplicate case id {case_id!r}")
    seen.add(case_id)
    prompt = expect(doc, c["prompt"], path + ("prompt",), str, "a string prompt")
    if not prompt.strip():
        raise doc.error(path + ("prompt",), "prompt is empty")
    if "seeds" in c:
        seeds = _parse_seeds(doc, c["seeds"], path + ("seeds",))
    elif default_seeds is not None:
        seeds = default_seeds
    else:
        raise doc.error(path, "missing required key 'seeds' (or set top-level 'seeds')")
    tags = _str_list(doc, c.get("tags", []), path + ("tags",), "tags")
    return Case(case_id, prompt, seeds, tags)


GATE_KEYS = ("metric", "detector", "bench", "stat", "op", "value", "optional", "severity", "tags", "baseline")


def _parse_gate(
    doc: YamlDoc,
    raw: Any,
    i: int,
    metrics: tuple[str, ...],
    detectors: tuple[str, ...],
    tags: set[str],
    has_bench: bool = False,
) -> GateSpec:
    path = ("gates", i)
    g = check_mapping(doc, raw, path, optional=GATE_KEYS)
    if sum(k in g for k in ("metric", "detector", "bench")) != 1:
        raise doc.error(path, "a gate names exactly one of 'metric', 'detector' or 'bench'")
    if "stat" not in g and "bench" not in g:
        raise doc.error(path, "missing required key 'stat'")
    if "bench" in g:
        subject = expect_choice(doc, g["bench"], path + ("bench",), BENCH_FIGURES)
        if not has_bench:
            raise doc.error(path + ("bench",), "a bench gate needs the suite's 'bench' section")
        if "tags" in g:
            raise doc.error(path + ("tags",), "a bench gate measures the transformer, not samples; no 'tags'")
        stats: tuple[str, ...] = ("value",)
    elif "metric" in g:
        subject = expect_choice(doc, g["metric"], path + ("metric",), OUTPUTS)
        if OUTPUTS[subject] not in metrics:
            raise doc.error(path + ("metric",), f"metric {OUTPUTS[subject]!r} is gated but not listed in 'metrics'")
        stats = (*METRIC_STATS, PER_SAMPLE) if "baseline" in g else METRIC_STATS
    else:
        subject = expect_choice(doc, g["detector"], path + ("detector",), DETECTORS)
        if subject not in detectors:
            raise doc.error(path + ("detector",), f"detector {subject!r} is gated but not listed in 'detectors'")
        stats = DETECTOR_STATS
    stat = expect_choice(doc, g.get("stat", "value"), path + ("stat",), stats)
    baseline = None
    if "baseline" in g:
        for key in ("op", "value"):
            if key in g:
                raise doc.error(path + (key,), f"a baseline gate has no {key!r}: its threshold is the drop allowed")
        b = check_mapping(doc, g["baseline"], path + ("baseline",), optional=("max_drop", "max_rel_drop"))
        if len(b) != 1:
            raise doc.error(path + ("baseline",), "expected exactly one of max_drop or max_rel_drop")
        ((kind, limit),) = b.items()
        expect(doc, limit, path + ("baseline", kind), (int, float), "a number")
        if limit < 0:
            raise doc.error(path + ("baseline", kind), f"expected a drop >= 0, got {limit}")
        baseline = (kind, float(limit))
        op, value = "<=", float(limit)
    else:
        for key in ("op", "value"):
            if key not in g:
                raise doc.error(path, f"missing required key {key!r} (or give 'baseline')")
        op = expect_choice(doc, g["op"], path + ("op",), OPS)
        value = float(expect(doc, g["value"], path + ("value",), (int, float), "a number"))
    gate_tags = _str_list(doc, g.get("tags", []), path + ("tags",), "tags")
    if gate_tags and baseline is not None:
        raise doc.error(path + ("tags",), "a baseline gate compares whole runs; it takes no 'tags'")
    for j, tag in enumerate(gate_tags):
        if tag not in tags:
            raise doc.error(path + ("tags", j), f"no case has tag {tag!r}{did_you_mean(tag, sorted(tags))}")
    return GateSpec(
        stat=stat,
        op=op,
        value=value,
        metric=g.get("metric"),
        detector=g.get("detector"),
        bench=g.get("bench"),
        optional=expect(doc, g.get("optional", False), path + ("optional",), bool, "true or false"),
        severity=expect_choice(doc, g.get("severity", "fail"), path + ("severity",), ("fail", "warn")),
        tags=gate_tags,
        baseline=baseline,
    )


def _parse_bench(doc: YamlDoc, raw: Any) -> dict[str, Any]:
    path = ("bench",)
    b = check_mapping(doc, raw, path, optional=(*BENCH_KEYS, "compile", "cuda_graph"))
    out: dict[str, Any] = {k: _int(doc, v, path + (k,), BENCH_KEYS[k]) for k, v in b.items() if k in BENCH_KEYS}
    if "resolution" in out and out["resolution"] % SIDE_MULTIPLE:
        raise doc.error(path + ("resolution",), f"expected a multiple of {SIDE_MULTIPLE}")
    if "compile" in b:
        out["compile"] = expect_choice(doc, b["compile"], path + ("compile",), ("blocks", "none"))
    if "cuda_graph" in b:
        out["cuda_graph"] = expect(doc, b["cuda_graph"], path + ("cuda_graph",), bool, "true or false")
    return out


NOISE_FLOOR_CHANGES = ("batch", "float32")


def _parse_noise_floor(doc: YamlDoc, raw: Any, generation: Generation) -> str | None:
    """`true` (batch composition), `false`, `batch` or `float32`."""
    path = ("noise_floor",)
    if raw is False:
        return None
    change = "batch" if raw is True else expect_choice(doc, raw, path, NOISE_FLOOR_CHANGES)
    if change == "batch" and generation.batch_size < 2:
        raise doc.error(path, "a batch-composition noise floor needs generation.batch_size >= 2; use float32")
    return str(change)


def _parse_thresholds(doc: YamlDoc, raw: Any, detectors: tuple[str, ...]) -> dict[str, dict[str, float]]:
    path = ("detector_thresholds",)
    mapping = check_mapping(doc, raw, path, optional=detectors)
    out: dict[str, dict[str, float]] = {}
    for name, values in mapping.items():
        params = detector_params(name)
        if not params:
            raise doc.error(path + (name,), f"detector {name!r} has no thresholds")
        checked = check_mapping(doc, values, path + (name,), optional=params)
        out[name] = {}
        for key, value in checked.items():
            expect(doc, value, path + (name, key), (int, float), "a number")
            out[name][key] = type(params[key])(value)
    return out


def _parse_weights(doc: YamlDoc, raw: Any, metrics: tuple[str, ...]) -> dict[str, str]:
    mapping = check_mapping(doc, raw, ("weights",), optional=[m for m in metrics if m in ("lpips", "clip_score")])
    out = {}
    for name, value in mapping.items():
        text = expect(doc, value, ("weights", name), str, "a file path")
        out[name] = str((doc.path.parent / text).expanduser()) if not Path(text).is_absolute() else text
    return out


METRIC_OPTIONS = {"lpips": {"net": ("alex", "vgg", "squeeze")}}


def _parse_metric_options(doc: YamlDoc, raw: Any, metrics: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    mapping = check_mapping(doc, raw, ("metric_options",), optional=[m for m in metrics if m in METRIC_OPTIONS])
    out: dict[str, dict[str, Any]] = {}
    for name, values in mapping.items():
        checked = check_mapping(doc, values, ("metric_options", name), optional=METRIC_OPTIONS[name])
        out[name] = {
            k: expect_choice(doc, v, ("metric_options", name, k), METRIC_OPTIONS[name][k]) for k, v in checked.items()
        }
    return out


def _names(doc: YamlDoc, raw: Any, key: str, registry: Any) -> tuple[str, ...]:
    names = _str_list(doc, raw, (key,), key)
    for i, name in enumerate(names):
        expect_choice(doc, name, (key, i), registry)
    if len(set(names)) != len(names):
        raise doc.error((key,), f"duplicate names in {list(names)}")
    return names


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
    naming file, line and key."""
    path = suite_path(path)
    doc = load_yaml(path, "suite")
    d = check_mapping(
        doc,
        doc.data,
        (),
        required=("name", "generation", "cases", "metrics", "gates"),
        optional=(
            "description",
            "model",
            "reference",
            "policies",
            "seeds",
            "detectors",
            "detector_thresholds",
            "weights",
            "metric_options",
            "noise_floor",
            "bench",
            "compile",
            "baselines",
        ),
    )
    errors = Errors()
    name = errors.attempt(lambda: _parse_name(doc, d["name"]), "")
    reference = errors.attempt(lambda: _parse_reference(doc, d.get("reference", {})), "auto")
    default_seeds = errors.attempt(lambda: _parse_seeds(doc, d["seeds"], ("seeds",)) if "seeds" in d else None, None)
    metrics = errors.attempt(lambda: _names(doc, d["metrics"], "metrics", METRICS), None)
    detectors = errors.attempt(lambda: _names(doc, d.get("detectors", []), "detectors", DETECTORS), None)
    cases = _parse_cases(doc, d["cases"], default_seeds, errors) if "seeds" not in d or default_seeds else None
    generation = errors.attempt(lambda: _parse_generation(doc, d["generation"]), None)
    bench = errors.attempt(lambda: _parse_bench(doc, d["bench"]), None) if "bench" in d else None
    gates: list[GateSpec] = []
    gates_raw = errors.attempt(lambda: expect(doc, d["gates"], ("gates",), list, "a list of gates"), None)
    bench_ok = "bench" not in d or bench is not None
    if gates_raw is not None and metrics is not None and detectors is not None and cases is not None and bench_ok:
        case_tags = {t for c in cases for t in c.tags}
        for i, g in enumerate(gates_raw):

            def gate(i: int = i, g: Any = g) -> GateSpec | None:
                assert metrics is not None and detectors is not None
                return _parse_gate(doc, g, i, metrics, detectors, case_tags, bench is not None)

            parsed_gate = errors.attempt(gate, None)
            if parsed_gate is not None:
                gates.append(parsed_gate)
    rest = {
        "model": lambda: expect(doc, d.get("model", "tiny"), ("model",), str, "a model source string"),
        "policies": lambda: _str_list(doc, d.get("policies", []), ("policies",), "policies"),
        "detector_thresholds": lambda: _parse_thresholds(doc, d.get("detector_thresholds", {}), detectors or ()),
        "weights": lambda: _parse_weights(doc, d.get("weights", {}), metrics or ()),
        "metric_options": lambda: _parse_metric_options(doc, d.get("metric_options", {}), metrics or ()),
        "noise_floor": lambda: (
            _parse_noise_floor(doc, d.get("noise_floor", False), generation) if generation is not None else None
        ),
        "compile": lambda: expect_choice(doc, d.get("compile", "auto"), ("compile",), COMPILE_CHOICES),
        "description": lambda: expect(doc, d.get("description", ""), ("description",), str, "a string"),
        "baselines": lambda: expect(doc, d.get("baselines", ""), ("baselines",), str, "a folder path") or None,
    }
    parsed = {key: errors.attempt(parse, None) for key, parse in rest.items()}
    errors.raise_any()
    assert metrics is not None and detectors is not None and cases is not None and generation is not None
    canonical = json.dumps(doc.data, sort_keys=True, default=str).encode()
    return Suite(
        name=name,
        path=str(path),
        sha256=hashlib.sha256(canonical).hexdigest(),
        reference_dtype=reference,
        generation=generation,
        cases=cases,
        metrics=metrics,
        detectors=detectors,
        gates=tuple(gates),
        bench=bench,
        **parsed,
        tags=tuple(sorted({t for c in cases for t in c.tags})),
    )
