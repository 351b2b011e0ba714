"""Review rates: the Wilson interval against published values and its closed form, and scripted
reviewers (always right, never sure, guessing) whose figures are known in advance."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable

import pytest

from evals.review.rates import (
    RATE_NAMES,
    Z95,
    CandidateReview,
    Rate,
    ToldApart,
    figures_of,
    flat,
    review_figures,
    to_dict,
    wilson,
)
from evals.review.votes import Vote

CANDIDATES = ("fp8-a", "fp8-b", "fp8-c")
SAMPLES = tuple(f"s{i:02d}" for i in range(8))
Strategy = Callable[[str, random.Random], str]


def vote(reviewer: str, candidate: str, sample_id: str, reference_side: str, answer: str, trial: int = 0) -> Vote:
    return Vote(
        reviewer=reviewer,
        candidate=candidate,
        sample_id=sample_id,
        reference_side=reference_side,
        answer=answer,
        seconds=1.0,
        trial=trial,
    )


def always_right(side: str, rng: random.Random) -> str:
    return side


def never_sure(side: str, rng: random.Random) -> str:
    return "cant_tell"


def guessing(side: str, rng: random.Random) -> str:
    return rng.choice(("left", "right"))


def scripted(reviewer: str, strategy: Strategy, n: int = 200, seed: int = 1234) -> list[Vote]:
    """n votes over a few candidates and samples, the reference on a random side."""
    rng = random.Random(seed)
    votes = []
    for i in range(n):
        side = rng.choice(("left", "right"))
        candidate = CANDIDATES[i % len(CANDIDATES)]
        sample = rng.choice(SAMPLES)
        votes.append(vote(reviewer, candidate, sample, side, strategy(side, rng), trial=i))
    return votes


def closed_form(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson's interval written the other common way: (k + z²/2 ± z·sqrt(k(n-k)/n + z²/4)) / (n + z²)."""
    root = z * math.sqrt(k * (n - k) / n + z * z / 4)
    return (k + z * z / 2 - root) / (n + z * z), (k + z * z / 2 + root) / (n + z * z)


# --- Wilson -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (5, 10, 0.2366, 0.7634),
        (1, 10, 0.0179, 0.4042),
        (81, 263, 0.2553, 0.3662),  # a non-round case, well inside (0, 1)
    ],
)
def test_wilson_matches_published_values(k: int, n: int, low: float, high: float) -> None:
    got = wilson(k, n)
    assert got[0] == pytest.approx(low, abs=1e-3)
    assert got[1] == pytest.approx(high, abs=1e-3)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 50, 200, 1000])
@pytest.mark.parametrize("z", [Z95, 1.0, 2.5758293035489004])
def test_wilson_matches_closed_form_and_contains_the_estimate(n: int, z: float) -> None:
    for k in range(n + 1):
        low, high = wilson(k, n, z)
        want_low, want_high = closed_form(k, n, z)
        assert low == pytest.approx(max(0.0, want_low), abs=1e-12)
        assert high == pytest.approx(min(1.0, want_high), abs=1e-12)
        assert 0.0 <= low <= k / n <= high <= 1.0
        if 0 < k < n:
            assert low < k / n < high


def test_wilson_exact_ends_and_undefined() -> None:
    assert wilson(0, 37)[0] == 0.0
    assert wilson(37, 37)[1] == 1.0
    assert all(math.isnan(x) for x in wilson(0, 0))
    with pytest.raises(ValueError):
        wilson(3, 2)
    with pytest.raises(ValueError):
        wilson(-1, 2)


