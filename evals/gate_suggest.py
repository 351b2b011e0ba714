"""`evals gates suggest`: gate thresholds derived from a trusted run, as YAML with their evidence.

Pure functions over records (no I/O; `evals.cli_gates` reads the run directory). Importing this
module imports no torch; the statistics come from `evals.records` (imported when first needed), so
a suggested gate is computed exactly as `evals.gates` will evaluate it.

A metric gets a `mean` gate and a tail gate (`min`/`max`, or `p05`/`p95` from 40 samples per
policy) at the worst trusted value moved by a margin in the metric's bad direction, never stricter
than the noise floor (the reference under a harmless change) passes with the same margin. A detector
gets `new_count == 0`, or the observed count with a warning when the trusted run already has flags.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from evals.metrics import OUTPUTS, higher_is_better
from evals.models.yamlspec import did_you_mean

if TYPE_CHECKING:
    from evals.records import PolicySummary, SampleRecord

NOISE_FLOOR_NAME = "noise-floor"
"""`evals.candidates.NOISE_FLOOR` (that module imports torch; a test checks they agree)."""
TAIL_MIN_SAMPLES = 40
"""From 40 samples per policy, 5% of them is at least two images: p05/p95 then describe the tail
rather than the single worst image, and one outlier no longer sets the gate. Below, `min`/`max`."""
SIGNIFICANT_DIGITS = 4
"""Thresholds are rounded to this many significant digits, always in the lenient direction."""
ORDER = ("step_error", "step_cosine", "psnr", "ssim", "lpips", "clip_score_delta")
"""Metric outputs in the order their gates are printed; any other output follows, by name."""
BASELINE_METRICS = ("step_error", "psnr", "ssim")
"""Metrics that get a regression gate against the committed/accepted baseline (their mean)."""


@dataclass(frozen=True)
class Margin:
    value: float
    """Absolute, in the metric's unit; or a fraction of the trusted value when `relative`."""
    relative: bool = False
    """The margin is `value` times the magnitude of the value it moves."""
    why: str = "--margin"
    """Where the number comes from, for the comments."""

    def amount(self, scale: float) -> float:
        return self.value * abs(scale) if self.relative else self.value

    def describe(self) -> str:
        size = f"{self.value * 100:g}% of the value" if self.relative else f"{self.value:g}"
        return f"{size} ({self.why})"


DEFAULT_MARGINS: dict[str, Margin] = {
    "psnr": Margin(1.0, why="default: 1 dB lets the mean squared error grow by 26%, 10^0.1"),
    "ssim": Margin(0.01, why="default: 1% of SSIM's 0..1 scale"),
    "lpips": Margin(0.01, why="default: 1% of LPIPS's practical 0..1 scale"),
    "clip_score_delta": Margin(0.5, why="default: half a point of 100*cos, under 2% of a matching pair's 25-35"),
    "step_error": Margin(
        0.02, relative=True, why="default: 2%, 7x the 0.3% that other machines' arithmetic moves it (gate-evidence.md)"
    ),
    "step_cosine": Margin(0.002, why="default: 0.002, 20x the 0.0001 that other machines' arithmetic moves it"),
}
FALLBACK_MARGIN = Margin(0.05, relative=True, why="default for a metric without a margin of its own")
NOT_GATED = {
    "clip_score_ref": "it scores the reference image, the same for every candidate",
    "clip_score": "it is clip_score_ref + clip_score_delta; clip_score_delta carries the candidate's effect",
}


def parse_margin(text: str) -> tuple[str, Margin]:
    """`psnr=1.5` (absolute, in the metric's unit) or `lpips=10%` (of the trusted value); ValueError if bad."""
    name, sep, raw = text.partition("=")
    if not sep or not name or not raw:
        raise ValueError(f"expected NAME=VALUE or NAME=PERCENT%, got {text!r}")
    if name not in OUTPUTS:
        raise ValueError(f"unknown metric {name!r}{did_you_mean(name, OUTPUTS)}")
    relative = raw.endswith("%")
    try:
        value = float(raw[:-1]) / 100 if relative else float(raw)
    except ValueError:
        raise ValueError(f"{text!r}: {raw!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r}: a margin is a finite number >= 0")
    return name, Margin(value, relative)


