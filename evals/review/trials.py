"""Which pair a reviewer sees next, and on which side the reference is shown.

The order comes from a generator seeded by (seed, reviewer), so it is reproducible, and each round
holds every (candidate, sample) pair once, so every sample gets its share of votes. The seed is
recorded per reviewer in review-seeds.json beside reviews.jsonl: a reviewer who comes back continues
the same order at the count of their votes already written. Imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from evals.models.names import check_name
from evals.models.yamlspec import InputError
from evals.review.votes import SIDES, Vote
from evals.rundir import write_json

SEEDS_FILE = "review-seeds.json"
_seeds_lock = threading.Lock()  # one server answers several starts at once


@dataclass(frozen=True)
class Trial:
    index: int
    """Position in the reviewer's order (the Vote's `trial`)."""
    candidate: str
    sample_id: str
    reference_side: str
    """left or right: where the reference's image is shown."""


def _generator(seed: int, reviewer: str) -> random.Random:
    """One stream per (seed, reviewer): two reviewers with one seed still see different orders."""
    digest = hashlib.sha256(f"{seed}\0{reviewer}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def trial_order(pairs: list[tuple[str, str]], reviewer: str, seed: int, rounds: int = 1) -> list[Trial]:
    """`rounds` rounds, each every distinct (candidate, sample_id) pair once in a shuffled order, the
    reference's side drawn per trial from the same generator. The pairs are sorted first, so the
    order does not depend on the order they were listed in."""
    ordered = sorted(set(pairs))
    rng = _generator(seed, reviewer)
    trials: list[Trial] = []
    for _ in range(rounds):
        shuffled = list(ordered)
        rng.shuffle(shuffled)
        for candidate, sample_id in shuffled:
            trials.append(Trial(len(trials), candidate, sample_id, rng.choice(SIDES)))
    return trials


def read_seeds(run_dir: Path) -> dict[str, int]:
    """Reviewer -> seed ({} before the first start); a malformed file is an InputError (a run
    directory may come from elsewhere)."""
    path = run_dir / SEEDS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"not JSON: {exc}", source=str(path)) from exc
    if not isinstance(data, dict):
        raise InputError("expected an object of reviewer -> seed", source=str(path))
    for reviewer, seed in data.items():
        check_name(reviewer, f"{path}: reviewer")
        if type(seed) is not int or seed < 0:
            raise InputError(f"seed of {reviewer!r}: {seed!r}, expected an integer >= 0", source=str(path))
    return data


def reviewer_seed(run_dir: Path, reviewer: str, seed: int | None = None) -> int:
    """The reviewer's recorded seed; on their first start `seed` (a random one when None) is recorded,
    keeping the other reviewers' entries. A `seed` that contradicts the recorded one is an InputError:
    the reviewer's votes so far were given in the recorded order."""
    check_name(reviewer, "reviewer")
    with _seeds_lock:
        seeds = read_seeds(run_dir)
        if reviewer in seeds:
            if seed is not None and seed != seeds[reviewer]:
                raise InputError(
                    f"reviewer {reviewer!r} started with seed {seeds[reviewer]} ({run_dir / SEEDS_FILE}); "
                    f"seed {seed} would change the order of their remaining trials"
                )
            return seeds[reviewer]
        chosen = secrets.randbits(63) if seed is None else seed
        if chosen < 0:
            raise InputError(f"seed {chosen}: expected an integer >= 0")
        write_json(run_dir / SEEDS_FILE, {**seeds, reviewer: chosen})
        return chosen


def next_index(votes: list[Vote], reviewer: str) -> int:
    """Where a returning reviewer continues: each of their votes answered one trial, in order."""
    return sum(1 for vote in votes if vote.reviewer == reviewer)
