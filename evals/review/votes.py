"""reviews.jsonl: the votes of a blind A/B review, in the run directory beside records.jsonl.

One vote a line, appended, flushed and synced before the reviewer's next trial is shown, so a killed
server loses none. The file may come from elsewhere (a run directory is shared): every line is
checked on read, and a bad one is an InputError naming the file and line. Imports no torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from evals.models.names import check_name
from evals.models.yamlspec import InputError
from evals.rundir import SyncedLines

REVIEWS_FILE = "reviews.jsonl"
SCHEMA_VERSION = 1
ANSWERS = ("left", "right", "cant_tell")
"""left / right: that side is the original (the reference); cant_tell: the reviewer cannot say."""
SIDES = ("left", "right")
MAX_SECONDS = 24 * 3600.0


@dataclass(frozen=True)
class Vote:
    reviewer: str
    """Who voted (a safe name: several people review one run)."""
    candidate: str
    """The candidate whose image was paired with the reference's."""
    sample_id: str
    """The sample both images are of."""
    reference_side: str
    """Where the reference was shown: left or right."""
    answer: str
    """left / right (that side is the original) or cant_tell."""
    seconds: float
    """From the pair being shown to the answer."""
    trial: int
    """The trial's index in the reviewer's seeded order (evals.review.trials)."""
    schema_version: int = SCHEMA_VERSION

    @property
    def picked(self) -> bool:
        return self.answer != "cant_tell"

    @property
    def correct(self) -> bool:
        """A pick of the side the reference was on."""
        return self.answer == self.reference_side

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> Vote:
        if not isinstance(data, dict) or set(data) != set(cls.__dataclass_fields__):
            raise ValueError(f"expected the keys {sorted(cls.__dataclass_fields__)}")
        if data["schema_version"] != SCHEMA_VERSION:
            raise ValueError(f"schema_version {data['schema_version']!r}, this version reads {SCHEMA_VERSION}")
        for key in ("reviewer", "candidate", "sample_id"):
            check_name(data[key], key)
        if data["reference_side"] not in SIDES:
            raise ValueError(f"reference_side {data['reference_side']!r}: expected one of {SIDES}")
        if data["answer"] not in ANSWERS:
            raise ValueError(f"answer {data['answer']!r}: expected one of {ANSWERS}")
        seconds = data["seconds"]
        if type(seconds) not in (int, float) or not math.isfinite(seconds) or not 0 <= seconds <= MAX_SECONDS:
            raise ValueError(f"seconds {seconds!r}: expected a number from 0 to {MAX_SECONDS:g}")
        if type(data["trial"]) is not int or data["trial"] < 0:
            raise ValueError(f"trial {data['trial']!r}: expected an integer >= 0")
        return cls(**{**data, "seconds": float(seconds)})


class VotesWriter(SyncedLines):
    """Appends votes to reviews.jsonl, each synced before `write` returns (the page's server answers
    several requests at once: SyncedLines is thread-safe)."""

    def write(self, vote: Vote) -> None:
        self.write_lines([vote.to_json()])


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if raw.strip():
                yield line_no, raw


def read_votes(run_dir: Path) -> list[Vote]:
    """Every vote of the run ([] before the first); a bad line is an InputError naming file and line.
    A last line cut short (a server killed mid-write) is the one exception: it is left out, since the
    vote it held was never confirmed to the reviewer."""
    path = run_dir / REVIEWS_FILE
    if not path.is_file():
        return []
    lines = list(_lines(path))
    votes = []
    for line_no, raw in lines:
        try:
            votes.append(Vote.from_dict(json.loads(raw.decode("utf-8"))))
        except (ValueError, TypeError, KeyError, InputError, RecursionError) as exc:
            torn = line_no == lines[-1][0] and not raw.endswith(b"\n")
            if torn:
                break
            raise InputError(f"bad vote: {exc}", source=str(path), line=line_no) from exc
    return votes