@dataclass(frozen=True)
class Entry:
    comments: tuple[str, ...]
    """Evidence, one line each, written as YAML comments above the gate."""
    gate: dict[str, Any] | None = None
    """The gate mapping, as a suite's `gates:` item; None: comments only."""
    warnings: tuple[str, ...] = ()
    """What needs a person's attention (also in `comments`)."""


@dataclass
class _Builder:
    comments: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def warn(self, text: str) -> None:
        self.comments.append(f"WARNING: {text}")
        self.warnings.append(text)

    def entry(self, gate: dict[str, Any] | None = None) -> Entry:
        return Entry(tuple(self.comments), gate, tuple(self.warnings))


def lenient(value: float, higher_is_better: bool, digits: int = SIGNIFICANT_DIGITS) -> float:
    """`value` rounded to `digits` significant digits toward leniency: down for a `>=` gate, up for `<=`."""
    if value == 0 or not math.isfinite(value):
        return value
    quantum = Decimal(1).scaleb(math.floor(math.log10(abs(value))) - digits + 1)
    rounded = Decimal(value).quantize(quantum)  # the nearest; one step more lenient if that is stricter
    if higher_is_better and float(rounded) > value:
        rounded -= quantum
    elif not higher_is_better and float(rounded) < value:
        rounded += quantum
    return float(rounded)


def _rounded(threshold: float, worst: float, higher: bool) -> float:
    """`lenient`, after dropping float noise (0.098 + 0.01 = 0.10800000000000001 gives 0.108, not 0.1081)
    unless that would make the trusted run's own worst value fail."""
    value = lenient(float(f"{threshold:.12g}"), higher)
    return value if (value <= worst if higher else value >= worst) else lenient(threshold, higher)


def _g(value: float) -> str:
    return f"{value:.4g}"


def _stats_line(name: str, stats: dict[str, float], n: int) -> str:
    return f"  {name} (n={n}): " + " ".join(f"{s} {_g(stats[s])}" for s in ("mean", "min", "p05", "p95", "max"))


