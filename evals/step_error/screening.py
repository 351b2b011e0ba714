"""screening.jsonl: every sample's step error, scored before any candidate image is generated.

A suite that scores step error screens first: each batch's reference trajectory (from the cache or
recorded while the reference generates), then each candidate's transformer teacher-forced on it. One
line per (candidate, sample), flushed as it is written, so a resumed run screens only what is left.
The summaries' step_error and step_cosine come from here, over every sample of the suite, also when
images are generated for a subset only (`images: {sample: N}`). Imports no torch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evals.models.names import check_name
from evals.models.yamlspec import InputError
from evals.rundir import SyncedLines

if TYPE_CHECKING:
    from evals.step_error.trajectory import StepErrors
    from evals.suite_types import Sample

log = logging.getLogger(__name__)

SCREENING_FILE = "screening.jsonl"
STEP_METRICS = ("step_error", "step_cosine")
"""The outputs screening scores (evals.metrics: the step_error metric's)."""


@dataclass(frozen=True)
class Screened:
    """One candidate's step error on one sample: the mean over the recorded steps and each step's."""

    policy: str
    sample_id: str
    tags: tuple[str, ...]
    step_error: float
    step_cosine: float
    steps: dict[str, list[float]]
    """{step: [indices], error: [relative L2], cosine: [...]}, as a record's `steps`."""

    @property
    def metrics(self) -> dict[str, float]:
        return {"step_error": self.step_error, "step_cosine": self.step_cosine}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Screened:
        if not isinstance(data, dict) or set(data) != {f for f in cls.__dataclass_fields__}:
            raise ValueError(f"expected the keys {sorted(cls.__dataclass_fields__)}")
        check_name(data["policy"], "policy")
        check_name(data["sample_id"], "sample_id")
        if not isinstance(data["tags"], list) or not all(isinstance(t, str) for t in data["tags"]):
            raise ValueError("tags: expected a list of strings")
        for key in STEP_METRICS:
            if type(data[key]) not in (int, float):
                raise ValueError(f"{key} {data[key]!r}: expected a number")
        steps = data["steps"]
        lengths = (
            {k: len(v) if isinstance(v, list) else -1 for k, v in steps.items()} if isinstance(steps, dict) else {}
        )
        if set(lengths) != {"step", "error", "cosine"} or len(set(lengths.values())) != 1 or -1 in lengths.values():
            raise ValueError(f"steps {steps!r}: expected lists step, error and cosine of one length")
        return cls(**{**data, "tags": tuple(data["tags"])})


def check_steps(steps: object) -> None:
    """A record's or screening line's `steps`: lists step, error and cosine of one length, or ValueError."""
    lengths = {k: len(v) if isinstance(v, list) else -1 for k, v in steps.items()} if isinstance(steps, dict) else {}
    if set(lengths) != {"step", "error", "cosine"} or len(set(lengths.values())) != 1 or -1 in lengths.values():
        raise ValueError(f"steps {steps!r}: expected lists step, error and cosine of one length")


def screened_batch(policy: str, batch: list[Sample], errors: StepErrors, steps: tuple[int, ...]) -> list[Screened]:
    """The batch's screening lines for one candidate, from its teacher-forced step errors."""
    return [
        Screened(
            policy=policy,
            sample_id=sample.id,
            tags=sample.case.tags,
            step_error=float(errors.relative[i].mean()),
            step_cosine=float(errors.cosine[i].mean()),
            steps={"step": list(steps), "error": errors.relative[i].tolist(), "cosine": errors.cosine[i].tolist()},
        )
        for i, sample in enumerate(batch)
    ]


class ScreeningWriter(SyncedLines):
    """Append-only screening.jsonl, each batch synced as it is written."""

    def write(self, lines: Iterable[Screened]) -> None:
        self.write_lines(line.to_json() for line in lines)


def _lines(path: Path) -> Iterator[tuple[int, Screened | Exception]]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield line_no, Screened.from_dict(json.loads(raw.decode("utf-8")))
            except (ValueError, TypeError, KeyError, InputError, RecursionError) as exc:
                yield line_no, exc


def read_screening(run_dir: Path) -> list[Screened]:
    """The run's screening lines ([] when it screened nothing); a bad line is an InputError naming
    the file and line (run directories can come from elsewhere)."""
    path = run_dir / SCREENING_FILE
    if not path.is_file():
        return []
    found = []
    for line_no, item in _lines(path):
        if isinstance(item, Exception):
            raise InputError(f"bad screening line: {item}", source=str(path), line=line_no) from item
        found.append(item)
    return found


def keep_usable_screening(run_dir: Path, names: set[str], sample_ids: set[str]) -> set[tuple[str, str]]:
    """(candidate, sample id) of the screening lines a resume keeps; the file is rewritten without
    the others (each named in a warning), so every sample ends screened exactly once."""
    from evals.rundir import write_atomic

    path = run_dir / SCREENING_FILE
    if not path.is_file():
        return set()
    kept: list[str] = []
    done: set[tuple[str, str]] = set()
    for line_no, item in _lines(path):
        if isinstance(item, Exception):
            log.warning(f"{path}:{line_no}: dropped, screened again ({item})")
            continue
        key = (item.policy, item.sample_id)
        if item.policy not in names or item.sample_id not in sample_ids or key in done:
            why = "a second copy" if key in done else "not a sample of this run"
            log.warning(f"{path}:{line_no}: dropped ({why})")
            continue
        done.add(key)
        kept.append(item.to_json())
    write_atomic(path, "".join(line + "\n" for line in kept))
    return done


def by_policy(screened: Iterable[Screened]) -> dict[str, list[Screened]]:
    out: dict[str, list[Screened]] = {}
    for item in screened:
        out.setdefault(item.policy, []).append(item)
    return out