def test_wilson_narrows_with_more_votes() -> None:
    widths = [wilson(n // 2, n)[1] - wilson(n // 2, n)[0] for n in (10, 100, 1000)]
    assert widths[0] > widths[1] > widths[2]


def test_rate() -> None:
    rate = Rate(5, 10)
    assert rate.value == 0.5
    assert (rate.low, rate.high) == wilson(5, 10)
    empty = Rate(0, 0)
    assert math.isnan(empty.value) and math.isnan(empty.low) and math.isnan(empty.high)


# --- scripted reviewers -----------------------------------------------------------------------------------


def test_a_reviewer_who_always_knows() -> None:
    votes = scripted("ana", always_right)
    figures = figures_of(votes)
    assert figures.votes == 200
    assert figures.indistinguishable_rate == Rate(0, 200)
    assert figures.pick_accuracy == Rate(200, 200)
    assert figures.cant_tell_rate == Rate(0, 200)
    assert figures.pick_accuracy.value == 1.0
    assert figures.pick_accuracy.high == 1.0
    assert figures.pick_accuracy.low > 0.95
    assert figures.indistinguishable_rate.value == 0.0
    assert figures.indistinguishable_rate.low == 0.0
    assert figures.indistinguishable_rate.high < 0.05


def test_a_reviewer_who_never_can_tell() -> None:
    figures = figures_of(scripted("bo", never_sure))
    assert figures.votes == 200
    assert figures.indistinguishable_rate == Rate(200, 200)
    assert figures.cant_tell_rate == Rate(200, 200)
    assert figures.indistinguishable_rate.value == 1.0
    assert figures.cant_tell_rate.value == 1.0
    assert figures.pick_accuracy.total == 0
    assert math.isnan(figures.pick_accuracy.value)
    assert math.isnan(figures.pick_accuracy.low) and math.isnan(figures.pick_accuracy.high)


def test_a_reviewer_who_guesses() -> None:
    votes = scripted("cy", guessing, seed=7)
    figures = figures_of(votes)
    accuracy = figures.pick_accuracy
    assert accuracy.total == 200  # every answer is a pick
    assert accuracy.successes == sum(v.answer == v.reference_side for v in votes)
    assert 0 < accuracy.successes < 200
    assert accuracy.low < 0.5 < accuracy.high
    assert figures.indistinguishable_rate.value == pytest.approx(0.5, abs=0.1)
    assert figures.indistinguishable_rate.successes == 200 - accuracy.successes
    assert figures.cant_tell_rate == Rate(0, 200)


def test_mixed_answers_count_each_way() -> None:
    votes = [
        vote("r", "c", "s1", "left", "left"),  # right
        vote("r", "c", "s1", "right", "left"),  # wrong
        vote("r", "c", "s2", "right", "cant_tell"),
        vote("r", "c", "s2", "left", "cant_tell"),
        vote("r", "c", "s3", "right", "right"),  # right
    ]
    figures = figures_of(votes)
    assert figures.votes == 5
    assert figures.cant_tell_rate == Rate(2, 5)
    assert figures.pick_accuracy == Rate(2, 3)
    assert figures.indistinguishable_rate == Rate(3, 5)
    assert figures_of([]).votes == 0 and math.isnan(figures_of([]).indistinguishable_rate.value)


# --- per candidate and reviewer ---------------------------------------------------------------------------


def test_review_splits_by_candidate_and_reviewer() -> None:
    votes = scripted("zoe", always_right) + scripted("ann", never_sure) + scripted("max", guessing, seed=7)
    random.Random(3).shuffle(votes)
    reviews = review_figures(votes)
    assert list(reviews) == sorted(CANDIDATES)
    for candidate, review in reviews.items():
        own = [v for v in votes if v.candidate == candidate]
        assert review.overall == figures_of(own)
        assert list(review.by_reviewer) == ["ann", "max", "zoe"]
        for reviewer, figures in review.by_reviewer.items():
            assert figures == figures_of(v for v in own if v.reviewer == reviewer)
        assert review.by_reviewer["zoe"].indistinguishable_rate.value == 0.0
        assert review.by_reviewer["zoe"].pick_accuracy.value == 1.0
        assert review.by_reviewer["ann"].cant_tell_rate.value == 1.0
        assert review.by_reviewer["ann"].pick_accuracy.total == 0
        assert review.overall.votes == sum(f.votes for f in review.by_reviewer.values())
        # The pooled counts are the reviewers' counts added up.
        for name in RATE_NAMES:
            pooled = getattr(review.overall, name)
            assert pooled.successes == sum(getattr(f, name).successes for f in review.by_reviewer.values())
            assert pooled.total == sum(getattr(f, name).total for f in review.by_reviewer.values())


def test_told_apart_ordering() -> None:
    votes = []
    # s_b: 3 correct of 3; s_a: 3 correct of 5 (ties s_b on count, lower share, so after it despite its id);
    # s_c: 2 of 2; s_d: 2 of 2 (ties s_c, by id); s_e: 1 of 4; s_f: none correct (wrong picks and
    # cant_tell), left out.
    plan = {
        "s_a": ["right"] * 3 + ["wrong", "cant_tell"],
        "s_e": ["right", "cant_tell", "wrong", "wrong"],
        "s_d": ["right", "right"],
        "s_b": ["right"] * 3,
        "s_f": ["wrong", "cant_tell", "cant_tell"],
        "s_c": ["right", "right"],
    }
    trial = 0
    for sample, outcomes in plan.items():
        for outcome in outcomes:
            side = "left" if trial % 2 else "right"
            other = "right" if side == "left" else "left"
            answer = {"right": side, "wrong": other, "cant_tell": "cant_tell"}[outcome]
            votes.append(vote(f"r{trial % 3}", "c", sample, side, answer, trial))
            trial += 1
    review = review_figures(votes)["c"]
    assert review.told_apart == [
        ToldApart("s_b", 3, 3),
        ToldApart("s_a", 3, 5),
        ToldApart("s_c", 2, 2),
        ToldApart("s_d", 2, 2),
        ToldApart("s_e", 1, 4),
    ]
    assert review_figures(votes, top=2)["c"].told_apart == review.told_apart[:2]
    assert review_figures(votes, top=0)["c"].told_apart == []
    nobody = review_figures(scripted("bo", never_sure))
    assert all(r.told_apart == [] for r in nobody.values())


def test_told_apart_defaults_to_ten() -> None:
    votes = [vote("r", "c", f"s{i:02d}", "left", "left", i) for i in range(15)]
    told = review_figures(votes)["c"].told_apart
    assert [t.sample_id for t in told] == [f"s{i:02d}" for i in range(10)]


# --- output -----------------------------------------------------------------------------------------------


def test_flat_names_and_values() -> None:
    review = review_figures(scripted("bo", never_sure))["fp8-a"]
    metrics = flat(review)
    want = {"human_votes"} | {f"human_{n}{end}" for n in RATE_NAMES for end in ("", "_low", "_high")}
    assert set(metrics) == want
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["human_votes"] == review.overall.votes
    assert metrics["human_cant_tell_rate"] == 1.0
    assert metrics["human_indistinguishable_rate"] == 1.0
    assert metrics["human_indistinguishable_rate_high"] == 1.0
    assert metrics["human_indistinguishable_rate_low"] == review.overall.indistinguishable_rate.low < 1.0
    assert math.isnan(metrics["human_pick_accuracy"])
    assert math.isnan(metrics["human_pick_accuracy_low"]) and math.isnan(metrics["human_pick_accuracy_high"])


def test_to_dict_is_strict_json() -> None:
    votes = scripted("bo", never_sure) + scripted("ana", always_right)
    review: CandidateReview = review_figures(votes)["fp8-b"]
    data = to_dict(review)
    text = json.dumps(data, allow_nan=False)  # raises if a NaN got through
    back = json.loads(text)
    assert back == data
    assert set(back) == {"overall", "by_reviewer", "told_apart"}
    overall = back["overall"]
    assert overall["votes"] == review.overall.votes
    for name in RATE_NAMES:
        rate = getattr(review.overall, name)
        assert overall[name] == {
            "value": rate.value,
            "low": rate.low,
            "high": rate.high,
            "successes": rate.successes,
            "total": rate.total,
        }
    assert list(back["by_reviewer"]) == ["ana", "bo"]
    assert back["by_reviewer"]["bo"]["pick_accuracy"] == {
        "value": None,
        "low": None,
        "high": None,
        "successes": 0,
        "total": 0,
    }
    assert back["told_apart"] == [
        {"sample_id": t.sample_id, "correct": t.correct, "votes": t.votes} for t in review.told_apart
    ]
    assert back["told_apart"]