def metric_entries(
    name: str,
    summaries: dict[str, PolicySummary],
    counts: dict[str, int],
    trusted: Sequence[str],
    noise_floor: str | None,
    margin: Margin,
) -> list[Entry]:
    """The mean and tail gates of metric output `name`, with their evidence."""
    lacking = [p for p in trusted if name not in summaries[p].metrics]
    if lacking:
        b = _Builder()
        b.warn(f"{name} has no values for {', '.join(lacking)}: no gate")
        return [b.entry()]
    higher = higher_is_better(name)
    sign, op = (-1.0, ">=") if higher else (1.0, "<=")
    n = min(counts.get(p, 0) for p in trusted)
    many = n >= TAIL_MIN_SAMPLES
    tail = ("p05" if higher else "p95") if many else ("min" if higher else "max")
    why_tail = (
        f"{n} >= {TAIL_MIN_SAMPLES}" if many else f"{n} < {TAIL_MIN_SAMPLES} samples per policy: p05/p95 ~ one image"
    )
    direction = "higher is better" if higher else "lower is better"
    head = [f"{name} ({direction}); margin {margin.describe()}; tail stat {tail} ({why_tail})"]
    head += [_stats_line(p, summaries[p].metrics[name], counts.get(p, 0)) for p in trusted]
    nf = summaries[noise_floor].metrics.get(name) if noise_floor and noise_floor in summaries else None
    if nf is not None and noise_floor is not None:
        head.append(_stats_line(f"{noise_floor} (reference vs itself)", nf, counts.get(noise_floor, 0)))
    else:
        head.append("  no noise floor: thresholds not checked against arithmetic noise")
    entries = []
    for i, stat in enumerate(("mean", tail)):
        b = _Builder(head[:] if i == 0 else [])
        values = {p: summaries[p].metrics[name][stat] for p in trusted}
        broken = sorted(p for p, v in values.items() if math.isnan(v))
        if broken:
            b.warn(f"{name} {stat} is NaN for {', '.join(broken)} (a broken sample): no gate from an untrustworthy run")
            entries.append(b.entry())
            continue
        worst_policy = (min if higher else max)(values, key=lambda p: values[p])
        worst = values[worst_policy]
        if not math.isfinite(worst):
            b.comments.append(f"{name} {stat}: worst trusted value is {worst} (identical images); no gate")
            entries.append(b.entry())
            continue
        threshold = worst + sign * margin.amount(worst)
        b.comments.append(
            f"{stat}: worst trusted {worst:.6g} ({worst_policy}) {'-' if higher else '+'} margin -> {threshold:.6g}"
        )
        if nf is not None and math.isfinite(nf[stat]):
            limit = nf[stat] + sign * margin.amount(nf[stat])
            if (higher and threshold > limit) or (not higher and threshold < limit):
                b.warn(
                    f"the noise floor's {stat} {_g(nf[stat])} would not pass {op} {_g(threshold)} with the margin; "
                    f"threshold set to {_g(limit)} (noise floor {'-' if higher else '+'} margin) instead"
                )
                threshold = limit
        if nf is not None and nf["min"] <= threshold <= nf["max"]:
            b.warn(
                f"{op} {_g(threshold)} lies within the noise floor's per-sample spread [{_g(nf['min'])}, "
                f"{_g(nf['max'])}]: a harmless change moves images this far, the gate partly measures arithmetic noise"
            )
        gate = {"metric": name, "stat": stat, "op": op, "value": _rounded(threshold, worst, higher)}
        entries.append(b.entry(gate))
    return entries


def baseline_entry(name: str, summaries: dict[str, PolicySummary], trusted: Sequence[str], margin: Margin) -> Entry:
    """`{metric: NAME, stat: mean, baseline: {max_drop: margin}}` (max_rel_drop for a relative margin)."""
    means = {p: summaries[p].metrics[name]["mean"] for p in trusted}
    b = _Builder([f"{name} mean against the committed/accepted baseline of the same suite, policy and platform"])
    b.comments.append(
        "  it fails while there is none: `evals baseline update RUN_DIR` writes one (or `optional: true`)"
    )
    b.comments.append("  trusted means: " + ", ".join(f"{p} {_g(v)}" for p, v in means.items()))
    if not all(math.isfinite(v) for v in means.values()):
        b.comments.append(f"  no gate: a non-finite {name} mean cannot be a baseline to drop from")
        return b.entry()
    kind = "max_rel_drop" if margin.relative else "max_drop"
    b.comments.append(f"  a drop of more than the margin {margin.describe()} from the baseline fails")
    return b.entry({"metric": name, "stat": "mean", "baseline": {kind: margin.value}})


def detector_entry(
    name: str,
    summaries: dict[str, PolicySummary],
    trusted: Sequence[str],
    noise_floor: str | None,
    new_flags: dict[str, list[str]],
) -> Entry:
    """`new_count == 0`, or `<=` the trusted run's own count with a warning when it already has new flags."""

    def counts(p: str) -> str:
        stats = summaries[p].detectors.get(name, {})
        return f"{p} new_count {stats.get('new_count', math.nan):g} (count {stats.get('count', math.nan):g})"

    b = _Builder([f"{name} (new_count: flagged where the reference image is not)"])
    b.comments.append("  " + "; ".join(counts(p) for p in trusted))
    ref = summaries[trusted[0]].reference_detectors.get(name, {}).get("count", math.nan)
    b.comments.append(f"  reference images flagged: {ref:g} of {summaries[trusted[0]].n}")
    if noise_floor and noise_floor in summaries:
        b.comments.append("  " + counts(noise_floor))
    observed = max(summaries[p].detectors.get(name, {}).get("new_count", 0.0) for p in trusted)
    if observed > 0:
        flagged = ", ".join(
            f"{p}: {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}" for p, ids in new_flags.items()
        )
        b.warn(
            f"the trusted run itself has new {name} flags ({flagged}); suggesting the observed count, not 0: "
            "look at those images before trusting this gate"
        )
        return b.entry({"detector": name, "stat": "new_count", "op": "<=", "value": int(observed)})
    return b.entry({"detector": name, "stat": "new_count", "op": "==", "value": 0})


