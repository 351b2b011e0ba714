"""What a blind A/B review's votes say, per candidate and reviewer, each rate with a 95% Wilson interval.

Review votes are few (tens to hundreds a candidate), so a bare share would overstate what they show:
every rate carries a Wilson score interval, which stays inside [0, 1] and is sensible at 0 and n
successes, where the normal approximation collapses to a zero-width interval. Imports no torch.

- `cant_tell_rate`: "can't tell" answers / all answers;
- `pick_accuracy`: correct picks / left-or-right answers (chance is 0.5; undefined with no picks);
- `indistinguishable_rate`: ("can't tell" + wrong picks) / all answers: 1 when nobody can tell, about
  0.5 when everyone guesses, 0 when every pick is right.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from evals.review.votes import Vote

Z95 = 1.959963984540054
"""The two-sided 95% quantile of the standard normal."""

RATE_NAMES = ("cant_tell_rate", "pick_accuracy", "indistinguishable_rate")


def wilson(successes: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of successes/total, clamped to [0, 1]; (NaN, NaN) when total is 0,
    since no votes bound nothing."""
    if total < 0 or not 0 <= successes <= total:
        raise ValueError(f"{successes} of {total}: expected 0 <= successes <= total")
    if total == 0:
        return math.nan, math.nan
    p = successes / total
    z2 = z * z
    denominator = 1 + z2 / total
    center = (p + z2 / (2 * total)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    # The ends are exactly 0 and 1 at 0 and n successes; rounding may put them a hair outside.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == total else min(1.0, center + half)
    return low, high


@dataclass(frozen=True)
class Rate:
    """A share with its 95% Wilson interval; kept as counts so that it can be re-pooled and shown as
    "k of n" (a rate of 1.0 from 2 votes is not one from 200)."""

    successes: int
    total: int

    @property
    def value(self) -> float:
        return self.successes / self.total if self.total else math.nan

    @property
    def low(self) -> float:
        return wilson(self.successes, self.total)[0]

    @property
    def high(self) -> float:
        return wilson(self.successes, self.total)[1]


@dataclass(frozen=True)
class ReviewFigures:
    """The rates of one set of votes (a candidate's, or one reviewer's of a candidate)."""

    votes: int
    cant_tell_rate: Rate
    pick_accuracy: Rate
    indistinguishable_rate: Rate


@dataclass(frozen=True)
class ToldApart:
    """A sample on which reviewers picked the reference correctly at least once: where to look for the
    candidate's visible difference."""

    sample_id: str
    correct: int
    votes: int


@dataclass(frozen=True)
class CandidateReview:
    overall: ReviewFigures
    by_reviewer: dict[str, ReviewFigures]
    """Per reviewer, in sorted order: one reviewer who can tell is hidden in a pooled rate."""
    told_apart: list[ToldApart]
    """Most correct picks first (then higher share correct, then sample id)."""


def figures_of(votes: Iterable[Vote]) -> ReviewFigures:
    """The rates of these votes, whatever their candidates or reviewers (the caller groups them)."""
    total = cant_tell = picks = correct = 0
    for vote in votes:
        total += 1
        if vote.picked:
            picks += 1
            correct += vote.correct
        else:
            cant_tell += 1
    wrong = picks - correct
    return ReviewFigures(
        votes=total,
        cant_tell_rate=Rate(cant_tell, total),
        pick_accuracy=Rate(correct, picks),
        indistinguishable_rate=Rate(cant_tell + wrong, total),
    )


def _told_apart(votes: list[Vote], top: int) -> list[ToldApart]:
    correct: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    for vote in votes:
        counts[vote.sample_id] += 1
        correct[vote.sample_id] += vote.correct
    told = [ToldApart(sample, correct[sample], counts[sample]) for sample in counts if correct[sample] > 0]
    told.sort(key=lambda t: (-t.correct, -t.correct / t.votes, t.sample_id))
    return told[: max(top, 0)]


def review_figures(votes: Iterable[Vote], top: int = 10) -> dict[str, CandidateReview]:
    """Per candidate (sorted): the pooled rates, each reviewer's, and up to `top` samples told apart."""
    by_candidate: dict[str, list[Vote]] = defaultdict(list)
    for vote in votes:
        by_candidate[vote.candidate].append(vote)
    reviews = {}
    for candidate in sorted(by_candidate):
        own = by_candidate[candidate]
        by_reviewer: dict[str, list[Vote]] = defaultdict(list)
        for vote in own:
            by_reviewer[vote.reviewer].append(vote)
        reviews[candidate] = CandidateReview(
            overall=figures_of(own),
            by_reviewer={reviewer: figures_of(by_reviewer[reviewer]) for reviewer in sorted(by_reviewer)},
            told_apart=_told_apart(own, top),
        )
    return reviews


def _rates(figures: ReviewFigures) -> dict[str, Rate]:
    return {
        "cant_tell_rate": figures.cant_tell_rate,
        "pick_accuracy": figures.pick_accuracy,
        "indistinguishable_rate": figures.indistinguishable_rate,
    }


def flat(review: CandidateReview) -> dict[str, float]:
    """The pooled figures as metric names for MLflow (one flat namespace of floats; NaN where a rate
    is undefined, e.g. pick accuracy with no picks)."""
    metrics = {"human_votes": float(review.overall.votes)}
    for name, rate in _rates(review.overall).items():
        metrics[f"human_{name}"] = rate.value
        metrics[f"human_{name}_low"] = rate.low
        metrics[f"human_{name}_high"] = rate.high
    return metrics


def _finite(x: float) -> float | None:
    # JSON has no NaN: an undefined rate is null.
    return x if math.isfinite(x) else None


def _rate_dict(rate: Rate) -> dict[str, Any]:
    return {
        "value": _finite(rate.value),
        "low": _finite(rate.low),
        "high": _finite(rate.high),
        "successes": rate.successes,
        "total": rate.total,
    }


def _figures_dict(figures: ReviewFigures) -> dict[str, Any]:
    return {"votes": figures.votes, **{name: _rate_dict(rate) for name, rate in _rates(figures).items()}}


def to_dict(review: CandidateReview) -> dict[str, Any]:
    """The review as plain JSON (review.json): strict JSON, so undefined values are null, not NaN."""
    return {
        "overall": _figures_dict(review.overall),
        "by_reviewer": {reviewer: _figures_dict(figures) for reviewer, figures in review.by_reviewer.items()},
        "told_apart": [{"sample_id": t.sample_id, "correct": t.correct, "votes": t.votes} for t in review.told_apart],
    }