def suggest(
    records: Sequence[SampleRecord],
    trusted: Sequence[str],
    noise_floor: str | None = None,
    margins: dict[str, Margin] | None = None,
) -> list[Entry]:
    """Suggested gates for `trusted` candidate policies of these records (the noise floor's, if named,
    are evidence only). `margins`: metric output -> margin, over DEFAULT_MARGINS."""
    from evals.records import summarize

    if not trusted:
        raise ValueError("no trusted candidate policy")
    summaries = summarize(records)
    missing = [p for p in trusted if p not in summaries]
    if missing:
        raise ValueError(f"no records of {', '.join(missing)}")
    chosen = {r.policy for r in records} & set(trusted)
    present = {m for r in records if r.policy in chosen for m in r.metrics}
    outputs = sorted(present, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))
    detectors = sorted({d for r in records if r.policy in chosen for d in r.detectors})
    counts = Counter(r.policy for r in records)
    entries: list[Entry] = []
    for name in outputs:
        if name in NOT_GATED:
            entries.append(Entry((f"{name}: not gated: {NOT_GATED[name]}",)))
            continue
        margin = (margins or {}).get(name) or DEFAULT_MARGINS.get(name) or FALLBACK_MARGIN
        per_metric = {p: sum(name in r.metrics for r in records if r.policy == p) for p in counts}
        entries += metric_entries(name, summaries, per_metric, trusted, noise_floor, margin)
    for name in BASELINE_METRICS:
        if name in outputs:
            margin = (margins or {}).get(name) or DEFAULT_MARGINS[name]
            entries.append(baseline_entry(name, summaries, trusted, margin))
    for name in detectors:
        new_flags: dict[str, list[str]] = {}
        for r in (r for r in records if r.policy in trusted and _new_flag(r, name)):
            new_flags.setdefault(r.policy, []).append(r.sample_id)
        entries.append(detector_entry(name, summaries, trusted, noise_floor, new_flags))
    return entries


def _new_flag(record: SampleRecord, detector: str) -> bool:
    found = record.detectors.get(detector)
    ref = record.reference_detectors.get(detector)
    return bool(found and found["flagged"]) and not bool(ref and ref["flagged"])


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        return value if value.isidentifier() else f'"{value}"'
    if isinstance(value, (bool, int)):
        return str(value).lower()
    text = repr(float(value))
    return format(Decimal(text), "f") if "e" in text else text  # YAML 1.1 reads 1e-05 as a string


def _flow(mapping: dict[str, Any]) -> str:
    items = (f"{k}: {_flow(v) if isinstance(v, dict) else _scalar(v)}" for k, v in mapping.items())
    return "{" + ", ".join(items) + "}"


def render(entries: Sequence[Entry], header: Sequence[str] = ()) -> str:
    """YAML: the header as comments, then `gates:` with every entry's comments above its gate."""
    lines = [f"# {h}" if h else "#" for h in header] + ["gates:"]
    for entry in entries:
        lines += [f"  # {c}" for c in entry.comments]
        if entry.gate is not None:
            lines.append(f"  - {_flow(entry.gate)}")
    return "\n".join(lines) + "\n"
